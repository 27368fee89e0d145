"""Calibration at scale: per-experiment shards and sufficient statistics, on Ray.

The same recipe as ``flows.calibrate``, but nothing corpus-sized is gathered in the
driver: each experiment is featurized on a worker into a Parquet shard
(``blis_model.scale.shards``; an unchanged experiment's shard is reused), the worker returns a
small summary (counts, ingest report, PICF sufficient statistics), and

* family ``picf`` (the default) is fit exactly from the summed statistics;
* any other family (``blis_model.scale.sampling``) is fit on a bounded deterministic
  sample of at most ``max_fit_rows`` steps (the temporal model on its rows in each
  experiment's first 70%, each leave-one-out fold — one task per held-out configuration
  — on the sample minus that configuration);
* ``auto`` fits every family that way (PICF from statistics) and releases the
  leave-one-experiment-out winner (``blis_model.calibration.selection``).

Scores (in-sample, temporal, LOO) read each experiment's full shard, one per task. The
release's BLIS projection uses a bounded deterministic sample of steps; the manifest's
``metrics.scale`` records both samples. Memory per worker is bounded by one experiment
(plus the fit sample), the driver's by the summaries, the models and the release sample.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.context import get_run_context

from blis_model.configuration.defaults import MAX_REQUEST_FAILURE_RATE
from blis_model.errors import CorpusError
from blis_model.models.registry import AUTO_FAMILY, check_family
from blis_model.requests.stage import RequestSettings
from blis_model.scale import shards
from blis_model.scale.sampling import (
    EXACT_FAMILY,
    MAX_FIT_ROWS,
    ShardModels,
    families_for,
    fit_description,
    sample_size,
)
from blis_model.storage import redact
from blis_model.storage.layout import cache_url
from flows.runtime import (
    quiet_domain_tracebacks,
    ray_task_runner,
    set_prefect_server_env,
    warn_unreachable_api,
)
from tasks.evaluate import choose_family
from tasks.ingest import discover, plan
from tasks.release import publish_release
from tasks.shards import (
    alphas_at_scale,
    fit_family,
    fit_fold,
    sample_for_fit,
    sample_rows,
    score_shard,
    shard_experiment,
)

FAMILY = EXACT_FAMILY  # the default: fit exactly from sufficient statistics
MAX_SAMPLE_ROWS = 20_000


def work_url(store: str, work: str | None) -> str:
    """Where shards go: ``work``, else ``<store>/cache``."""
    return work or cache_url(store)


def _peaks(memories: list[dict[str, Any]]) -> dict[str, float]:
    """Peak RSS (MB) per worker process."""
    out: dict[str, float] = {}
    for m in memories:
        key = str(m["pid"])
        out[key] = max(out.get(key, 0.0), float(m["peak_rss_mb"]))
    return out


ScoreTable = dict[str, dict[str, dict[str, float]]]  # kind → experiment → metrics.summary


def _resolve(fut: Any, memories: list[dict[str, Any]]) -> Any:
    model, mem = fut.result()
    memories.append(mem)
    return model


def _fit_families(usable: list[shards.ShardSummary], families: list[str], max_fit_rows: int,
                  memories: list[dict[str, Any]]
                  ) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """(model, temporal model, held-out configuration → LOO fold model) per family, all
    fits fanned out: PICF from statistics, the others on one bounded fit sample (drawn
    on a worker and passed between workers, never gathered in the driver)."""
    sampled = any(f != EXACT_FAMILY for f in families)
    sample = sample_for_fit.submit(usable, max_fit_rows) if sampled else None
    configs = sorted({s.config_key for s in usable})
    full = {f: fit_family.submit(f, usable, sample) for f in families}
    temporal = {f: fit_family.submit(f, usable, sample, "train") for f in families}
    folds = {f: {c: fit_fold.submit(f, usable, sample, c) for c in configs}
             if len(configs) > 1 else {} for f in families}
    models = {f: _resolve(full[f], memories) for f in families}
    if any(m is None for m in models.values()):
        raise CorpusError("no usable steps in the shards")
    return (models, {f: _resolve(temporal[f], memories) for f in families},
            {f: {c: _resolve(fut, memories) for c, fut in folds[f].items()}
             for f in families})


def _score_families(usable: list[shards.ShardSummary], families: list[str],
                    max_fit_rows: int, memories: list[dict[str, Any]]
                    ) -> tuple[dict[str, Any], dict[str, ScoreTable]]:
    """(family → model, family → scores): every family's models scored on every
    experiment's full shard, one task (one shard read) per experiment."""
    models, temporal, folds = _fit_families(usable, families, max_fit_rows, memories)
    scored = {s.experiment: score_shard.submit(
        {f: ShardModels(models[f], temporal[f], folds[f].get(s.config_key)) for f in families},
        s, s.experiment) for s in usable}
    scores: dict[str, ScoreTable] = {f: {"in_sample": {}, "temporal": {}, "loo": {}}
                                     for f in families}
    for name, fut in scored.items():
        for family, result in _resolve(fut, memories).items():
            for kind, score in result.items():
                if score is not None:
                    scores[family][kind][name] = score
    return models, scores


