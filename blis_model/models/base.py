"""What every step-time family shares: the estimator contract and serialisation.

Contract (scikit-learn): parameters stored verbatim in ``__init__``; learning only in
``fit(X, y=None)`` where ``X`` is a feature frame (``blis_model.dataset``) and ``y``
defaults to ``X["duration_us"]``; learned state ends with ``_``; ``predict`` never
changes state. ``to_dict`` gives the native coefficients with units (for
``coefficients.json``) and ``from_dict`` rebuilds a fitted model from it.
``calibrate(X_target)`` returns a NEW model adapted to the target configurations
(few steps), leaving ``self`` untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin

from blis_model.features.registry import REGISTRY, describe


def design(X: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    """Columns ``names`` of the frame as a float64 matrix."""
    return X.loc[:, list(names)].to_numpy(dtype=np.float64)


def target(X: pd.DataFrame, y: Any = None) -> np.ndarray:
    values = X["duration_us"] if y is None else y
    return np.asarray(values, dtype=np.float64)


def priors(names: Sequence[str]) -> np.ndarray:
    """Physical prior of each coefficient: 1 for corrections, 0 for overheads."""
    return np.array([REGISTRY[n].prior if n in REGISTRY else 0.0 for n in names])


def correction_mask(names: Sequence[str]) -> np.ndarray:
    return np.array([n in REGISTRY and REGISTRY[n].kind == "correction" for n in names])


def coefficient_table(names: Sequence[str], beta: np.ndarray) -> list[dict[str, Any]]:
    """Coefficients with their feature, unit and meaning, for releases and reports."""
    schema = {d["name"]: d for d in describe([n for n in names if n in REGISTRY])}
    return [{"feature": n, "value": float(b),
             "unit": schema.get(n, {}).get("coefficient_unit", "")}
            for n, b in zip(names, beta, strict=True)]


def coefficient_values(table: list[dict[str, Any]]) -> np.ndarray:
    return np.array([row["value"] for row in table], dtype=np.float64)


class StepTimeModel(RegressorMixin, BaseEstimator):
    """Base of the families; subclasses define ``family``, ``fit``, ``predict``,
    ``to_dict``/``from_dict`` and ``calibrate``."""

    family: ClassVar[str] = ""

    def score(self, X: pd.DataFrame, y: Any = None, sample_weight: Any = None) -> float:
        """Negative MAPE (higher is better), so model selection ranks by relative error."""
        truth = target(X, y)
        return -float(np.mean(np.abs(self.predict(X) - truth) / truth))

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepTimeModel:  # pragma: no cover - abstract
        raise NotImplementedError

    def calibrate(self, X: pd.DataFrame, y: Any = None) -> StepTimeModel:  # pragma: no cover
        raise NotImplementedError
