"""Split-conformal prediction intervals on relative residuals, per regime.

Scores are relative residuals r = y/ŷ − 1 of predictions made *out of experiment*: for
each training experiment, the wrapped estimator is fit on the other experiments (of
other configurations) and predicts it — the same situation as a configuration never
seen. With a single experiment, the split is temporal (first ``train_fraction`` of the
steps fit, the rest score). Scores are grouped by hard regime
(``models.regimes``); a regime with fewer than ``min_regime_steps`` scores uses the
pooled scores.

``interval(X, alpha)`` = ŷ·(1 + s(d)·[q_lo, q_hi]) with q_lo, q_hi the conformal
quantiles of the (normalised) scores at levels ⌊(n+1)·α/2⌋/n and ⌈(n+1)·(1 − α/2)⌉/n
(clipped to the observed range), ŷ from the estimator fit on all the data. Scores are
stored as a quantile grid, so intervals for any α are available after ``from_dict``.

**Far from every donor, wider.** A configuration's *novelty* d is its distance to the
NEAREST configuration the estimator was fit on, over descriptors of what changes the
physics (:func:`descriptor_distance`: weight dtype, GPU, MoE structure, TP; each axis
0…1, summed). Intervals widen by s(d) = 1 + γ·d. Scores are normalised the same way
(each out-of-experiment score divided by s(d) of its held-out configuration against the
others), so the pooled quantiles stay exchangeable (normalised split conformal). γ is
estimated from the out-of-experiment errors themselves — the non-negative fit of each
held-out configuration's mean |score| to a·(1 + γ·d) — when they span at least two
novelties; otherwise (every held-out configuration as near its donors as the others) the
data cannot tell and γ is ``widening_prior`` (1: one new axis doubles the spread).
A configuration of the training data (or calibrated on) has d = 0.

**Machine host factors do not narrow intervals.** A configuration never seen on a
machine with calibrated configurations predicts with that machine's host factor
(``config_terms``, *Machine host factors*); its novelty is unchanged — the ``gpu`` axis
still compares descriptors with the nearest donor, since the factor was learnt from
OTHER configurations of the machine — and the out-of-experiment scores are those of the
estimator as it predicts a configuration never seen (with the factors its donors give),
so the interval reflects how well that zero-shot works, nothing tighter.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone

from blis_model.configuration.defaults import TRAIN_FRACTION
from blis_model.features.frame import loo_split, temporal_split
from blis_model.models.base import StepTimeModel, target
from blis_model.models.picf import PICF
from blis_model.models.regimes import REGIMES, RegimeDetector
from blis_model.models.registry import model_from_dict

GRID = np.linspace(0.0, 1.0, 401)  # stored score quantile levels
DESCRIPTORS: tuple[str, ...] = ("arch_weight_bytes", "hw_hbm_tbs", "hw_interconnect_gbs",
                                "hw_tflops", "arch_experts", "arch_top_k", "tp")
"""Frame columns describing a configuration (per-experiment constants)."""
AXES: tuple[str, ...] = ("dtype", "gpu", "moe", "tp")
SAME = 0.01  # relative difference below which two hardware numbers are the same GPU
MAX_WIDENING = 10.0  # γ at most: a configuration one axis away gets ≤ 11× the spread


def config_descriptors(X: pd.DataFrame) -> dict[str, np.ndarray]:
    """Descriptor vector (``DESCRIPTORS``; NaN where the frame lacks a column) of every
    configuration of ``X``."""
    if "config_key" not in X or not len(X):
        return {}
    first = X.groupby("config_key", sort=True).head(1)
    cols = [first[c].to_numpy(dtype=np.float64) if c in first else np.full(len(first), np.nan)
            for c in DESCRIPTORS]
    return {str(k): np.array([c[i] for c in cols])
            for i, k in enumerate(first["config_key"].to_numpy())}


def _log2_gap(a: float, b: float) -> float:
    if not (np.isfinite(a) and np.isfinite(b)) or a <= 0 or b <= 0:
        return 0.0
    return min(1.0, abs(math.log2(a / b)))


def _differs(a: float, b: float) -> bool:
    return bool(np.isfinite(a) and np.isfinite(b) and abs(a - b) > SAME * max(abs(a), abs(b)))


def descriptor_distance(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per-axis distance (0…1) between two configurations' descriptors: ``dtype`` —
    |log2| of the weight-bytes ratio (bf16 → fp8: 1); ``gpu`` — 1 when HBM or
    interconnect bandwidth (or, same dtype, the peak) differ; ``moe`` — 1 between a dense
    and a MoE model, else |log2| of the expert-count ratio + of the top-k ratio; ``tp`` —
    |log2| of the TP ratio (each capped at 1)."""
    wb, hbm, link, peak, experts, top_k, tp = range(len(DESCRIPTORS))
    gpu = (_differs(a[hbm], b[hbm]) or _differs(a[link], b[link])
           or (not _differs(a[wb], b[wb]) and _differs(a[peak], b[peak])))
    ea, eb = (float(v) if np.isfinite(v) else 0.0 for v in (a[experts], b[experts]))
    if (ea > 0) != (eb > 0):
        moe = 1.0
    elif ea > 0:
        moe = min(1.0, _log2_gap(ea, eb) + _log2_gap(a[top_k], b[top_k]))
    else:
        moe = 0.0
    return {"dtype": _log2_gap(a[wb], b[wb]), "gpu": float(gpu), "moe": moe,
            "tp": _log2_gap(a[tp], b[tp])}


