"""Split-conformal prediction intervals on relative residuals, per regime.

Scores are relative residuals r = y/ŷ − 1 of predictions made *out of experiment*: for
each training experiment, the wrapped estimator is fit on the other experiments (of
other configurations) and predicts it — the same situation as a configuration never
seen. With a single experiment, the split is temporal (first ``train_fraction`` of the
steps fit, the rest score). Scores are grouped by hard regime
(``models.regimes``); a regime with fewer than ``min_regime_steps`` scores uses the
pooled scores.

``interval(X, alpha)`` = ŷ·(1 + [q_lo, q_hi]) with q_lo, q_hi the conformal quantiles
of the scores at levels ⌊(n+1)·α/2⌋/n and ⌈(n+1)·(1 − α/2)⌉/n (clipped to the observed
range), ŷ from the estimator fit on all the data. Scores are stored as a quantile grid,
so intervals for any α are available after ``from_dict``.
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
                 train_fraction: float = TRAIN_FRACTION) -> None:
        self.estimator = estimator
        self.min_regime_steps = min_regime_steps
        self.train_fraction = train_fraction

    def _base(self) -> StepTimeModel:
        return clone(self.estimator) if self.estimator is not None else PICF()

    def out_of_sample_scores(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(relative residuals, hard regimes) predicted out of experiment (or, with one
        experiment, out of time)."""
        scores, regimes = [], []
        detector = RegimeDetector()
        names = sorted(X["experiment"].unique()) if "experiment" in X else []
        for name in names if len(names) > 1 else []:
            train, test = loo_split(X, name)
            if train.empty:
                continue
            pred = self._base().fit(train).predict(test)
            scores.append(target(test) / np.maximum(pred, 1e-12) - 1.0)
            regimes.append(detector.hard(test))
        if not scores:
            frame = X if "experiment" in X else X.assign(experiment="")
            train, test = temporal_split(frame, self.train_fraction)
            if train.empty or test.empty:
                train = test = frame
            pred = self._base().fit(train).predict(test)
            scores.append(target(test) / np.maximum(pred, 1e-12) - 1.0)
            regimes.append(detector.hard(test))
        return np.concatenate(scores), np.concatenate(regimes)

    def fit(self, X: pd.DataFrame, y: Any = None) -> SplitConformal:
        if y is not None:
            X = X.assign(duration_us=np.asarray(y, dtype=np.float64))
        if not len(X):
            raise ValueError("SplitConformal.fit needs at least one step")
        scores, regimes = self.out_of_sample_scores(X)
        self.pooled_ = _score_table(scores)
        self.regime_scores_ = {r: _score_table(scores[regimes == k])
                               for k, r in enumerate(REGIMES)}
        self.estimator_ = self._base().fit(X)
        return self

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return self.estimator_.predict(X)

    def calibrate(self, X: pd.DataFrame, y: Any = None) -> SplitConformal:
        """A copy whose estimator is calibrated on ``X``; the scores are kept (intervals
        stay those of an unseen configuration, i.e. conservative)."""
        model = SplitConformal(**self.get_params())
        model.estimator_ = self.estimator_.calibrate(X, y)
        model.pooled_ = dict(self.pooled_)
        model.regime_scores_ = dict(self.regime_scores_)
        return model

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
        lo, hi = np.empty(len(X)), np.empty(len(X))
        for k, name in enumerate(REGIMES):
            mask = regimes == k
            if mask.any():
                q_lo, q_hi = self.score_bounds(name, alpha)
                lo[mask] = pred[mask] * (1.0 + q_lo)
                hi[mask] = pred[mask] * (1.0 + q_hi)
        return np.maximum(lo, 0.0), hi

    def coverage(self, X: pd.DataFrame, alpha: float = 0.1) -> float:
        """Fraction of steps of ``X`` whose duration lies in the (1 − alpha) interval."""
        lo, hi = self.interval(X, alpha)
        y = target(X)
        return float(np.mean((y >= lo) & (y <= hi))) if len(y) else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family,
                "params": {"min_regime_steps": self.min_regime_steps,
                           "train_fraction": self.train_fraction},
                "score": "relative residual y / prediction - 1",
                "grid": GRID.tolist(),
                "pooled": self.pooled_, "per_regime": self.regime_scores_,
                "estimator": self.estimator_.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitConformal:
        estimator = model_from_dict(data["estimator"])
        model = cls(estimator=clone(estimator), **data["params"])
        model.estimator_ = estimator
        model.pooled_ = data["pooled"]
        model.regime_scores_ = data["per_regime"]
        return model
