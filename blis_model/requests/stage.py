"""Request-level stage of the calibration: journey/API traces → validated request tables,
journey-reconstructed step batches, fitted alphas and TTFT / ITL / E2E accuracy.

Only experiments whose traces hold journey spans take this path; ``pipeline.featurize``
reads them in the same pass as the steps (``ingest.reader.read_tables``) and hands them to
:func:`request_data`; step-only traces are featurized exactly as before. Used by
``pipeline.featurize``, ``blis-model fit`` and the calibrate flow's tasks alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from blis_model.configuration.defaults import MAX_REQUEST_FAILURE_RATE, TRAIN_FRACTION
from blis_model.configuration.experiment import Experiment
from blis_model.errors import ConfigError, CorpusError
from blis_model.ingest.reconstruct import (
    ReconstructionReport,
    compare_with_snapshots,
    compare_with_summaries,
    fill_compositions,
    reconstruct_steps,
)
from blis_model.ingest.requests import overload_indicators, validate_requests
from blis_model.models.base import StepTimeModel
from blis_model.requests.accuracy import (
    METRICS,
    RequestData,
    full_step_table,
    predict_requests,
    request_accuracy,
    temporal_request_holdout,
)
from blis_model.requests.alphas import AlphaFit, alpha_errors, fit_alphas

DEFAULT_ALPHA_SOURCE = ("BLIS shipped defaults (iter29), NOT fit: the corpus has no "
                        "request-level (journey + API) traces")  # = release.ALPHA_SOURCE


@dataclass(frozen=True)
class RequestSettings:
    """Knobs of the request-level stage.

    ``requests``: None (default) or True reads journey/API spans in the steps' pass (used
    when the trace has journey spans), False never does. ``max_request_failure_rate`` (0..1;
    None disables the gate): share of an experiment's requests allowed to fail validation.
    ``exclude_overloaded``: leave out of training the experiments whose queue wait keeps
    growing (last third's median wait over the first third's > ``overload_wait_growth`` and
    median wait > ``overload_min_wait_ms``). ``alpha_method``: ``median`` (robust) or ``mean``.
    """

    requests: bool | None = None
    max_request_failure_rate: float | None = MAX_REQUEST_FAILURE_RATE
    exclude_overloaded: bool = False
    overload_wait_growth: float = 5.0
    overload_min_wait_ms: float = 50.0
    alpha_method: str = "median"
    train_fraction: float = TRAIN_FRACTION

    def __post_init__(self) -> None:
        rate = self.max_request_failure_rate
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ConfigError(f"must be in [0, 1], got {rate!r}", key="max_request_failure_rate")
        if self.alpha_method not in ("median", "mean"):
            raise ConfigError(f"must be 'median' or 'mean', got {self.alpha_method!r}",
                              key="alpha_method")


# --------------------------------------------------------------------------- ingest


def request_data(experiment: Experiment, steps: pa.Table, requests: pa.Table,
                 settings: RequestSettings | None = None) -> RequestData | None:
    """The experiment's request data from its step and request tables, ``steps``'
    summary-only rows filled by journey reconstruction; None when ``requests`` has no
    journey. Raises CorpusError when too many requests fail validation."""
    settings = settings or RequestSettings()
    if requests.column("request_id").null_count == requests.num_rows:
        return None  # no journey tracing: API spans alone give neither alphas nor batches
    mnbt = experiment.server.max_num_batched_tokens
    validation = validate_requests(requests, experiment.name, max_num_batched_tokens=mnbt)
    if settings.max_request_failure_rate is not None:
        validation.check(settings.max_request_failure_rate)
    rebuilt, report = reconstruct_steps(requests, mnbt, block_size=experiment.server.block_size)
    report.agreement = reconstruction_agreement(steps, rebuilt, report)
    # only a schedule rebuilt from journeys replaces the summary estimate (API-only traces
    # rebuild nothing)
    filled = fill_compositions(steps, rebuilt) if steps.num_rows and report.requests_used else steps
    return RequestData(experiment, filled, requests,
                       full_step_table(filled, rebuilt, experiment.name), validation, report)


def reconstruction_agreement(steps: pa.Table, rebuilt: pa.Table,
                             report: ReconstructionReport) -> dict[str, Any]:
    """How the journey reconstruction agrees with the traced steps: per compared column,
    exact-match share and relative error of the total, on the steps with snapshots
    (``snapshots``, None without any) and on every traced step's batch-summary counts
    (``summaries``, None without traced steps or without a rebuilt schedule)."""
    if not steps.num_rows or not report.requests_used:
        return {"snapshots": None, "summaries": None}
    snap = compare_with_snapshots(steps, rebuilt)
    return {"snapshots": snap if snap["steps"] else None,
            "summaries": compare_with_summaries(steps, rebuilt)}


def overload(data: RequestData, settings: RequestSettings) -> tuple[dict[str, float], bool]:
    """Overload indicators of an experiment and whether they cross the settings' limits."""
    ind = overload_indicators(data.requests)
    growth, wait = ind.get("wait_growth", float("nan")), ind.get("wait_median_ms", float("nan"))
    over = bool(growth > settings.overload_wait_growth and wait > settings.overload_min_wait_ms)
    return ind, over


