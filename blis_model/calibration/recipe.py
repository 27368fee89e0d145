"""THE calibration recipe, as plain library functions: traces in, a published release out.

    plan → discover → featurize (per experiment) → select training → validate (families ×
    leave-one-out folds, temporal holdout) → choose → fit → evaluate → request level →
    learning curve → release

:func:`calibrate` runs every step in this process (``blis-model fit``, a notebook). The
Prefect flow (``flows/calibrate.py``) runs the SAME step functions as tasks, fanned out
on Ray (one task per experiment, per fold, per configuration's specialist), and the
scale flow reuses :func:`plan`, :func:`choose_family`, the request level and
:func:`release`. Nothing here imports Prefect or Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from blis_model.calibration import replay_recipe
from blis_model.calibration.cache import featurize_cached
from blis_model.calibration.evaluation import (
    evaluate,
    fit_model,
    learning_curve,
)
from blis_model.calibration.featurize import (
    Featurized,
    experiment_names,
    featurize,
    request_items,
    split_overloaded,
    training_frame,
)
from blis_model.calibration.featurize import (
    split_kinds as split_by_kind,
)
from blis_model.calibration.plan import Plan, plan
from blis_model.calibration.selection import (
    Folds,
    Selection,
    choose_family,
    completed,
    validate,
)
from blis_model.configuration.experiment import Experiment, load_experiment
from blis_model.errors import BlisModelError
from blis_model.models.base import StepTimeModel
from blis_model.models.registry import AUTO_FAMILY, make_model
from blis_model.releases.build import build_release, release_version
from blis_model.releases.store import publish
from blis_model.requests.stage import RequestSettings, RequestStage, request_stage
from blis_model.storage import redact, storage_options_for

log = logging.getLogger(__name__)

PROGRESS_LOGGER = "blis_model.progress"
"""Logger of a run's milestones and decisions (the flows log them here, the CLI prints
them): what a user watches, without every task's log line."""

Progress = Callable[[str], None]
"""Called with a short description as each step starts (a CLI status line, a log)."""



@dataclass(frozen=True)
class Training:
    """The featurized corpus: every experiment (``everything``, reported in the release),
    those kept for training (``items``, overloaded ones left out with ``excluded``
    reasons) and their steps in one frame."""

    everything: list[Featurized]
    items: list[Featurized]
    excluded: dict[str, str]
    frame: pd.DataFrame

    @property
    def names(self) -> list[str]:
        """Training experiments with at least one usable step."""
        return [i.experiment.name for i in self.items if len(i.frame)]

    @property
    def configs(self) -> list[str]:
        return sorted({i.experiment.config_key for i in self.items if len(i.frame)})

    @property
    def experiments(self) -> list[Experiment]:
        """The experiments trained on."""
        return [i.experiment for i in self.items]

    @property
    def reports(self) -> list[Any]:
        """The ingest report of every experiment read."""
        return [i.report for i in self.everything]


# ------------------------------------------------------------------------------ steps


def discover(p: Plan) -> list[str]:
    """Names of the corpus's experiments (CorpusError when there are none)."""
    return experiment_names(p.corpus, storage_options_for(p.corpus))


def featurize_experiment(p: Plan, name: str) -> tuple[Featurized, bool]:
    """``(one experiment featurized, from_cache)``; with ``p.cache`` an unchanged
    experiment comes from ``<store>/cache/`` and a fresh one is added to it."""
    options = storage_options_for(p.corpus)
    if p.cache:
        item, cached = featurize_cached(p.corpus, name, p.store, options,
                                        storage_options_for(p.store),
                                        default_hardware=p.default_hardware,
                                        settings=p.settings)
    else:
        experiment = load_experiment(p.corpus, name, options, p.default_hardware)
        item, cached = featurize(experiment, options, p.settings), False
    warn_ingest(item)
    return item, cached


def warn_ingest(item: Featurized) -> None:
    """Log (warning) what ingestion skipped: unreadable parts and unusable steps. Every
    problem is also counted in the release manifest."""
    report, name = item.report, item.experiment.name
    if report.problems:
        more = len(report.problems) - 1
        log.warning("%s: %d unreadable part(s) skipped: %s%s", name, len(report.problems),
                    redact(str(report.problems[0])),
                    f" (+{more} more, see the manifest)" if more else "")
    dropped = int(report.counts.get("steps_bad_duration", 0))
    if dropped:
        log.warning("%s: %d step(s) with missing or non-positive duration excluded", name,
                    dropped)


def select_training(p: Plan, everything: Sequence[Featurized]) -> Training:
    """Leave overloaded experiments out (when configured) and build the training frame
    (CorpusError when no usable step remains)."""
    items, excluded = split_overloaded(everything, p.settings)
    for name, why in excluded.items():
        log.warning("%s excluded from training: %s", name, why)
    return Training(list(everything), items, excluded, training_frame(items))


def has_specialists(family: str) -> bool:
    """True when ``family`` fits its per-configuration sets as separate specialists
    (``per_config`` parameter, ``calibrate`` and ``with_config_sets``): the flow fits
    them in parallel and merges them, equal to one ``fit``."""
    model = make_model(family)
    return "per_config" in model.get_params() and hasattr(model, "with_config_sets")


def fit(p: Plan, frame: pd.DataFrame, family: str) -> StepTimeModel:
    """The release's model: ``family`` fit on every step, or the base release calibrated
    on them."""
    return fit_model(frame, family, base=p.base_model)


