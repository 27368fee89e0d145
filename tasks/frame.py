"""The training frame task: every experiment's steps in one frame, built once."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blis_model.calibration import featurize


@task(name="training-frame", cache_policy=NO_CACHE)
def training_frame(items: Sequence[featurize.Featurized]) -> pd.DataFrame:
    """All usable steps (CorpusError when there are none)."""
    frame = featurize.training_frame(items)
    get_run_logger().info("training on %d steps of %d experiment(s) in %d configuration(s)",
                          len(frame), frame["experiment"].nunique(), frame["config_key"].nunique())
    return frame
