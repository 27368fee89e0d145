"""Per-configuration terms that never hurt and stay physical (shared by every family).

A family with per-configuration terms (PICF's and OVERLAP's coefficient sets, MoLE-RD's
experts, HFD-TL's and Hybrid's scale + residual terms, BSR-ARD's posterior, RECE's
specialists) adapts them to one configuration's steps — in ``calibrate`` on a base, and
for every configuration of a fresh ``fit``. How far they move is chosen here, the same
way for every family.

**Candidates**, simplest first:

* ``none`` — the reference terms unchanged: the global set (fresh fit), the global set
  with its machine's host factor (a configuration the base never saw, on a machine it
  knows: *Machine host factors* below), or the base's own terms for that configuration;
* ``host`` — one factor h ∈ [1/κ, κ] on the HOST-time terms only, the device terms kept
  at the reference (families that implement it: *Host cost* below) — the first thing a
  few calibration steps learn;
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

**Host cost.** A step's time splits into *device* time (the GPU's kernels: the
correction-kind terms, µs estimates × dimensionless corrections) and *host* time (the
overhead-kind terms: counts — kernel launches, layers, requests, steps — priced in µs
per unit, paid by the CPU, the driver and the launch path). A new GPU is also a new
host: its CPU and driver set the µs per launch, not its datasheet. A family opts in to
the ``host`` candidate by implementing (:func:`offers_host`):

* ``_offers_host()`` — True when its terms have a host part;
* ``_terms_host_split(X, terms) -> (device_us, host_us)`` — the two parts per step;
* ``_terms_host_combine(device_us, host_us) -> µs`` (optional) — the prediction from
  the parts; without it the prediction is their sum and h has a closed form on relative
  error (:func:`host_factor`, like :func:`scale_factor`); with it (OVERLAP's smooth
  max) h is a bounded one-dimensional minimisation of the same loss;
* ``_terms_host_scaled(terms, h)`` — the terms with the host part × h;
* ``_global_terms()`` — the pooled (global) terms, the unit of host effects;
* ``machine_factor_for(key)`` — the machine host factor its reference carries (1 for a
  configuration it has seen, or on a machine it does not know).

Every record of such a family carries ``host_effect``: the ratio of the configuration's
host share of the step (Σ host µs / duration over its steps) under its chosen terms to
that under the global terms — exactly h for ``host`` from the global set, s for
``scale``, 1 for ``none`` on the global set, and for ``terms`` the host-time weighted
mean of its overhead terms' ratios (the one factor on the global host part that gives
the same host share). ``host_factor`` is h when ``host`` is chosen.

**Machine host factors (zero-shot).** A configuration's *machine* is the GPU field of
its key (the second ``|`` field: ``meta-llama/llama-3.1-8b|H200|tp1|bf16|mnbt8192|
mns256`` → ``H200``). An exp-config names no host (CPU, driver, launch path), so the
canonical GPU name stands for the machine the configuration was measured on. A
machine's host factor (:func:`machine_host_factors`) is the median of the host effects
of the configurations recorded on it (:func:`record_host_effect`: ``host_effect``, else
host → h, scale → s, none → 1; a configuration kept at its reference for too few steps
is no evidence) — or 1 when that median is within one standard error (the spread of
configurations' log effects within machines, / √n) of 1: the scatter of configurations
around the pooled fit is no machine effect. A configuration NEVER seen on a known
machine predicts zero-shot with
the global terms whose host part is × that factor — and that is also the reference of
its calibration (``none``), so calibrating never starts from worse than the zero-shot
prediction; a ``none`` on a scaled reference stores that reference as its own terms.
When every configuration of the pooled data is on one machine, their host effects
scatter around 1 and the factor is 1: nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

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

    kind: str  # "none" | "host" | "scale" | "terms"
    prior_steps: float | None = None

    @property
    def label(self) -> str:
        return f"terms@{self.prior_steps:g}" if self.kind == "terms" else self.kind


def candidates(prior_steps: float, strengths: Sequence[float] = STRENGTHS, host: bool = False
               ) -> list[Candidate]:
    """The candidates in order of flexibility (``none`` first; ``host`` right after it
    when the family has a host part)."""
    return [Candidate("none"), *([Candidate("host")] if host else []), Candidate("scale"),
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


# -------------------------------------------------------------------------- host cost

Combine = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Prediction (µs) from device and host µs per step (a family's ``_terms_host_combine``)."""
HOST_GRID = 49
"""Points of the log-spaced grid that brackets a non-additive host factor."""


