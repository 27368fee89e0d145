"""Step-time coefficients learned from client-side request measurements, by replay.

BLIS's step time is linear in its coefficients: ``StepTime = β · f(batch)`` (physics
features, ``features.physics``). Once a replay has fixed which steps ran while a request
was being served, its measured latencies are linear in (β, α) too:

* ``E2E − TTFT = Σ_{steps after its first token, to its last} β·f(s) + α1 + α2·(n − 1)``
* ``TTFT = α0 + wait + Σ_{steps from its admission to its first token} β·f(s) + α2``

(``wait``, the engine queue time, is what the replay's scheduler produced). So the fit
alternates: **replay** every experiment with the current (β, α) (``requests.replay``,
the vLLM-V1 scheduler) → a **robust linear fit** of the per-request sums (least absolute
relative error, β ≥ 0, ridge toward the prior) → replay again, until the schedules stop
changing. Each proposal is accepted with a damped step (1, ½, ¼ of the way) only if the
replayed latencies get closer to the measured ones — a workload near saturation makes
the map steep (a model 3% too slow queues forever), and the line search keeps every
accepted iterate stable. Every iteration is recorded (the convergence report).

Coefficients: each configuration has its own GEMM efficiency (``gemm_roofline_us``'s
correction: kernels differ by model shape) and its own α0; every other term — memory
traffic, attention, communication, and the host's µs per kernel launch, per request,
per step — belongs to the machine and is shared by the configurations it serves, as are
α1 and α2. A configuration seen only at low load then borrows, from the others, the
terms its data cannot tell (what grows with batch size). The global law (an unseen
configuration) has a pooled GEMM efficiency. The result is a PICF model
(``models.picf``), so a request-fit release is read, projected onto BLIS's basis and
evaluated like any other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from scipy.optimize import lsq_linear

from blis_model.features.physics import PHYSICS_FEATURES
from blis_model.models.base import correction_mask, priors
from blis_model.models.picf import PICF
from blis_model.requests.alphas import robust_linear_fit
from blis_model.requests.latency import (
    Alphas,
    Replayed,
    accuracy,
    latency_table,
    run_replay,
)
from blis_model.requests.measured import MeasuredExperiment
from blis_model.requests.replay import replay
from blis_model.requests.scheduler import StepAggregates, StepTime
from blis_model.requests.step_time import compile_part

log = logging.getLogger(__name__)

GLOBAL = "global"
MIN_STEP_US = 1.0  # a trial law may price a tiny step at 0: no GPU step is that short


@dataclass(frozen=True)
class ReplayFitSettings:
    """Knobs of :func:`fit_from_requests`.

    ``max_iterations``: replay → fit rounds at most; ``damping``: fractions of the way
    to a proposal tried in turn (the first that improves the objective is taken);
    ``tolerance``: stop when the objective improves by less (relative); ``ridge``:
    pseudo-requests (as a share of the rows) pulling each GPU correction toward its
    prior (counts: a vanishing pull that only splits collinear costs);
    ``config_features``: the terms each configuration fits on its own (None: every
    ``correction`` feature), the others are shared; ``ttft_weight``: weight
    of TTFT MAPE next to E2E MAPE in the objective; ``cap``: per-experiment MAPE cap in
    the objective (a saturated replay counts as 100%, not 10⁵%)."""

    features: tuple[str, ...] = PHYSICS_FEATURES
    max_iterations: int = 10
    damping: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
    tolerance: float = 1e-3
    ridge: float = 0.01
    config_features: tuple[str, ...] | None = ("gemm_roofline_us",)
    ttft_weight: float = 0.2
    cap: float = 100.0
    irls_iterations: int = 30


@dataclass(frozen=True)
class StepLaw:
    """The parameters being fit: β over ``features`` and α per configuration key, and
    the global β, α (key :data:`GLOBAL`) for configurations never fit."""

    features: tuple[str, ...]
    coef: dict[str, np.ndarray]
    alphas: dict[str, Alphas]
    contention: dict[str, float] = field(default_factory=dict)  # γ, µs per running request

    def for_config(self, key: str) -> tuple[np.ndarray, Alphas]:
        return (self.coef.get(key, self.coef[GLOBAL]), self.alphas.get(key, self.alphas[GLOBAL]))

    def gamma(self, key: str) -> float:
        """The API server's contention of a configuration, µs per running request."""
        return float(self.contention.get(key, self.contention.get(GLOBAL, 0.0)))

    def with_config(self, key: str) -> StepLaw:
        """This law, with ``key`` on the global terms if it has none of its own."""
        if key in self.coef:
            return self
        return StepLaw(self.features, {**self.coef, key: self.coef[GLOBAL]},
                       {**self.alphas, key: self.alphas[GLOBAL]},
                       {**self.contention, key: self.gamma(GLOBAL)})

    def toward(self, other: StepLaw, eta: float) -> StepLaw:
        """``eta`` of the way from this law to ``other`` (same keys)."""
        coef = {k: v + eta * (other.coef[k] - v) for k, v in self.coef.items()}
        alphas = {k: tuple(float(a + eta * (b - a)) for a, b in
                           zip(v, other.alphas[k], strict=True)) for k, v in self.alphas.items()}
        gamma = {k: self.gamma(k) + eta * (other.gamma(k) - self.gamma(k)) for k in self.coef}
        return StepLaw(self.features, coef, alphas, gamma)  # type: ignore[arg-type]

    def model(self) -> PICF:
        """The law as a PICF model: global set + one set per configuration."""
        model = PICF(features=self.features, per_config=True)
        model.coef_ = np.asarray(self.coef[GLOBAL], np.float64).copy()
        model.config_coef_ = {k: np.asarray(v, np.float64).copy()
                              for k, v in sorted(self.coef.items()) if k != GLOBAL}
        model.n_features_in_ = len(self.features)
        return model

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(self.features),
                "coef": {k: dict(zip(self.features, map(float, v), strict=True))
                         for k, v in sorted(self.coef.items())},
                "alphas": {k: list(map(float, v)) for k, v in sorted(self.alphas.items())},
                "contention_us_per_running_request": {k: self.gamma(k)
                                                      for k in sorted(self.coef)}}


