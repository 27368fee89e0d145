"""Fit tasks: the global model, one specialist per configuration, and their merge.

A family fits its per-configuration sets as separate, parallel specialists when its
estimator has a ``per_config`` parameter, a ``calibrate(frame)`` that refits the sets of
the configurations in ``frame`` around its global coefficients, and
``with_config_sets(specialists)`` to merge them (``calibration.recipe.has_specialists``)
— promising that ``fit(frame)`` equals ``fit`` with ``per_config=False``, calibrated per
configuration and merged (PICF does). Any other family is fit in one task.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blis_model.calibration import evaluation, recipe
from blis_model.metrics import summary
from blis_model.models.base import StepTimeModel


@task(name="fit-global", cache_policy=NO_CACHE)
def fit_global(p: recipe.Plan, frame: pd.DataFrame, family: str) -> StepTimeModel:
    """The model before specialists: the global fit over every step (only its global set
    when specialists follow), or the base release calibrated on them."""
    specialists = recipe.has_specialists(family)
    if p.base is not None and specialists:
        return p.base.model
    if p.base is None and specialists:
        model = evaluation.fit_model(frame, family, per_config=False)
    else:
        model = recipe.fit(p, frame, family)
    fit = summary(model.predict(frame), frame["duration_us"].to_numpy())
    get_run_logger().info("%s %s on %d steps of %d experiment(s): in-sample MAPE %.1f%%",
                          "calibrated" if p.base is not None else "global fit", family,
                          len(frame), frame["experiment"].nunique(), fit["mape"])
    return model


@task(name="fit-specialist", task_run_name="fit-specialist {config_key}",
      cache_policy=NO_CACHE)
def fit_specialist(model: StepTimeModel, frame: pd.DataFrame, config_key: str
                   ) -> StepTimeModel:
    """``model`` calibrated on one configuration's steps (shrunk toward its global set)."""
    part = frame[frame["config_key"] == config_key]
    specialist = model.calibrate(part)
    truth = part["duration_us"].to_numpy()
    before = summary(model.predict(part), truth)["mape"]
    after = summary(specialist.predict(part), truth)["mape"]
    get_run_logger().info("specialist %s: %d steps, in-sample MAPE %.1f%% (global set: %.1f%%)",
                          config_key, len(part), after, before)
    return specialist


@task(name="merge-specialists", cache_policy=NO_CACHE)
def merge_specialists(model: StepTimeModel, specialists: Mapping[str, StepTimeModel]
                      ) -> StepTimeModel:
    """One model: ``model``'s global set plus every specialist's own set."""
    return model.with_config_sets(specialists)
