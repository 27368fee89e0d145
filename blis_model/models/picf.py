"""PICF — physics-informed compositional features (idea 1 of the study).

StepTime = Σ_k β_k · f_k(step) with f_k the physics features (µs, or counts for
overheads). Coefficients are non-negative, fit on squared relative error, and
ridge-regularised toward the physical prior (corrections = 1, overheads free).

Two levels: a *global* coefficient set fit on all experiments pooled (features are
already hardware-normalised, so corrections transfer across GPUs), and one set per
*configuration* (``config_key``) shrunk toward the global set with a prior worth
``config_prior_steps`` pseudo-observations — so a configuration seen with few steps
stays close to the global physics and one seen with many steps follows its data.
``predict`` uses a configuration's own set when it has one, else the global set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from blis_model.features.physics import PHYSICS_FEATURES
from blis_model.models.base import (
    StepTimeModel,
    coefficient_table,
    coefficient_values,
    correction_mask,
    design,
    priors,
    target,
)
from blis_model.models.solvers import RelativeGram, nonneg_ridge


class PICF(StepTimeModel):
    """Non-negative relative-error ridge on physics features, global + per configuration."""

    family = "picf"

    def __init__(self, features: Sequence[str] = PHYSICS_FEATURES, ridge: float = 0.1,
                 per_config: bool = True, config_prior_steps: float = 50.0) -> None:
        self.features = features
        self.ridge = ridge
        self.per_config = per_config
        self.config_prior_steps = config_prior_steps

    # -- fitting ------------------------------------------------------------------------
    def _global_penalty(self, n: float) -> np.ndarray:
        return np.where(correction_mask(self.features), self.ridge * n, 0.0)

    def _fit_config(self, X: pd.DataFrame, y: np.ndarray, prior: np.ndarray) -> np.ndarray:
        stats = RelativeGram.from_rows(design(X, self.features), y)
        penalty = np.full(len(prior), float(self.config_prior_steps))
        return nonneg_ridge(stats, prior, penalty)

    def fit(self, X: pd.DataFrame, y: Any = None) -> PICF:
        y = target(X, y)
        if not len(y):
            raise ValueError("PICF.fit needs at least one step")
        names = list(self.features)
        stats = RelativeGram.from_rows(design(X, names), y)
        self.coef_ = nonneg_ridge(stats, priors(names), self._global_penalty(len(y)))
        self.config_coef_: dict[str, np.ndarray] = {}
        if self.per_config and "config_key" in X:
            for key, idx in X.groupby("config_key", sort=True).indices.items():
                self.config_coef_[str(key)] = self._fit_config(X.iloc[idx], y[idx], self.coef_)
        self.n_features_in_ = len(names)
        return self

    def calibrate(self, X: pd.DataFrame, y: Any = None) -> PICF:
        """A copy whose per-configuration sets are refit on ``X`` (few target steps),
        shrunk toward this model's global coefficients."""
        y = target(X, y)
        model = PICF(**self.get_params())
        model.coef_ = self.coef_.copy()
        model.config_coef_ = {k: v.copy() for k, v in self.config_coef_.items()}
        model.n_features_in_ = self.n_features_in_
        for key, idx in X.groupby("config_key", sort=True).indices.items():
            model.config_coef_[str(key)] = self._fit_config(X.iloc[idx], y[idx], self.coef_)
        return model

    def with_config_sets(self, specialists: Mapping[str, PICF]) -> PICF:
        """A copy (``per_config`` on) whose set for each configuration key is taken from
        ``specialists[key]`` — e.g. ``calibrate`` on that configuration's steps, run in
        parallel. ``fit`` equals ``PICF(per_config=False).fit`` merged this way."""
        model = PICF(**{**self.get_params(), "per_config": True})
        model.coef_ = self.coef_.copy()
        model.config_coef_ = {k: v.copy() for k, v in self.config_coef_.items()}
        model.n_features_in_ = self.n_features_in_
        for key in sorted(specialists):
            model.config_coef_[str(key)] = specialists[key].config_coef_[str(key)].copy()
        return model

    # -- prediction ---------------------------------------------------------------------
    def coefficients_for(self, config_key: str | None) -> np.ndarray:
        """The coefficient set used for a configuration (global if not calibrated)."""
        return self.config_coef_.get(str(config_key), self.coef_) if config_key else self.coef_

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        A = design(X, self.features)
        if "config_key" not in X or not self.config_coef_:
            return A @ self.coef_
        out = np.empty(len(X))
        for key, idx in X.groupby("config_key", sort=False).indices.items():
            out[idx] = A[idx] @ self.coefficients_for(str(key))
        return out

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "params": {**self.get_params(), "features": list(self.features)},
            "features": list(self.features),
            "global": coefficient_table(self.features, self.coef_),
            "per_config": {k: coefficient_table(self.features, v)
                           for k, v in sorted(self.config_coef_.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PICF:
        params = dict(data["params"])
        params["features"] = tuple(params["features"])
        model = cls(**params)
        model.coef_ = coefficient_values(data["global"])
        model.config_coef_ = {k: coefficient_values(v) for k, v in data["per_config"].items()}
        model.n_features_in_ = len(model.features)
        return model