def report(frame: pd.DataFrame, model: StepTimeModel, family: str, folds: Folds,
           temporal: Mapping[str, Any], selection: Selection | None) -> dict[str, Any]:
    """The release's evaluation: in-sample, and the chosen family's leave-one-out folds
    and temporal holdout (computed during validation), plus the family comparison."""
    evaluation = evaluate(frame, model, family, loo=completed(folds[family]),
                          temporal=temporal[family])
    if selection is not None:
        evaluation["family_selection"] = selection.to_dict()
    return evaluation


def request_level(p: Plan, training: Training, model: StepTimeModel, family: str
                  ) -> RequestStage:
    """Alphas and TTFT / ITL / E2E accuracy from the training experiments' request data
    (BLIS's default alphas when there are none)."""
    return request_stage(request_items(training.items), model, family, p.settings,
                         training.excluded, request_items(training.everything))


def curve(p: Plan, frame: pd.DataFrame, family: str) -> list[dict[str, float]] | None:
    """The release's learning curve: temporal-holdout MAPE against training steps, of
    calibrating the base release (``--base``) or fitting ``family`` afresh. None when the
    corpus is too small for one."""
    try:
        return learning_curve(frame, family, base=p.base_model)
    except (ValueError, ArithmeticError, BlisModelError):
        return None


def release(p: Plan, model: StepTimeModel, family: str, frame: pd.DataFrame,
            experiments: Sequence[Experiment], reports: Sequence[Any],
            evaluation: Mapping[str, Any], stage: RequestStage | None = None,
            learning: Sequence[Mapping[str, float]] | None = None) -> str:
    """Build every file of the release and publish it to the store, all or nothing;
    return its URL. ``frame``: the steps the BLIS projection and plots use (the training
    frame, or a bounded sample at scale); ``experiments``: those trained on;
    ``reports``: the ingest report of every experiment read."""
    extra = stage.release_kwargs if stage is not None else {}
    files = build_release(model, frame, experiments, reports, p.corpus,
                          {**evaluation, **(stage.evaluation if stage else {})}, family,
                          base_version=p.base_version, options=storage_options_for(p.corpus),
                          learning_curve=learning, **extra)
    return publish(files, p.store, release_version(files), storage_options_for(p.store))


# ------------------------------------------------------------------------- in process


def calibrate(corpus: str, store: str, *, family: str = AUTO_FAMILY, base: str | None = None,
              default_hardware: str | None = None, settings: RequestSettings | None = None,
              cache: bool = True, progress: Progress | None = None) -> str:
    """Calibrate on the traces under ``corpus``, publish a release to ``store`` and
    return its URL — every step of the recipe, in this process."""
    say = progress or (lambda _: None)
    p = plan(corpus, store, family, base, default_hardware, settings, cache)
    traces, measured = split_kinds(p, discover(p))
    everything = []
    for name in traces:
        say(f"featurize {name}")
        everything.append(featurize_experiment(p, name)[0])
    if measured:
        return calibrate_from_requests(p, measured, everything, say)
    training = select_training(p, everything)
    family, selection = p.family, None
    say("validate " + ", ".join(p.families) + " (leave-one-experiment-out, temporal holdout)")
    folds, temporal = validate(training.frame, p.families)
    if family == AUTO_FAMILY:
        selection = choose_family(folds, temporal)
        family = selection.winner
        say(f"family {selection.reason}")
    say(f"fit {family} on {len(training.frame)} steps")
    model = fit(p, training.frame, family)
    say("evaluate (in-sample, temporal holdout, leave-one-out)")
    evaluation = report(training.frame, model, family, folds, temporal, selection)
    say("request level: alphas, TTFT / ITL / E2E")
    stage = request_level(p, training, model, family)
    say("learning curve")
    learning = curve(p, training.frame, family)
    say("build and publish the release")
    return release(p, model, family, training.frame, training.experiments, training.reports,
                   evaluation, stage, learning)


def split_kinds(p: Plan, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(experiments with step/journey traces, experiments with client request
    measurements and no traces) of the plan's corpus (``featurize.split_kinds``)."""
    return split_by_kind(p.corpus, names, storage_options_for(p.corpus))


def calibrate_from_requests(p: Plan, names: Sequence[str], traced: Sequence[Featurized],
                            say: Progress, loo: bool = True) -> str:
    """The request-measurement recipe (``calibration.replay_recipe``): fit by replay,
    evaluate (in-sample, leave one experiment out), release. A PICF fit on the corpus's
    step traces (``traced``), when there are some, is the prior; else ``--base``."""
    if p.family not in (AUTO_FAMILY, "picf"):
        raise ValueError(f"request measurements are fit as family picf (a linear step law "
                         f"the replay fit solves for), not {p.family}")
    prior = None
    if traced:
        say("fit the step traces' PICF model: the prior of the request fit")
        prior = fit_model(select_training(p, traced).frame, "picf")
    say(f"load {len(names)} request-measurement experiment(s)")
    items = replay_recipe.load_items(p, names)
    say("fit by replay (replay → robust linear fit → replay)")
    result = replay_recipe.fit(p, items, prior=prior)
    say("evaluate by replay (in-sample, leave one experiment out)")
    evaluation = replay_recipe.evaluate(items, result, loo=loo)
    say("build and publish the release")
    return replay_recipe.release(p, items, result, evaluation)


__all__ = ["PROGRESS_LOGGER", "Folds", "Plan", "Progress", "Training", "calibrate",
           "choose_family", "completed", "curve", "discover", "featurize_experiment", "fit",
           "has_specialists", "plan", "release", "report", "request_level", "select_training",
           "split_kinds", "validate", "warn_ingest"]
