"""The calibration flow: traces in, a published release out, fanned out on Ray.

``calibrate`` is the entry point (CLI, deployments): it picks the Ray task runner — a
local Ray, or the cluster at ``ray_address`` — and runs :func:`calibrate_corpus`, the
library's recipe (``blis_model.calibration.recipe``) with its steps as tasks, on it as a
subflow, so every parameter of a run (the cluster too) is an ordinary flow parameter.
Without ``PREFECT_API_URL`` Prefect starts its temporary local server; nothing has to be
set up (see ``flows.runtime``).
"""

from __future__ import annotations

import logging

from prefect import flow, unmapped
from prefect.context import get_run_context

from blis_model.calibration import recipe
from blis_model.configuration.defaults import MAX_REQUEST_FAILURE_RATE
from blis_model.models.registry import AUTO_FAMILY
from blis_model.requests.stage import RequestSettings
from blis_model.storage import redact
from flows.runtime import (
    quiet_domain_tracebacks,
    ray_task_runner,
    set_prefect_server_env,
    warn_unreachable_api,
)
from tasks.artifacts import publish_artifacts
from tasks.evaluate import (
    accuracy_report,
    choose_family,
    learning_curve,
    loo_fold,
    request_level,
    temporal_holdout,
)
from tasks.fit import fit_global, fit_specialist, merge_specialists
from tasks.ingest import discover, featurize, plan, preflight, select_training
from tasks.release import publish_release
from tasks.replay import evaluate_by_replay, fit_by_replay, load, split_kinds
from tasks.replay import publish as publish_replay_release

progress = logging.getLogger(recipe.PROGRESS_LOGGER)


@flow(name="calibrate-corpus")
def calibrate_corpus(corpus: str, store: str, family: str = AUTO_FAMILY,
                     default_hardware: str | None = None, base: str | None = None,
                     max_request_failure_rate: float | None = MAX_REQUEST_FAILURE_RATE,
                     exclude_overloaded: bool = False) -> str:
    """The recipe of ``blis_model.calibration.recipe``, its steps as tasks: plan →
    discover → featurize (one task per experiment; unchanged experiments come from the
    feature cache under ``<store>/cache/``) → select training → validate (every family ×
    leave-one-out fold, every temporal holdout) → choose → fit (global, then one
    specialist per configuration) → evaluate, request level, learning curve → release.
    Returns the release URL.

    Experiments with journey/API traces are validated (CorpusError when more than
    ``max_request_failure_rate`` of an experiment's requests fail) and, with
    ``exclude_overloaded``, left out of training when their queue keeps growing."""
    settings = RequestSettings(max_request_failure_rate=max_request_failure_rate,
                               exclude_overloaded=exclude_overloaded)
    p = plan(corpus, store, family, base, default_hardware, settings)

    # Featurize each experiment on its own worker (request measurements: fit by replay).
    traces, measured = split_kinds(p, discover(p))
    progress.info("%d experiment(s) under %s: featurizing on Ray",
                  len(traces) + len(measured), redact(corpus))
    featurized = [f.result() for f in featurize.map(unmapped(p), traces)]  # errors raise
    if measured:
        return calibrate_measured(p, measured, featurized)
    training = select_training(p, featurized)
    progress.info("%d steps of %d experiment(s) in %d configuration(s); validating %s",
                  len(training.frame), len(training.names), len(training.configs),
                  ", ".join(p.families))

    # Validate: every family × leave-one-out fold and every temporal holdout in parallel;
    # with family "auto" the leave-one-out winner becomes the release's family.
    frame = training.frame
    folds = {f: {n: loo_fold.submit(frame, n, f) for n in training.names} for f in p.families}
    temporal = {f: temporal_holdout.submit(frame, f) for f in p.families}
    folds = {f: {n: fut.result() for n, fut in by_name.items()} for f, by_name in folds.items()}
    temporal = {f: fut.result() for f, fut in temporal.items()}
    family, selection = p.family, None
    if family == AUTO_FAMILY:
        selection = choose_family(folds, temporal)
        family = selection.winner
        progress.info("family %s", selection.reason)

    # Fit: the global model, then each configuration's specialist in parallel.
    model = fit_global(p, frame, family)
    if recipe.has_specialists(family):
        specialists = {key: fit_specialist.submit(model, frame, key) for key in training.configs}
        model = merge_specialists(model, {k: f.result() for k, f in specialists.items()})

    # Evaluate, request level and learning curve in parallel; then the release, and its
    # model card, metrics table and plots as artifacts of this run.
    evaluation = accuracy_report.submit(frame, model, family, folds, temporal, selection)
    stage = request_level.submit(p, training, model, family)
    learning = learning_curve.submit(p, frame, family)
    url = publish_release(p, model, family, frame, training.experiments, training.reports,
                          evaluation.result(), stage.result(), learning.result())
    publish_artifacts(url)
    progress.info("published %s (model card, metrics and plots are artifacts of this run)",
                  redact(url))
    return url


