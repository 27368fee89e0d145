"""Client-side request measurements: what a load generator saw of a real vLLM server.

BLIS users have per-request arrival times, token counts, TTFT and E2E measured by a load
generator (inference-perf), not server step traces. This module reads and validates them
(``../shared/docs/request-measurements.md``) into a :class:`Measurements` value, and writes
the same folder format (:func:`write_measurements`) for synthetic runs.

An experiment folder (local path, ``file://`` or ``s3://``) holds ``exp-config.yaml``,
``config.json`` and either

* ``requests.json[.gz]`` (the workload: ``index``, ``arrival_time_us``, ``input_tokens``,
  ``output_tokens`` as the client counted them, ``has_error``) + optional
  ``ground_truth.json[.gz]`` (``index``, ``has_error``, ``ttft_s``, ``e2e_s``) + optional
  ``inference-perf/`` (``profile.yaml``, ``config.yaml``, ``summary_lifecycle_metrics.json``,
  ``stage_<N>_lifecycle_metrics.json``), or
* inference-perf's native ``per_request_lifecycle_metrics.json`` (schema in
  :mod:`blis_model.ingest.inference_perf`) with its summary/stage/config files, at the top,
  under ``results/`` or under ``inference-perf/``.

**Every request is kept**, with a ``status`` (``ok`` | ``flagged`` | ``invalid``), its
primary ``reason`` and all its ``reasons`` (``|``-joined); see :data:`REASONS`.

**Output tokens.** The client's count (``output_tokens_recorded``) is a re-tokenization of
the streamed text and can be far below what the server generated. ``output_tokens`` is what
the server generated: for a completed request, the server's own count
(``usage.completion_tokens``, native files) when present, else — when ``ignore_eos`` was
set — the requested length (the request body's ``max_tokens``, else the workload's
``output_len``), else the recorded count (``output_tokens_source`` says which). Requests
with a client error keep the recorded count.

Times are µs: ``arrival_us`` from the first request's arrival (int), ``ttft_us`` and
``e2e_us`` as the client measured them (int, null when missing), ``itl_us`` =
(E2E − TTFT) / (output_tokens − 1) for ≥ 2 output tokens. The table is sorted by arrival
(then index); ``stage`` is the load stage of each request.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import yaml

from blis_model.configuration.experiment import EXP_CONFIG, ServerConfig, parse_server_config
from blis_model.configuration.kinds import (
    GROUND_TRUTH_FILES,
    INFERENCE_PERF_DIRS,
    PER_REQUEST_FILE,
    REQUEST_FILES,
)
from blis_model.errors import ConfigError, CorpusError
from blis_model.ingest.inference_perf import (
    LoadProfile,
    NativeRequest,
    finite_number,
    parse_native_record,
    parse_workload,
)
from blis_model.storage import filesystem, join, write_bytes_atomic

SUMMARY_FILE = "summary_lifecycle_metrics.json"
PROFILE_FILE = "profile.yaml"
EXPANDED_CONFIG_FILE = "config.yaml"  # inference-perf's dump of the configuration it ran
_STAGE_FILE = re.compile(r"^stage_(\d+)_lifecycle_metrics\.json$")

FORMAT_REQUESTS = "requests"  # requests.json + ground_truth.json
FORMAT_INFERENCE_PERF = "inference-perf"  # per_request_lifecycle_metrics.json

OK, FLAGGED, INVALID = "ok", "flagged", "invalid"

#: Every validation reason, in order of precedence (the first that applies is ``reason``).
REASONS: dict[str, str] = {
    "duplicate_index": "the request's index occurs more than once (in requests or ground "
                       "truth): its timing cannot be matched",
    "client_error": "the client recorded an error or a timeout (has_error); the server may "
                    "still have carried the request",
    "no_ground_truth": "no ground-truth timing (TTFT/E2E) for the request",
    "impossible_times": "arrival, TTFT or E2E missing/NaN, TTFT <= 0, E2E < TTFT, or "
                        "streamed token times out of order or outside the request",
    "invalid_token_counts": "input tokens missing or <= 0, or recorded output tokens "
                            "missing/negative with no generated count known",
    "zero_output_tokens": "the client recorded 0 output tokens (flagged, generated count used "
                          "when known; invalid otherwise)",
    "token_count_mismatch": "the recorded output-token count cannot match the request: it "
                            "differs from the generated count by more than the tolerance "
                            "(flagged, generated count used), or, with no generated count, "
                            "the decode time is far too long for it (invalid)",
    "arrival_unsorted": "the request arrives before an earlier entry of the file (flagged; "
                        "the table is sorted by arrival)",
}
_ALWAYS_INVALID = {"duplicate_index", "client_error", "no_ground_truth", "impossible_times",
                   "invalid_token_counts"}

#: Relative tolerance between recorded and generated output tokens (client
#: re-tokenization noise stays within a few %).
DEFAULT_TOKEN_TOLERANCE = 0.10
#: With no generated count known: a decode time above this many times the experiment's
#: median per-token time x (recorded tokens − 1) cannot come from that many tokens.
DEFAULT_TIMING_FACTOR = 5.0

REQUEST_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("index", pa.int64()),
    ("arrival_us", pa.int64()),
    ("stage", pa.int32()),
    ("input_tokens", pa.int64()),
    ("output_tokens_recorded", pa.int64()),
    ("output_tokens", pa.int64()),
    ("output_tokens_source", pa.string()),  # server_usage | ignore_eos | recorded
    ("has_error", pa.bool_()),
    ("error", pa.string()),
    ("ttft_us", pa.int64()),
    ("e2e_us", pa.int64()),
    ("itl_us", pa.float64()),
    ("valid", pa.bool_()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("reasons", pa.string()),
)
REQUEST_SCHEMA = pa.schema([pa.field(n, t) for n, t in REQUEST_COLUMNS])
TOKEN_TIMES_COLUMN = "token_times_us"  # list<int64>, native files only: µs, same origin


# -- values --------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasurementValidation:
    """Validation of one experiment's requests. ``reasons`` counts requests per reason (a
    request may have several); ``examples`` gives a few per reason; ``warnings`` are
    experiment-level findings (file disagreements, summary counts, ...)."""

    experiment: str
    n_requests: int
    n_ok: int
    n_flagged: int
    n_invalid: int
    reasons: dict[str, int]
    examples: dict[str, tuple[str, ...]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    unmatched_ground_truth: int = 0  # ground-truth entries with no request

    @property
    def n_usable(self) -> int:
        return self.n_ok + self.n_flagged

    @property
    def invalid_rate(self) -> float:
        return self.n_invalid / self.n_requests if self.n_requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "n_requests": self.n_requests,
                "n_ok": self.n_ok, "n_flagged": self.n_flagged, "n_invalid": self.n_invalid,
                "invalid_rate": self.invalid_rate, "reasons": dict(self.reasons),
                "examples": {k: list(v) for k, v in self.examples.items()},
                "warnings": list(self.warnings),
                "unmatched_ground_truth": self.unmatched_ground_truth}


@dataclass(frozen=True)
class Measurements:
    """One experiment's client-side request measurements (see the module doc)."""

    experiment: str
    url: str
    source_format: str  # FORMAT_REQUESTS | FORMAT_INFERENCE_PERF
    server: ServerConfig
    workload: LoadProfile | None
    requests: pa.Table  # REQUEST_SCHEMA (+ token_times_us from native files)
    validation: MeasurementValidation
    summary_metrics: dict[str, Any] | None = None  # summary_lifecycle_metrics.json as read
    stage_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)  # stage_<N>_...
    metadata: dict[str, Any] = field(default_factory=dict)  # requests.json top level, as read

    @property
    def num_gpu_blocks(self) -> int | None:
        return self.server.num_gpu_blocks

    @property
    def has_token_times(self) -> bool:
        return TOKEN_TIMES_COLUMN in self.requests.column_names

    def usable_requests(self) -> pa.Table:
        """The requests whose status is not ``invalid`` (still sorted by arrival)."""
        return self.requests.filter(self.requests.column("valid"))