LAUNCH_US = 5.0
"""Host time of one CUDA kernel launch, µs (the order of magnitude of NVIDIA's published
launch latency): where the per-kernel cost starts when no prior model is given."""


def physical_prior(features: Sequence[str]) -> np.ndarray:
    """GEMMs and memory traffic at datasheet peak (corrections 1), a kernel launch
    :data:`LAUNCH_US`, no other overhead."""
    base = priors(features)
    return np.where(np.asarray(features) == "layer_kernels", LAUNCH_US, base)


def initial_law(keys: Sequence[str], prior: PICF | None = None,
                features: Sequence[str] = PHYSICS_FEATURES) -> StepLaw:
    """Where the fit starts: the prior model's global set (e.g. a release fit on step
    traces, ``--base``) for every configuration, else :func:`physical_prior`; α = 0."""
    feats = tuple(prior.features) if prior is not None else tuple(features)
    base = (np.asarray(prior.coef_, np.float64) if prior is not None
            else physical_prior(feats))
    coef = {k: base.copy() for k in [*keys, GLOBAL]}
    return StepLaw(feats, coef, {k: (0.0, 0.0, 0.0) for k in [*keys, GLOBAL]},
                   {k: 0.0 for k in [*keys, GLOBAL]})


# ------------------------------------------------------------------------------ replay


def law_step_time(item: MeasuredExperiment, law: StepLaw) -> StepTime:
    """The law's step time on ``item``'s configuration, compiled (exact, a few µs a
    step); a step takes at least :data:`MIN_STEP_US`."""
    part = compile_part(law.features, law.for_config(item.config_key)[0], item.experiment,
                        item.limits.max_num_batched_tokens)

    def step_time(agg: StepAggregates) -> float:
        return max(part(agg), MIN_STEP_US)

    return step_time


def replay_with(item: MeasuredExperiment, law: StepLaw) -> Replayed:
    """Replay ``item`` with its configuration's β and α, with the per-request feature
    sums the fit solves on."""
    return run_replay(item, law_step_time(item, law), law.for_config(item.config_key)[1],
                      law.features, law.gamma(item.config_key))


def replay_steps(item: MeasuredExperiment, law: StepLaw) -> pa.Table:
    """The step table (``ingest.steps.STEP_SCHEMA``) of ``item`` replayed with ``law``."""
    alphas = law.for_config(item.config_key)[1]
    return replay(item.workload_with(alphas[0]), item.limits, law_step_time(item, law),
                  experiment=item.name).steps


