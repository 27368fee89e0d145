"""Replay tasks: load a measured experiment, replay one experiment with a law (the unit
the request fit fans out, every round), fit and evaluate by replay, publish the release
(``calibration.replay_recipe``'s steps)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from blis_model.calibration import recipe, replay_recipe
from blis_model.calibration.plan import Plan
from blis_model.models.picf import PICF
from blis_model.requests.latency import Replayed
from blis_model.requests.measured import MeasuredExperiment, load_measured
from blis_model.requests.replay_fit import ReplayFit, StepLaw, replay_with
from blis_model.storage import redact, storage_options_for
from tasks.policy import RETRIES, RETRY_DELAYS, transient


@task(name="split-kinds", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def split_kinds(p: Plan, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(experiments with traces, experiments with request measurements only)."""
    traces, measured = recipe.split_kinds(p, names)
    if measured:
        get_run_logger().info("%d request-measurement experiment(s): %s", len(measured),
                              ", ".join(measured))
    return traces, measured


@task(name="load-measured", task_run_name="load-measured {name}", cache_policy=NO_CACHE,
      retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def load(p: Plan, name: str) -> MeasuredExperiment:
    """One measured experiment, ready to replay (its validation logged)."""
    item = load_measured(p.corpus, name, storage_options_for(p.corpus), p.default_hardware)
    v = item.measurements.validation
    get_run_logger().info("%s: %d request(s): %d ok, %d flagged, %d invalid%s", name,
                          v.n_requests, v.n_ok, v.n_flagged, v.n_invalid,
                          " (overloaded: replayed, not trained on)" if item.overloaded else "")
    return item


@task(name="replay", task_run_name="replay {item.name}", cache_policy=NO_CACHE)
def replay_task(item: MeasuredExperiment, law: StepLaw) -> Replayed:
    """One experiment replayed with one law (and its per-request feature sums)."""
    return replay_with(item, law)


def ray_replayer(items: Sequence[MeasuredExperiment], law: StepLaw) -> list[Replayed]:
    """A round of replays, one task per experiment (on Ray when the flow runs there)."""
    return [f.result() for f in replay_task.map(list(items), unmapped(law))]


@task(name="fit-by-replay", cache_policy=NO_CACHE)
def fit_by_replay(p: Plan, items: Sequence[MeasuredExperiment], prior: PICF | None = None
                  ) -> ReplayFit:
    """The request fit: replay → robust linear fit → replay; each round's replays fan out."""
    result = replay_recipe.fit(p, items, replayer=ray_replayer, prior=prior)
    logger = get_run_logger()
    for it in result.iterations:
        logger.info("round %d: objective %.3f (damping %g, %.1f s)", it.index, it.objective,
                    it.damping, it.seconds)
    logger.info("stopped: %s", result.stopped)
    return result


@task(name="evaluate-by-replay", cache_policy=NO_CACHE)
def evaluate_by_replay(items: Sequence[MeasuredExperiment], result: ReplayFit
                       ) -> dict[str, Any]:
    """In-sample and leave-one-experiment-out request accuracy (folds' replays fan out)."""
    evaluation = replay_recipe.evaluate(items, result, replayer=ray_replayer)
    s = evaluation["summary"]
    get_run_logger().info("request accuracy (mean MAPE, not overloaded): in-sample TTFT %s, "
                          "ITL %s, E2E %s; leave-one-out TTFT %s, ITL %s, E2E %s",
                          *(_pct(s.get(f"{k}_{m}_mape")) for k in ("in_sample", "loo")
                            for m in ("ttft", "itl", "e2e")))
    return evaluation


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}%"


@task(name="publish-replay-release", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def publish(p: Plan, items: Sequence[MeasuredExperiment], result: ReplayFit,
            evaluation: dict[str, Any]) -> str:
    """Build and publish the request fit's release; return its URL."""
    url = replay_recipe.release(p, items, result, evaluation)
    get_run_logger().info("published release %s", redact(url))
    return url
