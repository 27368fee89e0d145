"""The promotion gate: is a candidate release at least as accurate as a baseline on a
golden corpus?

Compared, pooled over the golden corpus: step-time MAPE (every traced step); when the
golden corpus has journey + API traces, the teacher-forced request-level MAPEs (TTFT,
ITL, E2E; ``requests.accuracy``) of each release's model with its own BLIS alphas
(``manifest.blis.alpha_coeffs``); and when it has client request measurements, the
MAPEs of the same latencies REPLAYED (``replayed_ttft``, ``replayed_itl``,
``replayed_e2e``): each release's model and alphas drive the vLLM scheduler replay of
the measured workload (``requests.replay_release``), as BLIS would simulate it. The
candidate fails when any metric is worse than the baseline's by more than
``tolerance_pp`` percentage points, or when it predicts a non-finite or non-positive
step time. Pure library: the CLI (``blis-model gate``) calls
:func:`compare_releases`; promotion (``releases.channels.promote``) takes the callable of
:func:`load_gate`. This is the project's one promotion gate.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from blis_model.calibration.featurize import (
    experiment_names,
    featurize,
    request_items,
    split_kinds,
)
from blis_model.configuration.defaults import BLIS_SHIPPED_ALPHAS, GATE_TOLERANCE_PP
from blis_model.configuration.experiment import load_experiment
from blis_model.errors import CorpusError
from blis_model.features.frame import feature_frame
from blis_model.metrics import per_experiment, summary
from blis_model.releases.channels import Gate
from blis_model.releases.read import Release, predict_frame
from blis_model.requests.accuracy import (
    METRICS,
    RequestData,
    request_accuracy,
    request_accuracy_per_experiment,
    teacher_forced,
)
from blis_model.requests.alphas import AlphaFit
from blis_model.requests.measured import MeasuredExperiment, load_measured
from blis_model.requests.replay_release import replay_workload
from blis_model.requests.stage import RequestSettings
from blis_model.storage import redact

REPLAYED_METRICS: tuple[str, ...] = tuple(f"replayed_{m}" for m in METRICS)
GATE_METRICS: tuple[str, ...] = ("step", *METRICS, *REPLAYED_METRICS)


@dataclass(frozen=True)
class GoldenRequests:
    """One golden experiment's request data and the feature frame of all its steps."""

    data: RequestData
    full_frame: pd.DataFrame


@dataclass(frozen=True)
class GoldenSet:
    """A featurized golden corpus: every usable traced step (``frame``), the request
    data of experiments with journey + API traces, and the experiments of client request
    measurements (``measured``, replayed)."""

    corpus: str
    frame: pd.DataFrame
    requests: tuple[GoldenRequests, ...] = ()
    measured: tuple[MeasuredExperiment, ...] = ()

    @property
    def n_requests(self) -> int:
        return int(sum(g.data.requests.num_rows for g in self.requests)
                   + sum(len(m.workload) for m in self.measured))


def load_golden(corpus_url: str, options: dict[str, Any] | None = None,
                default_hardware: str | None = None,
                settings: RequestSettings | None = None) -> GoldenSet:
    """Featurize the golden corpus's traced experiments and load its request-measurement
    ones (CorpusError when it has neither a usable step nor a measured request)."""
    traced, measured = split_kinds(corpus_url, experiment_names(corpus_url, options), options)
    experiments = [load_experiment(corpus_url, n, options, default_hardware) for n in traced]
    items = [featurize(e, options, settings) for e in experiments]
    frames = [i.frame for i in items if len(i.frame)]
    replayed = tuple(load_measured(corpus_url, n, options, default_hardware) for n in measured)
    replayed = tuple(m for m in replayed if m.targets.any())
    if not frames and not replayed:
        raise CorpusError(f"golden corpus {redact(corpus_url)}: no usable steps or measured "
                          "requests")
    golden = tuple(GoldenRequests(d, feature_frame(d.experiment, d.full_steps))
                   for d in request_items(items) if d.full_steps.num_rows)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        {"duration_us": pd.Series(dtype=np.float64)})
    return GoldenSet(redact(corpus_url), frame, golden, replayed)


