"""BLIS in the loop: replay a measured workload through a user's ``blis`` binary with a
release's ``defaults.yaml`` and score BLIS's per-request latencies like our own replay.

Per experiment (only those with ground truth), in one temporary folder removed afterwards:

1. **the release, as BLIS reads it** — ``release/defaults.yaml`` (the release's bytes,
   verbatim), ``release/hardware_config.json`` and ``release/model_configs/<name>/
   config.json`` beside it (BLIS resolves both relative to ``--defaults-filepath``). A GPU
   or model the release never saw is added to the *copy* from the experiment's own
   configuration (listed under ``blis.supplemented`` in the report), so a zero-shot
   workload runs like ours does; the release itself is never written.
2. **a TraceV2 trace** of the measured workload — ``trace.yaml`` (header) and
   ``trace.csv`` (one row per request, :data:`TRACE_COLUMNS`).
3. ``blis replay`` (:func:`blis_command`), stdout and stderr captured, with a timeout.
4. **BLIS's per-request results** (``--results-path``: a JSON list of SimResult) turned
   into the report of :func:`blis_model.requests.latency.latency_table`.

TraceV2 as written here (BLIS ``sim/workload/tracev2.go``):

* header YAML, parsed strictly (unknown keys are fatal): ``trace_version: 2``,
  ``time_unit: microseconds``, ``mode: real`` (measured on a real server),
  ``warm_up_requests: 0`` and ``server`` — ``type: vllm``, ``model``,
  ``tensor_parallel``, ``max_num_seqs``, ``block_size``, ``max_model_len``. The header
  has no field for ``max_num_batched_tokens`` or the KV blocks, and BLIS configures its
  engine from flags, not from the header: the limits go on the command line.
* CSV, header row then one row per request in workload order: ``request_id`` = the
  request's position (0-based; BLIS names it ``request_<id>`` and reports it back),
  ``arrival_time_us`` = ``send_time_us`` = the client send time in integer µs from the
  first request (BLIS injects at ``send_time_us`` when > 0, else at the arrival),
  ``input_tokens`` = prompt tokens *after* the shared prefix, ``output_tokens`` = the
  tokens the server generated, ``prefix_group`` / ``prefix_length`` = the shared prefix
  (BLIS prepends ``prefix_length`` tokens shared by every request of the group, so its
  prefix cache hits them; at least one prompt token stays outside the prefix, as vLLM
  always computes the last one), ``streaming = true``, ``deadline_us = 0`` (the server
  never aborted client time-outs), ``first_chunk_time_us`` / ``last_chunk_time_us`` =
  send + measured TTFT / E2E (0 when not measured: BLIS only needs them for
  ``blis calibrate``), ``status`` ``ok`` / ``error``; every other column empty or 0.

Command (BLIS ``cmd/replay.go``, ``cmd/root.go`` ``registerSimConfigFlags``)::

    blis replay --trace-header trace.yaml --trace-data trace.csv --results-path results.json
        --latency-model trained-physics --defaults-filepath release/defaults.yaml
        --model <model id, lower-cased> --hardware <GPU> --tp <TP>
        --total-kv-blocks <KV blocks> --block-size-in-tokens <block size>
        --max-num-running-reqs <max_num_seqs> --max-num-scheduled-tokens <max_num_batched_tokens>
        [--max-model-len <max_model_len>] --horizon 9223372036854775807 --seed 42 --log warn

The coefficients are NOT passed as flags: BLIS loads ``trained_physics_coefficients``
from the release's ``defaults.yaml`` itself, which is what this check is for. The model
id is lower-cased because BLIS looks its config up as ``model_configs/<id after the
org>`` verbatim (and would fetch it from HuggingFace when missing); releases name that
folder lower-cased. The scheduler limits use the flag names every BLIS version we read
accepts (``--max-num-running-reqs`` / ``--max-num-scheduled-tokens``; recent versions
call them deprecated aliases of ``--max-num-seqs`` / ``--max-num-batched-tokens``). The
horizon is unbounded so overloaded runs drain, as in our replay (BLIS's replay default
is twice the last arrival).

Results (BLIS ``sim/workload/calibrate.go`` ``SimResult``, ``cmd/replay.go``
``extractSimResults``): a JSON list, one object per *completed* request, sorted by id:
``request_id``, ``ttft_us`` and ``e2e_us`` (server-side µs from arrival: TTFT includes
α0 and α2, E2E includes α1), ``input_tokens``, ``output_tokens`` and optionally
``slo_class``, ``model``, ``itl_mean_us``. A request missing from the list did not
complete. ITL is scored as ``(E2E − TTFT) / (n − 1)`` with the workload's ``n`` output
tokens — the definition of the measured ITL (``latency.measured_latencies``) — not
BLIS's ``itl_mean_us``.

Sources (github.com/inference-sim/inference-sim, read through the stored index):
``sim/workload/tracev2.go`` @ 0045b72691ecf9a9cb82ad3170e9c6a8e060f531 (TraceHeader,
TraceServerConfig, TraceRecord, CSV columns, strict header parsing);
``sim/workload/replay.go`` @ 195cdffa95e746906b37722436119ccaab7e6258
(LoadTraceV2Requests: request ids, injection time, prefix groups);
``cmd/replay.go`` and ``cmd/root.go`` @ 017fcd98c3ee16b2dbcd1cd9793e151b3de36f04 (replay
flags, ``--results-path``, horizon, extractSimResults); ``cmd/root.go``
``registerSimConfigFlags`` and ``resolveLatencyConfig`` in a later stored version (commit
not recorded by the index: flag names, the deprecated aliases of issue #1570,
trained-physics coefficients read from ``defaults.yaml`` unless given as flags);
``cmd/hfconfig.go`` @
06883b16236143142b379b626b53f166fc7f89ca (model_configs/ and hardware_config.json
resolved beside ``--defaults-filepath``); ``sim/workload/calibrate.go`` @
0c91ac06968bc35b41cf008cc5029cec61a22fdd (SimResult). Not verified against a running
``blis`` binary: the tests use a fake one that records its arguments.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from blis_model.configuration.experiment import Experiment
from blis_model.errors import BlisModelError, ReleaseError
from blis_model.releases.build import blis_model_config_name, read_hf_config
from blis_model.releases.files import DEFAULTS, HARDWARE_CONFIG, MODEL_CONFIGS
from blis_model.releases.read import Release, read_file
from blis_model.requests.latency import NO_SUMS, Replayed, latency_table
from blis_model.requests.measured import MeasuredExperiment
from blis_model.storage import redact, storage_options_for

TRACE_COLUMNS = (
    "request_id", "client_id", "tenant_id", "slo_class", "session_id", "round_index",
    "prefix_group", "prefix_length", "streaming", "input_tokens", "output_tokens",
    "text_tokens", "image_tokens", "audio_tokens", "video_tokens", "reason_ratio",
    "model", "deadline_us", "server_input_tokens",
    "arrival_time_us", "send_time_us", "first_chunk_time_us", "last_chunk_time_us",
    "num_chunks", "status", "error_message", "finish_reason",
)
"""BLIS TraceV2 CSV columns, in the order BLIS's positional parser reads them."""
TRACE_VERSION = 2
UNBOUNDED_HORIZON = 2**63 - 1  # BLIS ticks are µs; math.MaxInt64: run until drained
SEED = 42
TIMEOUT_S = 1800.0
RESULTS = "results.json"
SCHEDULER_FLAGS = {"max_num_seqs": "--max-num-running-reqs",
                   "max_num_batched_tokens": "--max-num-scheduled-tokens"}
