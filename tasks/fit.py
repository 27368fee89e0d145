"""Fit tasks: the global model, one specialist per configuration, and their merge.

A family fits its per-configuration sets as separate, parallel specialists when its
estimator has a ``per_config`` parameter, a ``calibrate(frame)`` that refits the sets of
the configurations in ``frame`` around its global coefficients, and
``with_config_sets(specialists)`` to merge them — promising that
``fit(frame)`` equals ``fit`` with ``per_config=False``, calibrated per configuration and
merged (PICF does). Any other family is fit in one task.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blis_model.calibration import evaluation
from blis_model.metrics import summary
from blis_model.models.base import StepTimeModel
from blis_model.models.registry import make_model
from blis_model.releases.read import Release, load_release
from blis_model.storage import redact
from tasks.policy import RETRIES, RETRY_DELAYS, transient


def has_specialists(family: str) -> bool:
    """True when ``family`` fits its per-configuration sets as separate specialists."""
    model = make_model(family)
    return "per_config" in model.get_params() and hasattr(model, "with_config_sets")


@task(name="load-base", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def load_base(url: str) -> Release:
    """The release to calibrate instead of fitting afresh."""
    release = load_release(url)
    get_run_logger().info("calibrating release %s (%s) from %s", release.version,
                          release.family, redact(url))
    return release


@task(name="fit-global", cache_policy=NO_CACHE)
def fit_global(frame: pd.DataFrame, family: str, base: StepTimeModel | None = None
               ) -> StepTimeModel:
    """The model before specialists: the global fit over every step (only its global set
    when specialists follow), or the ``base`` release's model to calibrate."""
    specialists = has_specialists(family)
    if base is not None and specialists:
        return base
    params = {"per_config": False} if specialists and base is None else {}
    model = evaluation.fit_model(frame, family, base=base, **params)
    fit = summary(model.predict(frame), frame["duration_us"].to_numpy())
    get_run_logger().info("%s %s on %d steps of %d experiment(s): in-sample MAPE %.1f%%",
                          "calibrated" if base is not None else "global fit", family, len(frame),
                          frame["experiment"].nunique(), fit["mape"])
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
