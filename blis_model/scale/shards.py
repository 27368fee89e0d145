"""Per-experiment Parquet shards and per-shard sufficient statistics: fitting at scale.

A corpus of millions of steps is never held in one frame. Each experiment is featurized
on its own (``featurize.featurize``, streaming its trace object line by line) into a
Parquet *shard* of its feature frame (sorted by step id), and summarised by a
:class:`ShardSummary`: counts, its ingest report, and the ``RelativeGram`` sufficient
statistics of the PICF feature set — over all its steps and over the first 70% of them
(the temporal-holdout train part), each also per time block (``models.config_terms``:
the shard's steps by step id cut in equal contiguous blocks). Statistics add up, so:

* :func:`fit_picf_from_stats` fits PICF (global set from the summed statistics; each
  configuration's choice of terms — by time-ordered cross-validation — from that
  configuration's summed block statistics) exactly as ``PICF.fit`` on the concatenated
  frames would;
* :func:`loo_fold_from_stats` fits a leave-one-experiment-out fold from the statistics of
  the other configurations and predicts the held-out experiment by reading its shard only;
* :func:`temporal_from_stats` and :func:`in_sample_from_shard` score one shard at a time.

Memory is bounded by one experiment's frame, whatever the corpus size. Shards are keyed
by ``feature_cache.cache_key`` (object identities, settings, code fingerprint), so an
unchanged experiment is never featurized again: its summary (written last, the commit
marker) is read back instead.
"""

from __future__ import annotations

import io
import json
import math
import resource
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from blis_model.calibration import evaluation, featurize
from blis_model.configuration.defaults import TRAIN_FRACTION
from blis_model.configuration.experiment import Experiment
from blis_model.errors import CorpusError
from blis_model.features.physics import PHYSICS_FEATURES
from blis_model.metrics import summary
from blis_model.models.base import design, priors
from blis_model.models.config_terms import N_BLOCKS, block_of_positions
from blis_model.models.picf import PICF, block_statistics
from blis_model.models.solvers import RelativeGram, nonneg_ridge
from blis_model.requests.stage import AlphaSample, RequestSettings, data_report
from blis_model.storage import filesystem, join, redact, storage_errors, write_bytes_atomic

SHARD_DIR = "shards"
SUMMARY_FORMAT = 3
ID_COLUMNS = ("experiment", "config_key", "step_id", "duration_us")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _gram_to_dict(g: RelativeGram) -> dict[str, Any]:
    return {"gram": g.gram.tolist(), "moment": g.moment.tolist(), "sum_w": g.sum_w,
            "sq_norm": g.sq_norm.tolist()}


def _gram_from_dict(d: Mapping[str, Any]) -> RelativeGram:
    return RelativeGram(np.asarray(d["gram"], dtype=np.float64),
                        np.asarray(d["moment"], dtype=np.float64), float(d["sum_w"]),
                        np.asarray(d["sq_norm"], dtype=np.float64))


def empty_gram(p: int) -> RelativeGram:
    return RelativeGram(np.zeros((p, p)), np.zeros(p), 0.0, np.zeros(p))


def total(stats: Iterable[RelativeGram], p: int) -> RelativeGram:
    """Sum of statistics (an all-zero one when there are none)."""
    out = empty_gram(p)
    for s in stats:
        out = out + s
    return out


@dataclass(frozen=True)
class ShardSummary:
    """One experiment's shard: where it is, its row counts, its ingest report (dict) and
    the PICF statistics over all rows (``stats``) and the temporal train part
    (``train_stats``, the first ``train_rows`` rows by step id), and the same per time
    block (``block_stats``, ``train_block_stats``: ``models.config_terms.N_BLOCKS``
    each). ``seconds`` and ``peak_rss_mb`` describe the featurization that wrote it
    (``from_cache`` when it was read back instead)."""

    experiment: str
    config_key: str
    shard_url: str
    rows: int
    train_rows: int
    features: tuple[str, ...]
    stats: RelativeGram
    train_stats: RelativeGram
    report: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    from_cache: bool = False
    requests: dict[str, Any] | None = None  # requests.stage.data_report; None: no journeys
    block_stats: tuple[RelativeGram, ...] = ()
    train_block_stats: tuple[RelativeGram, ...] = ()

    @property
    def alpha_url(self) -> str:
        """The request table's alpha inputs (``requests.stage.ALPHA_COLUMNS``), Parquet."""
        return self.shard_url.removesuffix(".parquet") + ".requests.parquet"

    def to_dict(self) -> dict[str, Any]:
        return {"format": SUMMARY_FORMAT, "experiment": self.experiment,
                "config_key": self.config_key, "shard_url": redact(self.shard_url),
                "rows": self.rows, "train_rows": self.train_rows,
                "features": list(self.features), "stats": _gram_to_dict(self.stats),
                "train_stats": _gram_to_dict(self.train_stats), "report": self.report,
                "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb,
                "requests": self.requests,
                "block_stats": [_gram_to_dict(g) for g in self.block_stats],
                "train_block_stats": [_gram_to_dict(g) for g in self.train_block_stats]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], shard_url: str) -> ShardSummary:
        if d.get("format") != SUMMARY_FORMAT:
            raise ValueError(f"shard summary format {d.get('format')!r}")
        return cls(d["experiment"], d["config_key"], shard_url, int(d["rows"]),
                   int(d["train_rows"]), tuple(d["features"]), _gram_from_dict(d["stats"]),
                   _gram_from_dict(d["train_stats"]), dict(d["report"]),
                   float(d["seconds"]), float(d["peak_rss_mb"]), from_cache=True,
                   requests=d.get("requests"),
                   block_stats=tuple(_gram_from_dict(g) for g in d["block_stats"]),
                   train_block_stats=tuple(_gram_from_dict(g) for g in d["train_block_stats"]))


