"""Ingest tasks: find the experiments of a corpus, and featurize one experiment."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blis_model.calibration import featurize as featurization
from blis_model.calibration.cache import featurize_cached
from blis_model.configuration.experiment import load_experiment
from blis_model.requests.stage import RequestSettings
from blis_model.storage import check_reachable, redact
from tasks.policy import RETRIES, RETRY_DELAYS, transient

MAX_PROBLEMS_LOGGED = 5
CACHE_HIT = "reused from the feature cache"
#: FAULT INJECTION, for tests only (tests/test_faults.py): when this variable names a
#: folder holding a file named after an experiment, the featurize task of that experiment
#: deletes the file and kills its own process (a Ray worker dying mid-task), once.
CRASH_ONCE_ENV = "BLIS_TEST_CRASH_ONCE_DIR"


@task(name="check-store", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def check_store(store: str) -> None:
    """Fail early, before any work, when the release store cannot be written to."""
    check_reachable(store)


@task(name="preflight", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def preflight(corpus: str, store: str) -> None:
    """Fail early — before starting Ray — when the corpus cannot be listed or the store
    cannot be written to (missing bucket, wrong or missing credentials: not retried)."""
    check_reachable(corpus)
    check_reachable(store)


@task(name="discover", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def discover(corpus: str) -> list[str]:
    """Names of the corpus's experiments (CorpusError when there are none)."""
    names = featurization.experiment_names(corpus)
    get_run_logger().info("found %d experiment(s) under %s: %s", len(names), redact(corpus),
                          ", ".join(names))
    return names


@task(name="featurize", task_run_name="featurize {name}", cache_policy=NO_CACHE,
      retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def featurize(corpus: str, name: str, default_hardware: str | None = None,
              settings: RequestSettings | None = None, store: str | None = None
              ) -> featurization.Featurized:
    """Load one experiment's configuration and stream its traces into its feature frame
    (with its request data when the traces have journey/API spans).

    With ``store``, an experiment whose objects (and the code) are unchanged since it was
    last featurized is read from the feature cache under ``<store>/cache/`` instead
    (``feature_cache``), and a fresh featurization is added to it.

    A configuration problem (ConfigError naming experiment, file and key) or a request
    table failing validation (CorpusError) is not retried.
    """
    _crash_once_if_asked(name)
    logger = get_run_logger()
    if store is None:
        item = featurization.featurize(load_experiment(corpus, name, None, default_hardware), None,
                                  settings)
    else:
        item, cached = featurize_cached(corpus, name, store, default_hardware=default_hardware,
                                        settings=settings)
        if cached:
            logger.info("%s: %s (unchanged objects) — %d steps", name, CACHE_HIT,
                        len(item.frame))
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


def _crash_once_if_asked(name: str) -> None:
    """The fault-injection hook of :data:`CRASH_ONCE_ENV` (a no-op unless it is set)."""
    folder = os.environ.get(CRASH_ONCE_ENV)
    if not folder:
        return
    try:
        (Path(folder) / name).unlink()  # only one attempt can remove the marker
    except FileNotFoundError:
        return
    os._exit(1)


@task(name="select-training", cache_policy=NO_CACHE)
def select_training(items: Sequence[featurization.Featurized], settings: RequestSettings
                    ) -> tuple[list[featurization.Featurized], dict[str, str]]:
    """(kept, excluded name → reason): overloaded experiments left out when configured."""
    kept, excluded = featurization.split_overloaded(items, settings)
    for name, why in excluded.items():
        get_run_logger().warning("%s excluded from training: %s", name, why)
    return kept, excluded
