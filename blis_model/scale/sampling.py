"""Any model family at scale: fit on a bounded deterministic sample, score on full shards.

PICF has sufficient statistics (``blis_model.scale.shards``): it is fit exactly from the summed
per-shard statistics. The other families (``overlap``, ``mole_rd``, ...) are nonlinear or
need the rows themselves, so at scale they are fit on a :class:`FitSample`: at most
``max_rows`` steps drawn from the shards, evenly spaced by step id within each experiment
with quotas proportional to its steps (``shards.sample_quotas``; every non-empty
experiment, hence every configuration and its whole time range, is represented). From
that one sample:

* the model is fit on every sampled row;
* the temporal-holdout model on the sampled rows in each experiment's first
  ``shards.TRAIN_FRACTION`` of steps (``ShardSummary.train_rows``);
* the leave-one-experiment-out fold of a configuration on the sample minus its rows.

Only the fits use the sample: :func:`score_shard` scores every family's models on ALL
steps of one experiment from one read of its shard. With ``max_rows`` ≥ the corpus's
steps the sample is the whole corpus, and everything equals the in-memory pipeline
(``pipeline.fit_model`` / ``leave_one_experiment_out`` / ``temporal_holdout``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from blis_model.calibration.selection import candidate_families
from blis_model.errors import CorpusError
from blis_model.features.frame import concat_frames
from blis_model.metrics import summary
from blis_model.models.base import StepTimeModel
from blis_model.models.registry import AUTO_FAMILY, check_family, make_model
from blis_model.scale import shards

EXACT_FAMILY = "picf"  # fit from sufficient statistics, never from the sample
MAX_FIT_ROWS = 100_000  # < 1 GB per worker for the sample-based fits (benchmarks/scale.py)
Scores = dict[str, dict[str, float] | None]  # kind (in_sample/temporal/loo) → summary


def families_for(family: str) -> list[str]:
    """The families to fit and score: every candidate for ``auto``, else ``family``."""
    name = check_family(family)
    return candidate_families() if name == AUTO_FAMILY else [name]


@dataclass(frozen=True, eq=False)
class FitSample:
    """The rows every sample-based fit uses. ``frame``: sampled rows, experiments in the
    summaries' order, each in step-id order; ``train``: per row, whether it lies in its
    experiment's temporal train part; ``total_steps``: steps of the shards it was drawn
    from; ``max_rows``: the bound it was drawn with."""

    frame: pd.DataFrame
    train: np.ndarray
    total_steps: int
    max_rows: int

    @property
    def rows(self) -> int:
        return len(self.frame)

    def part(self, train: bool = False, held_config: str | None = None) -> pd.DataFrame:
        """The rows to fit on: all, or the temporal train part (``train``), minus the rows
        of configuration ``held_config`` (a leave-one-out fold) when given."""
        keep = self.train.copy() if train else np.ones(len(self.frame), dtype=bool)
        if held_config is not None:
            keep &= (self.frame["config_key"] != held_config).to_numpy()
        return self.frame[keep] if not keep.all() else self.frame


def draw_fit_sample(summaries: Sequence[shards.ShardSummary], max_rows: int,
                    options: dict | None = None) -> FitSample:
    """At most ``max_rows`` steps (more only when there are more experiments than
    ``max_rows``: each keeps one), with the quotas of ``shards.sample_quotas`` and the rows
    of ``shards.sample_shard``, read one shard at a time: deterministic."""
    if max_rows < 1:
        raise ValueError(f"max_fit_rows must be ≥ 1, got {max_rows}")
    quotas = shards.sample_quotas(summaries, max_rows)
    frames, train = [], []
    for item in summaries:
        if not quotas.get(item.experiment):
            continue
        part = shards.sample_shard(item, quotas[item.experiment], options)
        positions = shards.sample_positions(item.rows, quotas[item.experiment])
        if len(positions) != len(part):
            raise CorpusError(f"shard of {item.experiment} has {len(part)} sampled rows, "
                              f"expected {len(positions)}")
        frames.append(part)
        train.append(positions < item.train_rows)
    frame = concat_frames(frames)
    mask = np.concatenate(train) if train else np.zeros(0, dtype=bool)
    return FitSample(frame, mask, sum(s.rows for s in summaries), max_rows)


def fit_on_sample(sample: FitSample, family: str, train: bool = False,
                  held_config: str | None = None) -> StepTimeModel | None:
    """``family`` fit on ``sample.part(train, held_config)`` (as ``make_model(family).fit``);
    None when those rows are empty."""
    rows = sample.part(train, held_config)
    return make_model(family).fit(rows) if len(rows) else None


def fit_picf_exact(summaries: Sequence[shards.ShardSummary], train: bool = False,
                   held_config: str | None = None) -> StepTimeModel | None:
    """PICF from the shard statistics (all steps, not a sample): as
    :func:`fit_on_sample` would on the whole corpus. None when no step is left."""
    if held_config is not None:
        if train:
            raise ValueError("a leave-one-out fold is fit on all steps, not the train part")
        return shards.picf_without_config(summaries, held_config)
    if not any(s.train_rows if train else s.rows for s in summaries):
        return None
    return shards.fit_picf_from_stats(summaries, train=train)


def fit_scale_model(family: str, summaries: Sequence[shards.ShardSummary],
                    sample: FitSample | None, train: bool = False,
                    held_config: str | None = None) -> StepTimeModel | None:
    """A model of ``family`` as the scale flow fits it: PICF exactly from statistics, any
    other family on ``sample``. ``train``: the temporal model; ``held_config``: the
    leave-one-out fold without that configuration. None: nothing to fit on."""
    if family == EXACT_FAMILY:
        return fit_picf_exact(summaries, train, held_config)
    if sample is None:
        raise ValueError(f"family {family} is fit on a sample of steps; none was drawn")
    return fit_on_sample(sample, family, train, held_config)


@dataclass(frozen=True)
class ShardModels:
    """One family's models for scoring one experiment: fit on everything (``model``), on
    the temporal train parts (``temporal``) and without the experiment's configuration
    (``loo``; None when no other configuration has steps)."""

    model: StepTimeModel
    temporal: StepTimeModel | None
    loo: StepTimeModel | None


def _score(model: StepTimeModel | None, frame: pd.DataFrame) -> dict[str, float] | None:
    if model is None or not len(frame):
        return None
    return summary(model.predict(frame), frame["duration_us"].to_numpy())


def score_shard(models: Mapping[str, ShardModels], item: shards.ShardSummary,
                options: dict | None = None) -> dict[str, Scores]:
    """Family → {in_sample, temporal, loo} scores (``metrics.summary``; None when not
    applicable) of experiment ``item`` on ALL its steps, from one read of its shard.
    Temporal scores the rows after its train part (``item.train_rows``)."""
    frame = shards.read_shard(item.shard_url, None, options)
    test = frame.iloc[item.train_rows:]
    return {family: {"in_sample": _score(m.model, frame), "temporal": _score(m.temporal, test),
                     "loo": _score(m.loo, frame)}
            for family, m in models.items()}


def sample_size(summaries: Sequence[shards.ShardSummary], max_rows: int) -> tuple[int, int]:
    """(rows, temporal-train rows) of :func:`draw_fit_sample`'s sample, from the summaries
    alone (the driver describes the sample without holding it)."""
    quotas = shards.sample_quotas(summaries, max_rows)
    rows = train = 0
    for item in summaries:
        positions = shards.sample_positions(item.rows, quotas.get(item.experiment, 0))
        rows += len(positions)
        train += int((positions < item.train_rows).sum())
    return rows, train


def fit_description(family: str, total_steps: int, sample_rows: int | None = None,
                    train_rows: int = 0, max_rows: int | None = None) -> str:
    """Which rows the fit of ``family`` used, for the release's ``metrics.scale.fit``
    (``sample_rows``/``train_rows``/``max_rows``: the fit sample, see :func:`sample_size`)."""
    if family == EXACT_FAMILY or sample_rows is None:
        return f"exact sufficient statistics over all {total_steps} steps"
    return (f"a deterministic sample of {sample_rows} of {total_steps} steps (at most "
            f"{max_rows}; evenly spaced by step id within each experiment, quotas "
            "proportional to its steps): the model on every sampled step, the temporal "
            f"model on the {train_rows} sampled steps in each experiment's first "
            f"{shards.TRAIN_FRACTION:.0%}, each leave-one-out fold on the sample minus the "
            "held-out configuration; every score uses all steps")


__all__ = ["EXACT_FAMILY", "MAX_FIT_ROWS", "FitSample", "ShardModels",
           "draw_fit_sample", "families_for", "fit_description", "fit_on_sample",
           "fit_picf_exact", "fit_scale_model", "sample_size",
           "score_shard"]