def summary_url(shard_url: str) -> str:
    return shard_url.removesuffix(".parquet") + ".summary.json"


def shard_url_for(work_url: str, key: str) -> str:
    """Where the shard of cache key ``key`` lives under the work URL."""
    return join(work_url, SHARD_DIR, f"{key}.parquet")


def _sorted_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("step_id", kind="stable").reset_index(drop=True)


def frame_stats(frame: pd.DataFrame, features: Sequence[str]) -> RelativeGram:
    """PICF statistics of a feature frame (rows scaled by 1/duration)."""
    if not len(frame):
        return empty_gram(len(features))
    return RelativeGram.from_rows(design(frame, features), frame["duration_us"].to_numpy())


def frame_block_stats(frame: pd.DataFrame, features: Sequence[str]) -> tuple[RelativeGram, ...]:
    """PICF statistics of each time block of a frame sorted by step id (as
    ``models.picf.block_statistics`` on one experiment)."""
    if not len(frame):
        return tuple(empty_gram(len(features)) for _ in range(N_BLOCKS))
    return tuple(block_statistics(frame, frame["duration_us"].to_numpy(), features,
                                  block_of_positions(len(frame))))


def train_rows(n: int, train_fraction: float = TRAIN_FRACTION) -> int:
    """Rows of the temporal train part (as ``dataset.temporal_split``)."""
    return int(round(train_fraction * n))


def featurize_to_shard(experiment: Experiment, shard_url: str, options: dict | None = None,
                       settings: Any = None, features: Sequence[str] = PHYSICS_FEATURES,
                       store_options: dict | None = None) -> ShardSummary:
    """Featurize one experiment (streaming its traces) into a Parquet shard at
    ``shard_url`` and return its summary (also written next to it, last)."""
    started = time.perf_counter()
    item = featurize.featurize(experiment, options, settings)
    frame = _sorted_frame(item.frame)
    features = tuple(features)
    k = train_rows(len(frame))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf,
                   compression="zstd")
    write_bytes_atomic(shard_url, buf.getvalue(), store_options)
    del buf
    request_report = None
    if item.requests is not None:
        request_report = data_report(item.requests, settings or RequestSettings())
        alphas = io.BytesIO()
        pq.write_table(AlphaSample.of(item.requests).requests, alphas, compression="zstd")
        write_bytes_atomic(shard_url.removesuffix(".parquet") + ".requests.parquet",
                           alphas.getvalue(), store_options)
    result = ShardSummary(
        experiment=experiment.name, config_key=experiment.config_key, shard_url=shard_url,
        rows=len(frame), train_rows=k, features=features,
        stats=frame_stats(frame, features), train_stats=frame_stats(frame.iloc[:k], features),
        report=item.report.to_dict(max_problems=20),
        seconds=time.perf_counter() - started, peak_rss_mb=peak_rss_mb(),
        requests=request_report, block_stats=frame_block_stats(frame, features),
        train_block_stats=frame_block_stats(frame.iloc[:k], features))
    write_bytes_atomic(summary_url(shard_url), json.dumps(result.to_dict()).encode(),
                       store_options)
    return result


