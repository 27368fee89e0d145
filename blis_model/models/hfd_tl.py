"""HFD-TL — hierarchical feature decomposition with transfer learning (idea 3).

StepTime(step of configuration c) = Σ_g γ_{c,g} · Σ_{k∈g} β_k f_k(step) + Σ_j δ_{c,j} r_j(step)

* **base** β (units of the physics features): universal physics, fit on the pooled
  donor experiments (non-negative, relative error, ridge toward the physical prior);
* **configuration** γ_{c,g} (dimensionless, prior 1) per scale group g — by default
  ``gpu`` (the corrections: roofline µs) and ``cpu`` (the overheads: counts) — how much
  faster or slower this configuration's GPU work and CPU overheads run than the
  universal physics says (``scale_groups="single"``: one γ for everything);
* **residual** δ_c (µs per unit of the residual features, prior 0): configuration
  overheads the base cannot carry (per step, per request, per mixed step, …).

Fitting backfits base and donor configuration terms (``n_backfit`` rounds), then
normalises each γ_g to a step-weighted geometric mean of 1, so a configuration never
seen predicts with γ = 1, δ = 0. The released (γ_c, δ_c) of every configuration — of a
fresh fit and of ``calibrate`` on a target — are the choice of ``models.config_terms``
against the fixed base: none (γ = 1, δ = 0, or the base release's terms), one host
factor h (with ``scale_groups="kind"``: the overheads group γ_cpu and the overhead-kind
residuals δ × h, the GPU group kept), one scale (γ_g = δ-scale = s), or (γ, δ) shrunk
toward the reference with priors worth a few multiples of ``config_prior_steps`` /
``residual_prior_steps`` steps — a few parameters, so a few dozen target steps suffice —
with γ in [1/κ, κ] and each δ at most what would alone take the whole step (bounds of
the solver). A configuration never seen predicts with γ_cpu = its machine's host factor
(``config_terms``, *Machine host factors*), γ_gpu = 1, δ = 0.
:func:`learning_curve` measures error against the number of target steps.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from blis_model.features import candidates  # noqa: F401 - registers residual features
from blis_model.features.physics import PHYSICS_FEATURES
from blis_model.metrics import summary
from blis_model.models.base import (
    PerConfigurationTerms,
    StepTimeModel,
    calibration_block,
    coefficient_table,
    coefficient_values,
    correction_mask,
    design,
    host_mask,
    host_scaling,
    priors,
    restore_choices,
    restore_machine_factors,
    target,
)
from blis_model.models.config_terms import (
    KAPPA,
    Selection,
    column_scale,
    machine_factor,
    machine_host_factors,
    term_bounds,
)
from blis_model.models.linear import config_groups, linear_predict, relative_stats
from blis_model.models.solvers import RelativeGram, bounded_ridge, nonneg_ridge

RESIDUAL_FEATURES: tuple[str, ...] = ("step_overhead", "request_overhead", "prefill_step")
SCALE_GROUPS: tuple[str, ...] = ("gpu", "cpu")  # corrections (GPU µs), overheads (counts)
SCALE_UNIT = "dimensionless (× base prediction of the group)"
LEARNING_CURVE_STEPS: tuple[int, ...] = (25, 50, 100, 250, 500, 1000)


def fit_config_terms(base_parts: np.ndarray, residual: np.ndarray, y: np.ndarray,
                     prior_scale: np.ndarray, prior_residual: np.ndarray, scale_steps: float,
                     residual_steps: float, kappa: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(γ, δ) ≥ 0 minimising Σ((Σ_g γ_g·base_g + r·δ)/y − 1)² + priors worth the given
    steps. ``base_parts`` is (steps, groups): the base prediction split by scale group.
    With ``kappa`` every term stays in its physical range (:func:`config_term_bounds`),
    a box constraint of the solver."""
    D = np.column_stack([base_parts, residual])
    stats = RelativeGram.from_rows(D, y)
    g = base_parts.shape[1]
    prior = np.concatenate([prior_scale, prior_residual])
    penalty = np.concatenate([np.full(g, scale_steps), np.full(residual.shape[1],
                                                                residual_steps)])
    if kappa is None:
        sol = nonneg_ridge(stats, prior, penalty)
    else:
        lower, upper = term_bounds(neutral_terms(g, residual.shape[1]), stats.column_scale,
                                   kappa)
        sol = bounded_ridge(stats, prior, penalty, lower, upper)
    return sol[:g], sol[g:]


