"""Release task: build the release files and publish them to the store, all or nothing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blis_model.configuration.experiment import Experiment
from blis_model.ingest.reader import IngestReport
from blis_model.models.base import StepTimeModel
from blis_model.releases.build import build_release, release_version
from blis_model.releases.files import MANIFEST
from blis_model.releases.store import publish
from blis_model.requests.stage import RequestStage
from blis_model.storage import redact
from tasks.policy import RETRIES, RETRY_DELAYS, transient


@task(name="publish-release", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def publish_release(model: StepTimeModel, frame: pd.DataFrame, experiments: Sequence[Experiment],
                    reports: Sequence[IngestReport], corpus: str, store: str,
                    evaluation: dict[str, Any], family: str, base_version: str | None = None,
                    request: RequestStage | None = None) -> str:
    """Write the release to ``store`` and return its URL. A retry builds a new version; a
    failed attempt leaves nothing visible. ``request`` adds fitted alphas and
    request-level metrics."""
    extra: dict[str, Any] = {}
    if request is not None:
        evaluation = {**evaluation, **request.evaluation}
        extra = request.release_kwargs
    files = build_release(model, frame, experiments, reports, corpus, evaluation, family,
                          base_version=base_version, **extra)
    version = release_version(files)
    url = publish(files, store, version)
    projection = json.loads(files[MANIFEST])["metrics"]["blis_projection"]["summary"]
    get_run_logger().info("published release %s (%s, %d experiments, %d steps) at %s; its "
                          "projection onto BLIS's basis has mean MAPE %.1f%% (BLIS's shipped "
                          "coefficients: %.1f%%)", version, family, len(experiments), len(frame),
                          redact(url), projection["projection_mape"],
                          projection["blis_shipped_mape"])
    return url
