"""The calibration recipe as plain library functions (no Prefect, no Ray).

discover → featurize (per experiment) → fit (global + per configuration) → evaluate →
release. ``flows/calibrate.py`` runs the same steps as Prefect tasks fanned out on Ray;
``blis-model fit`` runs them in-process through :func:`fit_corpus`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from blis_model.dataset import concat_frames, feature_frame, temporal_split
from blis_model.errors import CorpusError
from blis_model.experiment import Experiment, discover_experiments, load_experiment
from blis_model.ingest.reader import IngestReport, read_step_table, read_tables
from blis_model.metrics import per_experiment, summary
from blis_model.models.base import StepTimeModel
from blis_model.models.registry import DEFAULT_FAMILY, make_model
from blis_model.request_accuracy import RequestData
from blis_model.request_level import RequestSettings, overload, request_data

log = logging.getLogger(__name__)


@dataclass
class Featurized:
    """One experiment's feature frame and what its ingestion saw. ``requests``: its
    request data (journey/API traces; None for step-only traces)."""

    experiment: Experiment
    frame: pd.DataFrame
    report: IngestReport
    requests: RequestData | None = None


def load_experiments(corpus_url: str, options: dict | None = None,
                     default_hardware: str | None = None) -> list[Experiment]:
    """Every experiment under ``corpus_url`` with its configuration resolved.

    Raises CorpusError for an empty corpus and ConfigError (experiment, file, key) for
    any configuration problem — never a silent guess.
    """
    return [load_experiment(corpus_url, n, options, default_hardware)
            for n in experiment_names(corpus_url, options)]


def experiment_names(corpus_url: str, options: dict | None = None) -> list[str]:
    """Names (paths relative to the corpus) of its experiments, sorted; CorpusError if none.
    The flow loads each experiment's configuration in its own task."""
    names = discover_experiments(corpus_url, options)
    if not names:
        raise CorpusError(f"no experiments (folders with exp-config.yaml) under {corpus_url}")
    return names


def featurize(experiment: Experiment, options: dict | None = None,
              settings: RequestSettings | None = None) -> Featurized:
    """Stream the experiment's traces into its feature frame, in one pass. When the traces
    hold journey spans (and ``settings.requests`` is not False), also validate the request
    table read in that pass (CorpusError above ``settings.max_request_failure_rate``) and
    fill summary-only step compositions by journey reconstruction
    (``request_level.request_data``)."""
    if settings is not None and settings.requests is False:
        table, report = read_step_table(experiment, options)
        data = None
    else:
        table, report, requests = read_tables(experiment, options)
        data = request_data(experiment, table, requests, settings)
    if data is not None:
        table = data.steps
    return Featurized(experiment, feature_frame(experiment, table), report, data)


def split_overloaded(items: Sequence[Featurized], settings: RequestSettings | None = None
                     ) -> tuple[list[Featurized], dict[str, str]]:
    """(kept, excluded name → reason): with ``settings.exclude_overloaded``, experiments
    whose request data show a growing queue are left out of training."""
    settings = settings or RequestSettings()
    kept, excluded = [], {}
    for item in items:
        if settings.exclude_overloaded and item.requests is not None:
            ind, over = overload(item.requests, settings)
            if over:
                excluded[item.experiment.name] = (
                    f"overloaded: queue wait grows {ind['wait_growth']:.1f}x over the run "
                    f"(median {ind['wait_median_ms']:.0f} ms)")
                continue
        kept.append(item)
    if not kept:
        raise CorpusError("every experiment was excluded as overloaded: "
                          + "; ".join(f"{k}: {v}" for k, v in excluded.items()))
    return kept, excluded


def request_items(items: Sequence[Featurized]) -> list[RequestData]:
    """The request data of the experiments that have some."""
    return [i.requests for i in items if i.requests is not None]