def load_summary(shard_url: str, options: dict | None = None) -> ShardSummary | None:
    """The committed summary of the shard at ``shard_url``, or None (missing/unreadable)."""
    url = summary_url(shard_url)
    fs, path = filesystem(url, options)
    try:
        with storage_errors(url, options):
            fs.invalidate_cache(path)
            raw = fs.cat_file(path)
        return ShardSummary.from_dict(json.loads(raw), shard_url)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def alpha_sample(summary: ShardSummary, options: dict | None = None) -> AlphaSample | None:
    """The experiment's alpha inputs written next to its shard (None without journeys)."""
    if summary.requests is None:
        return None
    fs, path = filesystem(summary.alpha_url, options)
    with storage_errors(summary.alpha_url, options), fs.open(path, "rb") as fh:
        table = pq.read_table(fh)
    return AlphaSample(summary.experiment, summary.config_key, table)


def read_shard(shard_url: str, columns: Sequence[str] | None = None,
               options: dict | None = None) -> pd.DataFrame:
    """The shard's frame (only ``columns`` when given)."""
    fs, path = filesystem(shard_url, options)
    with storage_errors(shard_url, options), fs.open(path, "rb") as fh:
        table = pq.read_table(fh, columns=list(columns) if columns else None)
    return table.to_pandas()


def _scoring_columns(features: Sequence[str]) -> list[str]:
    return [*ID_COLUMNS, *[f for f in features if f not in ID_COLUMNS]]


# ------------------------------------------------------------------------- fitting


def _picf_from_total(global_stats: RelativeGram,
                     per_config: Mapping[str, Sequence[RelativeGram]],
                     features: Sequence[str], **params: Any) -> PICF:
    """PICF from summed statistics: the global set, then every configuration's choice of
    terms from its summed block statistics (``PICF.fit_config_sets_from_blocks``)."""
    model = PICF(features=tuple(features), **params)
    names = list(model.features)
    if global_stats.sum_w <= 0:
        raise CorpusError("no usable steps in the shards")
    model.coef_ = nonneg_ridge(global_stats, priors(names),
                               model._global_penalty(global_stats.sum_w))
    model.n_features_in_ = len(names)
    return model.fit_config_sets_from_blocks(dict(per_config))


def config_stats(summaries: Sequence[ShardSummary], train: bool = False
                 ) -> dict[str, RelativeGram]:
    """Statistics summed per configuration key (``train``: temporal train parts)."""
    p = len(summaries[0].features) if summaries else 0
    out: dict[str, RelativeGram] = {}
    for s in summaries:
        out[s.config_key] = out.get(s.config_key, empty_gram(p)) + (
            s.train_stats if train else s.stats)
    return out


def config_block_stats(summaries: Sequence[ShardSummary], train: bool = False
                       ) -> dict[str, list[RelativeGram]]:
    """Block statistics summed per configuration key and block (``train``: of the
    temporal train parts)."""
    p = len(summaries[0].features) if summaries else 0
    out: dict[str, list[RelativeGram]] = {}
    for s in summaries:
        blocks = s.train_block_stats if train else s.block_stats
        if len(blocks) != N_BLOCKS:
            raise CorpusError(f"shard summary of {s.experiment} has no block statistics")
        have = out.setdefault(s.config_key, [empty_gram(p) for _ in range(N_BLOCKS)])
        out[s.config_key] = [a + b for a, b in zip(have, blocks, strict=True)]
    return out


def _features(summaries: Sequence[ShardSummary]) -> tuple[str, ...]:
    if not summaries:
        raise CorpusError("no shards to fit")
    features = summaries[0].features
    if any(s.features != features for s in summaries):
        raise CorpusError("shards were featurized with different feature sets")
    return features


def fit_picf_from_stats(summaries: Sequence[ShardSummary], train: bool = False,
                        **params: Any) -> PICF:
    """PICF fit from summed shard statistics: equals ``PICF(**params).fit`` on the
    concatenated shard frames (``train``: on their temporal train parts)."""
    features = _features(summaries)
    per = config_stats(summaries, train)
    return _picf_from_total(total(per.values(), len(features)),
                            config_block_stats(summaries, train), features, **params)


def in_sample_from_shard(model: PICF, item: ShardSummary, options: dict | None = None
                         ) -> dict[str, float]:
    """Accuracy summary of ``model`` on all rows of one shard (reads that shard only)."""
    frame = read_shard(item.shard_url, _scoring_columns(item.features), options)
    return summary(model.predict(frame), frame["duration_us"].to_numpy())


def picf_without_config(summaries: Sequence[ShardSummary], config_key: str, **params: Any
                        ) -> PICF | None:
    """PICF fit on the statistics of every configuration but ``config_key``: the
    leave-one-out fold of its experiments. None when no other configuration has steps."""
    features = _features(summaries)
    others = [s for s in summaries if s.config_key != config_key]
    per = config_stats(others)
    train = total(per.values(), len(features))
    if train.sum_w <= 0:
        return None
    return _picf_from_total(train, config_block_stats(others), features, **params)