def calibrate_measured(p: recipe.Plan, names: list[str], traced: list) -> str:
    """The request-measurement recipe (``calibration.replay_recipe``) as tasks: load each
    experiment → fit by replay (every round's replays fan out, one per experiment) →
    evaluate (in-sample, leave one experiment out) → release and its artifacts. A PICF
    fit on the corpus's step traces, when there are some, is the prior."""
    prior = fit_global(p, select_training(p, traced).frame, "picf") if traced else None
    items = [f.result() for f in load.map(unmapped(p), names)]
    progress.info("fitting by replay on %d request-measurement experiment(s)", len(items))
    result = fit_by_replay(p, items, prior)
    progress.info("fit: %s after %d round(s)", result.stopped, len(result.iterations) - 1)
    evaluation = evaluate_by_replay(items, result)
    url = publish_replay_release(p, items, result, evaluation)
    publish_artifacts(url)
    progress.info("published %s (model card, metrics and plots are artifacts of this run)",
                  redact(url))
    return url


@flow(name="calibrate")
def calibrate(corpus: str, store: str, family: str = AUTO_FAMILY,
              ray_address: str | None = None, default_hardware: str | None = None,
              base: str | None = None,
              max_request_failure_rate: float | None = MAX_REQUEST_FAILURE_RATE,
              exclude_overloaded: bool = False) -> str:
    """Calibrate on the traces under ``corpus`` and publish a release to ``store``; return
    the release URL. Tasks run on a local Ray, or on the cluster at ``ray_address``.
    ``base`` (a release URL) is calibrated on the corpus instead of fitting afresh."""
    api_url = str(get_run_context().client.api_url).rstrip("/")
    warn_unreachable_api(api_url, ray_address)
    preflight(corpus, store)  # a bad bucket or credentials: one clear error, no Ray started
    run = calibrate_corpus.with_options(task_runner=ray_task_runner(api_url, ray_address))
    return run(corpus, store, family, default_hardware, base, max_request_failure_rate,
               exclude_overloaded)


def run_calibration(corpus: str, store: str, family: str = AUTO_FAMILY,
                    ray_address: str | None = None, default_hardware: str | None = None,
                    base: str | None = None,
                    max_request_failure_rate: float | None = MAX_REQUEST_FAILURE_RATE,
                    exclude_overloaded: bool = False) -> str:
    """Run :func:`calibrate` in this process (Prefect's temporary server unless
    ``PREFECT_API_URL`` is set) and return the release URL; raises the run's error."""
    set_prefect_server_env()
    quiet_domain_tracebacks()
    return calibrate(corpus=corpus, store=store, family=family, ray_address=ray_address,
                     default_hardware=default_hardware, base=base,
                     max_request_failure_rate=max_request_failure_rate,
                     exclude_overloaded=exclude_overloaded)
