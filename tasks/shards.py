"""Scale tasks: featurize one experiment into a shard, fit a family (PICF from statistics,
any other on a bounded sample of steps), score one shard, sample rows for the release. Each
returns small values (summaries, models, scores) — never a corpus-sized frame; the fit
sample is bounded by ``max_fit_rows`` — and reports its process's peak memory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blis_model.calibration import cache, recipe
from blis_model.configuration.experiment import Experiment, load_experiment
from blis_model.models.base import StepTimeModel
from blis_model.requests.stage import RequestSettings, RequestStage, alpha_stage
from blis_model.scale import sampling, shards
from blis_model.storage import redact
from tasks.policy import RETRIES, RETRY_DELAYS, transient


def memory() -> dict[str, Any]:
    """This process's id and peak resident memory (MB)."""
    return {"pid": os.getpid(), "peak_rss_mb": shards.peak_rss_mb()}


@task(name="featurize-to-shard", task_run_name="shard {name}", cache_policy=NO_CACHE,
      retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def shard_experiment(corpus: str, name: str, work: str, default_hardware: str | None = None,
                     settings: RequestSettings | None = None
                     ) -> tuple[Experiment, shards.ShardSummary, dict[str, Any]]:
    """(experiment, its shard summary, worker memory). The shard is keyed by
    ``cache.cache_key`` (object identities, settings, code): an unchanged
    experiment's committed shard is reused, not featurized again."""
    logger = get_run_logger()
    experiment = load_experiment(corpus, name, None, default_hardware)
    key = cache.cache_key(corpus, name, None, default_hardware, settings)
    url = shards.shard_url_for(work, key)
    summary = shards.load_summary(url)
    if summary is not None:
        logger.info("%s: unchanged, shard %s reused (%d steps)", name, redact(url), summary.rows)
    else:
        summary = shards.featurize_to_shard(experiment, url, None, settings)
        r = summary.report
        logger.info("%s: %d steps featurized in %.1f s (%.1f MB read, %.1f MB uncompressed) "
                    "into %s; worker peak RSS %.0f MB", name, summary.rows, summary.seconds,
                    r.get("bytes_read", 0) / 1e6, r.get("bytes_uncompressed", 0) / 1e6,
                    redact(url), summary.peak_rss_mb)
    return experiment, summary, memory()


@task(name="alphas-at-scale", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def alphas_at_scale(p: recipe.Plan, summaries: Sequence[shards.ShardSummary]) -> RequestStage:
    """The request level at scale: the alphas fit on every request's journey + API
    timestamps (a few numbers per request, read next to each shard) and each
    experiment's request validation; request-level accuracy is not computed at scale
    (the manifest says so)."""
    samples = [s for s in (shards.alpha_sample(x) for x in summaries) if s is not None]
    reports = {x.experiment: x.requests for x in summaries if x.requests is not None}
    stage = alpha_stage(samples, reports, p.settings)
    a = stage.alphas.pooled
    get_run_logger().info(
        "alphas: %s", stage.alphas.source if a is None else
        f"α0 {a.alpha0_us:.1f} µs, α1 {a.alpha1_us:.1f} µs, α2 {a.alpha2_us:.3f} µs/token "
        f"({a.n_pre_queue} requests of {len(samples)} experiment(s))")
    return stage


@task(name="sample-rows", cache_policy=NO_CACHE)
def sample_rows(summaries: Sequence[shards.ShardSummary], max_rows: int
                ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A bounded, deterministic sample of steps across shards (evenly spaced by step id
    within each shard, quotas proportional to its steps), for the release's BLIS
    projection."""
    frame = sampling.draw_fit_sample(summaries, max_rows).frame
    get_run_logger().info("sampled %d of %d steps for the release's BLIS projection",
                          len(frame), sum(s.rows for s in summaries))
    return frame, memory()


# ------------------------------------------------------------- any family (sample fit)


@task(name="sample-for-fit", cache_policy=NO_CACHE)
def sample_for_fit(summaries: Sequence[shards.ShardSummary], max_rows: int
                   ) -> sampling.FitSample:
    """The bounded, deterministic sample of steps every non-PICF fit uses (at most
    ``max_rows``; evenly spaced by step id within each shard, read one at a time)."""
    sample = sampling.draw_fit_sample(summaries, max_rows)
    get_run_logger().info("fit sample: %d of %d steps (at most %d; %d in the temporal train "
                          "parts); worker peak RSS %.0f MB", sample.rows, sample.total_steps,
                          max_rows, int(sample.train.sum()), shards.peak_rss_mb())
    return sample


def _fit(family: str, summaries: Sequence[shards.ShardSummary],
         sample: sampling.FitSample | None, train: bool, held_config: str | None
         ) -> tuple[StepTimeModel | None, dict[str, Any]]:
    model = sampling.fit_scale_model(family, summaries, sample, train, held_config)
    rows = ("all steps' statistics" if family == sampling.EXACT_FAMILY
            else f"{len(sample.part(train, held_config)) if sample else 0} sampled steps")
    what = ("temporal train parts" if train else
            f"without {held_config}" if held_config else "everything")
    get_run_logger().info("%s %s: %s (%s)", family, what,
                          "fitted" if model is not None else "nothing to fit", rows)
    return model, memory()


@task(name="fit-family", task_run_name="fit {family} {part}", cache_policy=NO_CACHE)
def fit_family(family: str, summaries: Sequence[shards.ShardSummary],
               sample: sampling.FitSample | None, part: str = "all"
               ) -> tuple[StepTimeModel | None, dict[str, Any]]:
    """(model, worker memory): ``family`` fit on everything (``part`` "all") or on the
    temporal train parts ("train"); PICF from statistics, any other family on
    ``sample``. The model is None when there is nothing to fit on."""
    if part not in ("all", "train"):
        raise ValueError(f"part must be 'all' or 'train', got {part!r}")
    return _fit(family, summaries, sample, part == "train", None)


@task(name="fit-fold", task_run_name="fit-fold {family} {held_config}", cache_policy=NO_CACHE)
def fit_fold(family: str, summaries: Sequence[shards.ShardSummary],
             sample: sampling.FitSample | None, held_config: str
             ) -> tuple[StepTimeModel | None, dict[str, Any]]:
    """(model, worker memory): the leave-one-out fold of configuration ``held_config``'s
    experiments — ``family`` fit without that configuration (None: nothing left)."""
    return _fit(family, summaries, sample, False, held_config)


@task(name="score-shard", task_run_name="score {name}", cache_policy=NO_CACHE)
def score_shard(models: dict[str, sampling.ShardModels], item: shards.ShardSummary,
                name: str) -> tuple[dict[str, sampling.Scores], dict[str, Any]]:
    """(family → in-sample / temporal / LOO scores, worker memory) of experiment ``name``
    on all its steps, from one read of its shard."""
    scores = sampling.score_shard(models, item)
    logger = get_run_logger()
    for family, s in scores.items():
        loo = s["loo"]
        if loo is not None:
            logger.info("%s leave-one-out %s: MAPE %.1f%% (%d steps)", family, name,
                        loo["mape"], loo["n"])
    return scores, memory()
