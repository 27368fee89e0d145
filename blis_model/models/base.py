"""What every step-time family shares: the estimator contract and serialisation.

Contract (scikit-learn): parameters stored verbatim in ``__init__``; learning only in
``fit(X, y=None)`` where ``X`` is a feature frame (``blis_model.features.frame``) and ``y``
defaults to ``X["duration_us"]``; learned state ends with ``_``; ``predict`` never
changes state. ``to_dict`` gives the native coefficients with units (for
``coefficients.json``) and ``from_dict`` rebuilds a fitted model from it.
``calibrate(X_target)`` returns a NEW model adapted to the target configurations
(few steps), leaving ``self`` untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin

from blis_model.features.registry import REGISTRY, describe
from blis_model.models.config_terms import (
    Selection,
    column_scale,
    machine_factor,
    machine_host_factors,
    method,
    records_to_dict,
    select_terms,
    term_bounds,
)


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


def host_mask(names: Sequence[str]) -> np.ndarray:
    """True for the HOST-time features: the overhead kind (counts — kernel launches,
    layers, requests, steps — priced in µs per unit, paid by the CPU, the driver and
    the launch path); the corrections are device time."""
    return np.array([n in REGISTRY and REGISTRY[n].kind == "overhead" for n in names],
                    dtype=bool)


def host_scaling(mask: np.ndarray, factor: float) -> np.ndarray:
    """Per-term multipliers: ``factor`` on the host terms (``mask``), 1 on the others."""
    return np.where(np.asarray(mask, dtype=bool), float(factor), 1.0)


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


class PerConfigurationTerms:
    """What every family with per-configuration terms shares: the choice of a
    configuration's terms by ``models.config_terms.select_terms`` with the family's
    ``config_prior_steps``, ``config_bound`` and ``config_selection``, and the defaults of
    its terms protocol for terms that are arrays (scaled by a factor, flattened)."""

    config_prior_steps: float
    config_bound: float
    config_selection: str

    def _select(self, key: str, X: pd.DataFrame, y: np.ndarray) -> Selection:
        """This model's choice of terms for configuration ``key`` on its steps."""
        return select_terms(self, X, y, key, self.config_prior_steps, self.config_bound,
                            self.config_selection)

    def _terms_scaled(self, terms: np.ndarray, factor: float) -> np.ndarray:
        return terms * factor

    def _terms_vector(self, terms: np.ndarray) -> np.ndarray:
        return np.asarray(terms).ravel()


