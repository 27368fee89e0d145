"""Rule-based regime detection from physics quantities, hard or soft (blended).

Each step gets four *pressure ratios*, each > 1 exactly when its condition holds:

* ``saturation``: batch / (fraction·max_num_seqs) — or any request waiting in the queue;
* ``kv_pressure``: KV-cache usage / threshold — or any preempted / recomputed request;
* ``launch_bound``: CPU launch floor / roofline GPU time, the floor being the fitted host
  cost Σ µs-per-unit·count (``launch_coef``: per step, per kernel launch, per MoE layer;
  MoLE-RD learns it) or, unfitted, ``launch_floor_us + launch_us_per_layer·layers`` (µs),
  and the GPU time ``max(compute µs, memory µs)`` summed from the physics features of
  each side;
* ``compute_bound``: compute µs / memory µs.

A decision list turns them into five regimes (in priority order): saturation,
kv_pressure, launch_bound, compute_bound, memory_bound (the rest). Soft gating replaces
each "ratio > 1" with a logistic in log(ratio) of width ``width`` (0 = hard rules), so
the weights of the five regimes are continuous in the physics and sum to 1.
Count-triggered conditions (a waiting or preempted request) are discrete: their log
ratio is ±``DISCRETE_LOG_RATIO``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import expit

from blis_model.models.linear import frame_column

REGIMES: tuple[str, ...] = ("saturation", "kv_pressure", "launch_bound", "compute_bound",
                            "memory_bound")
GATES: tuple[str, ...] = REGIMES[:-1]  # the last regime takes what the gates leave
COMPUTE_FEATURES: tuple[str, ...] = ("gemm_compute_us", "prefill_attention_us", "lm_head_us")
MEMORY_FEATURES: tuple[str, ...] = ("weight_read_us", "decode_attention_us",
                                     "mixed_decode_attention_us", "decode_attention_tail_us",
                                     "activation_io_us")  # names a frame lacks are skipped
DISCRETE_LOG_RATIO = 8.0
MIN_WEIGHT = 1e-9  # regime weights below this are exactly 0 (an empty regime stays empty)


def _sum_columns(X: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    out = np.zeros(len(X))
    for name in names:
        if name in X:
            out += X[name].to_numpy(dtype=np.float64)
    return out


def _safe_log_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """log(num/den) with 0/0 → −8 (condition absent) and x/0 → +8."""
    num = np.maximum(num, 0.0)
    den = np.maximum(den, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(num) - np.log(den)
    out = np.where(np.isnan(out), -DISCRETE_LOG_RATIO, out)
    return np.clip(out, -50.0, 50.0)


@dataclass(frozen=True)
class RegimeDetector:
    """The regime rules and their thresholds (units in the field comments)."""

    launch_floor_us: float = 1000.0  # CPU cost of a step regardless of the model, µs
    launch_us_per_layer: float = 25.0  # CPU launch cost per layer, µs
    kv_threshold: float = 0.9  # KV usage fraction where pressure starts
    saturation_fraction: float = 0.95  # batch / max_num_seqs where saturation starts
    compute_features: tuple[str, ...] = COMPUTE_FEATURES
    memory_features: tuple[str, ...] = MEMORY_FEATURES
    # learned host cost: (feature, µs per unit) pairs replacing the launch numbers above
    launch_coef: tuple[tuple[str, float], ...] = ()

    def compute_memory_us(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Roofline sides of every step: (compute µs, memory µs)."""
        return _sum_columns(X, self.compute_features), _sum_columns(X, self.memory_features)

    def launch_floor(self, X: pd.DataFrame) -> np.ndarray:
        """CPU launch floor of every step, µs: Σ coefficient·count over ``launch_coef``
        when learned, else ``launch_floor_us + launch_us_per_layer·arch_layers``."""
        if self.launch_coef:
            return sum(c * frame_column(X, name, 0.0) for name, c in self.launch_coef)
        layers = frame_column(X, "arch_layers", np.nan)
        if np.isnan(layers).all():
            layers = frame_column(X, "layer_overhead", 0.0)
        return self.launch_floor_us + self.launch_us_per_layer * np.nan_to_num(layers)

    def log_ratios(self, X: pd.DataFrame) -> np.ndarray:
        """(steps, 4) log pressure ratios in GATES order; > 0 means the condition holds."""
        n = len(X)
        out = np.empty((n, len(GATES)))
        batch = np.maximum(frame_column(X, "running_depth"),
                           frame_column(X, "pf_count") + frame_column(X, "dc_count"))
        mns = frame_column(X, "max_num_seqs", np.inf)
        sat = _safe_log_ratio(batch, self.saturation_fraction * mns)
        out[:, 0] = np.where(frame_column(X, "waiting_depth") > 0, DISCRETE_LOG_RATIO, sat)
        kv = _safe_log_ratio(frame_column(X, "kv_usage_ratio"),
                             np.full(n, self.kv_threshold))
        preempted = frame_column(X, "num_preempted") + frame_column(X, "preempted_before")
        out[:, 1] = np.where(preempted > 0, DISCRETE_LOG_RATIO, kv)
        compute, memory = self.compute_memory_us(X)
        out[:, 2] = _safe_log_ratio(self.launch_floor(X), np.maximum(compute, memory))
        out[:, 3] = _safe_log_ratio(compute, memory)
        return out

    def hard(self, X: pd.DataFrame) -> np.ndarray:
        """Index into REGIMES of every step under the hard rules."""
        return np.argmax(gate_weights(self.log_ratios(X), 0.0), axis=1)


def gate_weights(log_ratios: np.ndarray, width: float) -> np.ndarray:
    """(steps, 5) regime weights from the decision list; rows sum to 1.

    Gate membership is σ(log r / width) (the step function when ``width`` is 0).
    """
    member = expit(log_ratios / width) if width > 0 else (log_ratios > 0).astype(np.float64)
    n = len(log_ratios)
    weights = np.empty((n, len(REGIMES)))
    remaining = np.ones(n)
    for k in range(len(GATES)):
        weights[:, k] = remaining * member[:, k]
        remaining = remaining * (1.0 - member[:, k])
    weights[:, -1] = remaining  # memory_bound: not compute-bound after the other gates
    weights[weights < MIN_WEIGHT] = 0.0
    return weights / weights.sum(axis=1, keepdims=True)


def regime_counts(regimes: np.ndarray) -> dict[str, int]:
    """Steps per regime name (every regime listed, 0 when empty)."""
    counts = np.bincount(regimes, minlength=len(REGIMES))
    return {name: int(c) for name, c in zip(REGIMES, counts, strict=True)}
