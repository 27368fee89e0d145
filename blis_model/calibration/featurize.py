"""From a corpus to what the fits consume: experiments discovered, each featurized in one
pass over its traces (step table, request table, journey reconstruction, features).

``featurize`` is the unit of work the calibration fans out (one experiment per task);
what it returns is cached by ``calibration.cache`` under :data:`FEATURIZATION_VERSION`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from blis_model.configuration.experiment import Experiment, discover_experiments, load_experiment
from blis_model.configuration.kinds import MEASUREMENTS, TRACES, experiment_kinds
from blis_model.errors import CorpusError
from blis_model.features.frame import concat_frames, feature_frame
from blis_model.ingest.reader import IngestReport, read_step_table, read_tables
from blis_model.requests.accuracy import RequestData
from blis_model.requests.stage import RequestSettings, overload, request_data
from blis_model.storage import join, redact

log = logging.getLogger(__name__)

#: Version of what :func:`featurize` returns (step table, request data, features). Bump
#: it whenever ingest, reconstruction or a feature changes its output: cached
#: featurizations (``calibration.cache``, ``scale.shards``) of another version are
#: recomputed. Editing anything else (the CLI, a model family) keeps the cache valid.
FEATURIZATION_VERSION = "2026-12-02.1"


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


def split_kinds(corpus_url: str, names: Sequence[str], options: dict | None = None
                ) -> tuple[list[str], list[str]]:
    """(experiments with step/journey traces, experiments with client request measurements
    and no traces) — a corpus may mix both; a folder holding neither is skipped with a
    warning. CorpusError when no experiment holds either."""
    traces, measured = [], []
    for name in names:
        kinds = experiment_kinds(corpus_url if name == "." else join(corpus_url, name), options)
        if not kinds:
            log.warning("%s holds neither traces.json[.gz] nor request measurements "
                        "(requests.json[.gz], per_request_lifecycle_metrics.json): skipped",
                        name)
            continue
        (measured if MEASUREMENTS in kinds and TRACES not in kinds else traces).append(name)
    if not traces and not measured:
        raise CorpusError(f"no experiment under {redact(corpus_url)} holds traces "
                          "(traces.json[.gz]) or request measurements (requests.json[.gz])")
    return traces, measured


def featurize(experiment: Experiment, options: dict | None = None,
              settings: RequestSettings | None = None) -> Featurized:
    """Stream the experiment's traces into its feature frame, in one pass. When the traces
    hold journey spans (and ``settings.requests`` is not False), also validate the request
    table read in that pass (CorpusError above ``settings.max_request_failure_rate``) and
    fill summary-only step compositions by journey reconstruction
    (``requests.stage.request_data``)."""
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


def training_frame(items: Sequence[Featurized]) -> pd.DataFrame:
    """All steps of all experiments. Raises CorpusError when no usable step remains."""
    frame = concat_frames([i.frame for i in items])
    if frame.empty:
        raise CorpusError("no usable steps in the corpus (every step was missing, malformed "
                          "or had a non-positive duration)")
    return frame