def host_factor(device: np.ndarray, host: np.ndarray, y: np.ndarray, kappa: float = KAPPA,
                combine: Combine | None = None) -> float:
    """argmin_h Σ(ŷ(h)/y − 1)² within [1/κ, κ] where ŷ(h) = device + h·host (µs; closed
    form) or ``combine(device, h·host)`` (bounded one-dimensional minimisation); 1 when
    the steps have no host time."""
    device, host, y = (np.asarray(a, dtype=np.float64) for a in (device, host, y))
    b = host / y
    if not float((b * b).sum()) > 0:
        return 1.0
    if combine is None:
        a = 1.0 - device / y  # Σ(h·b − a)²: the host part must make up 1 − device/y
        return _bounded_scale(float((a * b).sum()), float((b * b).sum()), kappa)
    return _bounded_minimum(lambda h: msre(combine(device, h * host), y), kappa)


def host_from_stats(stats: RelativeGram, device_beta: np.ndarray, host_beta: np.ndarray,
                    kappa: float = KAPPA) -> float:
    """:func:`host_factor` of the linear prediction x·(device_beta + h·host_beta) from
    sufficient statistics (the two vectors split one set of terms)."""
    u, v = (np.asarray(b, dtype=np.float64) for b in (device_beta, host_beta))
    gv = stats.gram @ v
    return _bounded_scale(float(v @ stats.moment - u @ gv), float(v @ gv), kappa)


def _bounded_minimum(loss: Callable[[float], float], kappa: float) -> float:
    """The minimiser of ``loss`` over [1/κ, κ] (log scale): the best point of a
    log-spaced grid, refined by bounded Brent between its neighbours (deterministic)."""
    top = math.log(kappa) if math.isfinite(kappa) else math.log(1e4)
    grid = np.linspace(-top, top, HOST_GRID)
    values = [loss(math.exp(t)) for t in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best, best_value = float(grid[i]), float(values[i])
    if hi > lo:
        res = minimize_scalar(lambda t: loss(math.exp(t)), bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-10})
        if float(res.fun) < best_value:
            best = float(res.x)
    return float(math.exp(best))


def host_share_ratio(host: np.ndarray, reference_host: np.ndarray, y: np.ndarray
                     ) -> float | None:
    """Σ host/y ÷ Σ reference_host/y over a configuration's steps (µs / µs): how much
    more host time per step its terms give than the reference terms (:func:`share_ratio`)."""
    y = np.asarray(y, dtype=np.float64)
    return share_ratio(float(np.sum(np.asarray(host, dtype=np.float64) / y)),
                       float(np.sum(np.asarray(reference_host, dtype=np.float64) / y)), len(y))


def share_ratio(share: float, reference_share: float, steps: float) -> float | None:
    """``share / reference_share`` (sums over ``steps`` steps of host µs / duration);
    None when the reference carries (almost) no host time: below :data:`ZERO_SHARE` of
    the steps."""
    if not reference_share > ZERO_SHARE * max(float(steps), 1.0):
        return None
    return float(share) / float(reference_share)


def offers_host(family: Any) -> bool:
    """Whether a family has the ``host`` candidate (module docstring, *Host cost*)."""
    probe = getattr(family, "_offers_host", None)
    return bool(probe()) if callable(probe) else False


def host_combine(family: Any) -> Combine | None:
    """The family's prediction from (device, host) µs, None when it is their sum."""
    combine = getattr(family, "_terms_host_combine", None)
    return combine if callable(combine) else None


def host_effect(family: Any, X: pd.DataFrame, y: np.ndarray, terms: Any) -> float | None:
    """The configuration's host effect (module docstring): the host share of its steps
    under ``terms`` over that under the family's global terms."""
    _, host = family._terms_host_split(X, terms)
    _, reference = family._terms_host_split(X, family._global_terms())
    return host_share_ratio(host, reference, y)


# -------------------------------------------------------------------------- machines


def machine_of(config_key: str | None) -> str | None:
    """The machine of a configuration: the canonical GPU, second ``|`` field of its key
    (None for a key without one). An exp-config has no host identity: the GPU name
    stands for the machine (CPU, driver) the configuration was measured on."""
    parts = str(config_key or "").split("|")
    return parts[1] if len(parts) > 1 and parts[1] else None


