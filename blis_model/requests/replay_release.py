"""Replaying a release's model on measured workloads: what BLIS would simulate.

For each measured experiment (``requests.measured``), the release's step-time model on
that configuration (compiled per step, ``requests.step_time``) and its alphas drive the
one replay engine; the result is one row per request (``ROW_COLUMNS``) and, when the
experiment has ground truth, its request-level report (``requests.latency``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from blis_model.models.base import StepTimeModel
from blis_model.requests.latency import Alphas, Replayed, latency_table, run_replay
from blis_model.requests.measured import MeasuredExperiment
from blis_model.requests.scheduler import StepAggregates
from blis_model.requests.step_time import model_step_time

ROW_COLUMNS = ("experiment", "index", "ttft_us", "e2e_us", "itl_us", "queue_us", "steps",
               "status")
"""The replay CSV: the contract columns first (experiment = the folder's path relative to
the workload, ``index`` as measured; a request the replay never finishes has empty
latencies), then the engine queue wait (µs), the steps from admission to the last token
and the replay's status of the request."""
MIN_STEP_US = 1.0


def replay_model(item: MeasuredExperiment, model: StepTimeModel, alphas: Alphas,
                 per_running_us: float = 0.0) -> Replayed:
    """Replay ``item`` with ``model`` (its terms for the item's configuration), the
    alphas and the API server's contention."""
    compiled = model_step_time(model, item.experiment, item.limits.max_num_batched_tokens)

    def step_time(agg: StepAggregates) -> float:
        return max(float(compiled(agg)), MIN_STEP_US)

    return run_replay(item, step_time, alphas, per_running_us=per_running_us)


def replay_rows(item: MeasuredExperiment, replayed: Replayed) -> dict[str, np.ndarray]:
    """The CSV columns (``ROW_COLUMNS``) of one replayed experiment, in workload order."""
    req = replayed.requests
    index = item.measurements.requests.column("index").to_numpy()
    scheduled = req.column("scheduled_step").to_numpy(zero_copy_only=False).astype(float)
    finished = req.column("finished_step").to_numpy(zero_copy_only=False).astype(float)
    return {
        "experiment": np.full(len(index), item.name, dtype=object),
        "index": index,
        "ttft_us": replayed.predicted["ttft"],
        "e2e_us": replayed.predicted["e2e"],
        "itl_us": replayed.predicted["itl"],
        "queue_us": req.column("scheduled_us").to_numpy() - req.column("queued_us").to_numpy(),
        "steps": finished - scheduled + 1,
        "status": np.asarray(req.column("status").to_numpy(zero_copy_only=False), object),
    }


def replay_workload(items: list[MeasuredExperiment], model: StepTimeModel,
                    alphas_for: Callable[[str], Alphas],
                    contention_for: Callable[[str], float] = lambda _: 0.0
                    ) -> list[tuple[MeasuredExperiment, Replayed, dict[str, Any] | None]]:
    """Every experiment replayed with ``model``, its configuration's alphas and API
    contention; the request-level report of those with ground truth (None otherwise)."""
    out = []
    for item in items:
        replayed = replay_model(item, model, alphas_for(item.config_key),
                                contention_for(item.config_key))
        report = latency_table(item, replayed) if item.targets.any() else None
        out.append((item, replayed, report))
    return out


__all__ = ["ROW_COLUMNS", "replay_model", "replay_rows", "replay_workload"]
