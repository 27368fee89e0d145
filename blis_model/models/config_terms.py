"""Per-configuration terms that never hurt and stay physical (shared by every family).

A family with per-configuration terms (PICF's and OVERLAP's coefficient sets, MoLE-RD's
experts, HFD-TL's and Hybrid's scale + residual terms, BSR-ARD's posterior, RECE's
specialists) adapts them to one configuration's steps — in ``calibrate`` on a base, and
for every configuration of a fresh ``fit``. How far they move is chosen here, the same
way for every family.

**Candidates**, simplest first:

* ``none`` — the reference terms unchanged: the global set (fresh fit, or a
  configuration the base never saw), or the base's own terms for that configuration;
* ``scale`` — one factor s on the whole reference prediction (s ∈ [1/κ, κ], closed form
  on relative error);
* ``terms@λ`` — full per-configuration terms shrunk toward the reference with a prior
  worth λ steps, for λ = the family's ``config_prior_steps`` × (4, 1, 1/4) (strong →
  weak).

**Cross-validation by time blocks.** Steps are autocorrelated, so folds are never random
rows: each experiment's steps (by step id) are cut into :data:`N_BLOCKS` contiguous
blocks of equal size (:func:`time_blocks`).

* *Blocked folds* (:func:`cv_folds`): each block is validated once by the candidate fit
  on the other blocks — every fold trains on ~80% of the steps, so the CV judges terms
  fit on about as many steps as the final ones (a rolling origin, whose first folds
  train on 20%, would judge flexible candidates by fits on a fifth of the data).
* *Drift guard*: the last block, predicted by the candidate fit on the blocks BEFORE it
  only (rolling origin) — what calibrating on the first steps and predicting the rest
  does. A candidate that loses to ``none`` there is not taken: the configuration's
  recent steps disagree with what its earlier ones say.

A fold needs ≥ :data:`MIN_TRAIN_STEPS` training and ≥ :data:`MIN_VALID_STEPS`
validation steps; with fewer than two blocked folds the configuration keeps ``none``.
The error is the mean squared relative error (ŷ/y − 1)² on the validation block — the
loss the families' terms minimise, and computable from sufficient statistics, so PICF
selects from shard statistics exactly as from frames.

**Choice (one-standard-error rules, :func:`choose`).** A candidate replaces ``none`` only
when its paired improvement over ``none`` (per blocked fold) exceeds one standard error
of that improvement and it does not lose to ``none`` on the drift guard; among those
that do, the simplest within one standard error of the best is chosen. A more flexible
candidate must win clearly and consistently across folds, so a configuration whose law
matches the base (or differs by a scale) keeps ``none`` (or ``scale``).

**Physical ranges (box constraints in the solvers, never clipping).** Each term t with
global value g_t (the pooled fit's, or the physical neutral value of a scale: 1) may
move within [g_t/κ, κ·g_t] (κ = ``config_bound``, default :data:`KAPPA` = 4: a kernel
family's achieved fraction of peak, or a host's µs per launch / request / step, differs
between configurations of one engine by well under 4×; a term further out is absorbing
something else). A term whose global value is zero (a count the pooled data priced at
nothing, a residual with prior 0, a feature the donors never exercised) may take at most
the value at which it ALONE would account for the configuration's whole step time (RMS
over its steps of feature/duration = 1): a part of a step cannot exceed the step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from blis_model.models.solvers import RelativeGram

KAPPA = 4.0
"""Default physical range of a per-configuration term: a factor κ either way of its
global value."""
STRENGTHS: tuple[float, ...] = (4.0, 1.0, 0.25)
"""Shrinkage strengths of the ``terms`` candidates, × the family's ``config_prior_steps``
(strong → weak)."""
N_BLOCKS = 5
MIN_TRAIN_STEPS = 10
MIN_VALID_STEPS = 5
CV_MAX_STEPS = 4000
"""At most this many steps of one configuration enter its cross-validation (evenly
spaced within each experiment's time order); the chosen candidate is refit on all."""
ZERO_SHARE = 1e-6
"""A global term contributing less than this share of a step (RMS) counts as zero."""
SELECTIONS: tuple[str, ...] = ("cv", "terms")
METRIC = "mean squared relative error (prediction / duration - 1)^2 per validation block"
RULE = ("blocked CV over 5 contiguous blocks of each experiment's steps (by step id; each "
        "block validated by the fit on the others) plus a drift guard (the last block "
        "predicted from the earlier ones); a candidate replaces 'none' only when it beats it "
        "by more than one standard error (paired over folds) and not worse on the guard; of "
        "those, the simplest within one standard error of the best")


def check_selection(value: str) -> str:
    """``config_selection`` validated: ``"cv"`` (choose by CV) or ``"terms"`` (always the
    full terms at the family's ``config_prior_steps``, no CV: the pre-selection rule)."""
    if value not in SELECTIONS:
        raise ValueError(f"config_selection must be one of {SELECTIONS}, got {value!r}")
    return value


@dataclass(frozen=True)
class Candidate:
    """One way to set a configuration's terms (see module docstring)."""

    kind: str  # "none" | "scale" | "terms"
    prior_steps: float | None = None

    @property
    def label(self) -> str:
        return f"terms@{self.prior_steps:g}" if self.kind == "terms" else self.kind


def candidates(prior_steps: float, strengths: Sequence[float] = STRENGTHS) -> list[Candidate]:
    """The candidates in order of flexibility (``none`` first)."""
    return [Candidate("none"), Candidate("scale"),
            *(Candidate("terms", float(prior_steps) * f) for f in strengths)]


# -------------------------------------------------------------------------- folds


def time_blocks(X: pd.DataFrame, n_blocks: int = N_BLOCKS) -> np.ndarray:
    """Block index (0…n_blocks−1) of every row: each experiment's rows ordered by step
    id (row order without one) and cut into ``n_blocks`` contiguous equal parts."""
    n = len(X)
    out = np.zeros(n, dtype=np.int64)
    if not n:
        return out
    groups = (X.groupby("experiment", sort=False).indices if "experiment" in X
              else {"": np.arange(n)})
    steps = X["step_id"].to_numpy() if "step_id" in X else np.arange(n)
    for idx in groups.values():
        order = idx[np.argsort(steps[idx], kind="stable")]
        out[order] = block_of_positions(len(order), n_blocks)
    return out


def block_of_positions(n: int, n_blocks: int = N_BLOCKS) -> np.ndarray:
    """Block of each of ``n`` time-ordered positions: floor(i·n_blocks/n)."""
    return (np.arange(n, dtype=np.int64) * n_blocks) // max(n, 1)


Fold = tuple[tuple[int, ...], int]
"""(training blocks, validation block)."""


def cv_folds(counts: Sequence[float], min_train: int = MIN_TRAIN_STEPS,
             min_valid: int = MIN_VALID_STEPS) -> tuple[list[Fold], Fold | None]:
    """(blocked folds, drift guard) for blocks holding ``counts`` steps: every block k
    with ≥ ``min_valid`` steps, trained on the others (≥ ``min_train`` steps); the guard
    validates the last non-empty block on the blocks before it (None when too small)."""
    total = float(sum(counts))
    blocks = range(len(counts))
    folds = [(tuple(b for b in blocks if b != k), k) for k in blocks
             if counts[k] >= min_valid and total - counts[k] >= min_train]
    last = max((k for k in blocks if counts[k] > 0), default=None)
    guard = None
    if last is not None and counts[last] >= min_valid and sum(counts[:last]) >= min_train:
        guard = (tuple(range(last)), last)
    return folds, guard


def cv_subsample(n: int, max_steps: int = CV_MAX_STEPS) -> np.ndarray:
    """Positions (of ``n`` time-ordered rows) entering the CV: all, or ``max_steps``
    evenly spaced ones (each experiment and block keeps its share)."""
    if n <= max_steps:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_steps).round().astype(np.int64))


