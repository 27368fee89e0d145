"""Choosing a release's family by validation that matches use.

BLIS is asked to simulate configurations it has not seen, so the default family is the
winner of **leave-one-experiment-out** (zero-shot) MAPE; the within-experiment temporal
holdout (fit on earlier steps, predict later ones) breaks ties and decides alone when
the corpus has a single configuration. Random row splits are never used: steps are
autocorrelated. The comparison and the reason are recorded in the release manifest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from blis_model.calibration.evaluation import leave_one_out_fold, temporal_holdout
from blis_model.models.registry import FAMILIES

Folds = Mapping[str, Mapping[str, dict[str, float] | None]]  # family → experiment → fold

FAMILY_ORDER: tuple[str, ...] = ("picf", "overlap", "mole_rd", "hfd_tl", "bsr_ard", "rece",
                                 "hybrid")
"""Simplest first: on a tie the simpler family wins."""


@dataclass(frozen=True)
class FamilyScore:
    """One family's validation results (mean MAPE over experiments, %)."""

    family: str
    loo_mape: float
    loo_median_ape: float
    temporal_mape: float
    per_experiment_loo: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "loo_mape": self.loo_mape,
                "loo_median_ape": self.loo_median_ape, "temporal_mape": self.temporal_mape,
                "per_experiment_loo": self.per_experiment_loo}


@dataclass(frozen=True)
class Selection:
    """The chosen family, why, and every family's scores (best first). ``results`` keeps
    each family's raw (loo, temporal) per-experiment results for the release report."""

    winner: str
    reason: str
    scores: tuple[FamilyScore, ...]
    results: dict[str, tuple[dict, dict]] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"winner": self.winner, "reason": self.reason,
                "criterion": "leave-one-experiment-out mean MAPE, then temporal MAPE",
                "scores": [s.to_dict() for s in self.scores]}


def _mean(results: Mapping[str, Mapping[str, float]], key: str) -> float:
    values = [float(r[key]) for r in results.values() if r.get("n")]
    return sum(values) / len(values) if values else math.nan


def score(family: str, loo: Mapping[str, Mapping[str, float]],
          temporal: Mapping[str, Mapping[str, float]]) -> FamilyScore:
    """Summarise per-experiment LOO and temporal results (``metrics.summary`` dicts)."""
    return FamilyScore(family, _mean(loo, "mape"), _mean(loo, "median_ape"),
                       _mean(temporal, "mape"),
                       {k: float(v["mape"]) for k, v in sorted(loo.items()) if v.get("n")})


def _key(s: FamilyScore) -> tuple[float, float, int]:
    order = FAMILY_ORDER.index(s.family) if s.family in FAMILY_ORDER else len(FAMILY_ORDER)
    loo = s.loo_mape if not math.isnan(s.loo_mape) else math.inf
    temporal = s.temporal_mape if not math.isnan(s.temporal_mape) else math.inf
    return (round(loo, 6), round(temporal, 6), order)


def choose(scores: Sequence[FamilyScore]) -> Selection:
    """The winner (lowest LOO MAPE; then temporal; then simplest) and why."""
    if not scores:
        raise ValueError("no family scores to choose from")
    ranked = sorted(scores, key=_key)
    best = ranked[0]
    if math.isnan(best.loo_mape):
        reason = (f"{best.family}: lowest temporal-holdout MAPE {best.temporal_mape:.2f}% "
                  "(a single configuration: no leave-one-experiment-out possible)")
    else:
        runner = ranked[1] if len(ranked) > 1 else None
        margin = (f"; runner-up {runner.family} {runner.loo_mape:.2f}%"
                  if runner and not math.isnan(runner.loo_mape) else "")
        reason = (f"{best.family}: lowest leave-one-experiment-out mean MAPE "
                  f"{best.loo_mape:.2f}% (temporal {best.temporal_mape:.2f}%){margin}")
    return Selection(best.family, reason, tuple(ranked))


def candidate_families() -> list[str]:
    """Every registered family, simplest first."""
    return [f for f in FAMILY_ORDER if f in FAMILIES] + sorted(set(FAMILIES) - set(FAMILY_ORDER))


def validate(frame: pd.DataFrame, families: Sequence[str]
             ) -> tuple[Folds, dict[str, dict[str, dict[str, float]]]]:
    """(family → experiment → leave-one-out fold, family → temporal holdout), in
    process. The flow runs each fold and holdout as its own task instead."""
    names = sorted(frame["experiment"].unique())
    folds = {f: ({n: leave_one_out_fold(frame, n, f) for n in names} if len(names) > 1
                 else {}) for f in families}
    return folds, {f: temporal_holdout(frame, f) for f in families}


def completed(folds: Mapping[str, dict[str, float] | None]) -> dict[str, dict[str, float]]:
    """The folds that could be fit (a configuration alone in the corpus has none)."""
    return {name: folds[name] for name in sorted(folds) if folds[name] is not None}


def choose_family(folds: Folds, temporal: Mapping[str, Any]) -> Selection:
    """Score every validated family and pick the leave-one-experiment-out winner
    (:func:`choose`), keeping each family's results for the report."""
    scores = [score(f, completed(folds[f]), temporal[f]) for f in folds]
    selection = choose(scores)
    results = {f: (completed(folds[f]), temporal[f]) for f in folds}
    return Selection(selection.winner, selection.reason, selection.scores, results)


def compare_families(frame: pd.DataFrame, families: Sequence[str] | None = None) -> Selection:
    """Validate every family on ``frame`` (LOO + temporal, in-process) and choose."""
    return choose_family(*validate(frame, families or candidate_families()))