def corpus_fingerprint(experiments: Sequence[Experiment]) -> str:
    """SHA-256 over experiment names, configuration keys and trace object identities."""
    h = hashlib.sha256()
    for e in sorted(experiments, key=lambda e: e.name):
        h.update(json.dumps([e.name, e.config_key, e.trace_identity], sort_keys=True).encode())
    return h.hexdigest()


def training_frame(items: Sequence[Featurized]) -> pd.DataFrame:
    """All steps of all experiments. Raises CorpusError when no usable step remains."""
    frame = concat_frames([i.frame for i in items])
    if frame.empty:
        raise CorpusError("no usable steps in the corpus (every step was missing, malformed "
                          "or had a non-positive duration)")
    return frame


def fit_model(frame: pd.DataFrame, family: str = DEFAULT_FAMILY,
              base: StepTimeModel | None = None, **params: Any) -> StepTimeModel:
    """Fit ``family`` on ``frame``; with ``base``, calibrate the base on ``frame`` instead."""
    if base is not None:
        return base.calibrate(frame)
    return make_model(family, **params).fit(frame)


def leave_one_experiment_out(frame: pd.DataFrame, family: str = DEFAULT_FAMILY,
                             **params: Any) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy: for each experiment, fit on the others (its configuration
    unseen) and predict it. Needs ≥ 2 experiments; returns {} otherwise."""
    names = sorted(frame["experiment"].unique())
    if len(names) < 2:
        return {}
    out = {}
    for name in names:
        fold = leave_one_out_fold(frame, name, family, **params)
        if fold is not None:
            out[name] = fold
    return out


def leave_one_out_fold(frame: pd.DataFrame, name: str, family: str = DEFAULT_FAMILY,
                       **params: Any) -> dict[str, float] | None:
    """One fold of :func:`leave_one_experiment_out`: fit on the experiments whose
    configuration differs from ``name``'s, predict ``name``. None when nothing is left
    to train on."""
    test = frame[frame["experiment"] == name]
    train = frame[(frame["experiment"] != name)
                  & (frame["config_key"] != test["config_key"].iloc[0])]
    if train.empty:
        return None
    model = make_model(family, **params).fit(train)
    return summary(model.predict(test), test["duration_us"].to_numpy())


def temporal_holdout(frame: pd.DataFrame, family: str = DEFAULT_FAMILY,
                     train_fraction: float = 0.7, **params: Any) -> dict[str, dict[str, float]]:
    """Within-experiment accuracy: fit on the first 70% of every experiment's steps
    (by step id), predict the last 30%."""
    train, test = temporal_split(frame, train_fraction)
    if train.empty or test.empty:
        return {}
    model = make_model(family, **params).fit(train)
    return per_experiment(test, model.predict(test))


def mean_metric(results: dict[str, dict[str, float]], key: str = "mape") -> float:
    values = [r[key] for r in results.values() if r.get("n")]
    return float(np.mean(values)) if values else float("nan")


def evaluate(frame: pd.DataFrame, model: StepTimeModel, family: str = DEFAULT_FAMILY, *,
             loo: dict[str, dict[str, float]] | None = None,
             temporal: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """The accuracy report stored in a release: in-sample, temporal and LOO per experiment.
    ``loo``/``temporal`` are computed here unless given (the flow runs them as tasks)."""
    in_sample = per_experiment(frame, model.predict(frame))
    loo = leave_one_experiment_out(frame, family) if loo is None else loo
    temporal = temporal_holdout(frame, family) if temporal is None else temporal
    return {
        "in_sample": in_sample,
        "temporal_holdout": temporal,
        "leave_one_experiment_out": loo,
        "summary": {"in_sample_mape": mean_metric(in_sample),
                    "temporal_mape": mean_metric(temporal),
                    "loo_mape": mean_metric(loo), "loo_median_ape": mean_metric(loo, "median_ape"),
                    "steps": int(len(frame))},
    }


ProgressFn = Callable[[str], None]
