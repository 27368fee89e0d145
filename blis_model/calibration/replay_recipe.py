"""The calibration recipe for client-side request measurements (what BLIS users have:
load-generator runs, per request arrival, tokens, TTFT, E2E).

    measured experiments → fit by replay (``requests.replay_fit``) → evaluate
    (in-sample, leave one experiment out: TTFT / ITL / E2E) → release

The release's model is the fitted law as a PICF model (one GEMM efficiency per
configuration, shared machine-level terms), its alphas are fitted too, and its BLIS
projection is fit on the replayed steps. Overloaded experiments (their queue never
drained) are replayed and reported, never trained on. Used by ``calibration.recipe``
(``blis-model fit``) and the calibrate flow, which fans the replays out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from blis_model.calibration.plan import Plan
from blis_model.errors import CorpusError
from blis_model.features.frame import concat_frames, feature_frame
from blis_model.models.picf import PICF
from blis_model.releases import plots
from blis_model.releases.build import build_release, release_version
from blis_model.releases.store import publish
from blis_model.requests.latency import LATENCIES, latency_table, measured_latencies
from blis_model.requests.measured import MeasuredExperiment, load_measured
from blis_model.requests.replay_fit import (
    GLOBAL,
    Replayer,
    ReplayFit,
    ReplayFitSettings,
    fit_from_requests,
    leave_one_out,
    replay_all,
    replay_steps,
)
from blis_model.storage import storage_options_for

log = logging.getLogger(__name__)

PROJECTION_STEPS = 20_000  # replayed steps per experiment the BLIS projection uses


def load_items(p: Plan, names: Sequence[str]) -> list[MeasuredExperiment]:
    """The measured experiments ``names`` of the corpus, ready to replay."""
    options = storage_options_for(p.corpus)
    return [load_measured(p.corpus, n, options, p.default_hardware) for n in names]


def training(items: Sequence[MeasuredExperiment]) -> list[MeasuredExperiment]:
    """The experiments to fit on: every one that is not overloaded (CorpusError if none)."""
    kept = [i for i in items if not i.overloaded and i.targets.any()]
    if not kept:
        raise CorpusError("no request-measurement experiment to fit on: every one is "
                          "overloaded or has no valid request with ground truth")
    return kept


def prior_model(p: Plan) -> PICF | None:
    """The prior the fit is pulled toward: the base release's model when it is PICF
    (a release fit on step traces, or an earlier request fit), else the physics."""
    model = p.base_model
    return model if isinstance(model, PICF) else None


def fit(p: Plan, items: Sequence[MeasuredExperiment], settings: ReplayFitSettings | None = None,
        replayer: Replayer = replay_all, prior: PICF | None = None) -> ReplayFit:
    """The law fit on the training experiments' requests (``requests.replay_fit``),
    pulled toward ``prior`` (default: :func:`prior_model`)."""
    return fit_from_requests(training(items), settings, prior or prior_model(p),
                             replayer=replayer)


def evaluate(items: Sequence[MeasuredExperiment], result: ReplayFit,
             settings: ReplayFitSettings | None = None, loo: bool = True,
             replayer: Replayer = replay_all) -> dict[str, Any]:
    """The release's request-level evaluation: every experiment replayed with the fitted
    law (in-sample; overloaded ones too), and each training experiment replayed with a
    law fit on the others (leave one experiment out, warm-started), plus means over the
    experiments that are not overloaded."""
    settings = settings or ReplayFitSettings()
    train = training(items)
    replays = {r.name: r for r in result.replays}
    others = [i for i in items if i.name not in replays]
    for item, rep in zip(others, replayer(others, result.law) if others else [],
                         strict=True):
        replays[item.name] = rep
    in_sample = {i.name: latency_table(i, replays[i.name]) for i in items}
    folds = (leave_one_out(train, settings, start=result.law, replayer=replayer)
             if loo and len(train) > 1 else {})
    names = [i.name for i in train]
    return {"in_sample": in_sample, "leave_one_experiment_out": folds,
            "summary": {**_means(in_sample, names, "in_sample"),
                        **_means(folds, names, "loo"), "experiments": len(items),
                        "trained_on": names,
                        "overloaded": [i.name for i in items if i.overloaded]},
            "convergence": result.convergence()}


def _means(tables: Mapping[str, Mapping[str, Any]], names: Sequence[str], prefix: str
           ) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for m in LATENCIES:
        values = [tables[n]["accuracy"][m]["mape"] for n in names
                  if n in tables and tables[n]["accuracy"][m]["n"]]
        out[f"{prefix}_{m}_mape"] = float(np.mean(values)) if values else None
    return out


def projection_frame(items: Sequence[MeasuredExperiment], result: ReplayFit,
                     model: PICF) -> pd.DataFrame:
    """Replayed steps of the training experiments (at most ``PROJECTION_STEPS`` each,
    evenly spaced) as a feature frame whose ``duration_us`` is the model's prediction:
    what the BLIS projection is fit on."""
    frames = []
    for item in training(items):
        steps = replay_steps(item, result.law)
        every = max(1, steps.num_rows // PROJECTION_STEPS)
        steps = steps.take(np.arange(0, steps.num_rows, every))
        frame = feature_frame(item.experiment, steps)
        frame["duration_us"] = model.predict(frame)
        frames.append(frame)
    return concat_frames(frames)


def cdf_data(items: Sequence[MeasuredExperiment], evaluation_replays: Mapping[str, Any]
             ) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per experiment and latency: (simulated, measured) µs of the requests both
    completed — what the release's CDF plots draw."""
    out = {}
    for item in items:
        rep = evaluation_replays[item.name]
        measured = measured_latencies(item)
        done = np.asarray(rep.requests.column("status").to_numpy(zero_copy_only=False)) == (
            "finished")
        both = done & item.targets
        out[item.name] = {m: (rep.predicted[m][both], measured[m][both]) for m in LATENCIES}
    return out