def record_host_effect(rec: Mapping[str, Any]) -> float | None:
    """The host effect a choice record gives (``host_effect``, else host → h, scale → s,
    none → 1); None when unknown (a ``terms`` record made before host effects were
    recorded) or when it is no evidence (``none`` kept for too few steps)."""
    choice = str(rec.get("choice", ""))
    if choice == "none" and int(rec.get("folds") or 0) < 2:  # too few steps to judge
        return None
    if rec.get("host_effect") is not None:
        return float(rec["host_effect"])
    if "host_effect" in rec:  # recorded, but the configuration has no host time
        return None
    fallback = {"none": 1.0, "host": rec.get("host_factor"), "scale": rec.get("scale")}
    value = fallback.get(choice)
    return None if value is None else float(value)


def machine_host_factors(records: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per machine (:func:`machine_of`) with at least one configuration of known host
    effect (:func:`record_host_effect`): ``median`` of their effects, its
    ``standard_error`` in log space (the configuration-to-configuration spread of log
    effects pooled within machines, / √n; None while no machine has two configurations),
    ``configurations`` (key → effect) and ``factor`` (dimensionless, > 0) — the median,
    or 1 when it is within one standard error of 1: configurations of one machine scatter
    around the pooled fit, and a median that the scatter explains is no machine effect
    (every configuration of the pooled data on one machine: the factor is 1)."""
    effects: dict[str, dict[str, float]] = {}
    for key, rec in sorted(records.items()):
        machine, effect = machine_of(key), record_host_effect(rec)
        if machine is not None and effect is not None and effect > 0:
            effects.setdefault(machine, {})[str(key)] = effect
    spread = _log_spread([list(v.values()) for v in effects.values()])
    out = {}
    for machine, values in sorted(effects.items()):
        median = float(np.median(list(values.values())))
        se = None if spread is None else spread / math.sqrt(len(values))
        explained = se is not None and abs(math.log(median)) <= se
        out[machine] = {"factor": 1.0 if explained else median, "median": median,
                        "standard_error": se, "configurations": values}
    return out


def _log_spread(groups: Sequence[Sequence[float]]) -> float | None:
    """Standard deviation of log effects around their machine's mean, pooled over
    machines (None without a degree of freedom)."""
    dof = sum(len(g) - 1 for g in groups)
    if dof < 1:
        return None
    logs = [np.log(np.asarray(g, dtype=np.float64)) for g in groups]
    return float(math.sqrt(sum(float(((v - v.mean()) ** 2).sum()) for v in logs) / dof))


def machine_factor(factors: Mapping[str, Mapping[str, Any]],
                   records: Mapping[str, Any], config_key: str | None) -> float:
    """The host factor a configuration predicts with zero-shot: its machine's factor
    when the model never saw it (no record), else 1."""
    if config_key is None or str(config_key) in records:
        return 1.0
    entry = factors.get(machine_of(config_key) or "", {})
    return float(entry.get("factor", 1.0))


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
           scale: float | None = None, guard: Mapping[str, float] | None = None,
           host: float | None = None) -> dict[str, Any]:
    """The JSON record of one configuration's choice (released per configuration);
    ``scale`` is s when ``scale`` is chosen, ``host`` is h (``host_factor``) when
    ``host`` is."""
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
    if choice.kind == "host":
        out["host_factor"] = host
    if choice.kind == "terms":
        out["prior_steps"] = choice.prior_steps
    return out


def method(kappa: float, prior_steps: float, selection: str, host: bool = False
           ) -> dict[str, Any]:
    """How a family chose its per-configuration terms (released once per model);
    ``host``: the family has the ``host`` candidate."""
    return {"selection": selection, "metric": METRIC, "rule": RULE if selection == "cv" else
            "always the full terms at config_prior_steps (no cross-validation)",
            "blocks": N_BLOCKS, "min_train_steps": MIN_TRAIN_STEPS,
            "min_valid_steps": MIN_VALID_STEPS,
            "candidates": [c.label for c in candidates(prior_steps, host=host)],
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

    # optional, for the ``host`` candidate (module docstring, *Host cost*):
    # _offers_host() -> bool; _terms_host_split(X, terms) -> (device µs, host µs);
    # _terms_host_combine(device, host) -> µs (absent: the sum);
    # _terms_host_scaled(terms, h) -> terms; _global_terms() -> terms;
    # machine_factor_for(key) -> float


@dataclass(frozen=True)
class Selection:
    """The outcome for one configuration: the candidate, its terms (None for ``none``:
    the configuration keeps the reference — unless that reference carries a machine host
    factor, which is then stored as its terms) and the JSON record."""

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
    host = offers_host(family)
    cands = candidates(prior_steps, strengths, host=host)
    kept = _kept_reference(family, key, reference)
    if check_selection(selection) == "terms":
        fixed = Candidate("terms", float(prior_steps))
        terms = family._terms_fit(X, y, reference, float(prior_steps))
        rec = record(len(y), [], {}, [fixed], fixed, "config_selection='terms'")
        return _finished(family, key, fixed, terms, reference, rec, X, y)
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
        return _finished(family, key, cands[0], kept, reference, rec, X, y)
    base = family._terms_predict(Xc, reference)
    device, host_us = family._terms_host_split(Xc, reference) if host else (None, None)
    combine = host_combine(family)

    def fold_errors(fold: Fold) -> dict[str, float]:
        train, valid = np.isin(bc, fold[0]), bc == fold[1]
        out = {"none": msre(base[valid], yc[valid])}
        if host:
            h = host_factor(device[train], host_us[train], yc[train], kappa, combine)
            d, c = device[valid], h * host_us[valid]
            out["host"] = msre(d + c if combine is None else combine(d, c), yc[valid])
        s = scale_factor(base[train], yc[train], kappa)
        out["scale"] = msre(s * base[valid], yc[valid])
        Xt, yt, Xv = Xc.iloc[np.flatnonzero(train)], yc[train], Xc.iloc[np.flatnonzero(valid)]
        for c in cands:
            if c.kind == "terms":
                terms = family._terms_fit(Xt, yt, reference, float(c.prior_steps))
                out[c.label] = msre(family._terms_predict(Xv, terms), yc[valid])
        return out

    per_fold = [fold_errors(f) for f in folds]
    errors = {c.label: [e[c.label] for e in per_fold] for c in cands}
    guard = fold_errors(guard_fold) if guard_fold is not None else None
    label, reason = choose(errors, [c.label for c in cands], guard=guard)
    chosen = next(c for c in cands if c.label == label)
    return finish(family, X, y, reference, chosen, cands, folds, errors, reason, kappa,
                  guard=guard, key=key)


def finish(family: TermsFamily, X: pd.DataFrame, y: np.ndarray, reference: Any,
           chosen: Candidate, cands: Sequence[Candidate], folds: Sequence[Fold],
           errors: Mapping[str, Sequence[float]], reason: str, kappa: float,
           guard: Mapping[str, float] | None = None, key: str | None = None) -> Selection:
    """Refit the chosen candidate on every step and build its record."""
    terms, s, h = _kept_reference(family, key, reference), None, None
    if chosen.kind == "scale":
        s = scale_factor(family._terms_predict(X, reference), y, kappa)
        terms = family._terms_scaled(reference, s)
    elif chosen.kind == "host":
        device, host = family._terms_host_split(X, reference)
        h = host_factor(device, host, y, kappa, host_combine(family))
        terms = family._terms_host_scaled(reference, h)
    elif chosen.kind == "terms":
        terms = family._terms_fit(X, y, reference, float(chosen.prior_steps))
    rec = record(len(y), folds, errors, cands, chosen, reason, s, guard, h)
    return _finished(family, key, chosen, terms, reference, rec, X, y)


def _kept_reference(family: Any, key: str | None, reference: Any) -> Any:
    """The terms stored for ``none``: nothing (the configuration keeps predicting with
    the reference), or the reference itself when it carries a machine host factor — a
    configuration calibrated once predicts with what it was calibrated against, whatever
    its machine's factor becomes."""
    return reference if _machine_factor_of(family, key) != 1.0 else None


def _machine_factor_of(family: Any, key: str | None) -> float:
    probe = getattr(family, "machine_factor_for", None)
    return float(probe(key)) if offers_host(family) and callable(probe) and key else 1.0


def _finished(family: Any, key: str | None, chosen: Candidate, terms: Any, reference: Any,
              rec: dict[str, Any], X: pd.DataFrame, y: np.ndarray) -> Selection:
    """The selection with its record completed: the terms that moved and, for a family
    with a host part, the host effect and the machine factor its reference carried."""
    if offers_host(family):
        effect = host_effect(family, X, y, reference if terms is None else terms)
        rec["host_effect"] = effect
        m = _machine_factor_of(family, key)
        if m != 1.0:
            rec["machine_host_factor"] = m
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
