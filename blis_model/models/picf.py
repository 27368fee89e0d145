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

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from blis_model.features.physics import PHYSICS_FEATURES
from blis_model.models.base import ConfigCoefficientSets, correction_mask, design, priors, target
from blis_model.models.solvers import RelativeGram, nonneg_ridge

OVERHEAD_RIDGE = 1e-4


class PICF(ConfigCoefficientSets):
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
        """Pseudo-observations pulling each coefficient to its prior: ``ridge``·n for
        corrections; a vanishing ``OVERHEAD_RIDGE``·n for counts, which only decides how
        collinear counts share a cost (per-kernel vs per-step when every training
        configuration launches the same kernels) instead of leaving it to rounding."""
        return np.where(correction_mask(self.features), self.ridge * n, OVERHEAD_RIDGE * n)

    def _fit_config(self, X: pd.DataFrame, y: np.ndarray) -> np.ndarray:
        stats = RelativeGram.from_rows(design(X, self.features), y)
        penalty = np.full(len(self.coef_), float(self.config_prior_steps))
        return nonneg_ridge(stats, self.coef_, penalty)

    def fit(self, X: pd.DataFrame, y: Any = None) -> PICF:
        y = target(X, y)
        if not len(y):
            raise ValueError("PICF.fit needs at least one step")
        names = list(self.features)
        stats = RelativeGram.from_rows(design(X, names), y)
        self.coef_ = nonneg_ridge(stats, priors(names), self._global_penalty(len(y)))
        self.n_features_in_ = len(names)
        self._fit_config_sets(X, y)
        return self

    def _predict_with(self, X: pd.DataFrame, coef: np.ndarray) -> np.ndarray:
        return design(X, self.features) @ coef

    def linear_parts(self, config_key: str | None
                     ) -> tuple[list[tuple[Sequence[str], np.ndarray]], Any]:
        """One part, Σ β·features, with the configuration's set (for the replay's
        compiled step time, ``requests.step_time``)."""
        return [(tuple(self.features), self.coefficients_for(config_key))], _first

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "params": {**self.get_params(), "features": list(self.features)},
            "features": list(self.features),
            **self._coefficient_sets(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PICF:
        params = dict(data["params"])
        params["features"] = tuple(params["features"])
        model = cls(**params)
        model._restore_sets(data)
        return model


def _first(values: Sequence[float]) -> float:
    return values[0]