"""Scheduler-limit flags accepted by every BLIS version read (see the module doc)."""


class BlisRunError(BlisModelError):
    """The BLIS binary is missing, failed, timed out or wrote no usable results."""


def _last_line(text: str) -> str:
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no stderr)"


def blis_model_id(model: str) -> str:
    """The ``--model`` BLIS gets: the id lower-cased, so ``model_configs/<id after the
    org>`` is the release's (lower-cased) folder."""
    return model.strip().lower()


# ----------------------------------------------------------------------------- trace


def trace_header(item: MeasuredExperiment) -> dict[str, Any]:
    """The TraceV2 header of ``item`` (only keys BLIS's strict parser knows)."""
    limits, server = item.limits, item.experiment.server
    block: dict[str, Any] = {"type": "vllm", "model": blis_model_id(server.model),
                             "tensor_parallel": int(server.tensor_parallelism),
                             "max_num_seqs": int(limits.max_num_seqs),
                             "block_size": int(limits.block_size)}
    if limits.max_model_len:
        block["max_model_len"] = int(limits.max_model_len)
    return {"trace_version": TRACE_VERSION, "time_unit": "microseconds", "mode": "real",
            "warm_up_requests": 0, "server": block}


def _measured_us(item: MeasuredExperiment) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    req = item.measurements.requests
    errors = np.asarray(req.column("has_error").to_numpy(zero_copy_only=False), bool)
    return item.ttft_us, item.e2e_us, errors


