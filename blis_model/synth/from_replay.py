"""The generator's per-request truth, derived from ONE replay's log: journey events per
request and, per step, its exact batch and the REQUEST_SNAPSHOT of every member.

Inputs are the replay (``detail=True``), its workload and the :class:`SimRequest` of each
workload entry (same order); times are converted to monotonic ns as ``t0_ns + µs·1000``
(step durations are whole µs, so step ends are exact).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from blis_model.requests.detail import stay_table, step_members
from blis_model.requests.replay import ReplayResult
from blis_model.requests.scheduler import STAY_FINISHED, STAY_PREEMPTED
from blis_model.requests.workload import Workload
from blis_model.synth.records import JourneyEvent, SimRequest, StepBatch, StepRecord


def _step_times(result: ReplayResult, t0_ns: int) -> tuple[list[int], list[int], list[int]]:
    """(start ns, end ns, whole-µs duration) of every step."""
    start = (result.steps.column("ts_start_ns").to_numpy().astype(np.int64) + t0_ns).tolist()
    dur = result.steps.column("duration_us").to_numpy().astype(np.int64).tolist()
    return start, [s + d * 1000 for s, d in zip(start, dur, strict=True)], dur


def _attrs(req: SimRequest, kind: str, time_ns: int, step: int, phase: str, computed: int,
           output: int, preemptions: int, **extra: Any) -> dict[str, Any]:
    attrs = {"event.type": kind, "ts.monotonic": time_ns / 1e9, "ts.monotonic_ns": time_ns,
             "scheduler.step": step, "phase": phase,
             "prefill.done_tokens": min(computed, req.prompt),
             "prefill.total_tokens": req.prompt, "decode.done_tokens": output,
             "decode.max_tokens": req.max_tokens, "num_preemptions": preemptions}
    attrs.update(extra)
    return attrs


def _emit(req: SimRequest, kind: str, time_ns: int, step: int, phase: str, computed: int,
          output: int, preemptions: int, **extra: Any) -> None:
    req.events.append(JourneyEvent(kind, time_ns, step, _attrs(
        req, kind, time_ns, step, phase, computed, output, preemptions, **extra)))


def sim_requests(result: ReplayResult, workload: Workload, requests: list[SimRequest],
                 t0_ns: int) -> None:
    """Fill every request's lifecycle and journey events (QUEUED; per stay SCHEDULED,
    FIRST_TOKEN, PREEMPTED or FINISHED) from the replay."""
    if result.log is None:
        raise ValueError("the replay has no log: run it with detail=True")
    start, end, _ = _step_times(result, t0_ns)
    table = result.requests
    queued_step = table.column("queued_step").to_pylist()
    first_step = table.column("first_token_step").to_pylist()
    generated = table.column("generated_tokens").to_pylist()
    preemptions = table.column("num_preemptions").to_pylist()
    for i, req in enumerate(requests):
        req.queued_step = queued_step[i]
        req.output, req.preemptions = generated[i], preemptions[i]
        req.events = []
        _emit(req, "QUEUED", req.queued_ns, req.queued_step, "WAITING", 0, 0, 0)
    stays = stay_table(result.log, workload)
    columns = [stays[k].tolist() for k in ("request", "start", "last", "end", "end_step",
                                           "hit", "output", "preemptions", "output_end")]
    for r, first, last, how, at, hit, out, pre, out_end in zip(*columns, strict=True):
        req = requests[r]
        kind = "RESUME" if req.scheduled_step is not None else "FIRST"
        if kind == "FIRST":
            req.scheduled_ns, req.scheduled_step = start[first], first
        _emit(req, "SCHEDULED", start[first], first, "PREFILL", hit, out, pre,
              **{"schedule.kind": kind})
        ft = first_step[r]
        if out == 0 and ft is not None and first <= ft <= last:
            req.first_token_ns, req.first_token_step = end[ft], ft
            _emit(req, "FIRST_TOKEN", end[ft], ft, "DECODE", req.prompt, 1, pre)
        if how == STAY_PREEMPTED:
            _emit(req, "PREEMPTED", start[at], at, "WAITING", 0, out_end, pre + 1)
        elif how == STAY_FINISHED:
            req.finished_ns, req.finished_step = end[last], last
            req.departed_ns = end[last] + round(req.post_finish_us * 1e3)
            _emit(req, "FINISHED", end[last], last, "DECODE", req.prompt + out_end - 1,
                  out_end, pre, **{"finish.status": req.status})


def step_records(result: ReplayResult, workload: Workload, requests: list[SimRequest],
                 t0_ns: int, block_size: int) -> list[StepRecord]:
    """Every step's exact batch, summary and member snapshots, from the replay's log."""
    if result.log is None:
        raise ValueError("the replay has no log: run it with detail=True")
    steps = result.steps
    start, _, dur = _step_times(result, t0_ns)
    members = step_members(result.log, workload, block_size)
    m = {name: members.column(name).to_pylist() for name in members.column_names}
    ids = [r.journey_id for r in requests]
    bounds = np.searchsorted(members.column("step_id").to_numpy(),
                             np.arange(steps.num_rows + 1)).tolist()
    summary = {name: steps.column(name).to_numpy().astype(np.int64).tolist() for name in (
        "running_depth", "waiting_depth", "num_finished", "num_preempted", "kv_blocks_free")}
    records = []
    for k in range(steps.num_rows):
        prefills, pf_ids, decodes, dc_ids, snaps = [], [], [], [], []
        for j in range(bounds[k], bounds[k + 1]):
            rid = ids[m["request"][j]]
            computed, scheduled = m["computed"][j], m["scheduled"][j]
            if m["prefill"][j]:
                prefills.append((scheduled, computed))
                pf_ids.append(rid)
            else:
                decodes.append(computed)
                dc_ids.append(rid)
            snaps.append({
                "step.id": k, "request.id": rid,
                "request.phase": "PREFILL" if m["prefill"][j] else "DECODE",
                "request.num_prompt_tokens": m["prompt"][j],
                "request.num_computed_tokens": computed,
                "request.num_output_tokens": m["output"][j],
                "request.num_preemptions": m["preemptions"][j],
                "request.scheduled_tokens_this_step": scheduled,
                "kv.blocks_allocated_gpu": m["blocks_allocated"][j],
                "kv.blocks_cached_gpu": m["blocks_cached"][j]})
        batch = StepBatch(k, tuple(prefills), tuple(decodes), tuple(pf_ids), tuple(dc_ids))
        records.append(StepRecord(
            batch, start[k], dur[k], summary["running_depth"][k],
            summary["waiting_depth"][k], summary["num_finished"][k],
            summary["num_preempted"][k], summary["kv_blocks_free"][k], tuple(snaps)))
    return records
