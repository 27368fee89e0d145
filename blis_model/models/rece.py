"""RECE — robust ensemble with configuration embeddings (idea 5).

* **Quantile regression** (p50, p90, p99 by default): non-negative coefficients over the
  physics features per quantile, fit with the smoothed-pinball L-BFGS-B solver of
  ``models.quantile`` (linear in rows), robust to the heavy tail of step times.
* **Specialists**: one coefficient set per quantile and per configuration — the choice
  of ``models.config_terms`` (the reference set, one scale on it, or its own sets shrunk
  toward it with a prior worth a few multiples of ``config_prior_steps`` steps, each
  coefficient within its physical range around the global set of its level, bounds of
  the solver); the reference is the global set in a fresh fit, what the model predicted
  for the configuration before in ``calibrate``. A specialist is always stored (``none``
  stores the reference), so every fitted configuration is a neighbour of the ensemble.
* **Configuration embeddings**: each configuration is a vector of its architecture,
  hardware, TP and scheduler knobs (frame columns ``arch_*``, ``hw_*``, ``tp``,
  ``max_num_*``; log(1 + v), standardised over the training configurations).
* **Specialist ensemble** for a configuration never seen: the ``n_neighbors`` nearest
  specialists in embedding space, weighted by exp(−d²/2·bandwidth²), blended with the
  global set (weight ``global_weight``). Every blend of linear models is linear, so the
  result is one coefficient vector per quantile with the features' units.

``predict`` returns p50; ``predict_quantile(X, q)`` any fitted level (levels are kept
non-crossing by rearrangement).
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
    design,
    priors,
    restore_choices,
    target,
)
from blis_model.models.config_terms import (
    KAPPA,
    Selection,
    column_scale,
    term_bounds,
)
from blis_model.models.linear import config_groups, frame_column, linear_predict
from blis_model.models.quantile import fit_quantile, pilot_prediction

EMBEDDING_PREFIXES: tuple[str, ...] = ("arch_", "hw_", "max_num_")
QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99)


def embedding_columns(X: pd.DataFrame) -> list[str]:
    """Configuration columns of a frame: ``arch_*``, ``hw_*``, ``tp``, ``max_num_*``."""
    return sorted(c for c in X.columns
                  if c == "tp" or any(str(c).startswith(p) for p in EMBEDDING_PREFIXES))


def _raw_embedding(X: pd.DataFrame, columns: Sequence[str], idx: np.ndarray) -> np.ndarray:
    """log(1 + v) of each configuration column at the first row of ``idx``."""
    row = idx[:1]
    return np.array([np.log1p(max(float(frame_column(X, c)[row][0]), 0.0)) for c in columns])


class RECE(PerConfigurationTerms, StepTimeModel):
    """Quantile specialists per configuration + embedding-weighted ensemble for new ones."""

    family = "rece"

    def __init__(self, features: Sequence[str] = PHYSICS_FEATURES,
                 quantiles: Sequence[float] = QUANTILES, ridge: float = 1.0,
                 per_config: bool = True, config_prior_steps: float = 50.0,
                 embedding_columns: Sequence[str] | None = None, n_neighbors: int = 3,
                 bandwidth: float = 1.0, global_weight: float = 0.25,
                 smoothing: float = 1e-3, max_iter: int = 300, config_bound: float = KAPPA,
                 config_selection: str = "cv") -> None:
        self.features = features
        self.quantiles = quantiles
        self.ridge = ridge
        self.per_config = per_config
        self.config_prior_steps = config_prior_steps
        self.embedding_columns = embedding_columns
        self.n_neighbors = n_neighbors
        self.bandwidth = bandwidth
        self.global_weight = global_weight
        self.smoothing = smoothing
        self.max_iter = max_iter
        self.config_bound = config_bound
        self.config_selection = config_selection

    # -- fitting ------------------------------------------------------------------------
    def _fit_levels(self, A: np.ndarray, y: np.ndarray, prior: np.ndarray,
                    penalty: np.ndarray, pilot: np.ndarray, bounded: bool = False
                    ) -> np.ndarray:
        """(quantiles, features) coefficient sets on one design (``bounded``: each level
        inside the physical ranges around its global set)."""
        out = []
        for i, q in enumerate(self.quantiles):
            lower = upper = None
            if bounded:
                lower, upper = term_bounds(self.coef_[i], column_scale(A / y[:, None]),
                                           self.config_bound)
            out.append(fit_quantile(A, y, q, prior[i], penalty, pilot, self.smoothing,
                                    self.max_iter, x0=np.clip(prior[i], lower, upper)
                                    if bounded else prior[i], lower=lower, upper=upper))
        return np.vstack(out)

    # -- per-configuration terms (models.config_terms) ---------------------------------
    def _reference_terms(self, key: str, X: pd.DataFrame) -> np.ndarray:
        idx = np.arange(len(X))
        emb = self.embed(X, idx) if len(X) else None
        return np.array(self.coefficients_for(key, emb), dtype=np.float64, copy=True)

    def _terms_predict(self, X: pd.DataFrame, terms: np.ndarray) -> np.ndarray:
        return self._levels_with(X, terms, np.arange(len(X)))[:, self._median_level()]

    def _terms_fit(self, X: pd.DataFrame, y: np.ndarray, reference: np.ndarray,
                   prior_steps: float) -> np.ndarray:
        A = design(X, list(self.features))
        penalty = np.full(len(self.features), float(prior_steps))
        return self._fit_levels(A, y, reference, penalty, pilot_prediction(A, y), bounded=True)

    def _terms_layout(self, X: pd.DataFrame, y: np.ndarray
                      ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        scale = column_scale(design(X, list(self.features)) / y[:, None])
        bounds = [term_bounds(self.coef_[i], scale, self.config_bound)
                  for i in range(len(self.quantiles))]
        names = [f"p{float(q) * 100:g}/{n}" for q in self.quantiles for n in self.features]
        return (names, self.coef_.ravel(), np.concatenate([b[0] for b in bounds]),
                np.concatenate([b[1] for b in bounds]))

    def _apply(self, key: str, selection: Selection, reference: np.ndarray,
               embedding: np.ndarray) -> None:
        """Store the chosen specialist (the reference itself for ``none``)."""
        terms = reference if selection.terms is None else selection.terms
        self.specialists_[key] = np.asarray(terms, dtype=np.float64)
        self.embeddings_[key] = embedding
        self.config_choice_[key] = selection.record

    def fit(self, X: pd.DataFrame, y: Any = None) -> RECE:
        y = target(X, y)
        if not len(y):
            raise ValueError("RECE.fit needs at least one step")
        names = list(self.features)
        A = design(X, names)
        pilot = pilot_prediction(A, y)
        start = np.tile(priors(names), (len(self.quantiles), 1))
        penalty = np.where(correction_mask(names), self.ridge, 0.0)
        self.coef_ = self._fit_levels(A, y, start, penalty, pilot)
        self.embedding_columns_ = list(self.embedding_columns or embedding_columns(X))
        groups = config_groups(X)
        raw = {k: _raw_embedding(X, self.embedding_columns_, idx) for k, idx in groups.items()}
        if raw:
            stacked = np.vstack(list(raw.values()))
            self.embedding_center_ = stacked.mean(axis=0)
            spread = stacked.std(axis=0)
            self.embedding_scale_ = np.where(spread > 0, spread, 1.0)
        else:
            self.embedding_center_ = np.zeros(len(self.embedding_columns_))
            self.embedding_scale_ = np.ones(len(self.embedding_columns_))
        self.specialists_: dict[str, np.ndarray] = {}
        self.embeddings_: dict[str, np.ndarray] = {}
        self.config_choice_: dict[str, dict[str, Any]] = {}
        if self.per_config:
            # every reference is the global set: choose all before storing any
            chosen = {key: self._select(key, X.iloc[idx], y[idx]) for key, idx in groups.items()}
            for key, selection in chosen.items():
                self._apply(key, selection, self.coef_.copy(), self._standardise(raw[key]))
        self.n_features_in_ = len(names)
        return self

    def _standardise(self, raw: np.ndarray) -> np.ndarray:
        return (raw - self.embedding_center_) / self.embedding_scale_

    def embed(self, X: pd.DataFrame, idx: np.ndarray) -> np.ndarray:
        """The standardised embedding of the configuration of rows ``idx``."""
        return self._standardise(_raw_embedding(X, self.embedding_columns_, idx))

    def _copy_fitted(self) -> RECE:
        model = RECE(**self.get_params())
        model.coef_ = self.coef_.copy()
        model.embedding_columns_ = list(self.embedding_columns_)
        model.embedding_center_ = self.embedding_center_.copy()
        model.embedding_scale_ = self.embedding_scale_.copy()
        model.specialists_ = {k: v.copy() for k, v in self.specialists_.items()}
        model.embeddings_ = {k: v.copy() for k, v in self.embeddings_.items()}
        model.config_choice_ = copy.deepcopy(self.config_choice_)
        model.n_features_in_ = self.n_features_in_
        return model

    def calibrate(self, X: pd.DataFrame, y: Any = None) -> RECE:
        """A copy with a specialist for every configuration of ``X`` chosen and fit on its
        steps around what the model predicted for it before (its own specialist, or the
        embedding ensemble when new)."""
        y = target(X, y)
        model = self._copy_fitted()
        for key, idx in config_groups(X).items():
            part = X.iloc[idx]
            model._apply(key, self._select(key, part, y[idx]),
                         self._reference_terms(key, part), self.embed(X, idx))
        return model

    # -- ensemble -----------------------------------------------------------------------
    def neighbour_weights(self, embedding: np.ndarray) -> dict[str, float]:
        """Similarity weights (sum 1) of the nearest specialists for an embedding."""
        if not self.specialists_:
            return {}
        keys = sorted(self.specialists_)
        d = np.array([np.linalg.norm(embedding - self.embeddings_[k]) for k in keys])
        nearest = np.argsort(d, kind="stable")[: max(1, self.n_neighbors)]
        logits = -0.5 * (d[nearest] / max(self.bandwidth, 1e-12)) ** 2
        w = np.exp(logits - logits.max())
        return {keys[i]: float(v) for i, v in zip(nearest, w / w.sum(), strict=True)}

    def coefficients_for(self, config_key: str | None, embedding: np.ndarray | None = None
                         ) -> np.ndarray:
        """(quantiles, features) used for a configuration: its specialist, else the
        embedding-weighted ensemble blended with the global set, else the global set."""
        key = str(config_key)
        if key in self.specialists_:
            return self.specialists_[key]
        if embedding is None or not self.specialists_:
            return self.coef_
        weights = self.neighbour_weights(embedding)
        blend = sum(w * self.specialists_[k] for k, w in weights.items())
        return (1.0 - self.global_weight) * blend + self.global_weight * self.coef_

    # -- prediction ---------------------------------------------------------------------
    def _level(self, q: float) -> int:
        levels = [float(v) for v in self.quantiles]
        for i, v in enumerate(levels):
            if abs(v - q) < 1e-9:
                return i
        raise ValueError(f"quantile {q} not fitted; fitted: {levels}")

    def predict_quantiles(self, X: pd.DataFrame) -> np.ndarray:
        """(steps, quantiles) predictions, µs, non-decreasing along the levels."""
        out = np.empty((len(X), len(self.quantiles)))
        groups = config_groups(X) or {"": np.arange(len(X))}
        for key, idx in groups.items():
            coefs = self.coefficients_for(key, self.embed(X, idx) if len(idx) else None)
            out[idx] = self._levels_with(X, coefs, idx)
        return out

    def _levels_with(self, X: pd.DataFrame, coefs: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """(rows idx, quantiles) predictions of one set of levels, non-crossing."""
        names = list(self.features)
        out = np.column_stack([linear_predict(X, names, coefs[i], idx)
                               for i in range(len(self.quantiles))])
        order = np.argsort(np.asarray(self.quantiles, dtype=np.float64))
        out[:, order] = np.maximum.accumulate(out[:, order], axis=1)
        return out

    def _median_level(self) -> int:
        levels = [float(v) for v in self.quantiles]
        return self._level(0.5 if 0.5 in levels else min(levels))

    def predict_quantile(self, X: pd.DataFrame, q: float) -> np.ndarray:
        return self.predict_quantiles(X)[:, self._level(q)]

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """The median (p50) when fitted, else the lowest fitted level."""
        levels = [float(v) for v in self.quantiles]
        q = 0.5 if 0.5 in levels else min(levels)
        return self.predict_quantile(X, q)

    # -- serialisation ------------------------------------------------------------------
    def _tables(self, coefs: np.ndarray) -> dict[str, list[dict[str, Any]]]:
        return {f"p{float(q) * 100:g}": coefficient_table(self.features, coefs[i])
                for i, q in enumerate(self.quantiles)}

    def to_dict(self) -> dict[str, Any]:
        params = {**self.get_params(), "features": list(self.features),
                  "quantiles": [float(q) for q in self.quantiles],
                  "embedding_columns": (None if self.embedding_columns is None
                                        else list(self.embedding_columns))}
        return {
            "family": self.family,
            "params": params,
            "features": list(self.features),
            "quantiles": [float(q) for q in self.quantiles],
            "global": self._tables(self.coef_),
            "embedding": {"columns": self.embedding_columns_,
                          "transform": "(log(1 + v) - center) / scale",
                          "center": self.embedding_center_.tolist(),
                          "scale": self.embedding_scale_.tolist()},
            "per_config": {k: {"embedding": self.embeddings_[k].tolist(),
                               "quantiles": self._tables(v)}
                           for k, v in sorted(self.specialists_.items())},
            "calibration": calibration_block(self.config_bound, self.config_prior_steps,
                                             self.config_selection, self.config_choice_),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RECE:
        params = dict(data["params"])
        params["features"] = tuple(params["features"])
        params["quantiles"] = tuple(params["quantiles"])
        if params.get("embedding_columns") is not None:
            params["embedding_columns"] = tuple(params["embedding_columns"])
        model = cls(**params)

        def stack(tables: dict[str, list[dict[str, Any]]]) -> np.ndarray:
            return np.vstack([coefficient_values(tables[f"p{float(q) * 100:g}"])
                              for q in model.quantiles])

        model.coef_ = stack(data["global"])
        emb = data["embedding"]
        model.embedding_columns_ = list(emb["columns"])
        model.embedding_center_ = np.asarray(emb["center"], dtype=np.float64)
        model.embedding_scale_ = np.asarray(emb["scale"], dtype=np.float64)
        model.specialists_ = {k: stack(v["quantiles"]) for k, v in data["per_config"].items()}
        model.embeddings_ = {k: np.asarray(v["embedding"], dtype=np.float64)
                             for k, v in data["per_config"].items()}
        model.config_choice_ = restore_choices(data)
        model.n_features_in_ = len(model.features)
        return model