def trace_rows(item: MeasuredExperiment) -> list[list[str]]:
    """One TraceV2 CSV row (:data:`TRACE_COLUMNS`) per request, in workload order."""
    w = item.workload
    arrival = np.maximum(np.rint(w.arrival_us), 0).astype(np.int64)
    ttft, e2e, errors = _measured_us(item)
    rows = []
    for i in range(len(w)):
        prompt = int(w.prompt_tokens[i])
        group = int(w.prefix_group[i])
        prefix = min(int(w.prefix_tokens[i]), prompt - 1) if group >= 0 else 0
        sent = int(arrival[i])
        first = sent + int(round(ttft[i])) if math.isfinite(ttft[i]) else 0
        last = sent + int(round(e2e[i])) if math.isfinite(e2e[i]) else 0
        row = {"request_id": str(i), "round_index": "0",
               "prefix_group": f"g{group}" if group >= 0 and prefix > 0 else "",
               "prefix_length": str(prefix if group >= 0 else 0), "streaming": "true",
               "input_tokens": str(prompt - prefix), "output_tokens": str(int(w.output_tokens[i])),
               "text_tokens": "0", "image_tokens": "0", "audio_tokens": "0",
               "video_tokens": "0", "reason_ratio": "0", "deadline_us": "0",
               "server_input_tokens": "0", "arrival_time_us": str(sent),
               "send_time_us": str(sent), "first_chunk_time_us": str(first),
               "last_chunk_time_us": str(last), "num_chunks": "0",
               "status": "error" if errors[i] else "ok"}
        rows.append([row.get(c, "") for c in TRACE_COLUMNS])
    return rows


def write_trace(item: MeasuredExperiment, header_path: Path, data_path: Path) -> None:
    """Write ``item``'s TraceV2 header (YAML) and data (CSV)."""
    header_path.write_text(yaml.safe_dump(trace_header(item), sort_keys=False))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TRACE_COLUMNS)
    writer.writerows(trace_rows(item))
    data_path.write_text(buf.getvalue())


# ------------------------------------------------------------------------- release


class _ReleaseCopy:
    """The release's BLIS files in a local folder, completed for the experiments run."""

    def __init__(self, release: Release, folder: Path) -> None:
        self.release, self.folder = release, folder
        self.options = storage_options_for(release.url)
        folder.mkdir(parents=True)
        (folder / DEFAULTS).write_bytes(read_file(release.url, DEFAULTS, self.options))
        try:
            raw = read_file(release.url, HARDWARE_CONFIG, self.options)
            self.hardware: dict[str, Any] = json.loads(raw)
        except (ReleaseError, json.JSONDecodeError):
            self.hardware = {}
        self.supplemented: list[str] = []
        self._write_hardware()

    @property
    def defaults(self) -> Path:
        return self.folder / DEFAULTS

    def _write_hardware(self) -> None:
        (self.folder / HARDWARE_CONFIG).write_text(json.dumps(self.hardware, indent=2) + "\n")

    def prepare(self, experiment: Experiment) -> None:
        """Make sure BLIS finds the experiment's GPU and model config beside defaults.yaml."""
        gpu = experiment.hardware.name
        if gpu not in self.hardware:
            self.hardware[gpu] = experiment.hardware.to_blis()
            self.supplemented.append(f"{HARDWARE_CONFIG}:{gpu}")
            self._write_hardware()
        name = blis_model_config_name(experiment.server.model)
        rel = f"{MODEL_CONFIGS}/{name}/config.json"
        target = self.folder / rel
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.write_bytes(read_file(self.release.url, rel, self.options))
        except ReleaseError:
            config = read_hf_config(experiment, storage_options_for(experiment.url))
            target.write_text(json.dumps(config, indent=2) + "\n")
            self.supplemented.append(rel)


