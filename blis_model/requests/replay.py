"""Replay a workload through vLLM V1's scheduler with a candidate step-time model.

``replay(workload, limits, step_time)`` runs :class:`scheduler.Engine` and returns its
steps as a step table (``ingest.steps.STEP_SCHEMA``, ``composition = "replay"``: feed it
to ``dataset.feature_frame`` like a traced one) and its requests as a table of times and
step ids. ``blis_latencies`` turns a result into BLIS's TTFT / ITL / E2E per request.

Units: µs for times (the workload's clock), tokens for lengths.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from blis_model.ingest.steps import COMPOSITION_COLUMNS, STEP_SCHEMA, SUMMARY_FIELDS
from blis_model.requests.scheduler import Engine, EngineLog, StepAggregates, StepTime
from blis_model.requests.workload import ServerLimits, Workload

__all__ = ["ReplayResult", "ReplayStats", "ServerLimits", "StepAggregates", "Workload",
           "blis_latencies", "replay"]

REQUEST_SCHEMA = pa.schema([
    pa.field("index", pa.int64()),
    pa.field("arrival_us", pa.float64()), pa.field("queued_us", pa.float64()),
    pa.field("scheduled_us", pa.float64()), pa.field("first_token_us", pa.float64()),
    pa.field("finished_us", pa.float64()),
    pa.field("queued_step", pa.int64()), pa.field("scheduled_step", pa.int64()),
    pa.field("first_token_step", pa.int64()), pa.field("finished_step", pa.int64()),
    pa.field("prompt_tokens", pa.int64()), pa.field("output_tokens", pa.int64()),
    pa.field("generated_tokens", pa.int64()), pa.field("num_preemptions", pa.int64()),
    pa.field("status", pa.string()), pa.field("reason", pa.string()),
])
"""Per request: times in µs (NaN: never), step ids (null: never). ``scheduled_*``: first
admission; ``first_token_*``/``finished_*``: END of the step that produced the token
(aborted: the step boundary at which the server dropped it; before it reached the queue:
the abort time). ``output_tokens``: what the
workload asked for; ``generated_tokens``: what was produced. ``status``: finished |
aborted | rejected | unfinished (``max_steps`` reached); ``reason`` for the last two."""


@dataclass(frozen=True)
class ReplayStats:
    """How long the replay took: executed steps, wall seconds of the whole ``replay``
    call (scheduler + output tables) and of the scheduler loop alone."""

    steps: int
    seconds: float
    scheduler_seconds: float

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else math.inf


@dataclass(frozen=True)
class ReplayResult:
    """``steps``: one row per executed step (STEP_SCHEMA); ``requests``: one row per
    request in workload order (REQUEST_SCHEMA); ``log``: per-request detail when asked
    (``requests.detail`` derives journeys and snapshots from it)."""

    steps: pa.Table
    requests: pa.Table
    stats: ReplayStats
    log: EngineLog | None = None


def replay(workload: Workload, limits: ServerLimits, step_time: StepTime, *,
           step_gap_us: float = 0.0, max_steps: int | None = None, detail: bool = False,
           experiment: str = "replay") -> ReplayResult:
    """Replay ``workload`` on a server with ``limits``.

    ``step_time(agg) -> µs`` is called once per step with a reused
    :class:`StepAggregates` (the step-table columns of that step, plus ``step_id``); its
    value is the step's ``duration_us``, and the clock advances by it plus
    ``step_gap_us``. Requests enter the queue at ``arrival_us + pre_queue_us``.
    ``max_steps`` caps the run (requests left are "unfinished"); ``detail`` keeps the
    per-request log; ``experiment`` fills the step table's ``experiment`` column."""
    start = time.perf_counter()
    run = Engine(workload, limits, step_time, step_gap_us=step_gap_us, max_steps=max_steps,
                 detail=detail).run()
    steps = _steps_table(run.steps, experiment)
    requests = _requests_table(run.requests, workload)
    stats = ReplayStats(steps.num_rows, time.perf_counter() - start, run.seconds)
    return ReplayResult(steps=steps, requests=requests, stats=stats, log=run.log)


