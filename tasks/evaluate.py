"""Evaluation tasks: leave-one-experiment-out folds, temporal holdout, the report."""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blis_model.calibration import evaluation as evaluations
from blis_model.calibration.selection import Selection, choose, score
from blis_model.models.base import StepTimeModel
from blis_model.requests import stage as request_level
from blis_model.requests.accuracy import RequestData


@task(name="loo-fold", task_run_name="loo-fold {name}", cache_policy=NO_CACHE)
def loo_fold(frame: pd.DataFrame, name: str, family: str) -> dict[str, float] | None:
    """Zero-shot accuracy on ``name``: fit on the other configurations, predict it."""
    fold = evaluations.leave_one_out_fold(frame, name, family)
    if fold is None:
        get_run_logger().info("leave-one-out %s: skipped (no other configuration)", name)
    else:
        get_run_logger().info("leave-one-out %s: MAPE %.1f%%, median APE %.1f%% (%d steps)",
                              name, fold["mape"], fold["median_ape"], fold["n"])
    return fold


@task(name="temporal-holdout", cache_policy=NO_CACHE)
def temporal_holdout(frame: pd.DataFrame, family: str) -> dict[str, dict[str, float]]:
    """Fit on the first 70% of every experiment's steps, score the last 30%."""
    return evaluations.temporal_holdout(frame, family)


def _completed_folds(loo: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {name: loo[name] for name in sorted(loo) if loo[name] is not None}


@task(name="choose-family", cache_policy=NO_CACHE)
def choose_family(loo: dict[str, dict[str, Any]], temporal: dict[str, Any]) -> Selection:
    """Score every family from its folds and pick the leave-one-experiment-out winner."""
    selection = choose([score(f, _completed_folds(loo[f]), temporal[f]) for f in loo])
    logger = get_run_logger()
    for s in selection.scores:
        logger.info("family %s: leave-one-out MAPE %.1f%%, temporal MAPE %.1f%%", s.family,
                    s.loo_mape, s.temporal_mape)
    logger.info("chosen family %s", selection.reason)
    return selection


@task(name="accuracy-report", cache_policy=NO_CACHE)
def accuracy_report(frame: pd.DataFrame, model: StepTimeModel, family: str,
                    loo: dict[str, dict[str, float] | None],
                    temporal: dict[str, dict[str, float]],
                    selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """The release's evaluation (``evaluations.evaluate``) from the folds run as tasks, with
    the family comparison when the family was chosen automatically."""
    evaluation = evaluations.evaluate(frame, model, family, loo=_completed_folds(loo),
                                   temporal=temporal)
    if selection:
        evaluation["family_selection"] = selection
    s = evaluation["summary"]
    get_run_logger().info("%s accuracy (mean MAPE over experiments): in-sample %.1f%%, temporal "
                          "holdout %.1f%%, leave-one-experiment-out %.1f%%", family,
                          s["in_sample_mape"], s["temporal_mape"], s["loo_mape"])
    return evaluation


@task(name="request-level", cache_policy=NO_CACHE)
def request_level_report(data: list[RequestData], model: StepTimeModel, family: str,
                         settings: request_level.RequestSettings,
                         excluded: dict[str, str], reported: list[RequestData]
                         ) -> request_level.RequestStage:
    """Alphas (pooled + per configuration) and TTFT / ITL / E2E accuracy of the training
    experiments' request data; BLIS default alphas when there are none."""
    stage = request_level.request_stage(data, model, family, settings, excluded, reported)
    logger = get_run_logger()
    if stage.alphas.pooled is None:
        logger.info("alphas: %s", stage.alphas.source)
    else:
        a = stage.alphas.pooled
        logger.info("alphas (%s fit, %d requests): α0 %.1f µs, α1 %.1f µs, α2 %.3f µs/token",
                    a.method, a.n_pre_queue, a.alpha0_us, a.alpha1_us, a.alpha2_us)
    s = (stage.evaluation.get("request_level") or {}).get("summary") or {}
    if s:
        logger.info("request-level accuracy (mean MAPE over experiments): TTFT %.1f%%, ITL "
                    "%.1f%%, E2E %.1f%%; temporal holdout TTFT %.1f%%, ITL %.1f%%, E2E %.1f%%",
                    s["ttft_mape"], s["itl_mape"], s["e2e_mape"], s["temporal_ttft_mape"],
                    s["temporal_itl_mape"], s["temporal_e2e_mape"])
    return stage