# -------------------------------------------------------------------------- errors


def msre(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean squared relative error of predictions (µs) against durations (µs)."""
    r = np.asarray(pred, dtype=np.float64) / np.asarray(y, dtype=np.float64) - 1.0
    return float(np.mean(r * r)) if len(r) else float("nan")


def msre_from_stats(stats: RelativeGram, beta: np.ndarray) -> float:
    """:func:`msre` of the linear prediction x·β from sufficient statistics."""
    beta = np.asarray(beta, dtype=np.float64)
    value = beta @ stats.gram @ beta - 2.0 * beta @ stats.moment + stats.sum_w
    return float(max(value, 0.0) / max(stats.sum_w, 1e-300))


def scale_factor(pred: np.ndarray, y: np.ndarray, kappa: float = KAPPA) -> float:
    """argmin_s Σ(s·ŷ/y − 1)² within [1/κ, κ] (1 when nothing is predicted)."""
    a = np.asarray(pred, dtype=np.float64) / np.asarray(y, dtype=np.float64)
    return _bounded_scale(float(a.sum()), float((a * a).sum()), kappa)


def scale_from_stats(stats: RelativeGram, beta: np.ndarray, kappa: float = KAPPA) -> float:
    """:func:`scale_factor` of the linear prediction x·β from sufficient statistics."""
    beta = np.asarray(beta, dtype=np.float64)
    return _bounded_scale(float(beta @ stats.moment), float(beta @ stats.gram @ beta), kappa)


def _bounded_scale(sum_a: float, sum_a2: float, kappa: float) -> float:
    if not sum_a2 > 0:
        return 1.0
    # one variable: the bounded minimiser of the convex quadratic is the clipped one
    return float(min(max(sum_a / sum_a2, 1.0 / kappa), kappa))


# -------------------------------------------------------------------------- bounds


def term_bounds(global_values: np.ndarray, column_scale: np.ndarray, kappa: float = KAPPA
                ) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) physical range of each term (module docstring): [g/κ, κ·g] around a
    global value g that contributes to the steps, else [0, 1/scale] (the term alone
    would take the whole step); ``column_scale`` is the RMS of feature/duration over the
    configuration's steps. κ = inf leaves every term free in [0, inf)."""
    g = np.maximum(np.asarray(global_values, dtype=np.float64), 0.0)
    s = np.asarray(column_scale, dtype=np.float64)
    if not math.isfinite(kappa):
        return np.zeros_like(g), np.full_like(g, np.inf)
    live = g * s > ZERO_SHARE
    with np.errstate(divide="ignore"):
        cap = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), np.inf)
    lower = np.where(live, g / kappa, 0.0)
    upper = np.where(live, g * kappa, cap)
    return lower, upper


