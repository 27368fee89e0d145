"""Golden vectors for the Go evaluator of releases (``deploy/goeval``).

``write_golden(out_dir)`` fits one small release per model family on a deterministic
synthetic corpus (``models.synthetic``: dense and MoE models, TP 1–4, FP8, four GPUs),
calibrates it on one configuration of a machine the corpus lacks (H200) whose host cost
runs :data:`CALIBRATION_HOST` × the corpus's (so the release holds a machine host factor
that a configuration never seen on H200 predicts with), writes each release's
BLIS-facing files (``coefficients.json``, ``hardware_config.json``,
``model_configs/<name>/config.json``) under ``out_dir/releases/<family>/`` and one
versioned file ``out_dir/golden_v1.json`` of cases: (release, deployment, batch) →
the step time the Python library predicts, µs — plus quantiles (RECE, Hybrid) and the
predictive std (BSR-ARD, Hybrid).

A batch is what BLIS schedules in one step: per request its phase, tokens scheduled this
step ``t``, tokens computed before ``c`` (a decode's context) and prompt length ``s``,
plus optional scheduler state (queue depths, KV usage, preemptions). Its step aggregates
come from the ingest code itself (:func:`batch_to_steps` feeds the same events a trace
would to ``ingest.steps.StepTableBuilder``), its features from ``dataset.feature_frame``
and the expected µs from the release's model rebuilt from its ``coefficients.json``.
The file also holds every registered feature and aggregate per (deployment, batch), so
the Go side can be checked term by term.

Regenerate after any feature, aggregation or release-schema change::

    python -m blis_model.releases.golden_vectors deploy/goeval/testdata
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from blis_model.configuration.architecture import arch_from_hf_config, bundled_model_config
from blis_model.configuration.experiment import Experiment, ServerConfig
from blis_model.configuration.hardware import hardware_spec
from blis_model.features.frame import feature_frame
from blis_model.features.registry import REGISTRY
from blis_model.ingest.otlp import STEP_SCOPE, Event
from blis_model.ingest.steps import COMPOSITION_COLUMNS, StepTableBuilder
from blis_model.models.base import StepTimeModel
from blis_model.models.registry import FAMILIES as REGISTERED_FAMILIES
from blis_model.models.registry import make_model, model_from_dict
from blis_model.models.synthetic import SyntheticConfig, synthetic_frame
from blis_model.releases.build import blis_model_config_name, dumps_json
from blis_model.releases.files import COEFFICIENTS, HARDWARE_CONFIG, MANIFEST, MODEL_CONFIGS
from blis_model.releases.files import SCHEMA as RELEASE_SCHEMA
from blis_model.releases.projection import project_onto_blis

SCHEMA = "blis-goeval-golden/1"
GOLDEN_FILE = "golden_v1.json"
RELEASES_DIR = "releases"
FAMILIES: tuple[str, ...] = tuple(REGISTERED_FAMILIES)
"""Every registered family: a family ``--family auto`` can release is one the Go
evaluator must load (its golden test fails on a family it does not support)."""
FAMILY_PARAMS: dict[str, dict[str, Any]] = {"hybrid": {"quantiles": (0.5, 0.9, 0.99)}}
TRAIN_STEPS = 1500  # synthetic steps the golden releases are fit on
TRAIN_SEED = 0
CALIBRATION_CONFIG = SyntheticConfig("meta-llama/Llama-3.1-8B", "H200", 1)
CALIBRATION_STEPS = 300
CALIBRATION_HOST = 1.6
"""The golden releases are then calibrated on :data:`CALIBRATION_STEPS` steps of
:data:`CALIBRATION_CONFIG`, whose host-time coefficients are ``CALIBRATION_HOST`` × the
synthetic truth's (a slower host)."""
REQUEST_FIELDS: tuple[str, ...] = ("phase", "scheduled", "computed", "prompt",
                                   "blocks_allocated", "preemptions")


@dataclass(frozen=True)
class Request:
    """One request of a batch. ``scheduled`` = tokens computed this step (t; 1 for a
    decode), ``computed`` = tokens computed before this step (c; a decode's context),
    ``prompt`` = prompt length (s), ``blocks_allocated`` = KV blocks it holds,
    ``preemptions`` = times it was preempted before."""

    phase: str  # "prefill" | "decode"
    scheduled: int
    computed: int
    prompt: int
    blocks_allocated: int = 0
    preemptions: int = 0

    def row(self) -> list[Any]:
        return [self.phase, self.scheduled, self.computed, self.prompt,
                self.blocks_allocated, self.preemptions]