def release_alphas(release: Release) -> AlphaFit:
    """The release's BLIS alphas (α0, α1, α2) as an AlphaFit (shipped defaults if absent)."""
    coeffs = (release.manifest.get("blis") or {}).get("alpha_coeffs") or BLIS_SHIPPED_ALPHAS
    a0, a1, a2 = (float(x) for x in coeffs)
    return AlphaFit("release", a0, 0.0, a1, a2, 0, 0)


def score_release(release: Release, golden: GoldenSet) -> dict[str, Any]:
    """MAPE (%) of ``release`` on ``golden``: pooled per metric (``step``, ``ttft``,
    ``itl``, ``e2e``; summaries with ``n``) and per experiment, plus the count of
    unusable (non-finite or ≤ 0) step predictions."""
    frame = golden.frame
    pooled: dict[str, dict[str, float]] = {}
    per_exp: dict[str, dict[str, dict[str, float]]] = {}
    predicted = np.zeros(0)
    if not frame.empty:
        predicted = predict_frame(release, frame)
        truth = frame["duration_us"].to_numpy(dtype=np.float64)
        pooled["step"] = summary(predicted, truth)
        per_exp = {name: {"step": r} for name, r in per_experiment(frame, predicted).items()}
    per_request = []
    alphas = release_alphas(release)
    for g in golden.requests:
        full = predict_frame(release, g.full_frame)
        try:
            per_request.append(teacher_forced(g.data.requests, g.full_frame["step_id"].to_numpy(),
                                              full, alphas))
        except ValueError:
            continue  # steps not contiguous, or a non-finite prediction: no request metrics
    if per_request:
        rows = pd.concat(per_request, ignore_index=True)
        pooled.update(request_accuracy(rows))
        for name, metrics in request_accuracy_per_experiment(rows).items():
            per_exp.setdefault(name, {}).update(metrics)
    if golden.measured:
        reports = {item.name: report for item, _, report in replay_workload(
            list(golden.measured), release.model, release.alphas, release.contention)
            if report is not None}
        for name, report in reports.items():
            per_exp.setdefault(name, {}).update(
                {f"replayed_{m}": r for m, r in report["accuracy"].items()})
        for m in METRICS:
            pooled[f"replayed_{m}"] = _pooled_mape([r["accuracy"][m] for r in reports.values()])
    bad = int((~np.isfinite(predicted) | (predicted <= 0)).sum())
    return {"pooled": pooled, "per_experiment": per_exp, "unusable_steps": bad}