class ConfigCoefficientSets(PerConfigurationTerms, StepTimeModel):
    """A family with one global coefficient vector ``coef_`` (over ``features``) and one
    vector per configuration key in ``config_coef_``.

    Subclasses provide ``_fit_config(X, y, reference, prior_steps) -> coefficients`` (one
    configuration's terms, shrunk toward ``reference`` with a prior worth ``prior_steps``
    steps, inside :meth:`_bounds`) and ``_predict_with(X, coefficients) -> µs``; this
    class chooses each configuration's terms (``models.config_terms``: none / one host
    factor / one scale / full terms, by time-ordered cross-validation; the record of every
    choice in ``config_choice_``) and gives prediction by configuration, ``calibrate``,
    ``with_config_sets`` and the common part of serialisation. A configuration whose
    choice is ``none`` has no set (unless its reference carried a machine host factor):
    it predicts with the global set. A configuration never seen predicts with the global
    set whose host terms (:meth:`_host_terms_mask`) are × its machine's host factor
    (``machine_host_``: ``config_terms.machine_host_factors`` of the records; 1 on a
    machine without calibrated configurations).
    """

    features: Any
    config_prior_steps: float
    config_bound: float
    config_selection: str

    def _fit_config(self, X: pd.DataFrame, y: np.ndarray, reference: np.ndarray,
                    prior_steps: float) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _predict_with(self, X: pd.DataFrame, coef: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    # -- the per-configuration terms (models.config_terms) ----------------------------
    def _relative_design(self, X: pd.DataFrame, y: np.ndarray) -> np.ndarray:
        return design(X, self.features) / np.asarray(y, dtype=np.float64)[:, None]

    def _bounds(self, X: pd.DataFrame, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Physical range of each coefficient of a configuration on its steps."""
        return term_bounds(self.coef_, column_scale(self._relative_design(X, y)),
                           self.config_bound)

    def _reference_terms(self, key: str, X: pd.DataFrame) -> np.ndarray:
        return np.array(self.coefficients_for(key), dtype=np.float64, copy=True)

    def _terms_predict(self, X: pd.DataFrame, terms: np.ndarray) -> np.ndarray:
        return self._predict_with(X, terms)

    def _terms_fit(self, X: pd.DataFrame, y: np.ndarray, reference: np.ndarray,
                   prior_steps: float) -> np.ndarray:
        return self._fit_config(X, y, reference, prior_steps)

    def _terms_layout(self, X: pd.DataFrame, y: np.ndarray
                      ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        lower, upper = self._bounds(X, y)
        return list(self.features), self.coef_, lower, upper

    # -- host cost (config_terms: the host candidate and machine host factors) ----------
    def _host_terms_mask(self) -> np.ndarray:
        """Which coefficients price host time: the overhead-kind features."""
        return host_mask(self.features)

    def _offers_host(self) -> bool:
        return bool(self._host_terms_mask().any())

    def _terms_host_split(self, X: pd.DataFrame, terms: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
        """(device µs, host µs) per step of a linear set: Σ over the corrections, Σ over
        the overheads (their sum is the prediction)."""
        mask = self._host_terms_mask()
        A = design(X, self.features)
        return A @ np.where(mask, 0.0, terms), A @ np.where(mask, terms, 0.0)

    def _terms_host_scaled(self, terms: np.ndarray, factor: float) -> np.ndarray:
        return terms * host_scaling(self._host_terms_mask(), factor)

    def _global_terms(self) -> np.ndarray:
        return self.coef_

    def machine_factor_for(self, config_key: str | None) -> float:
        """The host factor a configuration predicts with: its machine's when this model
        never saw it, else 1 (``config_terms.machine_factor``)."""
        return machine_factor(getattr(self, "machine_host_", {}),
                              getattr(self, "config_choice_", {}), config_key)

    def _refresh_machine_factors(self) -> None:
        self.machine_host_: dict[str, dict[str, Any]] = (
            machine_host_factors(self.config_choice_) if self._offers_host() else {})

    def _apply(self, key: str, selection: Selection) -> None:
        if selection.terms is not None:
            self.config_coef_[key] = np.asarray(selection.terms, dtype=np.float64)
        self.config_choice_[key] = selection.record

    def _fit_config_sets(self, X: pd.DataFrame, y: np.ndarray) -> None:
        self.config_coef_: dict[str, np.ndarray] = {}
        self.config_choice_: dict[str, dict[str, Any]] = {}
        self.machine_host_ = {}  # every configuration's reference: the global set
        if getattr(self, "per_config", False) and "config_key" in X:
            for key, idx in X.groupby("config_key", sort=True).indices.items():
                self._apply(str(key), self._select(str(key), X.iloc[idx], y[idx]))
        self._refresh_machine_factors()

    def _copy_fitted(self, **params: Any) -> Any:
        model = type(self)(**{**self.get_params(), **params})
        model.coef_ = self.coef_.copy()
        model.config_coef_ = {k: v.copy() for k, v in self.config_coef_.items()}
        model.config_choice_ = copy.deepcopy(getattr(self, "config_choice_", {}))
        model.machine_host_ = copy.deepcopy(getattr(self, "machine_host_", {}))
        model.n_features_in_ = self.n_features_in_
        return model

    def calibrate(self, X: pd.DataFrame, y: Any = None) -> Any:
        """A copy whose terms for every configuration of ``X`` (few target steps) are
        chosen and refit on its steps around this model's terms for it (its own set, or
        the global set when new); ``self`` is untouched."""
        y = target(X, y)
        model = self._copy_fitted()
        for key, idx in X.groupby("config_key", sort=True).indices.items():
            model._apply(str(key), self._select(str(key), X.iloc[idx], y[idx]))
        model._refresh_machine_factors()
        return model

    def with_config_sets(self, specialists: Any) -> Any:
        """A copy (``per_config`` on) whose set and choice for each configuration key are
        taken from ``specialists[key]`` — e.g. ``calibrate`` on that configuration's
        steps, run in parallel. ``fit`` equals a ``per_config=False`` fit merged this
        way."""
        model = self._copy_fitted(per_config=True)
        for key in sorted(specialists):
            spec, key = specialists[key], str(key)
            if key in spec.config_coef_:
                model.config_coef_[key] = spec.config_coef_[key].copy()
            if key in getattr(spec, "config_choice_", {}):
                model.config_choice_[key] = copy.deepcopy(spec.config_choice_[key])
        model._refresh_machine_factors()
        return model

    def coefficients_for(self, config_key: str | None) -> np.ndarray:
        """The coefficient set used for a configuration: its own; the global set when it
        was seen without one; never seen, the global set with its machine's host factor
        on the host terms."""
        if not config_key:
            return self.coef_
        if str(config_key) in self.config_coef_:
            return self.config_coef_[str(config_key)]
        factor = self.machine_factor_for(str(config_key))
        return self.coef_ if factor == 1.0 else self._terms_host_scaled(self.coef_, factor)

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        if "config_key" not in X or not (self.config_coef_ or getattr(self, "machine_host_", {})):
            return self._predict_with(X, self.coef_)
        out = np.empty(len(X))
        for key, idx in X.groupby("config_key", sort=False).indices.items():
            out[idx] = self._predict_with(X.iloc[idx], self.coefficients_for(str(key)))
        return out

    def _coefficient_sets(self) -> dict[str, Any]:
        return {"global": coefficient_table(self.features, self.coef_),
                "per_config": {k: coefficient_table(self.features, v)
                               for k, v in sorted(self.config_coef_.items())},
                "calibration": self._calibration_block()}

    def _calibration_block(self) -> dict[str, Any]:
        host = self._offers_host()
        names = np.asarray(list(self.features), dtype=object)
        return calibration_block(self.config_bound, self.config_prior_steps,
                                 self.config_selection, getattr(self, "config_choice_", {}),
                                 host_terms=(list(names[self._host_terms_mask()]) if host
                                             else None),
                                 machines=getattr(self, "machine_host_", {}))

    def _restore_sets(self, data: dict[str, Any]) -> None:
        self.coef_ = coefficient_values(data["global"])
        self.config_coef_ = {k: coefficient_values(v) for k, v in data["per_config"].items()}
        self.config_choice_ = restore_choices(data)
        self.machine_host_ = restore_machine_factors(data)
        self.n_features_in_ = len(self.features)


def calibration_block(kappa: float, prior_steps: float, selection: str,
                      choices: dict[str, dict[str, Any]], host_terms: Sequence[str] | None = None,
                      machines: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The serialised record of how a model chose its per-configuration terms
    (``coefficients.json`` → ``model.calibration``): the method and, per configuration,
    the candidates' CV errors, the choice and the terms that moved. A family with a host
    part (``host_terms``: the terms h multiplies) adds ``machine_host_factors`` (machine →
    factor and the host effect of each of its configurations): the factor a
    configuration never seen on that machine predicts with."""
    out = {"method": method(kappa, prior_steps, selection, host=host_terms is not None),
           "per_config": records_to_dict(choices)}
    if host_terms is not None:
        out["host_terms"] = list(host_terms)
        out["machine_host_factors"] = copy.deepcopy(dict(machines or {}))
    return out


def restore_choices(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``config_choice_`` from a serialised model (empty for releases made before the
    calibration record existed)."""
    block = data.get("calibration") or {}
    return copy.deepcopy(dict(block.get("per_config") or {}))


def restore_machine_factors(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``machine_host_`` from a serialised model: empty for releases made before machine
    host factors existed — they predict every configuration never seen with the global
    terms, as they did (nothing is recomputed on load, so every reader agrees)."""
    block = data.get("calibration") or {}
    return copy.deepcopy(dict(block.get("machine_host_factors") or {}))