# ------------------------------------------------------------------------- command


def blis_command(blis: str, item: MeasuredExperiment, defaults: Path, header: Path,
                 data: Path, results: Path) -> list[str]:
    """The ``blis replay`` argv for one experiment (see the module doc)."""
    limits, server = item.limits, item.experiment.server
    argv = [blis, "replay", "--trace-header", str(header), "--trace-data", str(data),
            "--results-path", str(results), "--latency-model", "trained-physics",
            "--defaults-filepath", str(defaults), "--model", blis_model_id(server.model),
            "--hardware", item.experiment.hardware.name,
            "--tp", str(int(server.tensor_parallelism)),
            "--total-kv-blocks", str(int(limits.num_gpu_blocks)),
            "--block-size-in-tokens", str(int(limits.block_size)),
            SCHEDULER_FLAGS["max_num_seqs"], str(int(limits.max_num_seqs)),
            SCHEDULER_FLAGS["max_num_batched_tokens"], str(int(limits.max_num_batched_tokens))]
    if limits.max_model_len:
        argv += ["--max-model-len", str(int(limits.max_model_len))]
    return argv + ["--horizon", str(UNBOUNDED_HORIZON), "--seed", str(SEED), "--log", "warn"]


def _run(argv: list[str], cwd: Path, blis: str, name: str, timeout_s: float) -> None:
    """Run one BLIS command; any failure is a :class:`BlisRunError` naming ``blis``."""
    try:
        proc = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=timeout_s, check=False)
    except FileNotFoundError:
        raise BlisRunError(f"BLIS binary {blis} not found (experiment {name})") from None
    except PermissionError:
        raise BlisRunError(f"BLIS binary {blis} is not executable (experiment {name})"
                           ) from None
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (
            exc.stderr or "")
        raise BlisRunError(f"BLIS binary {blis} timed out after {timeout_s:g} s on experiment "
                           f"{name}: {_last_line(stderr)}") from None
    except OSError as exc:
        raise BlisRunError(f"BLIS binary {blis} cannot run (experiment {name}): {exc}"
                           ) from None
    if proc.returncode != 0:
        raise BlisRunError(f"BLIS binary {blis} failed on experiment {name} (exit "
                           f"{proc.returncode}): {_last_line(proc.stderr)}")


# ------------------------------------------------------------------------- results


