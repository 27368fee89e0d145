"""Synthetic step tables with a known linear-per-regime truth (tests and scale benchmarks).

Raw step columns (batch composition, KV usage, queue) are drawn for a few well-known
configurations, turned into a real feature frame by ``dataset.feature_frame`` (so every
registered feature, BLIS column and configuration constant is there), and labelled with

    duration = m_regime · Σ_k β_k f_k(step) · (1 + ε)

with ``β`` from :data:`TRUE_COEFFICIENTS` (physics prior-like values), ``m_regime`` from
:data:`REGIME_MULTIPLIERS` (hard regimes of ``models.regimes``) and ε heavy-tailed noise
(Student-t, 3 degrees of freedom, scaled by ``noise``, clipped to keep durations > 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa

from blis_model.configuration.architecture import arch_from_hf_config, bundled_model_config
from blis_model.configuration.hardware import hardware_spec
from blis_model.features.frame import concat_frames, feature_frame
from blis_model.features.physics import PHYSICS_FEATURES
from blis_model.features.registry import REGISTRY
from blis_model.ingest.steps import STEP_SCHEMA
from blis_model.models.linear import linear_predict
from blis_model.models.regimes import REGIMES, RegimeDetector

REGIME_MULTIPLIERS: dict[str, float] = {"saturation": 1.15, "kv_pressure": 1.3,
                                        "launch_bound": 1.0, "compute_bound": 1.0,
                                        "memory_bound": 1.1}
OVERHEAD_TRUTH: dict[str, float] = {"layer_overhead": 30.0, "moe_layer_overhead": 60.0,
                                    "request_overhead": 15.0, "step_overhead": 900.0}


def true_coefficients(features: Sequence[str] = PHYSICS_FEATURES) -> np.ndarray:
    """β of the synthetic truth: 1.25 for corrections, fixed µs per unit for overheads."""
    return np.array([OVERHEAD_TRUTH.get(n, 0.0) if REGISTRY[n].kind == "overhead" else 1.25
                     for n in features])


@dataclass(frozen=True)
class SyntheticConfig:
    model: str
    gpu: str
    tp: int
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256


CONFIGS: tuple[SyntheticConfig, ...] = (
    SyntheticConfig("meta-llama/Llama-3.1-8B", "H100", 1),
    SyntheticConfig("meta-llama/Llama-3.1-70B-Instruct", "H100", 4),
    SyntheticConfig("Qwen/Qwen3-30B-A3B", "A100-80", 2, 4096, 128),
    SyntheticConfig("mistralai/Mixtral-8x7B-v0.1", "H100", 2),
    SyntheticConfig("RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8", "L40S", 1, 2048, 64),
)


def _experiment(cfg: SyntheticConfig) -> SimpleNamespace:
    arch = arch_from_hf_config(bundled_model_config(cfg.model) or {}, cfg.model)
    server = SimpleNamespace(tensor_parallelism=cfg.tp, data_parallelism=1,
                             max_num_batched_tokens=cfg.max_num_batched_tokens,
                             max_num_seqs=cfg.max_num_seqs)
    quant = arch.quantization or "bf16"
    key = (f"{cfg.model.lower()}|{cfg.gpu}|tp{cfg.tp}|{quant}|mnbt{cfg.max_num_batched_tokens}"
           f"|mns{cfg.max_num_seqs}")
    return SimpleNamespace(name=f"synthetic/{cfg.model.split('/')[-1].lower()}-{cfg.gpu}",
                           config_key=key, arch=arch, hardware=hardware_spec(cfg.gpu),
                           server=server)


def synthetic_steps(n: int, cfg: SyntheticConfig, rng: np.random.Generator) -> pa.Table:
    """Plausible raw step columns: decode batches, prefill chunks, KV usage, queue."""
    mns, budget = cfg.max_num_seqs, cfg.max_num_batched_tokens
    load = rng.beta(2.0, 2.0, n)  # how busy the server is at the step
    dc = np.floor(load * mns * rng.uniform(0.6, 1.0, n))
    mean_ctx = rng.uniform(200, 3000, n)
    pf = rng.integers(0, 3, n).astype(np.float64) * (rng.random(n) < 0.6)
    pf_tokens = np.where(pf > 0, np.minimum(rng.uniform(16, budget, n), budget - dc), 0.0)
    pf_tokens = np.maximum(pf_tokens, 0.0)
    pf = np.where(pf_tokens > 0, np.maximum(pf, 1.0), 0.0)
    chunk = np.divide(pf_tokens, pf, out=np.zeros(n), where=pf > 0)
    before = rng.uniform(0, 2000, n) * (rng.random(n) < 0.3)
    kv_usage = np.clip(load * rng.uniform(0.3, 1.1, n), 0.0, 1.0)
    waiting = np.where(load > 0.9, rng.poisson(3.0, n), 0).astype(np.float64)
    preempted = np.where(kv_usage > 0.97, rng.poisson(0.5, n), 0).astype(np.float64)
    cols = {
        "step_id": np.arange(n), "ts_start_ns": np.arange(n) * 1e7, "duration_us": np.ones(n),
        "running_depth": dc + pf, "waiting_depth": waiting, "num_prefill_reqs": pf,
        "num_decode_reqs": dc, "prefill_tokens": pf_tokens, "decode_tokens": dc,
        "num_finished": np.zeros(n), "num_preempted": preempted, "kv_usage_ratio": kv_usage,
        "kv_blocks_total": np.full(n, 50_000.0), "kv_blocks_free": 50_000.0 * (1 - kv_usage),
        "pf_count": pf, "pf_tokens": pf_tokens, "pf_tokens_sq": pf_tokens * chunk,
        "pf_ctx_tokens": pf_tokens * before, "pf_prompt_tokens": pf_tokens * (before + chunk),
        "pf_kv_tokens": pf_tokens + pf * before, "pf_ctx_max": chunk + before,
        "pf_sampling": np.where(rng.random(n) < 0.5, pf, 0.0), "dc_count": dc,
        "dc_ctx_sum": dc * mean_ctx, "dc_ctx_max": np.where(dc > 0, 2 * mean_ctx, 0.0),
        "blocks_allocated": (dc * mean_ctx + pf_tokens + pf * before) / 16,
        "blocks_cached": np.zeros(n), "preempted_before": np.minimum(preempted, dc),
    }
    arrays = {"experiment": pa.array([""] * n)}
    for fld in STEP_SCHEMA:
        if fld.name in cols:
            arrays[fld.name] = pa.array(np.asarray(cols[fld.name]).astype(
                np.int64 if fld.name == "step_id" else np.float64))
    arrays["composition"] = pa.array(["snapshot"] * n)
    return pa.table(arrays, schema=STEP_SCHEMA)


def label(frame: pd.DataFrame, features: Sequence[str], beta: np.ndarray,
          multipliers: dict[str, float], noise: float, rng: np.random.Generator) -> np.ndarray:
    """Durations of the synthetic truth (see module docstring), µs."""
    regimes = RegimeDetector().hard(frame)
    mult = np.array([multipliers[r] for r in REGIMES])[regimes]
    clean = mult * linear_predict(frame, features, beta)
    eps = np.clip(noise * rng.standard_t(3, len(frame)), -0.7, 5.0)
    return clean * (1.0 + eps)


def synthetic_frame(n_steps: int, seed: int = 0, configs: Sequence[SyntheticConfig] = CONFIGS,
                    noise: float = 0.05, features: Sequence[str] = PHYSICS_FEATURES,
                    multipliers: dict[str, float] | None = None, host_multiplier: float = 1.0
                    ) -> pd.DataFrame:
    """A feature frame of ``n_steps`` steps spread over ``configs`` (one experiment each);
    ``host_multiplier`` multiplies the truth's host-time (overhead-kind) coefficients — a
    machine whose CPU and driver launch slower (> 1) or faster."""
    rng = np.random.default_rng(seed)
    host = np.array([REGISTRY[n].kind == "overhead" for n in features], dtype=bool)
    beta = true_coefficients(features) * np.where(host, float(host_multiplier), 1.0)
    frames = []
    sizes = np.diff(np.linspace(0, n_steps, len(configs) + 1).astype(int))
    for cfg, n in zip(configs, sizes, strict=True):
        frame = feature_frame(_experiment(cfg), synthetic_steps(int(n), cfg, rng))
        frame["duration_us"] = label(frame, features, beta, multipliers or REGIME_MULTIPLIERS,
                                     noise, rng)
        frames.append(frame)
    return concat_frames(frames)
