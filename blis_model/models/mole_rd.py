"""MoLE-RD — mixture of linear experts with rule-based regime detection (idea 2).

StepTime = Σ_r w_r(step) · Σ_k β_{r,k} f_k(step): the regime weights ``w_r`` come from
the physics rules of ``models.regimes`` (saturation, KV pressure, launch-bound,
compute-bound, memory-bound), softly blended near each boundary; each regime has its
own non-negative coefficient vector over the physics features (same units as PICF).

Fitting, on squared relative error:

1. a *global* PICF-style set (ridge toward the physical prior);
2. one expert per regime on every step weighted by its regime weight (the
   mixture-of-experts M-step with fixed gates), shrunk toward the global set with a
   prior worth ``regime_prior_steps`` steps — an empty regime is exactly the global set,
   a small one stays close to it;
3. per configuration, the choice of ``models.config_terms`` (also what ``calibrate``
   does on a target): the pooled experts, one scale on them, or the experts again
   shrunk toward them with a prior worth a few multiples of ``config_prior_steps``
   steps, each coefficient within its physical range around the pooled expert of its
   regime (bounds of the solver).

``boundary_jumps`` measures how much the prediction moves when a step's regime ratio
crosses a boundary (the discontinuity a hard switch would show).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from blis_model.features.physics import PHYSICS_FEATURES
from blis_model.models.base import (
    PerConfigurationTerms,
    StepTimeModel,
    calibration_block,
    coefficient_table,
    coefficient_values,
    correction_mask,
    priors,
    restore_choices,
    target,
)
from blis_model.models.config_terms import KAPPA, Selection, term_bounds
from blis_model.models.linear import columns_fn, config_groups, linear_predict, relative_stats
from blis_model.models.regimes import (
    COMPUTE_FEATURES,
    GATES,
    MEMORY_FEATURES,
    REGIMES,
    RegimeDetector,
    gate_weights,
    regime_counts,
)
from blis_model.models.solvers import bounded_ridge, nonneg_ridge

LAUNCH_FEATURES = ("step_overhead", "layer_kernels", "moe_layer_overhead")
"""Per-step host costs (counts constant within a configuration) whose fitted µs make the
launch floor of the launch-bound rule."""


class MoLERD(PerConfigurationTerms, StepTimeModel):
    """Per-regime non-negative linear experts over physics features, softly gated."""

    family = "mole_rd"

    def __init__(self, features: Sequence[str] = PHYSICS_FEATURES, ridge: float = 0.01,
                 regime_prior_steps: float = 100.0, gate_width: float = 0.25,
                 per_config: bool = True, config_prior_steps: float = 50.0,
                 launch_floor_us: float = 1000.0, launch_us_per_layer: float = 25.0,
                 kv_threshold: float = 0.9, saturation_fraction: float = 0.95,
                 compute_features: Sequence[str] = COMPUTE_FEATURES,
                 memory_features: Sequence[str] = MEMORY_FEATURES,
                 learn_launch_floor: bool = True, config_bound: float = KAPPA,
                 config_selection: str = "cv") -> None:
        self.features = features
        self.ridge = ridge
        self.regime_prior_steps = regime_prior_steps
        self.gate_width = gate_width
        self.per_config = per_config
        self.config_prior_steps = config_prior_steps
        self.launch_floor_us = launch_floor_us
        self.launch_us_per_layer = launch_us_per_layer
        self.kv_threshold = kv_threshold
        self.saturation_fraction = saturation_fraction
        self.compute_features = compute_features
        self.memory_features = memory_features
        self.learn_launch_floor = learn_launch_floor
        self.config_bound = config_bound
        self.config_selection = config_selection

    # -- regimes ------------------------------------------------------------------------
    @property
    def detector(self) -> RegimeDetector:
        """The regime rules; once fitted with ``learn_launch_floor``, the launch floor is
        the global fit's own host cost (µs per step, per kernel launch, per MoE layer)."""
        learned = getattr(self, "launch_coef_", {}) if self.learn_launch_floor else {}
        return RegimeDetector(self.launch_floor_us, self.launch_us_per_layer, self.kv_threshold,
                              self.saturation_fraction, tuple(self.compute_features),
                              tuple(self.memory_features), tuple(learned.items()))

    def regime_weights(self, X: pd.DataFrame) -> np.ndarray:
        """(steps, 5) blended regime weights (REGIMES order)."""
        return gate_weights(self.detector.log_ratios(X), self.gate_width)

    def regimes(self, X: pd.DataFrame) -> np.ndarray:
        """Hard regime index of every step (REGIMES order)."""
        return self.detector.hard(X)

    # -- fitting ------------------------------------------------------------------------
    def _fit_experts(self, X: pd.DataFrame, y: np.ndarray, W: np.ndarray, prior: np.ndarray,
                     prior_steps: float, bounded: bool = False) -> np.ndarray:
        """The (regimes, features) experts: each fit on every step weighted by its regime
        weight (the mixture-of-experts M-step), shrunk toward ``prior`` with a weight of
        ``prior_steps`` steps (``bounded``: inside the physical ranges around the pooled
        experts, ``config_terms.term_bounds``). A regime without weight keeps its prior
        exactly."""
        names = list(self.features)
        rows = columns_fn(X, names)
        out = np.array(prior, dtype=np.float64, copy=True)
        penalty = np.full(len(names), float(prior_steps))
        for k in range(W.shape[1]):
            if W[:, k].sum() > 0:
                stats = relative_stats(rows, y, w=W[:, k])
                if bounded:
                    lower, upper = term_bounds(self.regime_coef_[k], stats.column_scale,
                                               self.config_bound)
                    out[k] = bounded_ridge(stats, prior[k], penalty, lower, upper)
                else:
                    out[k] = nonneg_ridge(stats, prior[k], penalty)
        return out

    # -- per-configuration terms (models.config_terms) ---------------------------------
    def _reference_terms(self, key: str, X: pd.DataFrame) -> np.ndarray:
        return np.array(self.coefficients_for(key), dtype=np.float64, copy=True)

    def _terms_predict(self, X: pd.DataFrame, terms: np.ndarray) -> np.ndarray:
        W = self.regime_weights(X)
        names = list(self.features)
        return sum(W[:, k] * linear_predict(X, names, terms[k]) for k in range(len(REGIMES)))

    def _terms_fit(self, X: pd.DataFrame, y: np.ndarray, reference: np.ndarray,
                   prior_steps: float) -> np.ndarray:
        return self._fit_experts(X, y, self.regime_weights(X), reference, prior_steps,
                                 bounded=True)

    def _terms_layout(self, X: pd.DataFrame, y: np.ndarray
                      ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        names = list(self.features)
        W = self.regime_weights(X)
        rows = columns_fn(X, names)
        lower, upper = [], []
        for k in range(len(REGIMES)):
            scale = (relative_stats(rows, y, w=W[:, k]).column_scale if W[:, k].sum() > 0
                     else np.zeros(len(names)))
            lo, hi = term_bounds(self.regime_coef_[k], scale, self.config_bound)
            lower.append(lo)
            upper.append(hi)
        labels = [f"{r}/{n}" for r in REGIMES for n in names]
        return labels, self.regime_coef_.ravel(), np.concatenate(lower), np.concatenate(upper)

    def _apply(self, key: str, selection: Selection) -> None:
        if selection.terms is not None:
            self.config_coef_[key] = np.asarray(selection.terms, dtype=np.float64)
        self.config_choice_[key] = selection.record

    def fit(self, X: pd.DataFrame, y: Any = None) -> MoLERD:
        y = target(X, y)
        if not len(y):
            raise ValueError("MoLERD.fit needs at least one step")
        names = list(self.features)
        stats = relative_stats(columns_fn(X, names), y)
        penalty = np.where(correction_mask(names), self.ridge * len(y), 0.0)
        self.coef_ = nonneg_ridge(stats, priors(names), penalty)
        self.launch_coef_ = {n: float(b) for n, b in zip(names, self.coef_, strict=True)
                             if n in LAUNCH_FEATURES}
        W = self.regime_weights(X)
        prior = np.tile(self.coef_, (len(REGIMES), 1))
        self.regime_coef_ = self._fit_experts(X, y, W, prior, self.regime_prior_steps)
        self.regime_steps_ = regime_counts(self.regimes(X))
        self.config_coef_: dict[str, np.ndarray] = {}
        self.config_choice_: dict[str, dict[str, Any]] = {}
        if self.per_config:
            for key, idx in config_groups(X).items():
                self._apply(key, self._select(key, X.iloc[idx], y[idx]))
        self.n_features_in_ = len(names)
        return self

    def _copy_fitted(self) -> MoLERD:
        model = MoLERD(**self.get_params())
        model.coef_ = self.coef_.copy()
        model.regime_coef_ = self.regime_coef_.copy()
        model.regime_steps_ = dict(self.regime_steps_)
        model.launch_coef_ = dict(self.launch_coef_)
        model.config_coef_ = {k: v.copy() for k, v in self.config_coef_.items()}
        model.config_choice_ = copy.deepcopy(self.config_choice_)
        model.n_features_in_ = self.n_features_in_
        return model

    def calibrate(self, X: pd.DataFrame, y: Any = None) -> MoLERD:
        """A copy whose per-configuration experts are chosen and refit on ``X`` (few
        target steps) around the experts this model uses for that configuration now (its
        own if known, else the pooled regime experts)."""
        y = target(X, y)
        model = self._copy_fitted()
        for key, idx in config_groups(X).items():
            model._apply(key, self._select(key, X.iloc[idx], y[idx]))
        return model

    # -- prediction ---------------------------------------------------------------------
    def coefficients_for(self, config_key: str | None) -> np.ndarray:
        """The (regimes, features) experts used for a configuration."""
        return self.config_coef_.get(str(config_key), self.regime_coef_)

    def expert_predictions(self, X: pd.DataFrame) -> np.ndarray:
        """(steps, regimes): what each regime's expert predicts for every step, µs."""
        names = list(self.features)
        out = np.empty((len(X), len(REGIMES)))
        groups = config_groups(X) or {"": np.arange(len(X))}
        for key, idx in groups.items():
            coefs = self.coefficients_for(key)
            for k in range(len(REGIMES)):
                out[idx, k] = linear_predict(X, names, coefs[k], idx)
        return out

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return (self.regime_weights(X) * self.expert_predictions(X)).sum(axis=1)

    # -- serialisation ------------------------------------------------------------------
    def _regime_tables(self, coefs: np.ndarray) -> dict[str, list[dict[str, Any]]]:
        return {r: coefficient_table(self.features, coefs[k]) for k, r in enumerate(REGIMES)}

    def to_dict(self) -> dict[str, Any]:
        params = {**self.get_params(), "features": list(self.features),
                  "compute_features": list(self.compute_features),
                  "memory_features": list(self.memory_features)}
        return {
            "family": self.family,
            "params": params,
            "features": list(self.features),
            "regimes": list(REGIMES),
            "regime_steps": dict(self.regime_steps_),
            "launch_floor": [{"feature": n, "value": v, "unit": "µs per unit"}
                             for n, v in self.launch_coef_.items()],
            "global": coefficient_table(self.features, self.coef_),
            "per_regime": self._regime_tables(self.regime_coef_),
            "per_config": {k: self._regime_tables(v) for k, v in sorted(self.config_coef_.items())},
            "calibration": calibration_block(self.config_bound, self.config_prior_steps,
                                             self.config_selection, self.config_choice_),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoLERD:
        params = dict(data["params"])
        for key in ("features", "compute_features", "memory_features"):
            params[key] = tuple(params[key])
        model = cls(**params)

        def stack(tables: dict[str, list[dict[str, Any]]]) -> np.ndarray:
            return np.vstack([coefficient_values(tables[r]) for r in REGIMES])

        model.coef_ = coefficient_values(data["global"])
        model.regime_coef_ = stack(data["per_regime"])
        model.regime_steps_ = dict(data.get("regime_steps", {}))
        model.launch_coef_ = {r["feature"]: float(r["value"])
                              for r in data.get("launch_floor", [])}
        model.config_coef_ = {k: stack(v) for k, v in data["per_config"].items()}
        model.config_choice_ = restore_choices(data)
        model.n_features_in_ = len(model.features)
        return model


def boundary_jumps(model: MoLERD, X: pd.DataFrame, delta: float = 0.02, band: float = 0.1
                   ) -> dict[str, dict[str, float]]:
    """Relative change of the prediction (%) when a step's regime ratio moves from
    e^−δ to e^+δ of a boundary, for steps within e^±band of it, per gate.

    ``soft`` uses the model's gate width; ``hard`` the same experts with hard switches
    (the full discontinuity a rule-based router would show). Features are held fixed, so
    only the routing moves.
    """
    logr = model.detector.log_ratios(X)
    experts = model.expert_predictions(X)
    base = np.maximum((gate_weights(logr, model.gate_width) * experts).sum(axis=1), 1e-12)
    out: dict[str, dict[str, float]] = {}
    for g, name in enumerate(GATES):
        near = np.abs(logr[:, g]) < band
        row: dict[str, float] = {"steps_near": int(near.sum())}
        for label, width in (("soft", model.gate_width), ("hard", 0.0)):
            if not near.any():
                row.update({f"{label}_median_pct": 0.0, f"{label}_p90_pct": 0.0,
                            f"{label}_max_pct": 0.0})
                continue
            lo, hi = logr[near].copy(), logr[near].copy()
            lo[:, g], hi[:, g] = -delta, delta
            diff = ((gate_weights(hi, width) - gate_weights(lo, width)) * experts[near]).sum(1)
            jump = np.abs(diff) / base[near] * 100.0
            row.update({f"{label}_median_pct": float(np.median(jump)),
                        f"{label}_p90_pct": float(np.percentile(jump, 90)),
                        f"{label}_max_pct": float(jump.max())})
        out[name] = row
    return out
