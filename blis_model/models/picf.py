"""PICF — physics-informed compositional features (idea 1 of the study).

StepTime = Σ_k β_k · f_k(step) with f_k the physics features (µs, or counts for
overheads). Coefficients are non-negative, fit on squared relative error, and
ridge-regularised toward the physical prior (corrections = 1, overheads free).

Two levels: a *global* coefficient set fit on all experiments pooled (features are
already hardware-normalised, so corrections transfer across GPUs), and per
*configuration* (``config_key``) the choice of ``models.config_terms``: the global set,
one factor on its host terms (the overheads: µs per launch / layer / request / step),
one scale on it, or its own set shrunk toward the global one with a prior worth a few
multiples of ``config_prior_steps`` pseudo-observations, each coefficient within its
physical range — chosen by time-ordered cross-validation on the configuration's steps.
PICF does the whole choice from per-block sufficient statistics
(:func:`block_statistics`; the host factor in closed form,
``config_terms.host_from_stats``), so fits from shard statistics select exactly as fits
on frames. ``predict`` uses a configuration's own set when it has one, the global set
when it was seen without one, and for a configuration never seen the global set with
its machine's host factor (``config_terms``, *Machine host factors*).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from blis_model.features.physics import PHYSICS_FEATURES
from blis_model.models.base import ConfigCoefficientSets, correction_mask, design, priors, target
from blis_model.models.config_terms import (
    KAPPA,
    N_BLOCKS,
    Candidate,
    Fold,
    Selection,
    candidates,
    check_selection,
    choose,
    cv_folds,
    host_from_stats,
    moved_terms,
    msre_from_stats,
    record,
    scale_from_stats,
    share_ratio,
    term_bounds,
    time_blocks,
)
from blis_model.models.solvers import RelativeGram, bounded_ridge, nonneg_ridge

OVERHEAD_RIDGE = 1e-4


class PICF(ConfigCoefficientSets):
    """Non-negative relative-error ridge on physics features, global + per configuration."""

    family = "picf"

    def __init__(self, features: Sequence[str] = PHYSICS_FEATURES, ridge: float = 0.1,
                 per_config: bool = True, config_prior_steps: float = 50.0,
                 config_bound: float = KAPPA, config_selection: str = "cv") -> None:
        self.features = features
        self.ridge = ridge
        self.per_config = per_config
        self.config_prior_steps = config_prior_steps
        self.config_bound = config_bound
        self.config_selection = config_selection

    # -- fitting ------------------------------------------------------------------------
    def _global_penalty(self, n: float) -> np.ndarray:
        """Pseudo-observations pulling each coefficient to its prior: ``ridge``·n for
        corrections; a vanishing ``OVERHEAD_RIDGE``·n for counts, which only decides how
        collinear counts share a cost (per-kernel vs per-step when every training
        configuration launches the same kernels) instead of leaving it to rounding."""
        return np.where(correction_mask(self.features), self.ridge * n, OVERHEAD_RIDGE * n)

    def _fit_config(self, X: pd.DataFrame, y: np.ndarray, reference: np.ndarray,
                    prior_steps: float) -> np.ndarray:
        return self.terms_from_stats(RelativeGram.from_rows(design(X, self.features), y),
                                     reference, prior_steps)

    def terms_from_stats(self, stats: RelativeGram, reference: np.ndarray,
                         prior_steps: float) -> np.ndarray:
        """One configuration's set from its statistics: shrunk toward ``reference`` with a
        prior worth ``prior_steps`` steps, every coefficient inside its physical range
        (``config_terms.term_bounds`` around the global set) — a box constraint of the
        solver."""
        lower, upper = term_bounds(self.coef_, stats.column_scale, self.config_bound)
        return bounded_ridge(stats, reference, np.full(len(self.coef_), float(prior_steps)),
                             lower, upper)

    def _select(self, key: str, X: pd.DataFrame, y: np.ndarray) -> Selection:
        return self.select_from_blocks(key, block_statistics(X, y, self.features))

    def select_from_blocks(self, key: str, blocks: Sequence[RelativeGram]) -> Selection:
        """The choice of ``models.config_terms`` for configuration ``key`` from the
        statistics of its :data:`~blis_model.models.config_terms.N_BLOCKS` time blocks
        (:func:`block_statistics`, summed over its experiments): every candidate, fold and
        CV error from sums, equal to the frame computation."""
        reference = np.array(self.coefficients_for(key), dtype=np.float64, copy=True)
        total = sum(blocks[1:], blocks[0])
        steps = int(round(total.sum_w))
        host = self._offers_host()
        cands = candidates(self.config_prior_steps, host=host)
        mask = self._host_terms_mask()
        device, host_part = np.where(mask, 0.0, reference), np.where(mask, reference, 0.0)
        kept = reference if self.machine_factor_for(key) != 1.0 else None
        if check_selection(self.config_selection) == "terms":
            fixed = Candidate("terms", float(self.config_prior_steps))
            coef = self.terms_from_stats(total, reference, float(self.config_prior_steps))
            rec = record(steps, [], {}, [fixed], fixed, "config_selection='terms'")
            return Selection(fixed, coef, self._complete(key, rec, coef, reference, total))
        folds, guard_fold = cv_folds([b.sum_w for b in blocks])
        if len(folds) < 2:
            rec = record(steps, folds, {}, cands, cands[0],
                         f"too few steps for time-ordered cross-validation ({steps}): "
                         "the reference terms are kept")
            return Selection(cands[0], kept, self._complete(key, rec, kept, reference, total))

        def fold_errors(fold: Fold) -> dict[str, float]:
            train = sum((blocks[b] for b in fold[0][1:]), blocks[fold[0][0]])
            valid = blocks[fold[1]]
            out = {"none": msre_from_stats(valid, reference)}
            if host:
                h = host_from_stats(train, device, host_part, self.config_bound)
                out["host"] = msre_from_stats(valid, device + h * host_part)
            s = scale_from_stats(train, reference, self.config_bound)
            out["scale"] = msre_from_stats(valid, s * reference)
            for c in cands:
                if c.kind == "terms":
                    coef = self.terms_from_stats(train, reference, float(c.prior_steps))
                    out[c.label] = msre_from_stats(valid, coef)
            return out

        per_fold = [fold_errors(f) for f in folds]
        errors = {c.label: [e[c.label] for e in per_fold] for c in cands}
        guard = fold_errors(guard_fold) if guard_fold is not None else None
        label, reason = choose(errors, [c.label for c in cands], guard=guard)
        chosen = next(c for c in cands if c.label == label)
        coef, s, h = kept, None, None
        if chosen.kind == "scale":
            s = scale_from_stats(total, reference, self.config_bound)
            coef = s * reference
        elif chosen.kind == "host":
            h = host_from_stats(total, device, host_part, self.config_bound)
            coef = device + h * host_part
        elif chosen.kind == "terms":
            coef = self.terms_from_stats(total, reference, float(chosen.prior_steps))
        rec = record(steps, folds, errors, cands, chosen, reason, s, guard, h)
        return Selection(chosen, coef, self._complete(key, rec, coef, reference, total))

    def _complete(self, key: str, rec: dict[str, Any], coef: np.ndarray | None,
                  reference: np.ndarray, stats: RelativeGram) -> dict[str, Any]:
        """The record with the terms that moved, the host effect (host share of the
        steps, Σ host/duration, over the global set's) and the machine factor the
        reference carried (as ``config_terms`` completes it from frames)."""
        lower, upper = term_bounds(self.coef_, stats.column_scale, self.config_bound)
        rec["moved"] = ([] if coef is None else
                        moved_terms(list(self.features), self.coef_, coef, lower, upper))
        if self._offers_host():
            mask = self._host_terms_mask()
            terms = reference if coef is None else coef
            rec["host_effect"] = share_ratio(np.where(mask, terms, 0.0) @ stats.moment,
                                             np.where(mask, self.coef_, 0.0) @ stats.moment,
                                             stats.sum_w)
            if self.machine_factor_for(key) != 1.0:
                rec["machine_host_factor"] = self.machine_factor_for(key)
        return rec

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

    def fit_config_sets_from_blocks(self, per_config: dict[str, Sequence[RelativeGram]]
                                    ) -> PICF:
        """Choose every configuration's set from its block statistics (what ``fit`` does
        from frames; the scale path sums shard statistics): ``coef_`` must be set."""
        self.config_coef_ = {}
        self.config_choice_ = {}
        self.machine_host_ = {}  # every configuration's reference: the global set
        if self.per_config:
            for key in sorted(per_config):
                blocks = per_config[key]
                if sum(b.sum_w for b in blocks) > 0:
                    self._apply(key, self.select_from_blocks(key, blocks))
        self._refresh_machine_factors()
        return self

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


def block_statistics(X: pd.DataFrame, y: np.ndarray, features: Sequence[str],
                     blocks: np.ndarray | None = None) -> list[RelativeGram]:
    """PICF statistics of each of the ``N_BLOCKS`` time blocks of ``X``
    (``config_terms.time_blocks``: each experiment's steps by step id, cut in equal
    contiguous parts); an empty block has all-zero statistics."""
    blocks = time_blocks(X) if blocks is None else blocks
    A = design(X, features)
    y = np.asarray(y, dtype=np.float64)
    out = []
    for b in range(N_BLOCKS):
        rows = blocks == b
        out.append(RelativeGram.from_rows(A[rows], y[rows]))
    return out