def novelty(target: np.ndarray, donors: list[np.ndarray]) -> tuple[float, dict[str, float]]:
    """(distance, per-axis distances) of a configuration to the NEAREST donor (0 without
    donors: nothing to compare with)."""
    best: tuple[float, dict[str, float]] = (0.0, dict.fromkeys(AXES, 0.0))
    for i, d in enumerate(donors):
        axes = descriptor_distance(target, d)
        total = float(sum(axes.values()))
        if i == 0 or total < best[0]:
            best = (total, axes)
    return best


def fit_widening(distances: np.ndarray, spreads: np.ndarray, weights: np.ndarray,
                 prior: float) -> tuple[float, str]:
    """(γ, how): non-negative weighted least squares of spread ≈ a + b·d, γ = b/a (at most
    ``MAX_WIDENING``); ``prior`` when the held-out configurations span fewer than two
    novelties (or a is 0)."""
    d = np.asarray(distances, dtype=np.float64)
    if len(d) < 2 or np.ptp(d) <= 0:
        return float(prior), "prior (every held-out configuration equally near its donors)"
    from scipy.optimize import nnls

    w = np.sqrt(np.asarray(weights, dtype=np.float64))
    a_b, _ = nnls(np.column_stack([np.ones_like(d), d]) * w[:, None],
                  np.asarray(spreads, dtype=np.float64) * w)
    if a_b[0] <= 0:
        return MAX_WIDENING, "fit (capped)"
    return float(min(a_b[1] / a_b[0], MAX_WIDENING)), "fit on the held-out configurations"


def _score_table(scores: np.ndarray) -> dict[str, Any]:
    return {"n": int(len(scores)), "quantiles": np.quantile(scores, GRID).tolist()
            if len(scores) else []}


def _conformal_quantile(table: dict[str, Any], level: float, upper: bool) -> float:
    n = table["n"]
    k = math.ceil((n + 1) * level) if upper else math.floor((n + 1) * level)
    return float(np.interp(min(max(k / n, 0.0), 1.0), GRID, table["quantiles"]))


