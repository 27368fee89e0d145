"""BSR-ARD — Bayesian sparse regression with automatic relevance determination (idea 4).

Relative-error Bayesian linear model over the candidate features (``features.candidates``):
x·β / y = 1 + ε, ε ~ N(0, 1/λ) (1/√λ is the typical relative error), and a Gaussian prior
β_k ~ N(m_k, 1/α_k) per feature. With ``prior_mean="physics"`` m_k is the physical prior
(1 for the corrections of the physics set, 0 for every other candidate), so a feature the
evidence prunes keeps its datasheet meaning; ``"zero"`` is classic ARD (pruned = 0).
Evidence maximisation (``models.ard``) runs on sufficient statistics — one pass over the
rows — with the likelihood tempered by κ chosen by leave-one-configuration-out error
(``evidence_weight="cv"``). Zero-mean features pushed negative are dropped and the
evidence re-maximised; the final mean is the non-negative MAP, so BLIS gets β ≥ 0.

Predictive uncertainty per step: std = √(ŷ²/λ + xᵀΣx) µs (``predict(X, return_std=True)``).
Per configuration (``fit`` on donors, ``calibrate`` on a target), the choice of
``models.config_terms``: the reference posterior (pooled, or the configuration's own),
one host factor on it (the overhead-kind entries of the mean × h, the covariance
D·Σ·D with D = diag(h on those entries, 1 elsewhere)), one scale on it (mean × s,
covariance × s²), or a conjugate update whose prior is the
pooled posterior worth a few multiples of ``config_prior_steps`` steps (features the
donors never exercised — all-zero columns — get an independent prior at their prior
mean), or the configuration's own posterior when it is already known (sequential Bayes,
its precision scaled the same way); the posterior mean (the non-negative MAP) keeps
every coefficient within its physical range around the pooled mean (bounds of the
solver). A configuration never seen predicts with the pooled posterior host-scaled by
its machine's factor (``config_terms``, *Machine host factors*); that is also the prior
its calibration's updates start from.

:func:`transfer_check` applies the z-score rule (:class:`TransferCheck`) to a base model
and a few target steps.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from blis_model.features.candidates import CANDIDATE_FEATURES
from blis_model.models.ard import pooled_posterior, predictive_std, prior_means, stats_scale
from blis_model.models.base import (
    PerConfigurationTerms,
    StepTimeModel,
    calibration_block,
    coefficient_table,
    coefficient_values,
    design,
    host_mask,
    host_scaling,
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
from blis_model.models.linear import (
    columns_fn,
    config_groups,
    linear_predict,
    relative_stats,
    spd_inverse,
)
from blis_model.models.solvers import bounded_quadratic

Posterior = tuple[np.ndarray, np.ndarray, bool]
"""A configuration's terms: (mean over all features, covariance over ``config_features``,
whether it is the configuration's own posterior — a sequential-Bayes prior)."""

PRECISION_UNIT = "1 / (relative error)²"