Replayer = Callable[[Sequence[MeasuredExperiment], StepLaw], list[Replayed]]
"""Replays several experiments with one law (in process, or fanned out by a flow)."""


def replay_all(items: Sequence[MeasuredExperiment], law: StepLaw) -> list[Replayed]:
    return [replay_with(item, law) for item in items]


# --------------------------------------------------------------------------- objective


def objective(items: Sequence[MeasuredExperiment], replays: Sequence[Replayed],
              settings: ReplayFitSettings) -> float:
    """Mean over experiments of capped E2E MAPE + ``ttft_weight`` × capped TTFT MAPE."""
    values = []
    for item, rep in zip(items, replays, strict=True):
        acc = accuracy(item, rep, settings.cap)
        e2e = min(acc["e2e"]["mape"], settings.cap)
        ttft = min(acc["ttft"]["mape"], settings.cap)
        values.append(e2e + settings.ttft_weight * ttft)
    return float(np.mean(values)) if values else float("nan")


# --------------------------------------------------------------------------------- fit


def _robust_bounded(A: np.ndarray, y: np.ndarray, prior: np.ndarray, pen: np.ndarray,
                    lower: np.ndarray, upper: np.ndarray, iterations: int) -> np.ndarray:
    """min Σ|A x − y| + Σ pen·(x − prior)², lower ≤ x ≤ upper, by iteratively reweighted
    bounded least squares on column-scaled data (rows are relative: y ≈ 1). A column
    that is zero on every row (a term this data never exercises, e.g. TP communication
    at TP 1) keeps its prior."""
    rms = np.sqrt((A * A).mean(axis=0))
    used = rms > 1e-12 * max(float(rms.max()), 1e-300)
    scale = np.where(used, rms, 1.0)
    As = A / scale
    free = (upper > lower) & used
    x = np.clip(prior, lower, upper).astype(np.float64)
    w = np.ones(len(y))
    for _ in range(iterations):
        sw = np.sqrt(w)
        M = np.vstack([As * sw[:, None], np.diag(np.sqrt(pen) / scale)])
        z = np.concatenate([y * sw, np.sqrt(pen) * prior])
        z = z - M[:, ~free] @ (x[~free] * scale[~free])
        sol = lsq_linear(M[:, free], z, bounds=(lower[free] * scale[free],
                                                upper[free] * scale[free]),
                         method="bvls", lsmr_tol="auto")
        x_new = x.copy()
        x_new[free] = sol.x / scale[free]
        converged = np.max(np.abs(x_new - x)) <= 1e-9 * max(1.0, float(np.max(np.abs(x_new))))
        x = x_new
        w = 1.0 / np.maximum(np.abs(A @ x - y), 1e-4)
        if converged:
            break
    return x


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _queue_terms(replays: Sequence[Replayed], beta: np.ndarray, a2: float
                 ) -> tuple[float, float]:
    """(α0, γ): what the measured TTFT leaves once the queue, the steps up to the first
    token and α2 are accounted for, as α0 + γ·(requests running when the first token was
    produced) — least absolute relative error, both ≥ 0."""
    xt = np.vstack([r.xt for r in replays])
    yt = np.concatenate([r.yt for r in replays])
    if not len(yt):
        return 0.0, 0.0
    ttft = yt + np.concatenate([r.wait for r in replays])
    running = np.concatenate([r.nf for r in replays])
    rest = yt - xt @ beta - a2
    scale = 1.0 / np.maximum(ttft, 1.0)
    X = np.column_stack([np.ones(len(rest)), running]) * scale[:, None]
    a0, gamma = robust_linear_fit(X, rest * scale, "median")
    return float(a0), float(gamma)