def data_report(data: RequestData, settings: RequestSettings) -> dict[str, Any]:
    """JSON-able per-experiment summary: validation, overload and reconstruction."""
    indicators, over = overload(data, settings)
    rec = data.reconstruction
    comp = data.steps.column("composition").to_pylist() if data.steps.num_rows else []
    return {"validation": data.validation.to_dict(), "overload": indicators, "overloaded": over,
            "steps_reconstructed": int(sum(c == "journey" for c in comp)),
            "reconstruction": {"requests_used": rec.requests_used,
                               "requests_skipped": dict(rec.requests_skipped),
                               "segments": rec.segments, "forced_chunks": rec.forced_chunks,
                               "agreement": rec.agreement}}


# --------------------------------------------------------------------------- alphas


@dataclass(frozen=True)
class AlphaReport:
    """Alphas of a release: the pooled fit (what BLIS's defaults.yaml gets) and one per
    configuration; ``source`` says where the BLIS alphas come from."""

    pooled: AlphaFit | None
    per_config: dict[str, AlphaFit] = field(default_factory=dict)
    errors: dict[str, Any] = field(default_factory=dict)
    source: str = DEFAULT_ALPHA_SOURCE

    @property
    def blis_alphas(self) -> tuple[float, float, float] | None:
        return self.pooled.blis_alphas if self.pooled else None

    def to_dict(self) -> dict[str, Any]:
        return {"fit": self.pooled is not None, "source": self.source,
                "method": self.pooled.method if self.pooled else None,
                "pooled": self.pooled.to_dict() if self.pooled else None,
                "per_config": {k: v.to_dict() for k, v in sorted(self.per_config.items())},
                "errors": self.errors}


def _concat(tables: Sequence[pa.Table]) -> pa.Table:
    return pa.concat_tables(list(tables)) if len(tables) > 1 else tables[0]


ALPHA_COLUMNS: tuple[str, ...] = ("prompt_tokens", "output_tokens", "pre_queue_us",
                                  "post_finish_us")
"""What an alpha fit reads of a request table (a few numbers per request)."""


@dataclass(frozen=True)
class AlphaSample:
    """One experiment's alpha inputs: its name, configuration key and the
    :data:`ALPHA_COLUMNS` of its request table (small enough to gather at any scale)."""

    experiment: str
    config_key: str
    requests: pa.Table

    @classmethod
    def of(cls, data: RequestData) -> AlphaSample:
        return cls(data.experiment.name, data.experiment.config_key,
                   data.requests.select(list(ALPHA_COLUMNS)))


def fit_release_alphas(samples: Sequence[AlphaSample], method: str = "median") -> AlphaReport:
    """Robust alpha fits pooled over every experiment and per configuration; BLIS defaults
    (``pooled`` None) when there are no request data or no request has both timestamps."""
    data = [d for d in samples if d.requests.num_rows]
    if not data:
        return AlphaReport(None)
    try:
        pooled = fit_alphas(_concat([d.requests for d in data]), method)
    except CorpusError as exc:
        return AlphaReport(None, source=f"BLIS shipped defaults (iter29), NOT fit: {exc}")
    per_config: dict[str, AlphaFit] = {}
    for key in sorted({d.config_key for d in data}):
        part = [d.requests for d in data if d.config_key == key]
        try:
            per_config[key] = fit_alphas(_concat(part), method)
        except CorpusError:
            continue
    errors = {d.experiment: alpha_errors(pooled, d.requests) for d in data}
    source = (f"fit on {pooled.n_pre_queue} requests' journey + API timestamps of {len(data)} "
              f"experiment(s) ({method} regression; per configuration in coefficients.json)")
    return AlphaReport(pooled, per_config, errors, source)


# ------------------------------------------------------------------------- accuracy


def _mean(results: Mapping[str, Mapping[str, Any]], metric: str) -> float:
    values = [r[metric]["mape"] for r in results.values()
              if isinstance(r.get(metric), Mapping) and r[metric].get("n")]
    return float(np.mean(values)) if values else float("nan")