def moved_terms(names: Sequence[str], global_values: np.ndarray, values: np.ndarray,
                lower: np.ndarray, upper: np.ndarray, tolerance: float = 0.01
                ) -> list[dict[str, Any]]:
    """The terms of a configuration that differ from their global value by more than
    ``tolerance`` (relative) or sit at a bound: global, value, ratio (None from 0),
    range and which bound it is at."""
    out = []
    for name, g, v, lo, hi in zip(names, global_values, values, lower, upper, strict=True):
        g, v, lo, hi = float(g), float(v), float(lo), float(hi)
        at = None
        if lo > 0 and v <= lo * (1 + 1e-6):
            at = "lower"
        elif math.isfinite(hi) and hi > 0 and v >= hi * (1 - 1e-6):
            at = "upper"
        # a global value too small to count (range [0, whole step]) is 0
        zero = g <= 0 or (lo == 0 and math.isfinite(hi) and g <= ZERO_SHARE * hi)
        ratio = None if zero else v / g
        moved = (abs(ratio - 1.0) > tolerance) if ratio is not None else (
            v > ZERO_SHARE * hi if math.isfinite(hi) else v > 0)
        if moved or at:
            out.append({"term": name, "global": 0.0 if zero else g, "config": v, "ratio": ratio,
                        "range": [lo, hi if math.isfinite(hi) else None], "at_bound": at})
    return out


# -------------------------------------------------------------------------- the choice


