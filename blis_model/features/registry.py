"""Feature registry: name → pure vectorized function, unit, kind and description.

``kind == "correction"``: the feature is a physical time estimate in µs; its coefficient
is a dimensionless correction whose physical prior is 1 (runs at datasheet peak).
``kind == "overhead"``: the feature is a count; its coefficient is µs per unit (prior 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from blis_model.features.context import Columns, FeatureContext

FeatureFn = Callable[[Columns, FeatureContext], np.ndarray]


@dataclass(frozen=True)
class Feature:
    name: str
    fn: FeatureFn
    unit: str  # unit of the feature value
    kind: str  # "correction" | "overhead"
    description: str

    @property
    def coefficient_unit(self) -> str:
        return "dimensionless" if self.kind == "correction" else f"µs per {self.unit}"

    @property
    def prior(self) -> float:
        return 1.0 if self.kind == "correction" else 0.0


REGISTRY: dict[str, Feature] = {}


def feature(name: str, unit: str, kind: str) -> Callable[[FeatureFn], FeatureFn]:
    """Register a feature function; its docstring is its description."""

    def wrap(fn: FeatureFn) -> FeatureFn:
        if kind not in ("correction", "overhead"):
            raise ValueError(f"unknown feature kind {kind}")
        REGISTRY[name] = Feature(name, fn, unit, kind, " ".join((fn.__doc__ or "").split()))
        return fn

    return wrap


def compute(names: Sequence[str], steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """The (n_steps, len(names)) feature matrix. Unknown names raise KeyError."""
    n = len(next(iter(steps.values()))) if steps else 0
    out = np.empty((n, len(names)))
    for j, name in enumerate(names):
        out[:, j] = np.broadcast_to(REGISTRY[name].fn(steps, ctx), (n,))
    return out


def describe(names: Sequence[str]) -> list[dict[str, str]]:
    """Schema of a feature list, as stored in releases."""
    return [{"name": n, "unit": REGISTRY[n].unit, "kind": REGISTRY[n].kind,
             "coefficient_unit": REGISTRY[n].coefficient_unit,
             "description": REGISTRY[n].description} for n in names]