def _pooled_mape(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """MAPE over the union of several experiments' requests, from their MAPEs and counts
    (a mean of means weighted by n is exactly the pooled mean)."""
    n = sum(int(p.get("n") or 0) for p in parts)
    if not n:
        return {"mape": float("nan"), "n": 0}
    return {"mape": sum(float(p["mape"]) * int(p["n"]) for p in parts if p.get("n")) / n,
            "n": n}


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict. ``metrics``: per metric (``step``, ``ttft``, ``itl``, ``e2e``)
    the pooled MAPE (%) of candidate and baseline and the count scored; ``per_experiment``:
    the same per golden experiment. ``candidate_mape`` / ``baseline_mape`` / ``steps``
    repeat the step metric (what a channel's history shows)."""

    passed: bool
    candidate: str
    baseline: str | None
    tolerance_pp: float
    metrics: dict[str, dict[str, float | None]]
    per_experiment: dict[str, dict[str, dict[str, float | None]]]
    reasons: tuple[str, ...] = ()
    corpus: str = ""
    steps: int = 0
    requests: int = 0
    candidate_mape: float | None = None
    baseline_mape: float | None = None
    compared: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reasons"] = list(self.reasons)
        data["compared"] = list(self.compared)
        return data


def _mape(scores: dict[str, Any] | None, metric: str) -> float | None:
    r = (scores or {}).get(metric)
    if not r or not r.get("n"):
        return None
    value = float(r["mape"])
    return value if np.isfinite(value) else None


def compare_releases(candidate: Release, baseline: Release | None, golden: GoldenSet,
                     tolerance_pp: float = GATE_TOLERANCE_PP,
                     metrics: Sequence[str] = GATE_METRICS) -> GateResult:
    """Gate ``candidate`` against ``baseline`` on ``golden`` (see the module docstring).
    Without a baseline only the candidate's own predictions are checked. Request-level
    metrics are compared when the golden corpus has request data."""
    unknown = set(metrics) - set(GATE_METRICS)
    if unknown:
        raise ValueError(f"unknown gate metric(s) {sorted(unknown)}; known: {GATE_METRICS}")
    cand = score_release(candidate, golden)
    base = score_release(baseline, golden) if baseline is not None else None
    reasons: list[str] = []
    if cand["unusable_steps"]:
        reasons.append(f"release {candidate.version} predicts non-finite or non-positive step "
                       f"times for {cand['unusable_steps']} golden steps")
    table: dict[str, dict[str, float | None]] = {}
    compared = []
    for m in metrics:
        c, b = _mape(cand["pooled"], m), _mape(base["pooled"] if base else None, m)
        n = (cand["pooled"].get(m) or {}).get("n", 0)
        if c is None and b is None and (m != "step" or golden.frame.empty):
            continue  # no request data (or no traced step) in the golden corpus
        table[m] = {"candidate": c, "baseline": b, "n": n,
                    "change": None if c is None or b is None else c - b}
        if base is None:
            continue
        compared.append(m)
        label = "step" if m == "step" else (
            f"replayed {m[len('replayed_'):].upper()}" if m.startswith("replayed_") else m.upper())
        if c is None and b is not None:
            reasons.append(f"{label} MAPE cannot be computed for {candidate.version} "
                           f"(baseline {baseline.version}: {b:.2f}%)")
        elif c is not None and b is not None and not c <= b + tolerance_pp:
            reasons.append(f"{label} MAPE on the golden corpus is {c:.2f}% for "
                           f"{candidate.version}, worse than {b:.2f}% for {baseline.version} "
                           f"by more than {tolerance_pp:g} percentage point(s)")
    names = sorted(set(cand["per_experiment"]) | set((base or {}).get("per_experiment", {})))
    per_exp = {}
    for name in names:
        ce = cand["per_experiment"].get(name, {})
        be = (base or {}).get("per_experiment", {}).get(name, {})
        per_exp[name] = {m: {"candidate": _mape(ce, m), "baseline": _mape(be, m),
                             "n": (ce.get(m) or {}).get("n", 0)}
                         for m in table if m in ce or m in be}
    step = table.get("step") or {}
    return GateResult(passed=not reasons, candidate=candidate.version,
                      baseline=baseline.version if baseline is not None else None,
                      tolerance_pp=float(tolerance_pp), metrics=table, per_experiment=per_exp,
                      reasons=tuple(reasons), corpus=golden.corpus, steps=int(len(golden.frame)),
                      requests=golden.n_requests, candidate_mape=step.get("candidate"),
                      baseline_mape=step.get("baseline"), compared=tuple(compared))


def load_gate(corpus_url: str, options: dict[str, Any] | None = None,
              default_hardware: str | None = None,
              tolerance_pp: float = GATE_TOLERANCE_PP) -> Gate:
    """The promotion gate on a golden corpus, featurized once: a callable (candidate,
    baseline) → :class:`GateResult` for ``releases.channels.promote``."""
    golden = load_golden(corpus_url, options, default_hardware)
    return functools.partial(compare_releases, golden=golden, tolerance_pp=tolerance_pp)