def choose(errors: Mapping[str, Sequence[float]], order: Sequence[str], se_factor: float = 1.0,
           guard: Mapping[str, float] | None = None) -> tuple[str, str]:
    """(chosen label, reason) from paired per-fold errors; ``order[0]`` is the reference
    (``none``), the rest in order of flexibility.

    1. A candidate *qualifies* when its paired improvement over the reference, averaged
       over folds, exceeds ``se_factor`` standard errors of that improvement (it wins
       clearly and consistently, not by luck of one fold), and its ``guard`` error (the
       drift guard's) is not above the reference's.
    2. No qualifier: the reference. Else, of the qualifiers, the simplest whose paired
       excess over the best qualifier is within one standard error of that excess.
    """
    ref = order[0]
    means = {c: float(np.mean(errors[c])) for c in order}

    def excess(a: str, b: str) -> tuple[float, float]:
        """Mean and standard error of the paired excess error of a over b."""
        d = np.asarray(errors[a], dtype=np.float64) - np.asarray(errors[b], dtype=np.float64)
        se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
        return float(d.mean()), se

    tiny = 1e-9 * max(means[ref], 1e-12)  # ties broken the same way on every machine
    better = [c for c in order[1:] if excess(ref, c)[0] > se_factor * excess(ref, c)[1] + tiny]
    drifting = [c for c in better
                if guard is not None and guard[c] > guard[ref] * (1 + 1e-9) + 1e-15]
    qualified = [c for c in better if c not in drifting]
    if not qualified:
        best = min(order, key=lambda c: (means[c], order.index(c)))
        if best == ref:
            return ref, f"lowest CV error ({_pct(means[ref])} RMS relative error)"
        if drifting:
            assert guard is not None
            return ref, (f"{drifting[0]} beats it over the folds ({_pct(means[drifting[0]])} "
                         f"vs {_pct(means[ref])}) but not on the last block predicted from "
                         f"the earlier ones ({_pct(guard[drifting[0]])} vs "
                         f"{_pct(guard[ref])}): drift guard")
        return ref, (f"no candidate beats it by more than one standard error over the folds "
                     f"(best {best}: {_pct(means[best])} vs {_pct(means[ref])})")
    best = min(qualified, key=lambda c: (means[c], order.index(c)))
    for c in qualified:
        mean, se = excess(c, best)
        if mean <= se_factor * se + tiny:
            why = (f"beats {ref} by more than one standard error ({_pct(means[c])} vs "
                   f"{_pct(means[ref])} RMS relative error)")
            if c != best:
                why += f"; within one standard error of {best} ({_pct(means[best])})"
            return c, why
    return best, "lowest CV error"  # pragma: no cover - the best always qualifies


def _pct(mse: float) -> str:
    return f"{100.0 * math.sqrt(max(mse, 0.0)):.2f}%"


def record(steps: int, folds: Sequence[Fold], errors: Mapping[str, Sequence[float]],
           cands: Sequence[Candidate], choice: Candidate, reason: str,
           scale: float | None = None, guard: Mapping[str, float] | None = None
           ) -> dict[str, Any]:
    """The JSON record of one configuration's choice (released per configuration)."""
    rows = []
    for c in cands:
        e = errors.get(c.label)
        g = None if guard is None else guard.get(c.label)
        rows.append({"candidate": c.label,
                     "cv_rmsre_pct": (None if e is None else
                                      100.0 * math.sqrt(max(float(np.mean(e)), 0.0))),
                     "fold_msre": None if e is None else [float(v) for v in e],
                     "guard_msre": None if g is None else float(g)})
    out: dict[str, Any] = {"steps": int(steps), "folds": len(folds), "candidates": rows,
                           "choice": choice.label, "reason": reason, "moved": []}
    if choice.kind == "scale":
        out["scale"] = scale
    if choice.kind == "terms":
        out["prior_steps"] = choice.prior_steps
    return out


def method(kappa: float, prior_steps: float, selection: str) -> dict[str, Any]:
    """How a family chose its per-configuration terms (released once per model)."""
    return {"selection": selection, "metric": METRIC, "rule": RULE if selection == "cv" else
            "always the full terms at config_prior_steps (no cross-validation)",
            "blocks": N_BLOCKS, "min_train_steps": MIN_TRAIN_STEPS,
            "min_valid_steps": MIN_VALID_STEPS,
            "candidates": [c.label for c in candidates(prior_steps)],
            "bound_factor": kappa if math.isfinite(kappa) else None,
            "bounds": ("each term within [global/κ, κ·global]; a term whose global value is "
                       "0 at most what would alone take the whole step")}


# -------------------------------------------------------------------------- engine


class TermsFamily(Protocol):
    """What a family provides for :func:`select_terms` (terms: its own representation)."""

    def _reference_terms(self, key: str, X: pd.DataFrame) -> Any: ...

    def _terms_predict(self, X: pd.DataFrame, terms: Any) -> np.ndarray: ...

    def _terms_fit(self, X: pd.DataFrame, y: np.ndarray, reference: Any,
                   prior_steps: float) -> Any: ...

    def _terms_scaled(self, terms: Any, factor: float) -> Any: ...

    def _terms_layout(self, X: pd.DataFrame, y: np.ndarray
                      ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]: ...

    def _terms_vector(self, terms: Any) -> np.ndarray: ...


@dataclass(frozen=True)
class Selection:
    """The outcome for one configuration: the candidate, its terms (None for ``none``:
    the configuration keeps the reference) and the JSON record."""

    candidate: Candidate
    terms: Any
    record: dict[str, Any]