class BSRARD(PerConfigurationTerms, StepTimeModel):
    """ARD over the candidate features; per-configuration conjugate updates."""

    family = "bsr_ard"

    def __init__(self, features: Sequence[str] = CANDIDATE_FEATURES,
                 prior_mean: str = "physics", evidence_weight: float | str = "cv",
                 alpha_threshold: float = 1e5, max_iter: int = 300, tol: float = 1e-4,
                 per_config: bool = True, config_prior_steps: float = 50.0,
                 config_bound: float = KAPPA, config_selection: str = "cv") -> None:
        self.features = features
        self.prior_mean = prior_mean
        self.evidence_weight = evidence_weight
        self.alpha_threshold = alpha_threshold
        self.max_iter = max_iter
        self.tol = tol
        self.per_config = per_config
        self.config_prior_steps = config_prior_steps
        self.config_bound = config_bound
        self.config_selection = config_selection

    # -- fitting ------------------------------------------------------------------------
    @property
    def selected_features(self) -> list[str]:
        """The features whose coefficient the data determines (the rest keep their prior
        mean), in candidate order."""
        return [n for n, k in zip(self.features, self.keep_, strict=True) if k]

    @property
    def config_features(self) -> list[str]:
        """Features a configuration's update refits: those ARD kept, plus those the pooled
        data never exercised (all-zero columns, e.g. MoE terms without MoE donors)."""
        return [n for n, f in zip(self.features, self.keep_ | self.unseen_, strict=True) if f]

    def _config_update(self, X: pd.DataFrame, y: np.ndarray, reference: Posterior,
                       prior_steps: float) -> tuple[np.ndarray, np.ndarray]:
        """Posterior (mean over all features, covariance over ``config_features``) of one
        configuration: conjugate update of the pooled posterior (worth ``prior_steps``
        steps; unseen features get an independent prior at their prior mean worth the
        same number of steps) — or, when ``reference`` is the configuration's own
        posterior, of that posterior (sequential Bayes; its precision × ``prior_steps`` /
        ``config_prior_steps``). The mean stays in the physical ranges (bounds). A pooled
        reference host-scaled by a machine factor m (:meth:`machine_factor_for` of the
        steps' configuration) is the pooled posterior transformed the same way: mean
        with its host entries × m, precision ÷ m² on them."""
        free = self.keep_ | self.unseen_
        held = [n for n, f in zip(self.features, free, strict=True) if not f]
        stats = relative_stats(columns_fn(X, self.config_features), y,
                               offset=linear_predict(X, held, self.coef_[~free]))
        lam = self.noise_precision_
        if reference[2]:
            factor = prior_steps / self.config_prior_steps if self.config_prior_steps else 1.0
            prior_mean = reference[0][free]
            prior_prec = spd_inverse(reference[1]) * factor
        else:
            kept = np.flatnonzero(self.keep_[free])
            unseen = np.flatnonzero(self.unseen_[free])
            prior_mean = reference[0][free]
            d = self._host_scaling(self._machine_of_steps(X))[free][kept]
            prior_prec = np.zeros((int(free.sum()), int(free.sum())))
            prior_prec[np.ix_(kept, kept)] = (self.precision_ / np.outer(d, d)
                                              * (prior_steps / max(self.n_train_, 1.0)))
            scale = stats.column_scale[unseen]
            prior_prec[unseen, unseen] = lam * prior_steps * np.where(scale > 0, scale, 1.0) ** 2
        H = lam * stats.gram + prior_prec
        c = lam * stats.moment + prior_prec @ prior_mean
        lower, upper = term_bounds(self.coef_[free], stats.column_scale, self.config_bound)
        mean = self.coef_.copy()
        mean[free] = bounded_quadratic(H, c, lower, upper)
        return mean, spd_inverse(H)

    # -- per-configuration terms (models.config_terms) ---------------------------------
    def _reference_terms(self, key: str, X: pd.DataFrame) -> Posterior:
        if key in self.config_coef_:
            return self.config_coef_[key].copy(), self.config_sigma_[key].copy(), True
        free = self.keep_ | self.unseen_
        cov = np.zeros((int(free.sum()), int(free.sum())))
        kept = np.flatnonzero(self.keep_[free])
        cov[np.ix_(kept, kept)] = self.sigma_  # unseen features: no variance, as pooled
        d = self._host_scaling(self.machine_factor_for(key))
        return self.coef_ * d, cov * np.outer(d[free], d[free]), False

    def _terms_predict(self, X: pd.DataFrame, terms: Posterior) -> np.ndarray:
        return linear_predict(X, self.features, terms[0])

    def _terms_fit(self, X: pd.DataFrame, y: np.ndarray, reference: Posterior,
                   prior_steps: float) -> Posterior:
        mean, cov = self._config_update(X, y, reference, prior_steps)
        return mean, cov, True

    def _terms_scaled(self, terms: Posterior, factor: float) -> Posterior:
        return terms[0] * factor, terms[1] * factor * factor, True

    # -- host cost: the overhead-kind entries (config_terms) ----------------------------
    def _host_scaling(self, factor: float) -> np.ndarray:
        """Per-feature multipliers: ``factor`` on the overhead-kind features, else 1."""
        return host_scaling(host_mask(self.features), factor)

    def _offers_host(self) -> bool:
        return bool(host_mask(self.features).any())

    def _terms_host_split(self, X: pd.DataFrame, terms: Posterior
                          ) -> tuple[np.ndarray, np.ndarray]:
        """(device µs, host µs) per step of a posterior mean (their sum: the prediction)."""
        mask = host_mask(self.features)
        return (linear_predict(X, self.features, np.where(mask, 0.0, terms[0])),
                linear_predict(X, self.features, np.where(mask, terms[0], 0.0)))

    def _terms_host_scaled(self, terms: Posterior, factor: float) -> Posterior:
        """Host entries of the mean × h; covariance D·Σ·D (over ``config_features``)."""
        d = self._host_scaling(factor)
        free = self.keep_ | self.unseen_
        return terms[0] * d, terms[1] * np.outer(d[free], d[free]), True

    def _global_terms(self) -> Posterior:
        return self._reference_terms("", pd.DataFrame())

    def machine_factor_for(self, config_key: str | None) -> float:
        """The host factor a configuration predicts with: its machine's when never seen,
        else 1 (``config_terms.machine_factor``)."""
        return machine_factor(getattr(self, "machine_host_", {}), self.config_choice_,
                              config_key) if config_key else 1.0

    def _machine_of_steps(self, X: pd.DataFrame) -> float:
        """:meth:`machine_factor_for` the configuration of steps ``X`` (1 without one)."""
        keys = X["config_key"].unique() if "config_key" in X else []
        return self.machine_factor_for(str(keys[0])) if len(keys) == 1 else 1.0

    def _refresh_machine_factors(self) -> None:
        self.machine_host_: dict[str, dict[str, Any]] = (
            machine_host_factors(self.config_choice_) if self._offers_host() else {})

    def _terms_vector(self, terms: Posterior) -> np.ndarray:
        return terms[0]

    def _terms_layout(self, X: pd.DataFrame, y: np.ndarray
                      ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        A = design(X, self.features) / np.asarray(y, dtype=np.float64)[:, None]
        lower, upper = term_bounds(self.coef_, column_scale(A), self.config_bound)
        return list(self.features), self.coef_, lower, upper

    def _apply(self, key: str, selection: Selection) -> None:
        if selection.terms is not None:
            self.config_coef_[key] = np.asarray(selection.terms[0], dtype=np.float64)
            self.config_sigma_[key] = np.asarray(selection.terms[1], dtype=np.float64)
        self.config_choice_[key] = selection.record

    def fit(self, X: pd.DataFrame, y: Any = None) -> BSRARD:
        y = target(X, y)
        if not len(y):
            raise ValueError("BSRARD.fit needs at least one step")
        post, self.evidence_weight_, self.evidence_cv_ = pooled_posterior(
            X, y, self.features, prior_means(self.features, self.prior_mean),
            self.evidence_weight, alpha_threshold=self.alpha_threshold,
            max_iter=self.max_iter, tol=self.tol)
        self.keep_ = post.keep
        self.unseen_ = ~post.keep & (stats_scale(X, self.features) == 0)
        self.coef_ = post.mean
        self.alpha_ = post.alpha
        self.noise_precision_ = post.noise_precision
        self.sigma_ = post.cov
        self.precision_ = post.precision
        self.n_train_ = float(len(y)) * self.evidence_weight_
        self.config_coef_: dict[str, np.ndarray] = {}
        self.config_sigma_: dict[str, np.ndarray] = {}
        self.config_choice_: dict[str, dict[str, Any]] = {}
        self.machine_host_ = {}  # every configuration's reference: the pooled posterior
        if self.per_config:
            for key, idx in config_groups(X).items():
                self._apply(key, self._select(key, X.iloc[idx], y[idx]))
        self._refresh_machine_factors()
        self.n_features_in_ = len(self.features)
        return self

    def _copy_fitted(self) -> BSRARD:
        model = BSRARD(**self.get_params())
        for name in ("keep_", "unseen_", "coef_", "alpha_", "sigma_", "precision_"):
            setattr(model, name, getattr(self, name).copy())
        model.noise_precision_ = self.noise_precision_
        model.n_train_ = self.n_train_
        model.evidence_weight_ = self.evidence_weight_
        model.evidence_cv_ = dict(self.evidence_cv_)
        model.config_coef_ = {k: v.copy() for k, v in self.config_coef_.items()}
        model.config_sigma_ = {k: v.copy() for k, v in self.config_sigma_.items()}
        model.config_choice_ = copy.deepcopy(self.config_choice_)
        model.machine_host_ = copy.deepcopy(getattr(self, "machine_host_", {}))
        model.n_features_in_ = self.n_features_in_
        return model

    def calibrate(self, X: pd.DataFrame, y: Any = None) -> BSRARD:
        """A copy with the posterior of every configuration in ``X`` chosen and updated on
        its steps (reference: its current posterior if known, else the pooled posterior
        worth ``config_prior_steps`` steps)."""
        y = target(X, y)
        model = self._copy_fitted()
        for key, idx in config_groups(X).items():
            model._apply(key, self._select(key, X.iloc[idx], y[idx]))
        model._refresh_machine_factors()
        return model

    # -- prediction ---------------------------------------------------------------------
    def posterior_for(self, config_key: str | None
                      ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(mean over all features, covariance, the features it covers) of a
        configuration."""
        key = str(config_key)
        if key in self.config_coef_:
            return self.config_coef_[key], self.config_sigma_[key], self.config_features
        factor = self.machine_factor_for(config_key)
        if factor == 1.0:
            return self.coef_, self.sigma_, self.selected_features
        d = self._host_scaling(factor)
        cov = self.sigma_ * np.outer(d[self.keep_], d[self.keep_])
        return self.coef_ * d, cov, self.selected_features

    def predict(self, X: pd.DataFrame, return_std: bool = False
                ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        mean = np.empty(len(X))
        std = np.empty(len(X))
        groups = config_groups(X) or {"": np.arange(len(X))}
        for key, idx in groups.items():
            coef, cov, covered = self.posterior_for(key)
            mean[idx] = linear_predict(X, self.features, coef, idx)
            if return_std:
                std[idx] = predictive_std(X, covered, cov, mean[idx], self.noise_precision_,
                                          idx)
        return (mean, std) if return_std else mean

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "params": {**self.get_params(), "features": list(self.features)},
            "features": list(self.features),
            "selected": self.selected_features,
            "unseen": [n for n, u in zip(self.features, self.unseen_, strict=True) if u],
            "global": coefficient_table(self.features, self.coef_),
            "alpha": [None if not np.isfinite(a) else float(a) for a in self.alpha_],
            "noise_precision": {"value": self.noise_precision_, "unit": PRECISION_UNIT},
            "covariance": self.sigma_.tolist(),
            "precision": self.precision_.tolist(),
            "n_train": self.n_train_,
            "evidence_weight": self.evidence_weight_,
            "evidence_cv": {str(k): v for k, v in self.evidence_cv_.items()},
            "per_config": {k: {"coefficients": coefficient_table(self.features, v),
                               "covariance": self.config_sigma_[k].tolist()}
                           for k, v in sorted(self.config_coef_.items())},
            "calibration": calibration_block(
                self.config_bound, self.config_prior_steps, self.config_selection,
                self.config_choice_, machines=getattr(self, "machine_host_", {}),
                host_terms=([n for n, h in zip(self.features, host_mask(self.features),
                                               strict=True) if h]
                            if self._offers_host() else None)),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BSRARD:
        params = dict(data["params"])
        params["features"] = tuple(params["features"])
        model = cls(**params)
        model.coef_ = coefficient_values(data["global"])
        selected = set(data["selected"])
        model.keep_ = np.array([n in selected for n in model.features])
        model.unseen_ = np.array([n in set(data["unseen"]) for n in model.features])
        model.alpha_ = np.array([np.inf if a is None else a for a in data["alpha"]])
        model.noise_precision_ = float(data["noise_precision"]["value"])
        k = int(model.keep_.sum())
        model.sigma_ = np.asarray(data["covariance"], dtype=np.float64).reshape(k, k)
        model.precision_ = np.asarray(data["precision"], dtype=np.float64).reshape(k, k)
        model.n_train_ = float(data["n_train"])
        model.evidence_weight_ = float(data["evidence_weight"])
        model.evidence_cv_ = {float(k): v for k, v in data["evidence_cv"].items()}
        model.config_coef_ = {key: coefficient_values(v["coefficients"])
                              for key, v in data["per_config"].items()}
        f = len(model.config_features)
        model.config_sigma_ = {key: np.asarray(v["covariance"], dtype=np.float64).reshape(f, f)
                               for key, v in data["per_config"].items()}
        model.config_choice_ = restore_choices(data)
        model.machine_host_ = restore_machine_factors(data)
        model.n_features_in_ = len(model.features)
        return model


# -- transfer check ---------------------------------------------------------------------
@dataclass(frozen=True)
class TransferCheck:
    """Outcome of the z-score transfer check on a few target steps.

    Rule: with z_i = (y_i − ŷ_i)/σ_i the standardized residuals of the base model,
    the transfer FAILS when
      (bias)  |mean z| > max(2/√n_eff, ``min_bias``)  — n_eff = n·(1−ρ)/(1+ρ) discounts
              the lag-1 autocorrelation ρ ≥ 0 of z along the steps; ``min_bias`` (0.5 σ)
              keeps statistically significant but practically tiny biases from failing;
      or (tails) the fraction of |z| > 3 exceeds ``tail_limit`` (10%; Gaussian: 0.27%).
    """

    n_steps: int
    mean_z: float
    rms_z: float
    frac_beyond_3: float
    n_effective: float
    bias_limit: float
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def z_score_check(y: np.ndarray, mean: np.ndarray, std: np.ndarray, min_bias: float = 0.5,
                  tail_limit: float = 0.1) -> TransferCheck:
    """The rule of :class:`TransferCheck` on truths, predictions and predictive stds (µs),
    given in step order."""
    y, mean, std = (np.asarray(a, dtype=np.float64) for a in (y, mean, std))
    n = len(y)
    if not n:
        return TransferCheck(0, 0.0, 0.0, 0.0, 0.0, np.inf, True, "no target steps")
    z = (y - mean) / np.maximum(std, 1e-12)
    rho = 0.0
    if n > 2 and np.std(z) > 0:
        rho = float(np.clip(np.corrcoef(z[:-1], z[1:])[0, 1], 0.0, 0.99))
    n_eff = max(n * (1 - rho) / (1 + rho), 1.0)
    limit = max(2.0 / np.sqrt(n_eff), min_bias)
    mean_z = float(z.mean())
    tails = float(np.mean(np.abs(z) > 3.0))
    reasons = []
    if abs(mean_z) > limit:
        reasons.append(f"bias: |mean z| = {abs(mean_z):.2f} > {limit:.2f}")
    if tails > tail_limit:
        reasons.append(f"tails: {tails:.0%} of |z| > 3 (limit {tail_limit:.0%})")
    return TransferCheck(n, mean_z, float(np.sqrt(np.mean(z * z))), tails, float(n_eff),
                         float(limit), not reasons, "; ".join(reasons) or "ok")


def transfer_check(model: Any, X: pd.DataFrame, y: Any = None, min_bias: float = 0.5,
                   tail_limit: float = 0.1) -> TransferCheck:
    """z-score check of ``model`` (anything with ``predict(X, return_std=True)``) on the
    target steps ``X`` (ordered by step id within each experiment)."""
    if "step_id" in X:
        order = np.lexsort((X["step_id"].to_numpy(), X["experiment"].to_numpy()
                            if "experiment" in X else np.zeros(len(X))))
        X = X.iloc[order]
        if y is not None:
            y = np.asarray(y)[order]
    truth = target(X, y)
    mean, std = model.predict(X, return_std=True)
    return z_score_check(truth, mean, std, min_bias, tail_limit)