def _held(summaries: Sequence[ShardSummary], name: str) -> ShardSummary:
    held = next((s for s in summaries if s.experiment == name), None)
    if held is None:
        raise CorpusError(f"no shard for experiment {name}")
    return held


def loo_fold_from_stats(summaries: Sequence[ShardSummary], name: str,
                        options: dict | None = None, **params: Any) -> dict[str, float] | None:
    """Leave-one-experiment-out fold ``name`` (as ``evaluation.leave_one_out_fold``): fit on
    the statistics of every other configuration, predict ``name``'s shard. None when no
    other configuration has steps."""
    held = _held(summaries, name)
    model = picf_without_config(summaries, held.config_key, **params) if held.rows else None
    return None if model is None else in_sample_from_shard(model, held, options)


def loo_from_stats(summaries: Sequence[ShardSummary], options: dict | None = None,
                   **params: Any) -> dict[str, dict[str, float]]:
    """Every fold of :func:`loo_fold_from_stats` (needs ≥ 2 experiments with steps)."""
    names = sorted(s.experiment for s in summaries if s.rows)
    if len(names) < 2:
        return {}
    out = {}
    for name in names:
        fold = loo_fold_from_stats(summaries, name, options, **params)
        if fold is not None:
            out[name] = fold
    return out


def temporal_from_shard(model: PICF, item: ShardSummary, options: dict | None = None
                        ) -> dict[str, float] | None:
    """Temporal-holdout score of one shard: ``model`` (fit on every shard's train part)
    on the rows after its train part. None when it has none."""
    if item.rows <= item.train_rows:
        return None
    frame = read_shard(item.shard_url, _scoring_columns(item.features), options)
    test = frame.iloc[item.train_rows:]
    return summary(model.predict(test), test["duration_us"].to_numpy())


def temporal_from_stats(summaries: Sequence[ShardSummary], options: dict | None = None,
                        **params: Any) -> dict[str, dict[str, float]]:
    """``evaluation.temporal_holdout`` for PICF from shard statistics, one shard at a time."""
    if not any(s.train_rows for s in summaries):
        return {}
    model = fit_picf_from_stats(summaries, train=True, **params)
    out = {}
    for item in sorted(summaries, key=lambda s: s.experiment):
        score = temporal_from_shard(model, item, options)
        if score is not None:
            out[item.experiment] = score
    return out


def sample_quotas(summaries: Sequence[ShardSummary], max_rows: int) -> dict[str, int]:
    """Rows to sample from each shard: proportional to its rows, at most ``max_rows`` in
    all (each non-empty shard gets at least one)."""
    n = sum(s.rows for s in summaries)
    if n <= max_rows:
        return {s.experiment: s.rows for s in summaries}
    return {s.experiment: min(s.rows, max(1, math.floor(max_rows * s.rows / n)))
            for s in summaries}


def sample_positions(n: int, rows: int) -> np.ndarray:
    """Positions (0-based, by step id) of ``rows`` evenly spaced rows of an ``n``-row
    shard, first and last included: all of them when ``rows`` ≥ ``n``. Deterministic."""
    if rows >= n:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, rows).round().astype(np.int64))


def sample_shard(item: ShardSummary, rows: int, options: dict | None = None) -> pd.DataFrame:
    """The :func:`sample_positions` rows of one shard."""
    frame = read_shard(item.shard_url, None, options)
    if rows >= len(frame):
        return frame
    return frame.iloc[sample_positions(len(frame), rows)].reset_index(drop=True)


def evaluation_from_parts(in_sample: Mapping[str, Mapping[str, float]],
                          loo: Mapping[str, Mapping[str, float]],
                          temporal: Mapping[str, Mapping[str, float]], steps: int,
                          sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The release evaluation (as ``evaluation.evaluate``) from per-shard scores, with a
    ``sampling`` block saying which rows the BLIS projection was computed on."""
    return {
        "in_sample": dict(sorted(in_sample.items())),
        "temporal_holdout": dict(sorted(temporal.items())),
        "leave_one_experiment_out": dict(sorted(loo.items())),
        "summary": {"in_sample_mape": evaluation.mean_metric(dict(in_sample)),
                    "temporal_mape": evaluation.mean_metric(dict(temporal)),
                    "loo_mape": evaluation.mean_metric(dict(loo)),
                    "loo_median_ape": evaluation.mean_metric(dict(loo), "median_ape"),
                    "steps": int(steps)},
        "scale": dict(sampling),
    }


__all__ = ["ShardSummary", "featurize_to_shard", "fit_picf_from_stats", "load_summary",
           "loo_fold_from_stats", "loo_from_stats", "picf_without_config", "read_shard",
           "sample_positions", "sample_shard", "shard_url_for", "temporal_from_stats"]