def request_level_block(items: Sequence[MeasuredExperiment], result: ReplayFit
                        ) -> dict[str, Any]:
    """The manifest's ``request_level`` section: the fitted alphas (pooled = the global
    law's, per configuration), each experiment's validation and replay notes."""
    law = result.law

    def alpha_fit(key: str) -> dict[str, Any]:
        a0, a1, a2 = law.alphas[key]
        return {"method": "replay", "alpha0_us": float(a0), "alpha0_per_prompt_token_us": 0.0,
                "alpha1_us": float(a1), "alpha2_us": float(a2),
                "per_running_us": law.gamma(key), "n_pre_queue": 0, "n_post_finish": 0}

    return {
        "alphas": {"fit": True, "method": "replay", "source": ALPHA_SOURCE,
                   "pooled": alpha_fit(GLOBAL),
                   "per_config": {k: alpha_fit(k) for k in sorted(law.alphas) if k != GLOBAL},
                   "errors": {},
                   "per_running_us": "the API server's contention: a token reaches the "
                                     "client this many µs later per request running when it "
                                     "was produced (BLIS has no such term: defaults.yaml's "
                                     "α0 adds it at the training runs' mean concurrency)"},
        "experiments": {i.name: {"validation": i.measurements.validation.to_dict(),
                                 "overloaded": i.overloaded, "notes": list(i.notes),
                                 "targets": int(i.targets.sum())} for i in items},
        "excluded": {i.name: "overloaded: its queue never drained (client timeouts or "
                     "minutes of TTFT)" for i in items if i.overloaded},
        "law": law.to_dict(),
    }


ALPHA_SOURCE = ("fit by replay on the client-side TTFT and E2E of every valid request "
                "(α0 per configuration, α1 and α2 shared; pooled = the global law's)")


def blis_alphas(result: ReplayFit) -> tuple[float, float, float]:
    """The global law's alphas in BLIS's form: its contention term folded into α0 at the
    mean number of requests running when the training requests' first token came."""
    a0, a1, a2 = result.law.alphas[GLOBAL]
    running = np.concatenate([r.nf for r in result.replays if len(r.nf)] or [np.zeros(1)])
    return (a0 + result.law.gamma(GLOBAL) * float(np.mean(running)), a1, a2)


def release(p: Plan, items: Sequence[MeasuredExperiment], result: ReplayFit,
            evaluation: Mapping[str, Any]) -> str:
    """Build the release of a request fit and publish it; return its URL."""
    model = result.law.model()
    frame = projection_frame(items, result, model)
    replays = {r.name: r for r in result.replays}
    images = {f"{plots.PLOTS_DIR}/latency_cdfs.png": plots.latency_cdfs(
        cdf_data([i for i in items if i.name in replays], replays))}
    reports = [{"experiment": i.name, **i.measurements.validation.to_dict(), "problems": []}
               for i in items]
    a0, a1, a2 = blis_alphas(result)
    files = build_release(
        model, frame, [i.experiment for i in training(items)], reports, p.corpus,
        {"request_replay": dict(evaluation)}, "picf", base_version=p.base_version,
        options=storage_options_for(p.corpus), alphas=(a0, a1, a2), alpha_source=ALPHA_SOURCE,
        request_level=request_level_block(items, result), images=images)
    return publish(files, p.store, release_version(files), storage_options_for(p.store))


__all__ = ["ALPHA_SOURCE", "cdf_data", "evaluate", "fit", "load_items", "projection_frame",
           "release", "request_level_block", "training"]
