"""Hybrid (the study's recommendation: HFD-TL + BSR-ARD, optional RECE quantiles).

1. **ARD selection on pooled donors**: evidence maximisation over the candidate set
   (``models.ard``, as in BSR-ARD) keeps the features whose coefficient the data moves
   away from its prior mean; the non-negative posterior mean is the universal base β,
   with posterior covariance and noise precision.
2. **Residual calibration on the target**: per configuration, a scale γ_c (prior 1) and
   residual terms δ_c (prior 0) as in HFD-TL: ŷ = γ_c·x·β + r·δ_c — chosen by
   ``models.config_terms`` (none, one scale, or (γ, δ) at a few prior strengths, by
   time-ordered cross-validation; γ in [1/κ, κ], each δ at most what would alone take
   the whole step, as bounds of the solver).
3. **Uncertainty-based transfer check**: before calibrating a target configuration, the
   base model's standardized residuals on its steps go through the z-score rule
   (``bsr_ard.z_score_check``). A passed check offers the candidates with the normal
   priors; a failed one weakens them by ``failed_prior_factor`` (trust the target
   more). The outcome is kept per configuration (``transfer_checks_``) and released.
4. **Optional quantiles** (``quantiles=(0.5, 0.9, 0.99)``): non-negative quantile
   coefficient sets on the selected features (``models.quantile``), scaled by the same
   configuration terms.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from blis_model.features.candidates import CANDIDATE_FEATURES
from blis_model.models.ard import pooled_posterior, predictive_std, prior_means
from blis_model.models.base import (
    StepTimeModel,
    calibration_block,
    coefficient_table,
    coefficient_values,
    design,
    restore_choices,
    target,
)
from blis_model.models.bsr_ard import PRECISION_UNIT, TransferCheck, z_score_check
from blis_model.models.config_terms import KAPPA, Selection, select_terms
from blis_model.models.hfd_tl import (
    RESIDUAL_FEATURES,
    config_term_bounds,
    fit_config_terms,
    neutral_terms,
)
from blis_model.models.linear import config_groups, linear_predict
from blis_model.models.quantile import fit_quantile


class Hybrid(StepTimeModel):
    """ARD-selected base + per-configuration (scale, residual) terms + transfer check."""

    family = "hybrid"

    def __init__(self, features: Sequence[str] = CANDIDATE_FEATURES,
                 residual_features: Sequence[str] = RESIDUAL_FEATURES,
                 prior_mean: str = "physics", evidence_weight: float | str = "cv",
                 alpha_threshold: float = 1e5, config_prior_steps: float = 2.0,
                 residual_prior_steps: float = 2.0, failed_prior_factor: float = 0.2,
                 per_config: bool = True, quantiles: Sequence[float] | None = None,
                 min_bias: float = 0.5, tail_limit: float = 0.1, config_bound: float = KAPPA,
                 config_selection: str = "cv") -> None:
        self.features = features
        self.residual_features = residual_features
        self.prior_mean = prior_mean
        self.evidence_weight = evidence_weight
        self.alpha_threshold = alpha_threshold
        self.config_prior_steps = config_prior_steps
        self.residual_prior_steps = residual_prior_steps
        self.failed_prior_factor = failed_prior_factor
        self.per_config = per_config
        self.quantiles = quantiles
        self.min_bias = min_bias
        self.tail_limit = tail_limit
        self.config_bound = config_bound
        self.config_selection = config_selection

    # -- fitting ------------------------------------------------------------------------
    # -- per-configuration terms (models.config_terms) ---------------------------------
    def _reference_terms(self, key: str, X: pd.DataFrame) -> tuple[float, np.ndarray]:
        gamma, delta = self.terms_for(key)
        return float(gamma), np.array(delta, dtype=np.float64, copy=True)

    def _terms_predict(self, X: pd.DataFrame, terms: tuple[float, np.ndarray]) -> np.ndarray:
        return (terms[0] * self.base_predict(X)
                + linear_predict(X, self.residual_features, terms[1]))

    def _terms_fit(self, X: pd.DataFrame, y: np.ndarray, reference: tuple[float, np.ndarray],
                   prior_steps: float) -> tuple[float, np.ndarray]:
        factor = prior_steps / self.config_prior_steps if self.config_prior_steps else 1.0
        gamma, delta = fit_config_terms(
            self.base_predict(X)[:, None], design(X, self.residual_features), y,
            np.array([reference[0]]), reference[1], prior_steps,
            self.residual_prior_steps * factor, self.config_bound)
        return float(gamma[0]), delta

    def _terms_scaled(self, terms: tuple[float, np.ndarray], factor: float
                      ) -> tuple[float, np.ndarray]:
        return terms[0] * factor, terms[1] * factor

    def _terms_vector(self, terms: tuple[float, np.ndarray]) -> np.ndarray:
        return np.concatenate([[terms[0]], terms[1]])

    def _terms_layout(self, X: pd.DataFrame, y: np.ndarray
                      ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        lower, upper = config_term_bounds(self.base_predict(X)[:, None],
                                          design(X, self.residual_features), y,
                                          self.config_bound)
        names = ["scale", *(f"residual/{n}" for n in self.residual_features)]
        return names, neutral_terms(1, len(self.residual_features)), lower, upper

    def _select(self, key: str, X: pd.DataFrame, y: np.ndarray, strength: float = 1.0
                ) -> Selection:
        return select_terms(self, X, y, key, self.config_prior_steps * strength,
                            self.config_bound, self.config_selection)

    def _apply(self, key: str, selection: Selection) -> None:
        if selection.terms is not None:
            self.config_scale_[key] = float(selection.terms[0])
            self.config_residual_[key] = np.asarray(selection.terms[1], dtype=np.float64)
        self.config_choice_[key] = selection.record

    def fit(self, X: pd.DataFrame, y: Any = None) -> Hybrid:
        y = target(X, y)
        if not len(y):
            raise ValueError("Hybrid.fit needs at least one step")
        post, self.evidence_weight_, _ = pooled_posterior(
            X, y, self.features, prior_means(self.features, self.prior_mean),
            self.evidence_weight, alpha_threshold=self.alpha_threshold)
        self.selected_ = [n for n, k in zip(self.features, post.keep, strict=True) if k]
        self.coef_ = post.mean
        self.sigma_ = post.cov
        self.noise_precision_ = post.noise_precision
        self.quantile_coef_: dict[float, np.ndarray] = {}
        if self.quantiles:
            active = self.coef_ > 0
            names = [n for n, a in zip(self.features, active, strict=True) if a]
            A = design(X, names)
            pilot = np.maximum(A @ self.coef_[active], 0.01 * float(np.mean(y)))
            for q in self.quantiles:
                coef = np.zeros(len(self.features))
                coef[active] = fit_quantile(A, y, float(q), self.coef_[active],
                                            np.zeros(len(names)), pilot, x0=self.coef_[active])
                self.quantile_coef_[float(q)] = coef
        self.config_scale_: dict[str, float] = {}
        self.config_residual_: dict[str, np.ndarray] = {}
        self.transfer_checks_: dict[str, dict[str, Any]] = {}
        self.config_choice_: dict[str, dict[str, Any]] = {}
        if self.per_config:
            for key, idx in config_groups(X).items():
                self._apply(key, self._select(key, X.iloc[idx], y[idx]))
        self.n_features_in_ = len(self.features)
        return self

    def _copy_fitted(self) -> Hybrid:
        model = Hybrid(**self.get_params())
        model.selected_ = list(self.selected_)
        model.evidence_weight_ = self.evidence_weight_
        model.coef_ = self.coef_.copy()
        model.sigma_ = self.sigma_.copy()
        model.noise_precision_ = self.noise_precision_
        model.quantile_coef_ = {q: v.copy() for q, v in self.quantile_coef_.items()}
        model.config_scale_ = dict(self.config_scale_)
        model.config_residual_ = {k: v.copy() for k, v in self.config_residual_.items()}
        model.transfer_checks_ = {k: dict(v) for k, v in self.transfer_checks_.items()}
        model.config_choice_ = copy.deepcopy(self.config_choice_)
        model.n_features_in_ = self.n_features_in_
        return model

    def transfer_check(self, X: pd.DataFrame, y: Any = None) -> TransferCheck:
        """z-score check of the base (zero-shot) model on target steps ``X``."""
        order = np.argsort(X["step_id"].to_numpy(), kind="stable") if "step_id" in X else None
        if order is not None:
            X = X.iloc[order]
            y = None if y is None else np.asarray(y)[order]
        truth = target(X, y)
        mean, std = self.base_predict(X, return_std=True)
        return z_score_check(truth, mean, std, self.min_bias, self.tail_limit)

    def calibrate(self, X: pd.DataFrame, y: Any = None) -> Hybrid:
        """A copy calibrated on the target steps ``X``: per configuration, run the transfer
        check on the base model, then choose (γ, δ) with the candidates' priors weakened
        when it failed."""
        y = target(X, y)
        model = self._copy_fitted()
        for key, idx in config_groups(X).items():
            check = self.transfer_check(X.iloc[idx], y[idx])
            strength = 1.0 if check.passed else self.failed_prior_factor
            model._apply(key, self._select(key, X.iloc[idx], y[idx], strength))
            model.transfer_checks_[key] = check.to_dict()
        return model

    # -- prediction ---------------------------------------------------------------------
    def terms_for(self, config_key: str | None) -> tuple[float, np.ndarray]:
        key = str(config_key)
        if key in self.config_scale_:
            return self.config_scale_[key], self.config_residual_[key]
        return 1.0, np.zeros(len(self.residual_features))

    def base_predict(self, X: pd.DataFrame, return_std: bool = False
                     ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The universal (zero-shot) model: x·β, and its predictive std when asked, µs."""
        mean = linear_predict(X, self.features, self.coef_)
        if not return_std:
            return mean
        return mean, predictive_std(X, self.selected_, self.sigma_, mean,
                                    self.noise_precision_)

    def _apply_terms(self, X: pd.DataFrame, base: np.ndarray) -> np.ndarray:
        out = base.copy()
        for key, idx in config_groups(X).items():
            if key in self.config_scale_:
                gamma, delta = self.terms_for(key)
                out[idx] = gamma * base[idx] + linear_predict(X, self.residual_features, delta,
                                                              idx)
        return out

    def predict(self, X: pd.DataFrame, return_std: bool = False
                ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        if not return_std:
            return self._apply_terms(X, self.base_predict(X))
        base, std = self.base_predict(X, return_std=True)
        scale = np.ones(len(X))
        for key, idx in config_groups(X).items():
            scale[idx] = self.terms_for(key)[0]
        return self._apply_terms(X, base), std * scale

    def predict_quantile(self, X: pd.DataFrame, q: float) -> np.ndarray:
        """Quantile q of the step time (µs); needs ``quantiles`` set at fit time."""
        for level, coef in sorted(self.quantile_coef_.items()):
            if abs(level - q) < 1e-9:
                return self._apply_terms(X, linear_predict(X, self.features, coef))
        raise ValueError(f"quantile {q} not fitted; fitted: {sorted(self.quantile_coef_)}")

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        params = {**self.get_params(), "features": list(self.features),
                  "residual_features": list(self.residual_features),
                  "quantiles": None if self.quantiles is None else
                  [float(q) for q in self.quantiles]}
        return {
            "family": self.family,
            "params": params,
            "features": list(self.features),
            "selected": list(self.selected_),
            "evidence_weight": self.evidence_weight_,
            "base": coefficient_table(self.features, self.coef_),
            "covariance": self.sigma_.tolist(),
            "noise_precision": {"value": self.noise_precision_, "unit": PRECISION_UNIT},
            "quantiles": {f"p{q * 100:g}": coefficient_table(self.features, v)
                          for q, v in sorted(self.quantile_coef_.items())},
            "per_config": {k: {"scale": {"value": float(self.config_scale_[k]),
                                         "unit": "dimensionless (× base prediction)"},
                               "residual": coefficient_table(self.residual_features,
                                                             self.config_residual_[k]),
                               "transfer_check": self.transfer_checks_.get(k)}
                           for k in sorted(self.config_scale_)},
            "transfer_checks": {k: v for k, v in sorted(self.transfer_checks_.items())
                                if k not in self.config_scale_},
            "calibration": calibration_block(self.config_bound, self.config_prior_steps,
                                             self.config_selection, self.config_choice_),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hybrid:
        params = dict(data["params"])
        params["features"] = tuple(params["features"])
        params["residual_features"] = tuple(params["residual_features"])
        if params.get("quantiles") is not None:
            params["quantiles"] = tuple(params["quantiles"])
        model = cls(**params)
        model.selected_ = list(data["selected"])
        model.evidence_weight_ = float(data["evidence_weight"])
        model.coef_ = coefficient_values(data["base"])
        k = len(model.selected_)
        model.sigma_ = np.asarray(data["covariance"], dtype=np.float64).reshape(k, k)
        model.noise_precision_ = float(data["noise_precision"]["value"])
        model.quantile_coef_ = {float(q): coefficient_values(data["quantiles"][f"p{q * 100:g}"])
                                for q in (model.quantiles or ())}
        per = data["per_config"]
        model.config_scale_ = {key: float(v["scale"]["value"]) for key, v in per.items()}
        model.config_residual_ = {key: coefficient_values(v["residual"]) for key, v in per.items()}
        model.transfer_checks_ = {key: v["transfer_check"] for key, v in per.items()
                                  if v.get("transfer_check") is not None}
        model.transfer_checks_.update(data.get("transfer_checks") or {})
        model.config_choice_ = restore_choices(data)
        model.n_features_in_ = len(model.features)
        return model
