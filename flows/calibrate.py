"""The calibration flow: traces in, a published release out, fanned out on Ray.

``calibrate`` is the entry point (CLI, deployments): it picks the Ray task runner — a
local Ray, or the cluster at ``ray_address`` — and runs :func:`calibrate_corpus`, the
recipe, on it as a subflow, so every parameter of a run (the cluster too) is an ordinary
flow parameter. Without ``PREFECT_API_URL`` Prefect starts its temporary local server;
nothing has to be set up (see ``flows.runtime``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, unmapped
from prefect.context import get_run_context

from blis_model.calibration import featurize as featurization
from blis_model.calibration.selection import candidate_families
from blis_model.models.registry import AUTO_FAMILY
from blis_model.requests.stage import RequestSettings
from blis_model.storage import redact
from flows.runtime import (
    is_loopback,
    quiet_domain_tracebacks,
    ray_task_runner,
    set_prefect_server_env,
)
from tasks.artifacts import publish_artifacts
from tasks.evaluate import (
    accuracy_report,
    choose_family,
    loo_fold,
    request_level_report,
    temporal_holdout,
)
from tasks.fit import fit_global, fit_specialist, has_specialists, load_base, merge_specialists
from tasks.frame import training_frame
from tasks.ingest import check_store, discover, featurize, preflight, select_training
from tasks.release import publish_release


@flow(name="calibrate-corpus")
def calibrate_corpus(corpus: str, store: str, family: str = AUTO_FAMILY,
                     default_hardware: str | None = None, base: str | None = None,
                     max_request_failure_rate: float | None = 0.05,
                     exclude_overloaded: bool = False) -> str:
    """discover → featurize (one task per experiment; unchanged experiments come from the
    feature cache under ``<store>/cache/``) → fit (global, then one specialist per
    configuration) → evaluate (one task per leave-one-out fold; request level: alphas and
    TTFT / ITL / E2E) → release. Returns its URL.

    Experiments with journey/API traces are validated (CorpusError when more than
    ``max_request_failure_rate`` of an experiment's requests fail) and, with
    ``exclude_overloaded``, left out of training when their queue keeps growing."""
    settings = RequestSettings(max_request_failure_rate=max_request_failure_rate,
                               exclude_overloaded=exclude_overloaded)
    check_store(store)
    base_release = load_base(base) if base else None
    family = base_release.family if base_release else family
    if family != AUTO_FAMILY:
        has_specialists(family)  # ValueError for an unknown family, before any work

    # Discover the experiments and featurize each one on its own worker.
    names = discover(corpus)
    featurized = featurize.map(unmapped(corpus), names, unmapped(default_hardware),
                               unmapped(settings), unmapped(store))
    everything = [f.result() for f in featurized]  # raises the first experiment's error
    items, excluded = select_training(everything, settings)
    usable = [i for i in items if len(i.frame)]
    frame = training_frame.submit(items)
    names = [i.experiment.name for i in usable]

    # Validate: with family "auto", every family × leave-one-out fold and every family's
    # temporal holdout in parallel; the LOO winner becomes the release's family.
    families = candidate_families() if family == AUTO_FAMILY else [family]
    folds = {f: {n: loo_fold.submit(frame, n, f) for n in names} for f in families}
    temporal = {f: temporal_holdout.submit(frame, f) for f in families}
    selection = None
    if family == AUTO_FAMILY:
        selection = choose_family(folds, temporal)
        family = selection.winner
    specialists_apart = has_specialists(family)

    # Fit: the global model, then each configuration's specialist in parallel.
    model = fit_global.submit(frame, family, base_release.model if base_release else None)
    if specialists_apart:
        configs = sorted({i.experiment.config_key for i in usable})
        specialists = {key: fit_specialist.submit(model, frame, key) for key in configs}
        model = merge_specialists(model, {k: f.result() for k, f in specialists.items()})

    # Evaluate: in-sample, with the chosen family's folds and temporal holdout from above.
    evaluation = accuracy_report.submit(frame, model, family, folds[family], temporal[family],
                                        selection.to_dict() if selection else None)
    requests = request_level_report.submit(
        featurization.request_items(items), model, family, settings, excluded,
        featurization.request_items(everything))

    # Release: build the files (plots included) and publish them, all or nothing; then
    # show the model card, metrics table and plots as artifacts of this run.
    url = publish_release.submit(
        model, frame, [i.experiment for i in items], [i.report for i in everything], corpus,
        store, evaluation, family, base_release.version if base_release else None,
        requests).result()
    publish_artifacts(url)
    return url


@flow(name="calibrate")
def calibrate(corpus: str, store: str, family: str = AUTO_FAMILY,
              ray_address: str | None = None, default_hardware: str | None = None,
              base: str | None = None, max_request_failure_rate: float | None = 0.05,
              exclude_overloaded: bool = False) -> str:
    """Calibrate on the traces under ``corpus`` and publish a release to ``store``; return
    the release URL. Tasks run on a local Ray, or on the cluster at ``ray_address``.
    ``base`` (a release URL) is calibrated on the corpus instead of fitting afresh."""
    api_url = str(get_run_context().client.api_url).rstrip("/")
    if ray_address and is_loopback(api_url):
        get_run_logger().warning(
            "the Ray cluster's workers cannot reach this machine's Prefect API %s: set "
            "PREFECT_API_URL to a Prefect server they can reach", redact(api_url))
    preflight(corpus, store)  # a bad bucket or credentials: one clear error, no Ray started
    recipe = calibrate_corpus.with_options(task_runner=ray_task_runner(api_url, ray_address))
    return recipe(corpus, store, family, default_hardware, base, max_request_failure_rate,
                  exclude_overloaded)


def run_calibration(corpus: str, store: str, family: str = AUTO_FAMILY,
                    ray_address: str | None = None, default_hardware: str | None = None,
                    base: str | None = None, max_request_failure_rate: float | None = 0.05,
                    exclude_overloaded: bool = False) -> str:
    """Run :func:`calibrate` in this process (Prefect's temporary server unless
    ``PREFECT_API_URL`` is set) and return the release URL; raises the run's error."""
    set_prefect_server_env()
    quiet_domain_tracebacks()
    return calibrate(corpus=corpus, store=store, family=family, ray_address=ray_address,
                     default_hardware=default_hardware, base=base,
                     max_request_failure_rate=max_request_failure_rate,
                     exclude_overloaded=exclude_overloaded)