# -- reading files -------------------------------------------------------------------


def _bytes(fs: Any, path: str, label: str, experiment: str) -> bytes:
    try:
        with fs.open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise CorpusError(f"experiment {experiment}: {label}: file not found") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise CorpusError(f"experiment {experiment}: {label}: truncated or corrupt gzip "
                              f"({exc})") from None
    return raw


def _json(fs: Any, path: str, label: str, experiment: str) -> Any:
    raw = _bytes(fs, path, label, experiment)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:  # json accepts NaN / Infinity, which Python writers emit
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno} column {exc.colno}" if hasattr(exc, "lineno") else "bytes"
        raise CorpusError(f"experiment {experiment}: {label}: not valid JSON at {where} "
                          f"({exc.msg if hasattr(exc, 'msg') else exc})") from None


def _yaml(fs: Any, path: str, label: str, experiment: str) -> Any:
    raw = _bytes(fs, path, label, experiment)
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({exc})", file=label, experiment=experiment) from None
    if not isinstance(data, Mapping):
        raise ConfigError("expected a mapping", file=label, experiment=experiment)
    return data


def _listing(fs: Any, path: str) -> set[str]:
    try:
        return {str(e).rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


@dataclass
class _Folder:
    """Which files an experiment folder holds (two or three listings, no reads)."""

    top: set[str]
    sub: dict[str, set[str]]  # inference-perf dir -> its names ("" = top)

    def find(self, *names: str) -> tuple[str, str] | None:
        """(dir, name) of the first of ``names`` found, searching the inference-perf dirs."""
        for d in INFERENCE_PERF_DIRS:
            for name in names:
                if name in self.sub.get(d, set()):
                    return d, name
        return None


def _folder(fs: Any, path: str) -> _Folder:
    top = _listing(fs, path)
    sub = {"": top}
    for d in INFERENCE_PERF_DIRS:
        if d and d in top:
            sub[d] = _listing(fs, f"{path}/{d}")
    return _Folder(top=top, sub=sub)


def _rel(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


# -- validation ----------------------------------------------------------------------


@dataclass
class _Columns:
    """Per-request raw values in file order (NaN / None for missing)."""

    index: np.ndarray  # int64
    arrival_us: np.ndarray  # float64, raw (any origin)
    input_tokens: np.ndarray  # float64
    recorded: np.ndarray  # float64
    generated: np.ndarray  # float64: generated count when known (completed requests)
    generated_source: list[str | None]
    has_error: np.ndarray  # bool
    error: list[str | None]
    ttft_us: np.ndarray  # float64
    e2e_us: np.ndarray  # float64
    has_truth: np.ndarray  # bool
    duplicate: np.ndarray  # bool
    bad_stream: np.ndarray  # bool: token times disordered / outside the request
    check_order: bool  # whether file order should be arrival order
    stage: np.ndarray | None = None  # int (−1 unknown), when the file gives it
    token_times_us: list[list[float]] | None = None  # raw origin


def _round(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), np.round(values), np.nan)


def _evaluate(c: _Columns, tolerance: float, timing_factor: float
              ) -> tuple[list[list[tuple[str, bool]]], np.ndarray, list[str | None]]:
    """Reasons per request (name, invalidating), the output tokens and their source."""
    n = len(c.index)
    ttft, e2e = _round(c.ttft_us), _round(c.e2e_us)
    with np.errstate(invalid="ignore"):
        bad_times = (~np.isfinite(c.arrival_us) | ~np.isfinite(ttft) | ~np.isfinite(e2e)
                     | (ttft <= 0) | (e2e < ttft) | c.bad_stream)
        bad_input = ~np.isfinite(c.input_tokens) | (c.input_tokens <= 0)
        bad_recorded = np.isfinite(c.recorded) & (c.recorded < 0)
    completed = ~c.has_error
    known = completed & np.isfinite(c.generated)
    output = np.where(known, c.generated, c.recorded)
    source: list[str | None] = [
        (c.generated_source[i] if known[i] else ("recorded" if math.isfinite(c.recorded[i])
                                                 else None)) for i in range(n)]
    # Median per-token decode time of plausible requests, for the timing check.
    usable = completed & ~bad_times & np.isfinite(c.recorded) & (c.recorded >= 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_token = (e2e - ttft) / (c.recorded - 1)
    median_itl = float(np.median(per_token[usable])) if usable.any() else math.nan
    if c.check_order:
        running = np.fmax.accumulate(np.where(np.isfinite(c.arrival_us), c.arrival_us, -np.inf))
        unsorted = np.zeros(n, bool)
        unsorted[1:] = np.isfinite(c.arrival_us[1:]) & (c.arrival_us[1:] < running[:-1])
    else:
        unsorted = np.zeros(n, bool)

    out: list[list[tuple[str, bool]]] = []
    for i in range(n):
        reasons: list[tuple[str, bool]] = []
        if c.duplicate[i]:
            reasons.append(("duplicate_index", True))
        if c.has_error[i]:
            reasons.append(("client_error", True))
        elif not c.duplicate[i]:  # a duplicate's timing is ambiguous: nothing more to check
            if not c.has_truth[i]:
                reasons.append(("no_ground_truth", True))
            elif bad_times[i]:
                reasons.append(("impossible_times", True))
            rec = c.recorded[i]
            if bad_input[i] or bad_recorded[i] or (not math.isfinite(rec) and not known[i]):
                reasons.append(("invalid_token_counts", True))
            elif rec == 0:
                reasons.append(("zero_output_tokens", not known[i]))
            elif known[i]:
                gen = c.generated[i]
                if not math.isfinite(rec) or abs(rec - gen) > tolerance * gen:
                    reasons.append(("token_count_mismatch", False))
            elif (c.has_truth[i] and not bad_times[i] and math.isfinite(median_itl)
                  and e2e[i] - ttft[i] > timing_factor * median_itl * max(rec - 1, 1)):
                reasons.append(("token_count_mismatch", True))
        if unsorted[i]:
            reasons.append(("arrival_unsorted", False))
        reasons.sort(key=lambda r: _ORDER[r[0]])
        out.append(reasons)
    return out, output, source


_ORDER = {name: i for i, name in enumerate(REASONS)}


def _example(c: _Columns, i: int, reason: str) -> str:
    idx = int(c.index[i])
    if reason == "client_error":
        e2e = c.e2e_us[i]
        extra = f", E2E {e2e / 1e6:.1f} s" if math.isfinite(e2e) else ""
        return f"index {idx}: {c.error[i] or 'has_error'}{extra}"
    if reason == "impossible_times":
        return (f"index {idx}: TTFT {_us(c.ttft_us[i])}, E2E {_us(c.e2e_us[i])}, "
                f"arrival {_us(c.arrival_us[i])}"
                + (", token times out of order/outside the request" if c.bad_stream[i] else ""))
    if reason in ("zero_output_tokens", "token_count_mismatch", "invalid_token_counts"):
        decode = c.e2e_us[i] - c.ttft_us[i]
        return (f"index {idx}: recorded {_n(c.recorded[i])} output tokens, generated "
                f"{_n(c.generated[i])}, input {_n(c.input_tokens[i])}, decode "
                f"{_us(decode)}")
    if reason == "arrival_unsorted":
        return f"index {idx}: arrival {_us(c.arrival_us[i])} before an earlier entry's"
    return f"index {idx}"


def _us(v: float) -> str:
    return f"{v / 1e6:.3f} s" if math.isfinite(v) else "missing"


def _n(v: float) -> str:
    return str(int(v)) if math.isfinite(v) else "unknown"


def _build(c: _Columns, experiment: str, workload: LoadProfile | None,
           stage_counts: list[int] | None, tolerance: float, timing_factor: float,
           warnings: list[str], unmatched: int, max_examples: int = 3
           ) -> tuple[pa.Table, MeasurementValidation]:
    n = len(c.index)
    reasons, output, source = _evaluate(c, tolerance, timing_factor)
    finite = np.isfinite(c.arrival_us)
    origin = float(c.arrival_us[finite].min()) if finite.any() else 0.0
    arrival = _round(c.arrival_us - origin)
    order = np.lexsort((c.index, np.where(finite, arrival, np.inf)))

    counts: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    status = []
    for i in range(n):
        rs = reasons[i]
        for name, _ in rs:
            counts[name] += 1
            ex = examples.setdefault(name, [])
            if len(ex) < max_examples:
                ex.append(_example(c, i, name))
        status.append(INVALID if any(inv for _, inv in rs) else FLAGGED if rs else OK)
    primary = [next((r for r, inv in rs if inv), rs[0][0] if rs else OK) for rs in reasons]

    ttft, e2e = _round(c.ttft_us), _round(c.e2e_us)
    with np.errstate(invalid="ignore", divide="ignore"):
        itl = np.where(np.isfinite(ttft) & np.isfinite(e2e) & (output >= 2),
                       (e2e - ttft) / (output - 1), np.nan)

    stage = _stages(c, arrival, order, workload, stage_counts, warnings)

    def ints(values: np.ndarray) -> pa.Array:
        v = values[order]
        mask = ~np.isfinite(v)
        return pa.array(np.where(mask, 0, v).astype(np.int64), pa.int64(), mask=mask)

    def take(values: Sequence[Any]) -> list[Any]:
        return [values[j] for j in order]

    arrays = {
        "index": pa.array(c.index[order], pa.int64()),
        "arrival_us": ints(arrival),
        "stage": pa.array(stage[order], pa.int32(), mask=stage[order] < 0),
        "input_tokens": ints(c.input_tokens),
        "output_tokens_recorded": ints(c.recorded),
        "output_tokens": ints(output),
        "output_tokens_source": pa.array(take(source), pa.string()),
        "has_error": pa.array(c.has_error[order], pa.bool_()),
        "error": pa.array(take(c.error), pa.string()),
        "ttft_us": ints(ttft),
        "e2e_us": ints(e2e),
        "itl_us": pa.array(itl[order], pa.float64(), mask=~np.isfinite(itl[order])),
        "valid": pa.array([status[j] != INVALID for j in order], pa.bool_()),
        "status": pa.array(take(status), pa.string()),
        "reason": pa.array(take(primary), pa.string()),
        "reasons": pa.array(["|".join(r for r, _ in reasons[j]) for j in order], pa.string()),
    }
    table = pa.Table.from_arrays(list(arrays.values()), schema=REQUEST_SCHEMA)
    if c.token_times_us is not None:
        rel = [[round(t - origin) for t in c.token_times_us[j]] for j in order]
        table = table.append_column(pa.field(TOKEN_TIMES_COLUMN, pa.list_(pa.int64())),
                                    pa.array(rel, pa.list_(pa.int64())))
    st = Counter(status)
    validation = MeasurementValidation(
        experiment=experiment, n_requests=n, n_ok=st[OK], n_flagged=st[FLAGGED],
        n_invalid=st[INVALID], reasons={k: counts[k] for k in REASONS if counts[k]},
        examples={k: tuple(v) for k, v in examples.items()}, warnings=tuple(warnings),
        unmatched_ground_truth=unmatched)
    return table, validation


def _stages(c: _Columns, arrival: np.ndarray, order: np.ndarray, workload: LoadProfile | None,
            stage_counts: list[int] | None, warnings: list[str]) -> np.ndarray:
    """Load stage per request (file order; −1 unknown): the file's own stage ids, else the
    stage reports' request counts taken in arrival order (exact for inference-perf, whose
    stage files count every request sent in the stage), else the profile's stage durations
    (approximate: stages start a few seconds apart)."""
    n = len(c.index)
    stage = np.full(n, -1, np.int64)
    if c.stage is not None and (c.stage >= 0).all():
        return c.stage.astype(np.int64)
    if stage_counts and sum(stage_counts) == n:
        stage[order] = np.repeat(np.arange(len(stage_counts)), stage_counts)
        return stage
    if stage_counts:
        warnings.append(f"stage reports count {sum(stage_counts)} requests, the table has {n}: "
                        "stages assigned from the profile's durations")
    stages = workload.stages if workload else ()
    durations = [s.duration_s for s in stages]
    if stages and all(d is not None and d > 0 for d in durations):
        bounds = np.cumsum(np.asarray(durations, float))[:-1] * 1e6
        finite = np.isfinite(arrival)
        stage[finite] = np.searchsorted(bounds, arrival[finite], side="right")
    return stage


# -- the two formats -----------------------------------------------------------------


def _requests_format(fs: Any, path: str, folder: _Folder, name: str, workload: LoadProfile | None,
                     warnings: list[str]) -> tuple[_Columns, dict[str, Any], int]:
    req_name = next(f for f in REQUEST_FILES if f in folder.top)
    label = f"{name}/{req_name}"
    data = _json(fs, f"{path}/{req_name}", label, name)
    if isinstance(data, Mapping):
        entries = data.get("requests")
        metadata = {k: v for k, v in data.items() if k != "requests"}
    else:
        entries, metadata = data, {}
    if not isinstance(entries, list):
        raise CorpusError(f"experiment {name}: {label}: expected a 'requests' list")
    n = len(entries)
    index = np.zeros(n, np.int64)
    arrival, inp, rec = (np.full(n, np.nan) for _ in range(3))
    has_error = np.zeros(n, bool)
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping):
            raise CorpusError(f"experiment {name}: {label}: requests[{i}] is not an object")
        idx = e.get("index")
        if isinstance(idx, bool) or not isinstance(idx, int | float) or idx != int(idx):
            raise CorpusError(f"experiment {name}: {label}: requests[{i}] has no integer "
                              f"'index' (got {idx!r})")
        index[i] = int(idx)
        arrival[i] = finite_number(e.get("arrival_time_us"))
        inp[i] = finite_number(e.get("input_tokens"))
        rec[i] = finite_number(e.get("output_tokens"))
        has_error[i] = bool(e.get("has_error"))
    dup_counts = Counter(index.tolist())

    ttft, e2e = np.full(n, np.nan), np.full(n, np.nan)
    has_truth = np.zeros(n, bool)
    unmatched = 0
    gt_name = next((f for f in GROUND_TRUTH_FILES if f in folder.top), None)
    if gt_name is None:
        warnings.append(f"no {GROUND_TRUTH_FILES[0]}: no request has timing")
    else:
        gt_label = f"{name}/{gt_name}"
        gt = _json(fs, f"{path}/{gt_name}", gt_label, name)
        if isinstance(gt, Mapping):
            gt = gt.get("requests", gt.get("ground_truth"))
        if not isinstance(gt, list):
            raise CorpusError(f"experiment {name}: {gt_label}: expected a list of objects")
        position = {int(k): i for i, k in enumerate(index.tolist()) if dup_counts[k] == 1}
        gt_counts: Counter[int] = Counter()
        for j, g in enumerate(gt):
            idx = g.get("index") if isinstance(g, Mapping) else None
            if isinstance(idx, bool) or not isinstance(idx, int | float) or idx != int(idx):
                raise CorpusError(f"experiment {name}: {gt_label}: entry {j} has no integer "
                                  f"'index' (got {idx!r})")
            idx = int(idx)
            gt_counts[idx] += 1
            if idx not in dup_counts:
                unmatched += 1
                continue
            i = position.get(idx)
            if i is None:
                continue
            has_truth[i] = True
            for target, key in ((ttft, "ttft_s"), (e2e, "e2e_s")):
                seconds = finite_number(g.get(key))
                target[i] = seconds * 1e6 if seconds is not None else np.nan
            has_error[i] |= bool(g.get("has_error"))
        for idx, k in gt_counts.items():
            if k > 1:
                dup_counts[idx] += 1  # an index with two timings is ambiguous too
        if unmatched:
            warnings.append(f"{gt_name}: {unmatched} entries match no request index")
    duplicate = np.array([dup_counts[int(k)] > 1 for k in index], bool)
    generated = np.full(n, np.nan)
    gen_source: list[str | None] = [None] * n
    if workload and workload.ignore_eos and workload.output_len:
        generated[:] = workload.output_len
        gen_source = ["ignore_eos"] * n
    return _Columns(index=index, arrival_us=arrival, input_tokens=inp, recorded=rec,
                    generated=generated, generated_source=gen_source, has_error=has_error,
                    error=[None] * n, ttft_us=ttft, e2e_us=e2e, has_truth=has_truth,
                    duplicate=duplicate, bad_stream=np.zeros(n, bool),
                    check_order=True), metadata, unmatched


def _native_format(fs: Any, path: str, where: tuple[str, str], name: str,
                   workload: LoadProfile | None, token_times: bool) -> _Columns:
    label = f"{name}/{_rel(*where)}"
    data = _json(fs, f"{path}/{_rel(*where)}", label, name)
    if isinstance(data, Mapping):
        data = data.get("requests", data.get("per_request"))
    if not isinstance(data, list):
        raise CorpusError(f"experiment {name}: {label}: expected a JSON array of request "
                          "records")
    rows: list[NativeRequest] = [parse_native_record(r, i) for i, r in enumerate(data)]
    # index = rank by send time (the file is in completion order, not arrival order)
    rows.sort(key=lambda r: (r.start_s if r.start_s is not None else math.inf, r.position))
    n = len(rows)
    nan = math.nan
    start = np.array([r.start_s if r.start_s is not None else nan for r in rows])
    end = np.array([r.end_s if r.end_s is not None else nan for r in rows])
    first = np.array([r.token_times_s[0] if r.token_times_s else nan for r in rows])
    bad_stream = np.array([
        bool(r.problems) or bool(r.token_times_s) and (
            any(b < a for a, b in zip(r.token_times_s, r.token_times_s[1:], strict=False))
            or (r.start_s is not None and r.token_times_s[0] < r.start_s - 1e-6)
            or (r.end_s is not None and r.token_times_s[-1] > r.end_s + 1e-6))
        for r in rows], bool)
    eos_default = bool(workload and workload.ignore_eos)
    generated = np.full(n, nan)
    gen_source: list[str | None] = [None] * n
    for i, r in enumerate(rows):
        ignore_eos = r.ignore_eos if r.ignore_eos is not None else eos_default
        requested = r.max_tokens if r.max_tokens is not None else (
            workload.output_len if workload else None)
        if r.server_output_tokens is not None:
            generated[i], gen_source[i] = r.server_output_tokens, "server_usage"
        elif ignore_eos and requested:
            generated[i], gen_source[i] = requested, "ignore_eos"

    def ints(attr: str) -> np.ndarray:
        return np.array([getattr(r, attr) if getattr(r, attr) is not None else nan
                         for r in rows], float)

    stage = np.array([r.stage_id if r.stage_id is not None else -1 for r in rows], np.int64)
    return _Columns(
        index=np.arange(n, dtype=np.int64), arrival_us=start * 1e6, input_tokens=ints(
            "input_tokens"), recorded=ints("output_tokens"), generated=generated,
        generated_source=gen_source, has_error=np.array([r.has_error for r in rows], bool),
        error=[r.error if r.error else ("; ".join(r.problems) or None) for r in rows],
        ttft_us=(first - start) * 1e6, e2e_us=(end - start) * 1e6,
        has_truth=np.ones(n, bool), duplicate=np.zeros(n, bool), bad_stream=bad_stream,
        check_order=False, stage=stage if (stage >= 0).any() else None,
        token_times_us=[[t * 1e6 for t in r.token_times_s] for r in rows]
        if token_times else None)


# -- public API ----------------------------------------------------------------------


def _consistency(name: str, server: ServerConfig, metadata: Mapping[str, Any],
                 workload: LoadProfile | None, warnings: list[str]) -> None:
    model = metadata.get("model_id")
    if model and str(model).lower() != server.model.lower():
        warnings.append(f"requests.json model_id {model} differs from {EXP_CONFIG} model "
                        f"{server.model}")
    if workload and workload.model_name and workload.model_name.lower() != server.model.lower():
        warnings.append(f"inference-perf server.model_name {workload.model_name} differs from "
                        f"{EXP_CONFIG} model {server.model}")
    cfg = metadata.get("config")
    if isinstance(cfg, Mapping):
        for key, ours in (("tensor_parallelism", server.tensor_parallelism),
                          ("max_num_seqs", server.max_num_seqs),
                          ("max_num_batched_tokens", server.max_num_batched_tokens),
                          ("block_size", server.block_size),
                          ("kv_blocks_total_gpu", server.num_gpu_blocks)):
            theirs = cfg.get(key)
            if theirs is not None and ours is not None and finite_number(theirs) != ours:
                warnings.append(f"requests.json config.{key}={theirs} differs from "
                                f"{EXP_CONFIG} ({ours})")


def _summary_checks(summary: Mapping | None, table: pa.Table, warnings: list[str]) -> None:
    if table.num_rows:
        errors = pa.compute.and_(table.column("has_error"),
                                 pa.compute.less_equal(table.column("input_tokens"), 0))
        blind = int(pa.compute.sum(errors).as_py() or 0)
        if blind:
            warnings.append(f"{blind} requests with has_error record 0 input tokens (the client "
                            "counts tokens only for completed requests): a replay must impute "
                            "their prompt length")
    if not isinstance(summary, Mapping):
        return
    load = summary.get("load_summary") or {}
    count = load.get("count") if isinstance(load, Mapping) else None
    if count is not None and count != table.num_rows:
        warnings.append(f"{SUMMARY_FILE} counts {count} requests, the table has "
                        f"{table.num_rows}")
    failures = summary.get("failures") or {}
    failed = failures.get("count") if isinstance(failures, Mapping) else None
    errors = int(np.asarray(table.column("has_error")).sum()) if table.num_rows else 0
    if failed is not None and failed != errors:
        warnings.append(f"{SUMMARY_FILE} counts {failed} failures, the table has {errors} "
                        "requests with has_error")


def read_measurements(url: str, *, experiment: str | None = None, options: dict | None = None,
                      default_hardware: str | None = None, source: str = "auto",
                      token_tolerance: float = DEFAULT_TOKEN_TOLERANCE,
                      timing_factor: float = DEFAULT_TIMING_FACTOR,
                      token_times: bool = True) -> Measurements:
    """Read and validate the request measurements of the experiment folder ``url``.

    ``experiment`` names it in errors (default: the folder's name). ``source`` picks the
    format when a folder has both: ``"requests"`` (requests.json, the default choice of
    ``"auto"``) or ``"inference-perf"`` (per_request_lifecycle_metrics.json).
    ``token_times`` keeps the native file's streamed token times (``token_times_us``).

    Raises ConfigError for a bad ``exp-config.yaml`` / profile (naming file and key) and
    CorpusError naming the experiment and file when the measurements are missing, not valid
    JSON, truncated, or hold no usable request.
    """
    fs, path = filesystem(url, options)
    path = path.rstrip("/")
    name = experiment or path.rsplit("/", 1)[-1]
    if not fs.exists(f"{path}/{EXP_CONFIG}"):
        raise ConfigError("file not found", file=f"{name}/{EXP_CONFIG}", experiment=name)
    server = parse_server_config(_yaml(fs, f"{path}/{EXP_CONFIG}", f"{name}/{EXP_CONFIG}",
                                       name),
                                 experiment=name, file=f"{name}/{EXP_CONFIG}",
                                 default_hardware=default_hardware)
    folder = _folder(fs, path)
    has_requests = bool(folder.top & set(REQUEST_FILES))
    native = folder.find(PER_REQUEST_FILE)
    if source not in ("auto", FORMAT_REQUESTS, FORMAT_INFERENCE_PERF):
        raise ValueError(f"source must be auto, {FORMAT_REQUESTS} or {FORMAT_INFERENCE_PERF}")
    fmt = (FORMAT_INFERENCE_PERF if source == FORMAT_INFERENCE_PERF
           or (source == "auto" and not has_requests and native) else FORMAT_REQUESTS)
    if fmt == FORMAT_REQUESTS and not has_requests:
        raise CorpusError(f"experiment {name}: {name}/{REQUEST_FILES[1]}[.gz]: file not found"
                          + (f" (it has {_rel(*native)})" if native else
                             f" (nor {PER_REQUEST_FILE})"))
    if fmt == FORMAT_INFERENCE_PERF and not native:
        raise CorpusError(f"experiment {name}: {name}/{PER_REQUEST_FILE}: file not found "
                          f"(looked in {', '.join(d or '.' for d in INFERENCE_PERF_DIRS)})")

    warnings: list[str] = []
    profile = folder.find(PROFILE_FILE)
    expanded = folder.find(EXPANDED_CONFIG_FILE)
    try:
        workload, wl_warnings = parse_workload(
            _yaml(fs, f"{path}/{_rel(*profile)}", f"{name}/{_rel(*profile)}", name)
            if profile else None,
            _yaml(fs, f"{path}/{_rel(*expanded)}", f"{name}/{_rel(*expanded)}", name)
            if expanded else None,
            profile_file=_rel(*profile) if profile else PROFILE_FILE,
            expanded_file=_rel(*expanded) if expanded else EXPANDED_CONFIG_FILE)
    except ConfigError as exc:
        if exc.experiment:
            raise
        error = ConfigError(f"experiment {name}: {exc}")
        error.file, error.key, error.experiment = exc.file, exc.key, name
        raise error from None
    warnings += wl_warnings
    summary_at = folder.find(SUMMARY_FILE)
    summary = (_json(fs, f"{path}/{_rel(*summary_at)}", f"{name}/{_rel(*summary_at)}", name)
               if summary_at else None)
    stage_metrics: dict[int, dict[str, Any]] = {}
    stage_dir = summary_at[0] if summary_at else (profile or expanded or native or ("", ""))[0]
    for fname in sorted(folder.sub.get(stage_dir, set())):
        m = _STAGE_FILE.match(fname)
        if m:
            stage_metrics[int(m.group(1))] = _json(fs, f"{path}/{_rel(stage_dir, fname)}",
                                                   f"{name}/{_rel(stage_dir, fname)}", name)
    stage_counts = None
    if stage_metrics and sorted(stage_metrics) == list(range(len(stage_metrics))):
        try:
            stage_counts = [int(stage_metrics[k]["load_summary"]["count"])
                            for k in sorted(stage_metrics)]
        except (KeyError, TypeError, ValueError):
            stage_counts = None
    if workload is None or workload.ignore_eos is None:
        warnings.append("ignore_eos unknown (no inference-perf profile/config): generated "
                        "output tokens taken as recorded")
    elif workload.ignore_eos and not workload.output_len and fmt == FORMAT_REQUESTS:
        warnings.append("ignore_eos set but no output_len known: recorded counts used")
    if workload is not None and workload.streaming is False:
        warnings.append("api.streaming is false: the client measured no TTFT")

    metadata: dict[str, Any] = {}
    unmatched = 0
    if fmt == FORMAT_REQUESTS:
        columns, metadata, unmatched = _requests_format(fs, path, folder, name, workload,
                                                        warnings)
        data_file = f"{name}/{next(f for f in REQUEST_FILES if f in folder.top)}"
        if native:
            warnings.append(f"{_rel(*native)} present but not read (requests.json preferred)")
    else:
        assert native is not None
        columns = _native_format(fs, path, native, name, workload, token_times)
        data_file = f"{name}/{_rel(*native)}"
    if server.num_gpu_blocks is None and isinstance(metadata.get("config"), Mapping):
        blocks = finite_number(metadata["config"].get("kv_blocks_total_gpu"))
        if blocks:
            server = _with_blocks(server, int(blocks))
    _consistency(name, server, metadata, workload, warnings)
    table, validation = _build(columns, name, workload, stage_counts, token_tolerance,
                               timing_factor, warnings, unmatched)
    extra: list[str] = []
    _summary_checks(summary, table, extra)
    if extra:
        validation = MeasurementValidation(**{**validation.__dict__,
                                              "warnings": validation.warnings + tuple(extra)})
    if validation.n_usable == 0 and columns.has_truth.any():  # no timing at all: a workload
        top = ", ".join(f"{k}={v}" for k, v in sorted(validation.reasons.items(),
                                                     key=lambda kv: -kv[1]))
        raise CorpusError(f"experiment {name}: {data_file}: no usable request among "
                          f"{validation.n_requests} ({top or 'empty'})")
    return Measurements(experiment=name, url=url, source_format=fmt, server=server,
                        workload=workload, requests=table, validation=validation,
                        summary_metrics=summary, stage_metrics=stage_metrics,
                        metadata=metadata)


def _with_blocks(server: ServerConfig, blocks: int) -> ServerConfig:
    return ServerConfig(**{**server.__dict__, "num_gpu_blocks": blocks})


def load_measurements(corpus_url: str, name: str, options: dict | None = None,
                      **kwargs: Any) -> Measurements:
    """:func:`read_measurements` of the experiment ``name`` (relative to ``corpus_url``, as
    :func:`blis_model.configuration.experiment.discover_experiments` returns it)."""
    url = corpus_url if name == "." else join(corpus_url, name)
    return read_measurements(url, experiment=name, options=options, **kwargs)


# -- writing -------------------------------------------------------------------------


def _column(table: pa.Table, *names: str) -> list[Any] | None:
    for n in names:
        if n in table.column_names:
            return table.column(n).to_pylist()
    return None


def _server_mapping(exp_config: ServerConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(exp_config, ServerConfig):
        return {k: v for k, v in exp_config.__dict__.items() if v is not None}
    return dict(exp_config)


def write_measurements(url: str, requests: pa.Table | Sequence[Mapping[str, Any]], *,
                       exp_config: ServerConfig | Mapping[str, Any],
                       workload: LoadProfile | Mapping[str, Any] | None = None,
                       hf_config: Mapping[str, Any] | None = None,
                       summary_metrics: Mapping[str, Any] | None = None,
                       stage_metrics: Mapping[int, Mapping[str, Any]] | None = None,
                       experiment: str | None = None, metadata: Mapping[str, Any] | None = None,
                       options: dict | None = None) -> str:
    """Write an experiment folder in the ``requests.json`` format at ``url``; return ``url``.

    ``requests``: a table (or row mappings) with ``index``, ``arrival_us``,
    ``input_tokens``, ``output_tokens_recorded`` (else ``output_tokens``: the count the
    client saw), ``has_error``, ``ttft_us``, ``e2e_us`` (µs; null when not measured).
    ``exp_config``: the ``exp-config.yaml`` mapping or a ServerConfig (``num_gpu_blocks``
    included). ``workload``: profile facts (a LoadProfile or a ``profile.yaml`` mapping),
    written as ``inference-perf/profile.yaml``. ``hf_config`` → ``config.json``; summary and
    stage metrics → ``inference-perf/``. A request with neither TTFT nor E2E gets no
    ground-truth entry. ``exp-config.yaml`` is written last. Reading the folder back gives
    the same request table.
    """
    table = requests if isinstance(requests, pa.Table) else pa.Table.from_pylist(
        [dict(r) for r in requests])
    name = experiment or url.rstrip("/").rsplit("/", 1)[-1]
    index = _column(table, "index")
    if index is None:
        index = list(range(table.num_rows))
    need = {"arrival_us": _column(table, "arrival_us", "arrival_time_us"),
            "input_tokens": _column(table, "input_tokens"),
            "output_tokens": _column(table, "output_tokens_recorded", "output_tokens")}
    missing = [k for k, v in need.items() if v is None]
    if missing:
        raise ValueError(f"requests lack column(s) {', '.join(missing)}")
    n = table.num_rows
    has_error = _column(table, "has_error") or [False] * n
    ttft = _column(table, "ttft_us") or [None] * n
    e2e = _column(table, "e2e_us") or [None] * n
    reasons = _column(table, "reasons") or [""] * n
    server = _server_mapping(exp_config)
    cfg_keys = {"tensor_parallelism": "tensor_parallelism", "max_num_seqs": "max_num_seqs",
                "max_num_batched_tokens": "max_num_batched_tokens",
                "kv_blocks_total_gpu": "num_gpu_blocks", "block_size": "block_size"}
    doc: dict[str, Any] = {"experiment": name, "model_id": server.get("model")}
    doc.update(dict(metadata or {}))
    doc["config"] = {k: server[v] for k, v in cfg_keys.items() if server.get(v) is not None}
    doc["requests"] = [
        {"index": int(index[i]), "arrival_time_us": need["arrival_us"][i],
         "input_tokens": need["input_tokens"][i], "output_tokens": need["output_tokens"][i],
         "prefix_group": "", "has_error": bool(has_error[i])} for i in range(n)]
    truth = []
    for i in range(n):
        if "no_ground_truth" in str(reasons[i] or "").split("|") or (
                ttft[i] is None and e2e[i] is None):
            continue
        entry: dict[str, Any] = {"index": int(index[i]), "has_error": bool(has_error[i])}
        if e2e[i] is not None:
            entry["e2e_s"] = e2e[i] / 1e6
        if ttft[i] is not None:
            entry["ttft_s"] = ttft[i] / 1e6
        truth.append(entry)

    def put(rel: str, data: bytes) -> None:
        write_bytes_atomic(join(url, rel), data, options)

    def gz(obj: Any) -> bytes:
        return gzip.compress(orjson.dumps(obj), mtime=0)

    if hf_config is not None:
        put("config.json", json.dumps(dict(hf_config), indent=2).encode())
    put(REQUEST_FILES[0], gz(doc))
    put(GROUND_TRUTH_FILES[0], gz(truth))
    if workload is not None:
        profile = workload.to_profile() if isinstance(workload, LoadProfile) else dict(workload)
        put(f"inference-perf/{PROFILE_FILE}", yaml.safe_dump(profile, sort_keys=False).encode())
    if summary_metrics is not None:
        put(f"inference-perf/{SUMMARY_FILE}", json.dumps(summary_metrics, indent=2).encode())
    for k, v in (stage_metrics or {}).items():
        put(f"inference-perf/stage_{int(k)}_lifecycle_metrics.json",
            json.dumps(v, indent=2).encode())
    # Last: a folder is an experiment once it has exp-config.yaml, so discovery never sees
    # a half-written one.
    put(EXP_CONFIG, yaml.safe_dump(server, sort_keys=False).encode())
    return url