@flow(name="calibrate-shards")
def calibrate_shards(corpus: str, store: str, work: str | None = None,
                     default_hardware: str | None = None,
                     max_request_failure_rate: float | None = MAX_REQUEST_FAILURE_RATE,
                     max_sample_rows: int = MAX_SAMPLE_ROWS, family: str = FAMILY,
                     max_fit_rows: int = MAX_FIT_ROWS) -> str:
    """discover → shard each experiment (fan out) → fit (PICF from statistics; any other
    family, or ``auto``, on a sample of at most ``max_fit_rows`` steps; folds fan out) →
    validate (in-sample, temporal, LOO: one shard per task, fan out) → [choose the family]
    → sample → release. Returns the release URL."""
    logger = get_run_logger()
    settings = RequestSettings(max_request_failure_rate=max_request_failure_rate)
    p = plan(corpus, store, family, None, default_hardware, settings)  # fails before work
    family = p.family
    work = work_url(store, work)

    # Featurize every experiment into its shard on a worker; keep only the summaries.
    names = discover(p)
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
    steps = sum(s.rows for s in summaries)
    stage = alphas_at_scale.submit(p, summaries)  # the request level: alphas only

    # Fit; validate each experiment from one read of its shard; choose the family (auto).
    sample = sample_rows.submit(usable, max_sample_rows)
    families = families_for(family)
    models, by_family = _score_families(usable, families, max_fit_rows, memories)
    selection = None
    if family == AUTO_FAMILY:
        selection = choose_family({f: by_family[f]["loo"] for f in families},
                                  {f: by_family[f]["temporal"] for f in families})
        family = selection.winner
    model, scores = models[family], by_family[family]
    fits: dict[str, Any]
    if family == EXACT_FAMILY:
        fit, fits = fit_description(family, steps), {"fit_rows": steps}
    else:
        fit_rows, train_rows = sample_size(usable, max_fit_rows)
        fit = fit_description(family, steps, fit_rows, train_rows, max_fit_rows)
        fits = {"fit_rows": fit_rows}
    if any(f != EXACT_FAMILY for f in families):
        fits["max_fit_rows"] = max_fit_rows
    if selection is not None:  # every candidate's fit: the statistics or the sample
        fits["candidates_fit"] = {f: "exact sufficient statistics" if f == EXACT_FAMILY
                                  else "the fit sample" for f in families}
    logger.info("%s fit on %s", family, fit)
    frame, mem = sample.result()
    memories.append(mem)
    sampling = {"family": family, "fit": fit, **fits,
                "sample_rows": int(len(frame)), "total_steps": int(steps),
                "sample": f"up to {max_sample_rows} steps, evenly spaced by step id within "
                          "each experiment, quotas proportional to its steps; the BLIS "
                          "projection and deployment defaults use this sample, every other "
                          "metric uses all steps",
                "experiments_featurized": len(summaries) - reused,
                "experiments_reused": reused,
                "worker_peak_rss_mb": _peaks(memories)}
    evaluation = shards.evaluation_from_parts(scores["in_sample"], scores["loo"],
                                              scores["temporal"], steps, sampling)
    if selection is not None:
        evaluation["family_selection"] = selection.to_dict()
    return publish_release(p, model, family, frame, experiments,
                           [s.report for s in summaries], evaluation, stage.result())


@flow(name="calibrate-at-scale")
def calibrate_at_scale(corpus: str, store: str, work: str | None = None,
                       ray_address: str | None = None, default_hardware: str | None = None,
                       max_request_failure_rate: float | None = MAX_REQUEST_FAILURE_RATE,
                       max_sample_rows: int = MAX_SAMPLE_ROWS,
                       num_cpus: int | None = None, family: str = FAMILY,
                       max_fit_rows: int = MAX_FIT_ROWS) -> str:
    """Calibrate ``family`` (default PICF, exactly from statistics; any other family or
    ``auto`` on a sample of at most ``max_fit_rows`` steps) on a large corpus through
    shards and publish a release to ``store``; return its URL. Tasks run on a local Ray
    (``num_cpus`` workers; default: this machine's CPUs) or on the cluster at
    ``ray_address``."""
    api_url = str(get_run_context().client.api_url).rstrip("/")
    warn_unreachable_api(api_url, ray_address)
    recipe = calibrate_shards.with_options(
        task_runner=ray_task_runner(api_url, ray_address, num_cpus))
    return recipe(corpus, store, work, default_hardware, max_request_failure_rate,
                  max_sample_rows, check_family(family), max_fit_rows)


def run_at_scale(corpus: str, store: str, **kwargs: Any) -> str:
    """Run :func:`calibrate_at_scale` in this process and return the release URL."""
    set_prefect_server_env()
    quiet_domain_tracebacks()
    return calibrate_at_scale(corpus=corpus, store=store, **kwargs)