def propose(replays: Sequence[Replayed], law: StepLaw, prior: StepLaw,
            settings: ReplayFitSettings) -> StepLaw:
    """The next law, from one joint robust fit of every request's E2E − TTFT.

    A configuration's own terms (``settings.config_features``: its GEMM efficiency
    against the datasheet) are fit on its requests; every other term (memory traffic,
    attention, communication; the host's µs per kernel launch, per request, per step,
    per MoE layer) is the machine's and shared by every configuration, as are α1 and α2
    (with near-constant output lengths they are collinear with one configuration's step
    sums). α0 is per configuration. The global law (an unseen configuration) has the
    own terms of a pooled fit with the shared ones held."""
    feats = law.features
    p = len(feats)
    own = (correction_mask(feats) if settings.config_features is None
           else np.isin(np.asarray(feats), settings.config_features))
    shared = ~own
    keys = [k for k in law.coef if k != GLOBAL and any(
        r.config_key == k and len(r.yd) for r in replays)]
    if not keys:
        return law
    no, ns = int(own.sum()), int(shared.sum())
    blocks, targets = [], []
    for c, key in enumerate(keys):
        part = [r for r in replays if r.config_key == key and len(r.yd)]
        xd = np.vstack([r.xd for r in part])
        n = np.concatenate([r.n for r in part])
        yd = np.concatenate([r.yd for r in part])
        keep = yd > 0
        row = np.zeros((int(keep.sum()), len(keys) * no + ns + 2))
        row[:, c * no:(c + 1) * no] = xd[keep][:, own]
        row[:, len(keys) * no:len(keys) * no + ns] = xd[keep][:, shared]
        row[:, -2] = 1.0
        row[:, -1] = n[keep] - 1
        # the API server's contention at the first and last token is held (last round's γ)
        nf = np.concatenate([r.nf for r in part])[keep]
        nl = np.concatenate([r.nl for r in part])[keep]
        yd = yd.copy()
        yd[keep] = yd[keep] - law.gamma(key) * (nl - nf)
        blocks.append(row / yd[keep, None])
        targets.append(np.ones(int(keep.sum())))
    A, y = np.vstack(blocks), np.concatenate(targets)
    anchor = prior.coef[GLOBAL]
    target = np.concatenate([*[anchor[own]] * len(keys), anchor[shared], [0.0, 0.0]])
    shared_is_correction = correction_mask(feats)[shared]
    pen = np.concatenate([np.full(len(keys) * no, settings.ridge),
                          np.where(shared_is_correction, settings.ridge, 1e-6),
                          [1e-6, 1e-6]]) * len(A)
    x = _robust_bounded(A, y, target, pen, np.zeros(A.shape[1]), np.full(A.shape[1], np.inf),
                        settings.irls_iterations)
    shared_coef, a1, a2 = x[len(keys) * no:len(keys) * no + ns], float(x[-2]), float(x[-1])
    coef, alphas, gamma = {}, {}, {}
    for c, key in enumerate(keys):
        beta = np.zeros(p)
        beta[own], beta[shared] = x[c * no:(c + 1) * no], shared_coef
        part = [r for r in replays if r.config_key == key]
        a0, gamma[key] = _queue_terms(part, beta, a2)
        coef[key], alphas[key] = beta, (a0, a1, a2)
    # the global own terms: one pooled fit with the shared terms and α1, α2 held fixed
    xd = np.vstack([r.xd for r in replays if len(r.yd)])
    n = np.concatenate([r.n for r in replays if len(r.yd)])
    yd = np.concatenate([r.yd for r in replays if len(r.yd)])
    keep = yd > 0
    rest = yd[keep] - xd[keep][:, shared] @ shared_coef - a1 - a2 * (n[keep] - 1)
    G = xd[keep][:, own] / rest[:, None]
    g = _robust_bounded(G, np.ones(len(G)), anchor[own], np.full(no, settings.ridge) * len(G),
                        np.zeros(no), np.full(no, np.inf), settings.irls_iterations)
    beta = np.zeros(p)
    beta[own], beta[shared] = g, shared_coef
    coef[GLOBAL] = beta
    a0, gamma[GLOBAL] = _queue_terms(list(replays), beta, a2)
    alphas[GLOBAL] = (a0, a1, a2)
    for key in law.coef:  # configurations with no usable request keep their law
        coef.setdefault(key, law.coef[key])
        alphas.setdefault(key, law.alphas[key])
        gamma.setdefault(key, law.gamma(key))
    return StepLaw(feats, coef, alphas, gamma)


@dataclass(frozen=True)
class Iteration:
    """One accepted round: the objective after it, the damping taken, the replayed step
    count per experiment, the largest relative coefficient change, seconds spent."""

    index: int
    objective: float
    damping: float
    steps: dict[str, int]
    coef_change: float
    seconds: float
    tried: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"iteration": self.index, "objective": self.objective, "damping": self.damping,
                "steps": dict(self.steps), "coef_change": self.coef_change,
                "seconds": self.seconds, "tried": list(self.tried)}