@dataclass(frozen=True)
class StepState:
    """Scheduler state at the step (the BATCH_SUMMARY fields features read)."""

    running_depth: float = 0.0  # requests running
    waiting_depth: float = 0.0  # requests waiting in the queue
    num_preempted: float = 0.0  # requests preempted at this step
    kv_usage_ratio: float = 0.0  # GPU KV-cache usage, 0..1

    def to_dict(self) -> dict[str, float]:
        return {"running_depth": self.running_depth, "waiting_depth": self.waiting_depth,
                "num_preempted": self.num_preempted, "kv_usage_ratio": self.kv_usage_ratio}


@dataclass(frozen=True)
class Deployment:
    """A BLIS deployment: model, GPU, TP and scheduler knobs (``quantization`` overrides
    the model config's, as in exp-config.yaml)."""

    name: str
    model: str
    hardware: str
    tensor_parallelism: int
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    quantization: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "hardware": self.hardware,
                "tensor_parallelism": self.tensor_parallelism,
                "max_num_batched_tokens": self.max_num_batched_tokens,
                "max_num_seqs": self.max_num_seqs, "quantization": self.quantization or ""}

    def experiment(self) -> Experiment:
        server = ServerConfig(self.model, self.hardware, self.tensor_parallelism,
                              self.max_num_batched_tokens, self.max_num_seqs,
                              quantization=self.quantization)
        arch = arch_from_hf_config(bundled_model_config(self.model) or {}, self.model,
                                   self.quantization)
        return Experiment(name=f"golden/{self.name}", url="", server=server, arch=arch,
                          hardware=hardware_spec(self.hardware), trace_url=None)


# The five training configurations of models.synthetic (calibrated terms), the
# configuration the releases are calibrated on (H200), then configurations no release saw
# (global terms — with H200's machine host factor for the Qwen one —, RECE's embedding
# blend).
DEPLOYMENTS: tuple[Deployment, ...] = (
    Deployment("llama8b-h100-tp1", "meta-llama/Llama-3.1-8B", "H100", 1),
    Deployment("llama70b-h100-tp4", "meta-llama/Llama-3.1-70B-Instruct", "H100", 4),
    Deployment("qwen3moe-a100-tp2", "Qwen/Qwen3-30B-A3B", "A100-80", 2, 4096, 128),
    Deployment("mixtral-h100-tp2", "mistralai/Mixtral-8x7B-v0.1", "H100", 2),
    Deployment("llama8bfp8-l40s-tp1", "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8", "L40S", 1,
               2048, 64),
    Deployment("llama8b-h200-tp1", "meta-llama/Llama-3.1-8B", "H200", 1),
    Deployment("unseen-mixtral-h100-tp1", "mistralai/Mixtral-8x7B-v0.1", "H100", 1),
    Deployment("unseen-llama8bfp8-h100-tp2", "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8",
               "H100-SXM", 2, 4096, 128),
    Deployment("unseen-qwen7b-h200-tp1", "Qwen/Qwen2.5-7B-Instruct", "H200", 1, 16384, 512),
    Deployment("unseen-llama8b-fp8override-a100-tp1", "meta-llama/Llama-3.1-8B", "A100-80", 1,
               8192, 256, "fp8"),
)


