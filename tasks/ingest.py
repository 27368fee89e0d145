"""Ingest tasks: plan the run, find the experiments of a corpus, featurize one experiment,
select the training experiments (``calibration.recipe``'s steps, with retries and logs)."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blis_model.calibration import recipe
from blis_model.calibration.featurize import Featurized
from blis_model.requests.stage import RequestSettings
from blis_model.storage import check_reachable, redact
from tasks.policy import RETRIES, RETRY_DELAYS, transient

MAX_PROBLEMS_LOGGED = 5
CACHE_HIT = "reused from the feature cache"


@task(name="preflight", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def preflight(corpus: str, store: str) -> None:
    """Fail early — before starting Ray — when the corpus cannot be listed or the store
    cannot be written to (missing bucket, wrong or missing credentials: not retried)."""
    check_reachable(corpus)
    check_reachable(store)


@task(name="plan", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def plan(corpus: str, store: str, family: str, base: str | None,
         default_hardware: str | None, settings: RequestSettings) -> recipe.Plan:
    """The run resolved before any work (store reachable, family known, base loaded)."""
    p = recipe.plan(corpus, store, family, base, default_hardware, settings)
    if p.base is not None:
        get_run_logger().info("calibrating release %s (%s) from %s", p.base.version, p.family,
                              redact(base or ""))
    return p


@task(name="discover", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def discover(p: recipe.Plan) -> list[str]:
    """Names of the corpus's experiments (CorpusError when there are none)."""
    names = recipe.discover(p)
    get_run_logger().info("found %d experiment(s) under %s: %s", len(names), redact(p.corpus),
                          ", ".join(names))
    return names


@task(name="featurize", task_run_name="featurize {name}", cache_policy=NO_CACHE,
      retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def featurize(p: recipe.Plan, name: str) -> Featurized:
    """One experiment's configuration, traces, request data and feature frame; an
    experiment unchanged since it was last featurized comes from ``<store>/cache/``.

    A configuration problem (ConfigError naming experiment, file and key) or a request
    table failing validation (CorpusError) is not retried.
    """
    logger = get_run_logger()
    item, cached = recipe.featurize_experiment(p, name)
    if cached:
        logger.info("%s: %s (unchanged objects) — %d steps", name, CACHE_HIT, len(item.frame))
        return item
    exp, report = item.experiment, item.report
    c = report.counts
    logger.info("%s (%s, %s, TP%d): %d steps kept of %d traced; dropped %d duplicate and %d "
                "with a missing or non-positive duration; %d malformed line(s); %.1f MB read",
                name, exp.server.model, exp.hardware.name, exp.server.tensor_parallelism,
                c.get("steps_kept", 0), c.get("steps_seen", 0), c.get("steps_duplicate", 0),
                c.get("steps_bad_duration", 0), report.lines_malformed, report.bytes_read / 1e6)
    for problem in report.problems[:MAX_PROBLEMS_LOGGED]:
        logger.warning("%s: skipped %s", name, redact(str(problem)))
    if len(report.problems) > MAX_PROBLEMS_LOGGED:
        logger.warning("%s: %d more problem(s), listed in the release manifest", name,
                       len(report.problems) - MAX_PROBLEMS_LOGGED)
    if item.requests is not None:
        v = item.requests.validation
        rebuilt = sum(c == "journey" for c in item.requests.steps.column("composition").to_pylist())
        logger.info("%s: %d request(s), %d failing validation (%.1f%%); %d traced step(s) "
                    "rebuilt from journeys", name, v.n_requests, v.n_failed,
                    100 * v.failure_rate, rebuilt)
    return item


@task(name="select-training", cache_policy=NO_CACHE)
def select_training(p: recipe.Plan, items: Sequence[Featurized]) -> recipe.Training:
    """Overloaded experiments left out (when configured); the training frame built once."""
    training = recipe.select_training(p, items)
    logger = get_run_logger()
    for name, why in training.excluded.items():
        logger.warning("%s excluded from training: %s", name, why)
    frame = training.frame
    logger.info("training on %d steps of %d experiment(s) in %d configuration(s)",
                len(frame), frame["experiment"].nunique(), frame["config_key"].nunique())
    return training