@dataclass(frozen=True)
class ReplayFit:
    """The fitted law, the last replays (one per experiment, in ``items`` order), the
    convergence report and why the fit stopped."""

    law: StepLaw
    replays: list[Replayed]
    iterations: list[Iteration]
    stopped: str
    seconds: float

    def convergence(self) -> dict[str, Any]:
        return {"method": "replay → robust linear fit of per-request sums → replay, damped "
                          "steps accepted when the replayed latencies improve",
                "iterations": [i.to_dict() for i in self.iterations], "stopped": self.stopped,
                "seconds": self.seconds, "objective": self.iterations[-1].objective
                if self.iterations else None}


def _change(a: StepLaw, b: StepLaw) -> float:
    return max(float(np.max(np.abs(b.coef[k] - v) / np.maximum(np.abs(v), 1e-9)))
               for k, v in a.coef.items())


def fit_from_requests(items: Sequence[MeasuredExperiment], settings: ReplayFitSettings | None
                      = None, prior: PICF | None = None, start: StepLaw | None = None,
                      replayer: Replayer = replay_all) -> ReplayFit:
    """Fit β and α to the measured latencies of ``items`` (module docstring). ``prior``:
    the model coefficients are pulled toward (and start from) its global set; ``start``:
    a law to start from instead (e.g. a previous fit: leave-one-out folds);
    ``replayer``: runs the replays of one round (a flow fans them out)."""
    settings = settings or ReplayFitSettings()
    started = time.perf_counter()
    keys = sorted({i.config_key for i in items})
    anchor = initial_law(keys, prior, settings.features)
    law = start if start is not None else anchor
    law = StepLaw(law.features, {k: law.for_config(k)[0] for k in [*keys, GLOBAL]},
                  {k: law.for_config(k)[1] for k in [*keys, GLOBAL]},
                  {k: law.gamma(k) for k in [*keys, GLOBAL]})
    replays = replayer(items, law)
    best = objective(items, replays, settings)
    iterations: list[Iteration] = [Iteration(0, best, 0.0, {r.name: r.steps for r in replays},
                                             0.0, time.perf_counter() - started)]
    stopped = f"max_iterations ({settings.max_iterations}) reached"
    for index in range(1, settings.max_iterations + 1):
        t0 = time.perf_counter()
        target = propose(replays, law, anchor, settings)
        tried, accepted = [], None
        for eta in settings.damping:
            candidate = law.toward(target, eta)
            trial = replayer(items, candidate)
            value = objective(items, trial, settings)
            tried.append({"damping": eta, "objective": value})
            if value < best:
                accepted = (eta, candidate, trial, value)
                break
        if accepted is None:
            stopped = "no damped step improved the replayed latencies"
            break
        eta, candidate, replays, value = accepted
        improvement = (best - value) / max(best, 1e-12)
        iterations.append(Iteration(index, value, eta, {r.name: r.steps for r in replays},
                                    _change(law, candidate), time.perf_counter() - t0, tried))
        log.info("replay fit round %d: objective %.3f (damping %g)", index, value, eta)
        law, best = candidate, value
        if improvement < settings.tolerance:
            stopped = f"objective improved by less than {settings.tolerance:g} (relative)"
            break
    return ReplayFit(law, replays, iterations, stopped, time.perf_counter() - started)


def leave_one_out(items: Sequence[MeasuredExperiment], settings: ReplayFitSettings,
                  prior: PICF | None = None, start: StepLaw | None = None,
                  replayer: Replayer = replay_all, configuration: bool = False
                  ) -> dict[str, dict[str, Any]]:
    """Each experiment replayed with a law fit on the OTHERS (``configuration``: on the
    other configurations only — zero-shot, its global terms), warm-started from
    ``start``: its request-level report."""
    out = {}
    for held in items:
        train = [i for i in items if i.name != held.name and not (
            configuration and i.config_key == held.config_key)]
        if not train:
            continue
        fold = fit_from_requests(train, settings, prior, start, replayer)
        law = fold.law.with_config(held.config_key)
        out[held.name] = latency_table(held, replayer([held], law)[0])
    return out


__all__ = ["GLOBAL", "Iteration", "ReplayFit", "ReplayFitSettings", "Replayer", "StepLaw",
           "fit_from_requests", "initial_law", "law_step_time", "leave_one_out", "objective",
           "replay_all", "replay_steps", "replay_with"]