def read_results(path: Path, n: int, blis: str, name: str) -> dict[int, dict[str, float]]:
    """BLIS's SimResult list, by request id (ids outside the workload are an error)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BlisRunError(f"BLIS binary {blis} wrote no results file on experiment {name} "
                           "(--results-path)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BlisRunError(f"BLIS binary {blis}: results of experiment {name} are not JSON "
                           f"({exc})") from None
    if data is None:
        data = []
    if not isinstance(data, list):
        raise BlisRunError(f"BLIS binary {blis}: results of experiment {name} are not a list "
                           "of per-request results")
    out: dict[int, dict[str, float]] = {}
    for entry in data:
        try:
            rid = int(entry["request_id"])
            ttft, e2e = float(entry["ttft_us"]), float(entry["e2e_us"])
            n_out = int(entry.get("output_tokens", 0) or 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise BlisRunError(f"BLIS binary {blis}: a result of experiment {name} lacks "
                               f"request_id / ttft_us / e2e_us ({exc!r})") from None
        if not 0 <= rid < n:
            raise BlisRunError(f"BLIS binary {blis}: experiment {name} has {n} requests, "
                               f"BLIS reported request_id {rid}")
        out[rid] = {"ttft_us": ttft, "e2e_us": e2e, "output_tokens": n_out}
    return out


def blis_replayed(item: MeasuredExperiment, results: dict[int, dict[str, float]],
                  seconds: float) -> Replayed:
    """BLIS's results as a :class:`Replayed` (no step table, no fit sums)."""
    n = len(item.workload)
    ttft, e2e = np.full(n, np.nan), np.full(n, np.nan)
    for rid, r in results.items():
        ttft[rid], e2e[rid] = r["ttft_us"], r["e2e_us"]
    n_out = item.workload.output_tokens.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        itl = np.where(n_out > 1, (e2e - ttft) / (n_out - 1), np.nan)
    status = np.where(np.isfinite(e2e), "finished", "not_completed")
    empty = np.zeros(0)
    return Replayed(item.name, item.config_key, 0, seconds,
                    pa.table({"status": pa.array(status.tolist(), pa.string())}),
                    {"ttft": ttft, "itl": itl, "e2e": e2e}, NO_SUMS, NO_SUMS, empty, empty,
                    empty, empty)


def blis_report(item: MeasuredExperiment, results: dict[int, dict[str, float]],
                seconds: float) -> dict[str, Any]:
    """``latency_table``'s report of BLIS's results (``steps`` is unknown: None), with
    how many completed requests BLIS counted a different number of output tokens for."""
    report = latency_table(item, blis_replayed(item, results, seconds))
    out = item.workload.output_tokens
    report["steps"] = None
    report["blis"] = {"seconds": seconds, "token_mismatches": int(sum(
        1 for rid, r in results.items() if r["output_tokens"] and r["output_tokens"] != out[rid]))}
    return report


# ----------------------------------------------------------------------------- run


def run_blis(blis: str, release: Release, items: Sequence[MeasuredExperiment],
             workload_url: str, timeout_s: float = TIMEOUT_S) -> dict[str, dict[str, Any]]:
    """Replay every experiment of ``items`` that has ground truth through the BLIS binary
    ``blis`` with ``release``'s ``defaults.yaml``; per experiment, the report shape of
    ``latency_table`` (plus ``blis``: binary, release, workload, run seconds, files added
    to the release copy). Raises :class:`BlisRunError` naming the binary, the experiment
    and BLIS's last stderr line when a run fails."""
    scored = [item for item in items if item.targets.any()]
    if not scored:
        return {}
    path = shutil.which(blis) or (blis if os.sep in blis else None)
    if path is None or not os.path.isfile(path):
        raise BlisRunError(f"BLIS binary {blis} not found (experiment {scored[0].name})")
    if not os.access(path, os.X_OK):
        raise BlisRunError(f"BLIS binary {blis} is not executable (experiment "
                           f"{scored[0].name})")
    path = os.path.abspath(path)
    reports: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="blis-model-blis-") as tmp:
        root = Path(tmp)
        copy = _ReleaseCopy(release, root / "release")
        for k, item in enumerate(scored):
            folder = root / f"experiment-{k}"
            folder.mkdir()
            copy.prepare(item.experiment)
            header, data, results = folder / "trace.yaml", folder / "trace.csv", folder / RESULTS
            write_trace(item, header, data)
            argv = blis_command(path, item, copy.defaults, header, data, results)
            start = time.perf_counter()
            _run(argv, folder, blis, item.name, timeout_s)
            seconds = time.perf_counter() - start
            parsed = read_results(results, len(item.workload), blis, item.name)
            report = blis_report(item, parsed, seconds)
            report["blis"].update({"binary": blis, "release": redact(release.url),
                                   "workload": redact(workload_url),
                                   "supplemented": list(copy.supplemented)})
            reports[item.name] = report
    return reports


__all__ = ["SCHEDULER_FLAGS", "TRACE_COLUMNS", "BlisRunError", "blis_command", "blis_model_id",
           "blis_replayed", "blis_report", "read_results", "run_blis", "trace_header",
           "trace_rows", "write_trace"]