def in_sample_requests(data: Sequence[RequestData], model: StepTimeModel, alphas: AlphaFit
                       ) -> dict[str, dict[str, dict[str, float]]]:
    """TTFT / ITL / E2E accuracy per experiment, teacher-forced with ``model`` and
    ``alphas`` on every request (skipped when its steps are not contiguous)."""
    out = {}
    for d in data:
        try:
            per_request = predict_requests(d, model, alphas)
        except ValueError:
            continue
        out[d.experiment.name] = request_accuracy(per_request)
    return out


def request_evaluation(data: Sequence[RequestData], model: StepTimeModel, family: str,
                       alphas: AlphaReport, train_fraction: float = TRAIN_FRACTION
                       ) -> dict[str, Any]:
    """The release's request-level accuracy (empty when there are no request data):
    in-sample with the release's model and pooled alphas, and the temporal holdout (model
    and alphas refit on the first ``train_fraction`` of every experiment)."""
    data = [d for d in data if d.requests.num_rows]
    if not data or alphas.pooled is None:
        return {}
    in_sample = in_sample_requests(data, model, alphas.pooled)
    try:
        temporal = temporal_request_holdout(data, family, train_fraction)
    except (ValueError, CorpusError):
        temporal = {}
    return {
        "in_sample": in_sample, "temporal_holdout": temporal,
        "summary": {**{f"{m}_mape": _mean(in_sample, m) for m in METRICS},
                    **{f"temporal_{m}_mape": _mean(temporal, m) for m in METRICS},
                    "experiments": len(data),
                    "requests": int(sum(d.requests.num_rows for d in data))},
    }


# ---------------------------------------------------------------------------- stage


def release_block(reports: Mapping[str, Mapping[str, Any]], alphas: AlphaReport,
                  settings: RequestSettings | None = None,
                  excluded: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The manifest's ``request_level`` section: alpha fits, per-experiment validation /
    overload / reconstruction (``reports``: :func:`data_report` by experiment),
    experiments excluded from training and the settings."""
    settings = settings or RequestSettings()
    return {"alphas": alphas.to_dict(),
            "experiments": {name: dict(reports[name]) for name in sorted(reports)},
            "excluded": dict(sorted((excluded or {}).items())),
            "settings": {"max_request_failure_rate": settings.max_request_failure_rate,
                         "exclude_overloaded": settings.exclude_overloaded,
                         "overload_wait_growth": settings.overload_wait_growth,
                         "overload_min_wait_ms": settings.overload_min_wait_ms,
                         "alpha_method": settings.alpha_method}}


@dataclass(frozen=True)
class RequestStage:
    """What the request level adds to a release: its alphas, the evaluation entries
    (``{"request_level": ...}``, empty without request data) and the manifest section
    (None without request data)."""

    alphas: AlphaReport
    evaluation: dict[str, Any]
    block: dict[str, Any] | None

    @property
    def release_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``release.build_release``."""
        return {"alphas": self.alphas.blis_alphas, "alpha_source": self.alphas.source,
                "request_level": self.block}


def request_stage(data: Sequence[RequestData], model: StepTimeModel, family: str,
                  settings: RequestSettings | None = None,
                  excluded: Mapping[str, str] | None = None,
                  reported: Sequence[RequestData] | None = None) -> RequestStage:
    """Fit the alphas on ``data`` (the training experiments' request data) and evaluate
    ``model`` on them; ``reported`` (default ``data``) are listed in the manifest."""
    settings = settings or RequestSettings()
    alphas = fit_release_alphas([AlphaSample.of(d) for d in data], settings.alpha_method)
    reported = list(data if reported is None else reported)
    if not reported:
        return RequestStage(alphas, {}, None)
    evaluation = request_evaluation(data, model, family, alphas, settings.train_fraction)
    reports = {d.experiment.name: data_report(d, settings) for d in reported}
    return RequestStage(alphas, {"request_level": evaluation} if evaluation else {},
                        release_block(reports, alphas, settings, excluded))


ALPHAS_ONLY = ("alphas fit on every request's journey + API timestamps; TTFT / ITL / E2E "
               "accuracy (teacher-forced on every step) is not computed at scale")


def alpha_stage(samples: Sequence[AlphaSample], reports: Mapping[str, Mapping[str, Any]],
                settings: RequestSettings | None = None,
                excluded: Mapping[str, str] | None = None) -> RequestStage:
    """The request level from alpha inputs alone (the scale path: per-experiment samples
    and :func:`data_report` dicts gathered from workers): the alphas and the manifest
    section, which says that request-level accuracy was not computed."""
    settings = settings or RequestSettings()
    alphas = fit_release_alphas(samples, settings.alpha_method)
    if not reports:
        return RequestStage(alphas, {}, None)
    block = release_block(reports, alphas, settings, excluded)
    block["accuracy"] = ALPHAS_ONLY
    return RequestStage(alphas, {}, block)