def _decodes(n: int, base: int, spread: int, offset: int = 0) -> list[Request]:
    """``n`` decodes with deterministic, varied contexts in [base, base + spread)."""
    out = []
    for i in range(n):
        ctx = base + ((i + offset) * 7919) % spread
        prompt = max(1, ctx - (i * 31) % 200)
        out.append(Request("decode", 1, ctx, prompt, -(-(ctx + 1) // 16)))
    return out


def golden_batches() -> dict[str, tuple[list[Request], StepState]]:
    """Named batches: empty, single and chunked prefills, decodes (one, under KV pressure,
    64), a saturated mixed step, a 256-request step and a huge one (1024 decodes + a long
    prefill chunk)."""
    return {
        "empty": ([], StepState()),
        "single_prefill": ([Request("prefill", 512, 0, 512, 32)], StepState(running_depth=1)),
        "chunked_prefill_32_decodes": (
            [Request("prefill", 2048, 4096, 8192, 384)] + _decodes(32, 200, 3000),
            StepState(running_depth=33)),
        "single_decode": ([Request("decode", 1, 37, 20, 3)], StepState(running_depth=1)),
        "kv_pressure_16_decodes": (
            [Request(r.phase, r.scheduled, r.computed, r.prompt, r.blocks_allocated, i % 2)
             for i, r in enumerate(_decodes(16, 20000, 9000))],
            StepState(running_depth=16, num_preempted=1, kv_usage_ratio=0.97)),
        "decode_64": (_decodes(64, 100, 6000, 3), StepState(running_depth=64,
                                                              kv_usage_ratio=0.41)),
        "pressured_mixed": (
            [Request("prefill", 700, 300, 1000, 63, 1), Request("prefill", 90, 0, 4000, 6)]
            + [Request(r.phase, r.scheduled, r.computed, r.prompt, r.blocks_allocated,
                       1 if i % 17 == 0 else 0) for i, r in enumerate(_decodes(200, 500, 9000))],
            StepState(running_depth=202, waiting_depth=3, num_preempted=2,
                      kv_usage_ratio=0.96)),
        "batch_256": (
            [Request("prefill", 1024, 0, 1024, 64), Request("prefill", 333, 2048, 4000, 150)]
            + _decodes(254, 64, 4000, 11), StepState(running_depth=256, kv_usage_ratio=0.7)),
        "huge_1024_decodes_long_prefill": (
            [Request("prefill", 8192, 16384, 65536, 1536)] + _decodes(1024, 100, 32000, 5),
            StepState(running_depth=1025, waiting_depth=12, kv_usage_ratio=0.88)),
    }


# ------------------------------------------------------------------------- batches


def _events(requests: Sequence[Request], state: StepState, step_id: int) -> list[Event]:
    pf = [r for r in requests if r.phase == "prefill"]
    summary = {
        "step.id": step_id, "step.duration_us": 1.0,
        "queue.running_depth": state.running_depth, "queue.waiting_depth": state.waiting_depth,
        "batch.num_prefill_reqs": len(pf), "batch.num_decode_reqs": len(requests) - len(pf),
        "batch.prefill_tokens": sum(r.scheduled for r in pf),
        "batch.decode_tokens": sum(r.scheduled for r in requests if r.phase != "prefill"),
        "batch.num_preempted": state.num_preempted, "kv.usage_gpu_ratio": state.kv_usage_ratio,
    }
    events = [Event(STEP_SCOPE, "step.BATCH_SUMMARY", 0, summary)]
    for i, r in enumerate(requests):
        if r.phase not in ("prefill", "decode"):
            raise ValueError(f"request phase must be prefill or decode, got {r.phase!r}")
        events.append(Event(STEP_SCOPE, "step.REQUEST_SNAPSHOT", 0, {
            "step.id": step_id, "request.id": f"r{i}", "request.phase": r.phase.upper(),
            "request.num_prompt_tokens": r.prompt, "request.num_computed_tokens": r.computed,
            "request.num_output_tokens": 0, "request.scheduled_tokens_this_step": r.scheduled,
            "request.num_preemptions": r.preemptions,
            "kv.blocks_allocated_gpu": r.blocks_allocated, "kv.blocks_cached_gpu": 0}))
    return events


def step_table(batches: Sequence[tuple[Sequence[Request], StepState]]) -> pa.Table:
    """The step table ingest builds for these batches (one step each, in order)."""
    builder = StepTableBuilder("golden")
    for step_id, (requests, state) in enumerate(batches):
        builder.add_all(_events(requests, state, step_id))
    table, _ = builder.table()
    return table


def batch_to_steps(requests: Sequence[Request], state: StepState = StepState()
                   ) -> dict[str, float]:
    """Step aggregates of one batch (``COMPOSITION_COLUMNS`` and the scheduler state),
    exactly as ingest computes them from a trace of that step."""
    row = step_table([(requests, state)]).to_pylist()[0]
    keys = list(COMPOSITION_COLUMNS) + list(state.to_dict())
    return {k: float(row[k]) for k in keys}


# ------------------------------------------------------------------------- releases


def fit_releases(families: Sequence[str] = FAMILIES) -> dict[str, dict[str, Any]]:
    """coefficients.json content per family, fit on the deterministic synthetic corpus
    and calibrated on the H200 configuration (:data:`CALIBRATION_CONFIG`)."""
    frame = synthetic_frame(TRAIN_STEPS, seed=TRAIN_SEED)
    target = synthetic_frame(CALIBRATION_STEPS, seed=TRAIN_SEED + 1,
                             configs=[CALIBRATION_CONFIG], host_multiplier=CALIBRATION_HOST)
    out = {}
    for family in families:
        model = make_model(family, **FAMILY_PARAMS.get(family, {})).fit(frame).calibrate(target)
        projection = project_onto_blis(model, frame)
        out[family] = {"version": f"golden-{family}", "family": family,
                       "model": model.to_dict(),
                       "blis_projection": projection.coefficient_block()}
    return out


def release_files(coefficients: dict[str, Any]) -> dict[str, bytes]:
    """A release folder's BLIS-facing files (relative path → bytes) for the golden
    deployments, in ``releases.build``'s formats, with the manifest's version and
    checksums (the Go evaluator, like Python, loads nothing else)."""
    files = {COEFFICIENTS: dumps_json(coefficients)}
    gpus = {}
    for dep in DEPLOYMENTS:
        spec = hardware_spec(dep.hardware)
        gpus[spec.name] = spec.to_blis()
        name = blis_model_config_name(dep.model)
        files[f"{MODEL_CONFIGS}/{name}/config.json"] = dumps_json(bundled_model_config(dep.model))
    files[HARDWARE_CONFIG] = dumps_json(dict(sorted(gpus.items())))
    files[MANIFEST] = dumps_json({
        "schema": RELEASE_SCHEMA, "version": coefficients["version"],
        "family": coefficients["family"],
        "files": {p: hashlib.sha256(b).hexdigest() for p, b in sorted(files.items())}})
    return files


# ---------------------------------------------------------------------------- cases


def _predictions(model: StepTimeModel, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    out = {"step_time_us": np.asarray(model.predict(frame), dtype=np.float64)}
    levels = getattr(model, "quantile_coef_", None)
    levels = sorted(levels) if levels is not None else list(getattr(model, "quantiles", ()) or ())
    for q in levels:
        out[f"p{float(q) * 100:g}"] = np.asarray(model.predict_quantile(frame, float(q)))
    if model.family in ("bsr_ard", "hybrid"):
        out["std_us"] = np.asarray(model.predict(frame, return_std=True)[1])
    return out


def _machine_factor(model: StepTimeModel, config_key: str) -> float:
    """The machine host factor the model predicts the configuration with (1 for a
    family without a host part)."""
    probe = getattr(model, "machine_factor_for", None)
    return float(probe(config_key)) if callable(probe) else 1.0


def build_golden(coefficients: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The golden document for releases given as coefficients.json contents."""
    batches = golden_batches()
    names = list(batches)
    table = step_table([batches[n] for n in names])
    feature_names = sorted(REGISTRY)
    steps = {n: {k: float(table.column(k)[i].as_py()) for k in
                 list(COMPOSITION_COLUMNS) + list(StepState().to_dict())}
             for i, n in enumerate(names)}
    features: dict[str, dict[str, dict[str, float]]] = {}
    frames: dict[str, pd.DataFrame] = {}
    config_keys: dict[str, str] = {}
    for dep in DEPLOYMENTS:
        exp = dep.experiment()
        frame = feature_frame(exp, table)
        frames[dep.name] = frame
        config_keys[dep.name] = exp.config_key
        features[dep.name] = {n: {f: float(frame[f].iloc[i]) for f in feature_names}
                              for i, n in enumerate(names)}
    cases = []
    for family, coef in coefficients.items():
        # the model Go reads: rebuilt from the coefficients.json bytes
        model = model_from_dict(json.loads(dumps_json(coef))["model"])
        alphas = [a["value"] for a in coef["blis_projection"]["alpha_coeffs"]]
        for dep in DEPLOYMENTS:
            preds = _predictions(model, frames[dep.name])
            for i, batch in enumerate(names):
                record = (coef["model"].get("calibration") or {}).get("per_config", {}).get(
                    config_keys[dep.name])
                case = {"release": family, "deployment": dep.name, "batch": batch,
                        "config_key": config_keys[dep.name],
                        "calibrated": config_keys[dep.name] in coef["model"]["per_config"],
                        "calibration_choice": None if record is None else record["choice"],
                        "machine_host_factor": _machine_factor(model, config_keys[dep.name]),
                        "alphas": alphas}
                case.update({k: float(v[i]) for k, v in preds.items()})
                cases.append(case)
    return {
        "schema": SCHEMA,
        "generator": "python -m blis_model.releases.golden_vectors deploy/goeval/testdata",
        "tolerance": {"relative": 1e-9, "absolute_us": 1e-9},
        "request_fields": list(REQUEST_FIELDS),
        "releases": {f: f"{RELEASES_DIR}/{f}" for f in coefficients},
        "deployments": {d.name: d.to_dict() for d in DEPLOYMENTS},
        "batches": {n: {"requests": [r.row() for r in batches[n][0]],
                        "state": batches[n][1].to_dict()} for n in names},
        "config_keys": config_keys,
        "steps": steps,
        "features": features,
        "cases": cases,
    }


def golden_files(families: Sequence[str] = FAMILIES) -> dict[str, bytes]:
    """Every golden file (relative path → bytes): the releases and ``golden_v1.json``."""
    coefficients = fit_releases(families)
    files: dict[str, bytes] = {}
    for family, coef in coefficients.items():
        for path, data in release_files(coef).items():
            files[f"{RELEASES_DIR}/{family}/{path}"] = data
    files[GOLDEN_FILE] = dumps_json(build_golden(coefficients))
    return files


def write_golden(out_dir: str | Path, families: Sequence[str] = FAMILIES) -> list[Path]:
    """Write the golden releases and vectors under ``out_dir``; the paths written."""
    root = Path(out_dir)
    written = []
    for rel, data in sorted(golden_files(families).items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover - developer entry point
    write_golden(sys.argv[1] if len(sys.argv) > 1 else "deploy/goeval/testdata")