def select_terms(family: TermsFamily, X: pd.DataFrame, y: np.ndarray, key: str,
                 prior_steps: float, kappa: float = KAPPA, selection: str = "cv",
                 strengths: Sequence[float] = STRENGTHS, max_steps: int = CV_MAX_STEPS
                 ) -> Selection:
    """Choose and fit one configuration's terms on its steps ``X`` (module docstring)."""
    y = np.asarray(y, dtype=np.float64)
    reference = family._reference_terms(key, X)
    cands = candidates(prior_steps, strengths)
    if check_selection(selection) == "terms":
        fixed = Candidate("terms", float(prior_steps))
        terms = family._terms_fit(X, y, reference, float(prior_steps))
        rec = record(len(y), [], {}, [fixed], fixed, "config_selection='terms'")
        return Selection(fixed, terms, _with_moved(family, rec, terms, X, y))
    blocks = time_blocks(X)
    order = _time_order(X)
    order = order[cv_subsample(len(order), max_steps)]
    Xc, yc, bc = X.iloc[order], y[order], blocks[order]
    counts = [float((bc == b).sum()) for b in range(N_BLOCKS)]
    folds, guard_fold = cv_folds(counts)
    if len(folds) < 2:
        rec = record(len(y), folds, {}, cands, cands[0],
                     f"too few steps for time-ordered cross-validation ({len(y)}): "
                     "the reference terms are kept")
        return Selection(cands[0], None, rec)
    base = family._terms_predict(Xc, reference)

    def fold_errors(fold: Fold) -> dict[str, float]:
        train, valid = np.isin(bc, fold[0]), bc == fold[1]
        out = {"none": msre(base[valid], yc[valid])}
        s = scale_factor(base[train], yc[train], kappa)
        out["scale"] = msre(s * base[valid], yc[valid])
        Xt, yt, Xv = Xc.iloc[np.flatnonzero(train)], yc[train], Xc.iloc[np.flatnonzero(valid)]
        for c in cands[2:]:
            terms = family._terms_fit(Xt, yt, reference, float(c.prior_steps))
            out[c.label] = msre(family._terms_predict(Xv, terms), yc[valid])
        return out

    per_fold = [fold_errors(f) for f in folds]
    errors = {c.label: [e[c.label] for e in per_fold] for c in cands}
    guard = fold_errors(guard_fold) if guard_fold is not None else None
    label, reason = choose(errors, [c.label for c in cands], guard=guard)
    chosen = next(c for c in cands if c.label == label)
    return finish(family, X, y, reference, chosen, cands, folds, errors, reason, kappa,
                  guard=guard)


def finish(family: TermsFamily, X: pd.DataFrame, y: np.ndarray, reference: Any,
           chosen: Candidate, cands: Sequence[Candidate], folds: Sequence[Fold],
           errors: Mapping[str, Sequence[float]], reason: str, kappa: float,
           guard: Mapping[str, float] | None = None) -> Selection:
    """Refit the chosen candidate on every step and build its record."""
    terms, s = None, None
    if chosen.kind == "scale":
        s = scale_factor(family._terms_predict(X, reference), y, kappa)
        terms = family._terms_scaled(reference, s)
    elif chosen.kind == "terms":
        terms = family._terms_fit(X, y, reference, float(chosen.prior_steps))
    rec = record(len(y), folds, errors, cands, chosen, reason, s, guard)
    return Selection(chosen, terms, _with_moved(family, rec, terms, X, y))


def _with_moved(family: TermsFamily, rec: dict[str, Any], terms: Any, X: pd.DataFrame,
                y: np.ndarray) -> dict[str, Any]:
    if terms is None:
        rec["moved"] = []
        return rec
    names, global_values, lower, upper = family._terms_layout(X, y)
    rec["moved"] = moved_terms(names, global_values, family._terms_vector(terms), lower, upper)
    return rec


def _time_order(X: pd.DataFrame) -> np.ndarray:
    """Row positions ordered by (experiment, step id) (row order when absent)."""
    n = len(X)
    steps = X["step_id"].to_numpy() if "step_id" in X else np.arange(n)
    exps = X["experiment"].astype(str).to_numpy() if "experiment" in X else np.zeros(n)
    return np.lexsort((np.arange(n), steps, exps))


def column_scale(A: np.ndarray) -> np.ndarray:
    """RMS over rows of each column of a relative design (feature / duration)."""
    return np.sqrt(np.mean(A * A, axis=0)) if len(A) else np.zeros(A.shape[1])


def records_to_dict(records: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {k: dict(v) for k, v in sorted(records.items())}