def _steps_table(cols: dict[str, np.ndarray], experiment: str) -> pa.Table:
    n = len(cols["step_id"])
    cols["ts_start_ns"] = np.round(cols["ts_start_us"] * 1e3)
    arrays = {"experiment": _constant(experiment, n),
              "step_id": pa.array(cols["step_id"], pa.int64())}
    for name in [c for c in SUMMARY_FIELDS.values() if c != "step_id"] + list(
            COMPOSITION_COLUMNS):
        arrays[name] = pa.array(cols[name], pa.float64())
    arrays["composition"] = _constant("replay", n)
    return pa.table(arrays, schema=STEP_SCHEMA)


def _constant(value: str, n: int) -> pa.Array:
    """A string column holding ``value`` n times (built without n Python strings)."""
    raw = value.encode()
    offsets = np.arange(n + 1, dtype=np.int32) * len(raw)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(raw * n))


def _requests_table(cols: dict[str, list], workload: Workload) -> pa.Table:
    n = len(workload)
    arrays: dict[str, pa.Array] = {"index": pa.array(np.arange(n), pa.int64()),
                                   "arrival_us": pa.array(workload.arrival_us, pa.float64())}
    for name in ("queued_us", "scheduled_us", "first_token_us", "finished_us"):
        arrays[name] = pa.array(np.asarray(cols[name], np.float64), pa.float64())
    for name in ("queued_step", "scheduled_step", "first_token_step", "finished_step"):
        values = np.asarray(cols[name], np.int64)
        arrays[name] = pa.array(values, pa.int64(), mask=values < 0)
    arrays["prompt_tokens"] = pa.array(workload.prompt_tokens, pa.int64())
    arrays["output_tokens"] = pa.array(workload.output_tokens, pa.int64())
    arrays["generated_tokens"] = pa.array(np.asarray(cols["generated_tokens"], np.int64))
    arrays["num_preemptions"] = pa.array(np.asarray(cols["num_preemptions"], np.int64))
    arrays["status"] = pa.array(cols["status"], pa.string())
    arrays["reason"] = pa.array(cols["reason"], pa.string())
    return pa.table(arrays, schema=REQUEST_SCHEMA)


def blis_latencies(result: ReplayResult, alphas: Sequence[float]) -> dict[str, np.ndarray]:
    """BLIS's per-request latencies (µs, NaN unless finished) from a replay, with
    ``alphas = (α0, α1, α2)`` in BLIS's order:

    ``TTFT = first_token_end + α2 − arrival``,
    ``E2E = finished_end − arrival + α1 + α2·output_tokens``,
    ``ITL = (E2E − TTFT) / (output_tokens − 1)`` (NaN with one output token).

    α0 is not added here: it is the pre-queue time the replay ran with
    (``Workload.pre_queue_us``), already inside the first-token and finish times."""
    if len(alphas) != 3:
        raise ValueError(f"alphas must be (α0, α1, α2), got {len(alphas)} values")
    _, a1, a2 = (float(a) for a in alphas)
    req = result.requests
    done = np.asarray(req.column("status").to_numpy(zero_copy_only=False) == "finished")
    arrival = req.column("arrival_us").to_numpy()
    out = req.column("output_tokens").to_numpy().astype(np.float64)
    ttft = np.where(done, req.column("first_token_us").to_numpy() + a2 - arrival, np.nan)
    e2e = np.where(done, req.column("finished_us").to_numpy() - arrival + a1 + a2 * out,
                   np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        itl = np.where(out > 1, (e2e - ttft) / (out - 1), np.nan)
    return {"ttft_us": ttft, "itl_us": itl, "e2e_us": e2e}