def neutral_terms(groups: int, residuals: int) -> np.ndarray:
    """The global value of the configuration terms: γ = 1 per group, δ = 0."""
    return np.concatenate([np.ones(groups), np.zeros(residuals)])


def config_term_bounds(base_parts: np.ndarray, residual: np.ndarray, y: np.ndarray,
                       kappa: float) -> tuple[np.ndarray, np.ndarray]:
    """Physical range of (γ, δ): γ_g within [1/κ, κ] of the universal base; each δ at
    most the value at which it alone would take the whole step (``config_terms``)."""
    D = np.column_stack([base_parts, residual]) / np.asarray(y, dtype=np.float64)[:, None]
    return term_bounds(neutral_terms(base_parts.shape[1], residual.shape[1]),
                       column_scale(D), kappa)


class HFDTL(PerConfigurationTerms, StepTimeModel):
    """Universal physics base + per-configuration scale and residual terms."""

    family = "hfd_tl"

    def __init__(self, features: Sequence[str] = PHYSICS_FEATURES,
                 residual_features: Sequence[str] = RESIDUAL_FEATURES,
                 scale_groups: str = "kind", ridge: float = 0.01,
                 config_prior_steps: float = 2.0, residual_prior_steps: float = 2.0,
                 n_backfit: int = 3, per_config: bool = True, config_bound: float = KAPPA,
                 config_selection: str = "cv") -> None:
        self.features = features
        self.residual_features = residual_features
        self.scale_groups = scale_groups
        self.ridge = ridge
        self.config_prior_steps = config_prior_steps
        self.residual_prior_steps = residual_prior_steps
        self.n_backfit = n_backfit
        self.per_config = per_config
        self.config_bound = config_bound
        self.config_selection = config_selection

    # -- structure ----------------------------------------------------------------------
    @property
    def group_names(self) -> list[str]:
        if self.scale_groups == "single":
            return ["all"]
        if self.scale_groups == "kind":
            return list(SCALE_GROUPS)
        raise ValueError(f"scale_groups must be 'kind' or 'single', got {self.scale_groups!r}")

    @property
    def group_of_feature(self) -> np.ndarray:
        """Scale group index of every base feature (kind: 0 corrections, 1 overheads)."""
        if len(self.group_names) == 1:
            return np.zeros(len(self.features), dtype=int)
        return np.where(correction_mask(self.features), 0, 1)

    def _parts(self, X: pd.DataFrame, coef: np.ndarray, idx: np.ndarray | None = None
               ) -> np.ndarray:
        """(steps, groups) base prediction split by scale group, µs."""
        groups = self.group_of_feature
        names = np.asarray(list(self.features), dtype=object)
        return np.column_stack([linear_predict(X, list(names[groups == g]), coef[groups == g],
                                               idx) for g in range(len(self.group_names))])

    # -- fitting ------------------------------------------------------------------------
    def _terms(self, parts: np.ndarray, X: pd.DataFrame, y: np.ndarray,
               prior: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return fit_config_terms(parts, design(X, self.residual_features), y, prior[0],
                                prior[1], self.config_prior_steps, self.residual_prior_steps)

    def _fit_base(self, X: pd.DataFrame, y: np.ndarray, scale: np.ndarray,
                  offset: np.ndarray) -> np.ndarray:
        """β given per-step group scales (steps, groups) and residual offsets (µs)."""
        names = list(self.features)
        arrays = [X[n].to_numpy(dtype=np.float64) for n in names]
        groups = self.group_of_feature

        def rows(sl: slice) -> np.ndarray:
            return np.column_stack([a[sl] for a in arrays]) * scale[sl][:, groups]

        stats = relative_stats(rows, y, offset=offset)
        penalty = np.where(correction_mask(names), self.ridge * len(y), 0.0)
        return nonneg_ridge(stats, priors(names), penalty)

    def fit(self, X: pd.DataFrame, y: Any = None) -> HFDTL:
        y = target(X, y)
        if not len(y):
            raise ValueError("HFDTL.fit needs at least one step")
        n_groups = len(self.group_names)
        neutral = (np.ones(n_groups), np.zeros(len(self.residual_features)))
        groups = config_groups(X) if self.per_config else {}
        scale, offset = np.ones((len(y), n_groups)), np.zeros(len(y))
        terms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for _ in range(max(1, self.n_backfit)):
            coef = self._fit_base(X, y, scale, offset)
            if not groups:
                break
            parts = self._parts(X, coef)
            for key, idx in groups.items():
                part = X.iloc[idx]
                terms[key] = self._terms(parts[idx], part, y[idx], neutral)
                scale[idx] = terms[key][0]
                offset[idx] = linear_predict(part, self.residual_features, terms[key][1])
        # a configuration never seen runs at γ = 1: fold the donors' typical γ into β
        if terms:
            sizes = np.array([len(groups[k]) for k in terms], dtype=np.float64)
            gammas = np.maximum(np.vstack([terms[k][0] for k in terms]), 1e-12)
            g = np.exp(sizes @ np.log(gammas) / sizes.sum())
            coef = coef * g[self.group_of_feature]
            terms = {k: (v[0] / g, v[1]) for k, v in terms.items()}
        self.coef_ = coef
        self.config_scale_: dict[str, np.ndarray] = {}
        self.config_residual_: dict[str, np.ndarray] = {}
        self.config_choice_: dict[str, dict[str, Any]] = {}
        self.machine_host_: dict[str, dict[str, Any]] = {}  # references: the neutral terms
        self.n_features_in_ = len(self.features)
        # the released terms: each configuration's choice against the final base
        for key, idx in groups.items():
            self._apply(key, self._select(key, X.iloc[idx], y[idx]))
        self._refresh_machine_factors()
        return self

    def _copy_fitted(self) -> HFDTL:
        model = type(self)(**self.get_params())
        model.coef_ = self.coef_.copy()
        model.config_scale_ = {k: v.copy() for k, v in self.config_scale_.items()}
        model.config_residual_ = {k: v.copy() for k, v in self.config_residual_.items()}
        model.config_choice_ = copy.deepcopy(self.config_choice_)
        model.machine_host_ = copy.deepcopy(getattr(self, "machine_host_", {}))
        model.n_features_in_ = self.n_features_in_
        return model

    def calibrate(self, X: pd.DataFrame, y: Any = None) -> HFDTL:
        """A copy with (γ, δ) of every configuration in ``X`` chosen and fit on its steps;
        the base is untouched. A configuration already known starts from its current
        terms."""
        y = target(X, y)
        model = self._copy_fitted()
        for key, idx in config_groups(X).items():
            model._apply(key, self._select(key, X.iloc[idx], y[idx]))
        model._refresh_machine_factors()
        return model

    # -- per-configuration terms (models.config_terms) ---------------------------------
    def _reference_terms(self, key: str, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        gamma, delta = self.terms_for(key)
        return gamma.copy(), delta.copy()

    def _terms_predict(self, X: pd.DataFrame, terms: tuple[np.ndarray, np.ndarray]
                       ) -> np.ndarray:
        return (self._parts(X, self.coef_) @ terms[0]
                + linear_predict(X, self.residual_features, terms[1]))

    def _terms_fit(self, X: pd.DataFrame, y: np.ndarray, reference: tuple[np.ndarray, np.ndarray],
                   prior_steps: float) -> tuple[np.ndarray, np.ndarray]:
        factor = prior_steps / self.config_prior_steps if self.config_prior_steps else 1.0
        return fit_config_terms(self._parts(X, self.coef_), design(X, self.residual_features),
                                y, reference[0], reference[1], prior_steps,
                                self.residual_prior_steps * factor, self.config_bound)

    def _terms_scaled(self, terms: tuple[np.ndarray, np.ndarray], factor: float
                      ) -> tuple[np.ndarray, np.ndarray]:
        return terms[0] * factor, terms[1] * factor

    def _terms_vector(self, terms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return np.concatenate([terms[0], terms[1]])

    def _terms_layout(self, X: pd.DataFrame, y: np.ndarray
                      ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        lower, upper = config_term_bounds(self._parts(X, self.coef_),
                                          design(X, self.residual_features), y,
                                          self.config_bound)
        names = ([f"scale/{g}" for g in self.group_names]
                 + [f"residual/{n}" for n in self.residual_features])
        return (names, neutral_terms(len(self.group_names), len(self.residual_features)),
                lower, upper)

    # -- host cost: the overheads group and the host residuals (config_terms) ---------
    def _host_group(self) -> int | None:
        """Index of the overheads scale group (None with a single group)."""
        names = self.group_names
        return names.index("cpu") if "cpu" in names else None

    def _offers_host(self) -> bool:
        return self._host_group() is not None

    def _terms_host_split(self, X: pd.DataFrame, terms: tuple[np.ndarray, np.ndarray]
                          ) -> tuple[np.ndarray, np.ndarray]:
        """(device µs, host µs) per step: γ_gpu·base_gpu + the correction-kind residuals,
        γ_cpu·base_cpu + the overhead-kind residuals (their sum is the prediction)."""
        gamma, delta = terms
        parts = self._parts(X, self.coef_)
        cpu = np.arange(len(gamma)) == self._host_group()
        R = design(X, self.residual_features)
        mask = host_mask(self.residual_features)
        return (parts[:, ~cpu] @ gamma[~cpu] + R @ np.where(mask, 0.0, delta),
                parts[:, cpu] @ gamma[cpu] + R @ np.where(mask, delta, 0.0))

    def _terms_host_scaled(self, terms: tuple[np.ndarray, np.ndarray], factor: float
                           ) -> tuple[np.ndarray, np.ndarray]:
        gamma = terms[0].copy()
        gamma[self._host_group()] *= factor
        return gamma, terms[1] * host_scaling(host_mask(self.residual_features), factor)

    def _global_terms(self) -> tuple[np.ndarray, np.ndarray]:
        return np.ones(len(self.group_names)), np.zeros(len(self.residual_features))

    def machine_factor_for(self, config_key: str | None) -> float:
        """The host factor a configuration predicts with: its machine's when never seen,
        else 1 (``config_terms.machine_factor``)."""
        return machine_factor(getattr(self, "machine_host_", {}), self.config_choice_,
                              config_key)

    def _refresh_machine_factors(self) -> None:
        self.machine_host_ = (machine_host_factors(self.config_choice_) if self._offers_host()
                              else {})

    def _host_term_names(self) -> list[str] | None:
        """The terms a host factor multiplies (None without an overheads group)."""
        if not self._offers_host():
            return None
        return ["scale/cpu"] + [f"residual/{n}" for n, h in
                                zip(self.residual_features, host_mask(self.residual_features),
                                    strict=True) if h]

    def _apply(self, key: str, selection: Selection) -> None:
        if selection.terms is not None:
            self.config_scale_[key] = np.asarray(selection.terms[0], dtype=np.float64)
            self.config_residual_[key] = np.asarray(selection.terms[1], dtype=np.float64)
        self.config_choice_[key] = selection.record

    # -- prediction ---------------------------------------------------------------------
    def terms_for(self, config_key: str | None) -> tuple[np.ndarray, np.ndarray]:
        """(γ per scale group, δ) of a configuration: its own; (1, 0) when seen without
        them; never seen, (1, 0) with γ_cpu = its machine's host factor."""
        key = str(config_key)
        if key in self.config_scale_:
            return self.config_scale_[key], self.config_residual_[key]
        factor = self.machine_factor_for(config_key) if config_key else 1.0
        neutral = self._global_terms()
        return neutral if factor == 1.0 else self._terms_host_scaled(neutral, factor)

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        known = {k: idx for k, idx in config_groups(X).items()
                 if k in self.config_scale_ or self.machine_factor_for(k) != 1.0}
        if not known:
            return linear_predict(X, self.features, self.coef_)
        parts = self._parts(X, self.coef_)
        out = parts.sum(axis=1)
        for key, idx in known.items():
            gamma, delta = self.terms_for(key)
            out[idx] = parts[idx] @ gamma + linear_predict(X, self.residual_features, delta, idx)
        return out

    def effective_coefficients(self, config_key: str | None) -> dict[str, float]:
        """γ·β + δ on the union of base and residual features (what BLIS would run)."""
        gamma, delta = self.terms_for(config_key)
        scaled = self.coef_ * gamma[self.group_of_feature]
        out = {n: float(b) for n, b in zip(self.features, scaled, strict=True)}
        for n, d in zip(self.residual_features, delta, strict=True):
            out[n] = out.get(n, 0.0) + float(d)
        return out

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        per_config = {}
        for key in sorted(self.config_scale_):
            eff = self.effective_coefficients(key)
            per_config[key] = {
                "scale": {g: {"value": float(v), "unit": SCALE_UNIT}
                          for g, v in zip(self.group_names, self.config_scale_[key],
                                          strict=True)},
                "residual": coefficient_table(self.residual_features, self.config_residual_[key]),
                "effective": coefficient_table(list(eff), np.array(list(eff.values()))),
            }
        return {
            "family": self.family,
            "params": {**self.get_params(), "features": list(self.features),
                       "residual_features": list(self.residual_features)},
            "features": list(self.features),
            "scale_groups": {g: [n for n, i in zip(self.features, self.group_of_feature,
                                                    strict=True) if i == k]
                             for k, g in enumerate(self.group_names)},
            "base": coefficient_table(self.features, self.coef_),
            "per_config": per_config,
            "calibration": calibration_block(self.config_bound, self.config_prior_steps,
                                             self.config_selection, self.config_choice_,
                                             host_terms=self._host_term_names(),
                                             machines=self.machine_host_),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HFDTL:
        params = dict(data["params"])
        params["features"] = tuple(params["features"])
        params["residual_features"] = tuple(params["residual_features"])
        model = cls(**params)
        model.coef_ = coefficient_values(data["base"])
        per = data["per_config"]
        model.config_scale_ = {k: np.array([v["scale"][g]["value"] for g in model.group_names])
                               for k, v in per.items()}
        model.config_residual_ = {k: coefficient_values(v["residual"]) for k, v in per.items()}
        model.config_choice_ = restore_choices(data)
        model.machine_host_ = restore_machine_factors(data)
        model.n_features_in_ = len(model.features)
        return model


def learning_curve(model: StepTimeModel, X_target: pd.DataFrame,
                   sizes: Sequence[int] = LEARNING_CURVE_STEPS, min_eval_steps: int = 10
                   ) -> list[dict[str, float]]:
    """Error vs number of target steps: for every experiment of ``X_target`` and size n,
    ``model.calibrate`` on its first n steps (by step id) and score the rest.

    One row per size that at least one experiment supports (n + ``min_eval_steps`` steps):
    mean over experiments of MAPE and median APE (%), experiments and evaluated steps.
    Size 0 is the zero-shot error.
    """
    rows = []
    experiments = {k: g.sort_values("step_id") for k, g in X_target.groupby("experiment")}
    for n in sizes:
        scores, steps = [], 0
        for group in experiments.values():
            if len(group) < n + min_eval_steps:
                continue
            train, test = group.iloc[:n], group.iloc[n:]
            fitted = model.calibrate(train) if n else model
            scores.append(summary(fitted.predict(test), test["duration_us"].to_numpy()))
            steps += len(test)
        if scores:
            rows.append({"target_steps": int(n),
                         "mape": float(np.mean([s["mape"] for s in scores])),
                         "median_ape": float(np.mean([s["median_ape"] for s in scores])),
                         "experiments": len(scores), "eval_steps": steps})
    return rows
