"""Calibration at scale: per-experiment shards and sufficient statistics, on Ray.

The same recipe as ``flows.calibrate`` for the PICF family, but nothing corpus-sized is
gathered in the driver: each experiment is featurized on a worker into a Parquet shard
(``blis_model.shards``; an unchanged experiment's shard is reused), the worker returns a
small summary (counts, ingest report, PICF sufficient statistics), PICF is fit from the
summed statistics, leave-one-experiment-out folds and scores read one shard each, and
the release's BLIS projection uses a bounded deterministic sample of steps (recorded in
the manifest under ``metrics.scale``). Memory per worker is bounded by one experiment,
the driver's by the summaries and the sample.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.context import get_run_context

from blis_model import shards
from blis_model.release_store import _store_root
from blis_model.request_level import RequestSettings
from blis_model.storage import join, redact
from flows.runtime import (
    is_loopback,
    quiet_domain_tracebacks,
    ray_task_runner,
    set_prefect_server_env,
)
from tasks.ingest import check_store, discover
from tasks.release import publish_release
from tasks.shards import fit_from_stats, sample_rows, shard_experiment, validate_shard

FAMILY = "picf"
MAX_SAMPLE_ROWS = 20_000


def work_url(store: str, work: str | None) -> str:
    """Where shards go: ``work``, else ``<store>/cache``."""
    return work or join(_store_root(store), "cache")


def _peaks(memories: list[dict[str, Any]]) -> dict[str, float]:
    """Peak RSS (MB) per worker process."""
    out: dict[str, float] = {}
    for m in memories:
        key = str(m["pid"])
        out[key] = max(out.get(key, 0.0), float(m["peak_rss_mb"]))
    return out


@flow(name="calibrate-shards")
def calibrate_shards(corpus: str, store: str, work: str | None = None,
                     default_hardware: str | None = None,
                     max_request_failure_rate: float | None = 0.05,
                     max_sample_rows: int = MAX_SAMPLE_ROWS) -> str:
    """discover → shard each experiment (fan out) → fit PICF from statistics → validate
    (in-sample, temporal, LOO fold: one shard per task, fan out) → sample → release.
    Returns the release URL."""
    logger = get_run_logger()
    settings = RequestSettings(max_request_failure_rate=max_request_failure_rate)
    work = work_url(store, work)
    check_store(store)

    # Featurize every experiment into its shard on a worker; keep only the summaries.
    names = discover(corpus)
    done = shard_experiment.map(unmapped(corpus), names, unmapped(work),
                                unmapped(default_hardware), unmapped(settings))
    results = [f.result() for f in done]
    experiments = [r[0] for r in results]
    summaries = [r[1] for r in results]
    memories = [r[2] for r in results]
    reused = sum(s.from_cache for s in summaries)
    logger.info("%d experiment(s): %d featurized, %d unchanged (shards reused) under %s",
                len(summaries), len(summaries) - reused, reused, redact(work))
    usable = [s for s in summaries if s.rows]

    # Fit from statistics; validate each experiment from one read of its shard.
    model = fit_from_stats.submit(usable)
    temporal_model = fit_from_stats.submit(usable, train=True)
    validated = {s.experiment: validate_shard.submit(model, temporal_model, usable,
                                                     s.experiment) for s in usable}
    sample = sample_rows.submit(usable, max_sample_rows)
    scores: dict[str, dict[str, dict[str, float]]] = {"in_sample": {}, "temporal": {},
                                                      "loo": {}}
    for name, fut in validated.items():
        result, mem = fut.result()
        memories.append(mem)
        for kind, score in result.items():
            if score is not None:
                scores[kind][name] = score
    frame, mem = sample.result()
    memories.append(mem)
    steps = sum(s.rows for s in summaries)
    sampling = {"sample_rows": int(len(frame)), "total_steps": int(steps),
                "sample": f"up to {max_sample_rows} steps, evenly spaced by step id within "
                          "each experiment, quotas proportional to its steps; the BLIS "
                          "projection and deployment defaults use this sample, every other "
                          "metric uses all steps",
                "experiments_featurized": len(summaries) - reused,
                "experiments_reused": reused,
                "worker_peak_rss_mb": _peaks(memories)}
    evaluation = shards.evaluation_from_parts(scores["in_sample"], scores["loo"],
                                              scores["temporal"], steps, sampling)
    return publish_release.submit(model, frame, experiments, [s.report for s in summaries],
                                  corpus, store, evaluation, FAMILY).result()


@flow(name="calibrate-at-scale")
def calibrate_at_scale(corpus: str, store: str, work: str | None = None,
                       ray_address: str | None = None, default_hardware: str | None = None,
                       max_request_failure_rate: float | None = 0.05,
                       max_sample_rows: int = MAX_SAMPLE_ROWS,
                       num_cpus: int | None = None) -> str:
    """Calibrate PICF on a large corpus through shards and publish a release to ``store``;
    return its URL. Tasks run on a local Ray (``num_cpus`` workers; default: this
    machine's CPUs) or on the cluster at ``ray_address``."""
    api_url = str(get_run_context().client.api_url).rstrip("/")
    if ray_address and is_loopback(api_url):
        get_run_logger().warning(
            "the Ray cluster's workers cannot reach this machine's Prefect API %s: set "
            "PREFECT_API_URL to a Prefect server they can reach", redact(api_url))
    recipe = calibrate_shards.with_options(
        task_runner=ray_task_runner(api_url, ray_address, num_cpus))
    return recipe(corpus, store, work, default_hardware, max_request_failure_rate,
                  max_sample_rows)


def run_at_scale(corpus: str, store: str, **kwargs: Any) -> str:
    """Run :func:`calibrate_at_scale` in this process and return the release URL."""
    set_prefect_server_env()
    quiet_domain_tracebacks()
    return calibrate_at_scale(corpus=corpus, store=store, **kwargs)
