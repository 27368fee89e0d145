"""Release task: build the release files and publish them to the store, all or nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blis_model.calibration import recipe
from blis_model.configuration.experiment import Experiment
from blis_model.models.base import StepTimeModel
from blis_model.releases.read import read_manifest
from blis_model.requests.stage import RequestStage
from blis_model.storage import redact
from tasks.policy import RETRIES, RETRY_DELAYS, transient


@task(name="publish-release", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def publish_release(p: recipe.Plan, model: StepTimeModel, family: str, frame: pd.DataFrame,
                    experiments: Sequence[Experiment], reports: Sequence[Any],
                    evaluation: Mapping[str, Any], stage: RequestStage | None = None,
                    learning: Sequence[Mapping[str, float]] | None = None) -> str:
    """Write the release to the store and return its URL (``recipe.release``). A retry
    builds a new version; a failed attempt leaves nothing visible."""
    url = recipe.release(p, model, family, frame, experiments, reports, evaluation, stage,
                         learning)
    manifest = read_manifest(url)
    projection = manifest["metrics"]["blis_projection"]["summary"]
    get_run_logger().info("published release %s (%s, %d experiments, %d steps) at %s; its "
                          "projection onto BLIS's basis has mean MAPE %.1f%% (BLIS's shipped "
                          "coefficients: %.1f%%)", manifest["version"], family,
                          len(experiments), len(frame), redact(url),
                          projection["projection_mape"], projection["blis_shipped_mape"])
    return url
