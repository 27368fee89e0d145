"""Evaluation tasks: leave-one-experiment-out folds, the temporal holdout, the family
choice, the release's accuracy report, its request level and its learning curve
(``calibration.recipe``'s steps, one task each so they fan out on Ray)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blis_model.calibration import evaluation, recipe
from blis_model.calibration.selection import Folds, Selection
from blis_model.models.base import StepTimeModel
from blis_model.requests.stage import RequestStage


@task(name="loo-fold", task_run_name="loo-fold {family} {name}", cache_policy=NO_CACHE)
def loo_fold(frame: pd.DataFrame, name: str, family: str) -> dict[str, float] | None:
    """Zero-shot accuracy on ``name``: fit on the other configurations, predict it."""
    fold = evaluation.leave_one_out_fold(frame, name, family)
    if fold is None:
        get_run_logger().info("leave-one-out %s: skipped (no other configuration)", name)
    else:
        get_run_logger().info("leave-one-out %s: MAPE %.1f%%, median APE %.1f%% (%d steps)",
                              name, fold["mape"], fold["median_ape"], fold["n"])
    return fold


@task(name="temporal-holdout", task_run_name="temporal-holdout {family}", cache_policy=NO_CACHE)
def temporal_holdout(frame: pd.DataFrame, family: str) -> dict[str, dict[str, float]]:
    """Fit on the first 70% of every experiment's steps, score the last 30%."""
    return evaluation.temporal_holdout(frame, family)


@task(name="choose-family", cache_policy=NO_CACHE)
def choose_family(folds: Folds, temporal: Mapping[str, Any]) -> Selection:
    """Score every family from its folds and pick the leave-one-experiment-out winner."""
    selection = recipe.choose_family(folds, temporal)
    logger = get_run_logger()
    for s in selection.scores:
        logger.info("family %s: leave-one-out MAPE %.1f%%, temporal MAPE %.1f%%", s.family,
                    s.loo_mape, s.temporal_mape)
    logger.info("chosen family %s", selection.reason)
    return selection


@task(name="accuracy-report", cache_policy=NO_CACHE)
def accuracy_report(frame: pd.DataFrame, model: StepTimeModel, family: str, folds: Folds,
                    temporal: Mapping[str, Any], selection: Selection | None
                    ) -> dict[str, Any]:
    """The release's evaluation from the folds run as tasks, with the family comparison
    when the family was chosen automatically."""
    report = recipe.report(frame, model, family, folds, temporal, selection)
    s = report["summary"]
    get_run_logger().info("%s accuracy (mean MAPE over experiments): in-sample %.1f%%, temporal "
                          "holdout %.1f%%, leave-one-experiment-out %.1f%%", family,
                          s["in_sample_mape"], s["temporal_mape"], s["loo_mape"])
    return report


@task(name="request-level", cache_policy=NO_CACHE)
def request_level(p: recipe.Plan, training: recipe.Training, model: StepTimeModel,
                  family: str) -> RequestStage:
    """Alphas (pooled + per configuration) and TTFT / ITL / E2E accuracy of the training
    experiments' request data; BLIS default alphas when there are none."""
    stage = recipe.request_level(p, training, model, family)
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


@task(name="learning-curve", cache_policy=NO_CACHE)
def learning_curve(p: recipe.Plan, frame: pd.DataFrame, family: str
                   ) -> list[dict[str, float]] | None:
    """Temporal-holdout error against the number of training steps (for the release)."""
    points = recipe.curve(p, frame, family)
    if points:
        get_run_logger().info("learning curve: %s", ", ".join(
            f"{pt['train_steps']} steps → {pt['mape']:.1f}%" for pt in points))
    return points