class SplitConformal(StepTimeModel):
    """Wraps any family; adds ``interval(X, alpha)`` with per-regime conformal scores."""

    family = "conformal"

    def __init__(self, estimator: StepTimeModel | None = None, min_regime_steps: int = 30,
                 train_fraction: float = TRAIN_FRACTION, widening_prior: float = 1.0,
                 widen: bool = True) -> None:
        self.estimator = estimator
        self.min_regime_steps = min_regime_steps
        self.train_fraction = train_fraction
        self.widening_prior = widening_prior
        self.widen = widen

    def _base(self) -> StepTimeModel:
        return clone(self.estimator) if self.estimator is not None else PICF()

    def out_of_sample_scores(self, X: pd.DataFrame
                             ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """(relative residuals, hard regimes, one record per held-out experiment: its
        configuration, steps, novelty against the others and mean |score|) predicted out
        of experiment (or, with one experiment, out of time: novelty 0)."""
        scores, regimes, held = [], [], []
        detector = RegimeDetector()
        names = sorted(X["experiment"].unique()) if "experiment" in X else []
        for name in names if len(names) > 1 else []:
            train, test = loo_split(X, name)
            if train.empty:
                continue
            pred = self._base().fit(train).predict(test)
            r = target(test) / np.maximum(pred, 1e-12) - 1.0
            scores.append(r)
            regimes.append(detector.hard(test))
            mine = config_descriptors(test)
            key = next(iter(mine), "")
            d, axes = novelty(mine[key], list(config_descriptors(train).values())) if mine \
                else (0.0, dict.fromkeys(AXES, 0.0))
            held.append({"experiment": name, "config_key": key, "steps": int(len(test)),
                         "novelty": d, "axes": axes, "mean_abs_score": float(np.mean(np.abs(r)))})
        if not scores:
            frame = X if "experiment" in X else X.assign(experiment="")
            train, test = temporal_split(frame, self.train_fraction)
            if train.empty or test.empty:
                train = test = frame
            pred = self._base().fit(train).predict(test)
            r = target(test) / np.maximum(pred, 1e-12) - 1.0
            scores.append(r)
            regimes.append(detector.hard(test))
            held = [{"experiment": "", "config_key": "", "steps": int(len(test)),
                     "novelty": 0.0, "axes": dict.fromkeys(AXES, 0.0),
                     "mean_abs_score": float(np.mean(np.abs(r)))}]
        return np.concatenate(scores), np.concatenate(regimes), held

    def fit(self, X: pd.DataFrame, y: Any = None) -> SplitConformal:
        if y is not None:
            X = X.assign(duration_us=np.asarray(y, dtype=np.float64))
        if not len(X):
            raise ValueError("SplitConformal.fit needs at least one step")
        scores, regimes, held = self.out_of_sample_scores(X)
        if self.widen:
            by_config: dict[str, list[dict[str, Any]]] = {}
            for h in held:
                by_config.setdefault(h["config_key"], []).append(h)
            d = np.array([g[0]["novelty"] for g in by_config.values()])
            spread = np.array([np.average([h["mean_abs_score"] for h in g],
                                          weights=[h["steps"] for h in g])
                               for g in by_config.values()])
            self.widening_, self.widening_source_ = fit_widening(
                d, spread, np.ones(len(d)), self.widening_prior)
        else:
            self.widening_, self.widening_source_ = 0.0, "off"
        sizes = [h["steps"] for h in held]
        spread_of = np.repeat([1.0 + self.widening_ * h["novelty"] for h in held], sizes)
        normalised = scores / spread_of
        self.held_out_ = held
        self.pooled_ = _score_table(normalised)
        self.regime_scores_ = {r: _score_table(normalised[regimes == k])
                               for k, r in enumerate(REGIMES)}
        self.estimator_ = self._base().fit(X)
        self.donors_ = config_descriptors(X)
        return self

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return self.estimator_.predict(X)

    def calibrate(self, X: pd.DataFrame, y: Any = None) -> SplitConformal:
        """A copy whose estimator is calibrated on ``X``; the scores are kept (intervals
        stay those of an unseen configuration, i.e. conservative)."""
        model = SplitConformal(**self.get_params(deep=False))
        model.estimator_ = self.estimator_.calibrate(X, y)
        model.pooled_ = dict(self.pooled_)
        model.regime_scores_ = dict(self.regime_scores_)
        model.widening_, model.widening_source_ = self.widening_, self.widening_source_
        model.held_out_ = list(self.held_out_)
        model.donors_ = {**self.donors_, **config_descriptors(X)}  # now seen: novelty 0
        return model

    def novelty(self, X: pd.DataFrame) -> dict[str, dict[str, Any]]:
        """Per configuration of ``X``: its novelty d (distance to the nearest donor), the
        per-axis distances and the interval widening 1 + γ·d."""
        donors = list(self.donors_.values())
        out = {}
        for key, desc in config_descriptors(X).items():
            d, axes = novelty(desc, donors)
            out[key] = {"novelty": d, "axes": axes, "widening": 1.0 + self.widening_ * d}
        return out

    def _widening(self, X: pd.DataFrame) -> np.ndarray:
        """1 + γ·d of every row (1 without configuration columns)."""
        out = np.ones(len(X))
        if "config_key" not in X or not self.widening_:
            return out
        factors = {k: v["widening"] for k, v in self.novelty(X).items()}
        keys = X["config_key"].astype(str).to_numpy()
        for key, f in factors.items():
            out[keys == key] = f
        return out

    def score_bounds(self, regime: str, alpha: float) -> tuple[float, float]:
        """(q_lo, q_hi) relative bounds of the (1 − alpha) interval for a regime."""
        table = self.regime_scores_.get(regime, {"n": 0})
        if table["n"] < max(self.min_regime_steps, 1):
            table = self.pooled_
        return (_conformal_quantile(table, alpha / 2, upper=False),
                _conformal_quantile(table, 1 - alpha / 2, upper=True))

    def interval(self, X: pd.DataFrame, alpha: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) µs of the (1 − alpha) prediction interval of every step."""
        pred = self.predict(X)
        regimes = RegimeDetector().hard(X)
        widen = self._widening(X)
        lo, hi = np.empty(len(X)), np.empty(len(X))
        for k, name in enumerate(REGIMES):
            mask = regimes == k
            if mask.any():
                q_lo, q_hi = self.score_bounds(name, alpha)
                lo[mask] = pred[mask] * (1.0 + widen[mask] * q_lo)
                hi[mask] = pred[mask] * (1.0 + widen[mask] * q_hi)
        return np.maximum(lo, 0.0), hi

    def coverage(self, X: pd.DataFrame, alpha: float = 0.1) -> float:
        """Fraction of steps of ``X`` whose duration lies in the (1 − alpha) interval."""
        lo, hi = self.interval(X, alpha)
        y = target(X)
        return float(np.mean((y >= lo) & (y <= hi))) if len(y) else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family,
                "params": {"min_regime_steps": self.min_regime_steps,
                           "train_fraction": self.train_fraction,
                           "widening_prior": self.widening_prior, "widen": self.widen},
                "score": "relative residual (y / prediction - 1) / (1 + widening * novelty)",
                "grid": GRID.tolist(),
                "pooled": self.pooled_, "per_regime": self.regime_scores_,
                "widening": {"value": self.widening_, "source": self.widening_source_,
                             "descriptors": list(DESCRIPTORS), "axes": list(AXES),
                             "held_out": self.held_out_},
                "donors": {k: [None if not np.isfinite(v) else float(v) for v in d]
                           for k, d in sorted(self.donors_.items())},
                "estimator": self.estimator_.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitConformal:
        estimator = model_from_dict(data["estimator"])
        model = cls(estimator=clone(estimator), **data["params"])
        model.estimator_ = estimator
        model.pooled_ = data["pooled"]
        model.regime_scores_ = data["per_regime"]
        widening = data.get("widening") or {"value": 0.0, "source": "off", "held_out": []}
        model.widening_, model.widening_source_ = widening["value"], widening["source"]
        model.held_out_ = list(widening.get("held_out", []))
        model.donors_ = {k: np.array([np.nan if v is None else v for v in d], dtype=np.float64)
                         for k, d in (data.get("donors") or {}).items()}
        return model
