"""Serialize a simulation to vLLM's OTLP JSON-lines trace format (all three scopes).

Layout follows the real exporter byte for byte where ingestion cares: compact JSON,
integers as strings (``{"intValue":"42"}``), step events as
``{"timeUnixNano":..,"name":"step.X","attributes":[..]}`` inside spans named
``scheduler_steps_N`` (``steps_per_span`` steps each). Journey spans (``llm_core``) and API
spans (``llm_request``) are exported ``spans_per_line`` to a line when they end. Event
``timeUnixNano`` is wall-clock ns (monotonic + ``wall_offset_ns``); ``ts.monotonic*`` and
``step.ts_*_ns`` attributes are monotonic.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson

from blis_model.ingest.otlp import API_SCOPE, JOURNEY_SCOPE, STEP_SCOPE
from blis_model.synth.records import SimRequest, StepRecord
from blis_model.synth.simulator import SimResult


def otlp_value(value: Any) -> dict[str, Any]:
    """Encode one attribute value as an OTLP AnyValue."""
    kind = type(value)
    if kind is int:
        return {"intValue": str(value)}
    if kind is str:
        return {"stringValue": value}
    if kind is float:
        return {"doubleValue": value}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int | np.integer):
        return {"intValue": str(int(value))}
    if isinstance(value, float | np.floating):
        return {"doubleValue": float(value)}
    return {"stringValue": str(value)}


def otlp_attributes(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": otlp_value(v)} for k, v in attrs.items()]


def _attribute_json(key: str, value: Any) -> str:
    """One attribute as compact JSON text (fast path for the common value types)."""
    kind = type(value)
    if kind is int:
        return f'{{"key":"{key}","value":{{"intValue":"{value}"}}}}'
    if kind is str:
        return f'{{"key":"{key}","value":{{"stringValue":{orjson.dumps(value).decode()}}}}}'
    return orjson.dumps({"key": key, "value": otlp_value(value)}).decode()


def _event(time_ns: int, name: str, attrs: dict[str, Any]) -> orjson.Fragment:
    """An event, pre-serialized (``{"timeUnixNano":..,"name":..,"attributes":[..]}``)."""
    body = ",".join([_attribute_json(k, v) for k, v in attrs.items()])
    return orjson.Fragment(
        f'{{"timeUnixNano":"{time_ns}","name":"{name}","attributes":[{body}]}}'.encode())


def export_line(scope: str, spans: list[dict[str, Any]]) -> bytes:
    """One OTLP export object holding ``spans`` of ``scope``, as a JSON line (no newline)."""
    return orjson.dumps({"resourceSpans": [{
        "resource": {"attributes": otlp_attributes({"service.name": "vllm"})},
        "scopeSpans": [{"scope": {"name": scope}, "spans": spans}]}]})


class _Ids:
    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng([seed, 7919])

    def hex(self, nbytes: int) -> str:
        return self._rng.bytes(nbytes).hex()


def _summary(step: StepRecord, total_blocks: int) -> dict[str, Any]:
    b = step.batch
    used = total_blocks - step.blocks_free
    return {
        "step.id": b.step_id, "step.ts_start_ns": step.ts_start_ns,
        "step.ts_end_ns": step.ts_end_ns, "step.duration_us": step.duration_us,
        "queue.running_depth": step.running_depth, "queue.waiting_depth": step.waiting_depth,
        "batch.num_prefill_reqs": len(b.prefills), "batch.num_decode_reqs": b.decode_count,
        "batch.scheduled_tokens": b.prefill_tokens + b.decode_count,
        "batch.prefill_tokens": b.prefill_tokens, "batch.decode_tokens": b.decode_count,
        "batch.num_finished": step.num_finished, "batch.num_preempted": step.num_preempted,
        "kv.usage_gpu_ratio": round(used / total_blocks, 6),
        "kv.blocks_total_gpu": total_blocks, "kv.blocks_free_gpu": step.blocks_free,
    }


def step_lines(result: SimResult, ids: _Ids) -> list[tuple[int, bytes]]:
    """(export wall ns, line) per span of traced steps."""
    cfg = result.config
    groups: dict[int, list[StepRecord]] = {}
    for step in result.steps:
        if step.batch.step_id % cfg.sample_every == 0:
            groups.setdefault(step.batch.step_id // cfg.steps_per_span, []).append(step)
    lines = []
    for seq, steps in sorted(groups.items()):
        events = []
        for step in steps:
            wall = step.ts_end_ns + cfg.wall_offset_ns
            events.append(_event(wall, "step.BATCH_SUMMARY", _summary(step, cfg.num_gpu_blocks)))
            if cfg.snapshots:
                events.extend(_event(wall, "step.REQUEST_SNAPSHOT", snap)
                              for snap in step.snapshots)
        start = steps[0].ts_end_ns + cfg.wall_offset_ns
        end = steps[-1].ts_end_ns + cfg.wall_offset_ns
        span = {"traceId": ids.hex(16), "spanId": ids.hex(8), "name": f"scheduler_steps_{seq}",
                "kind": 1, "startTimeUnixNano": str(start), "endTimeUnixNano": str(end),
                "attributes": otlp_attributes({
                    "scheduler.span_sequence": seq,
                    "scheduler.step_range_start": seq * cfg.steps_per_span,
                    "scheduler.step_range_end": (seq + 1) * cfg.steps_per_span - 1}),
                "events": events, "status": {}}
        lines.append((end, export_line(STEP_SCOPE, [span])))
    return lines


def _journey_span(req: SimRequest, offset: int, ids: _Ids) -> dict[str, Any]:
    events = [_event(e.time_ns + offset, f"journey.{e.name}", e.attrs) for e in req.events]
    return {"traceId": ids.hex(16), "spanId": ids.hex(8), "name": "llm_core", "kind": 1,
            "startTimeUnixNano": str(req.queued_ns + offset),
            "endTimeUnixNano": str((req.finished_ns or req.queued_ns) + offset),
            "attributes": otlp_attributes({"gen_ai.request.id": req.journey_id}),
            "events": events, "status": {}}


def _api_span(req: SimRequest, offset: int, ids: _Ids) -> dict[str, Any]:
    departed = req.departed_ns or req.arrival_ns
    events = [_event(req.arrival_ns + offset, "api.ARRIVED",
                     {"event.ts.monotonic": req.arrival_ns / 1e9}),
              _event(departed + offset, "api.DEPARTED", {"event.ts.monotonic": departed / 1e9})]
    return {"traceId": ids.hex(16), "spanId": ids.hex(8), "name": "llm_request", "kind": 2,
            "startTimeUnixNano": str(req.arrival_ns + offset),
            "endTimeUnixNano": str(departed + offset),
            "attributes": otlp_attributes({
                "gen_ai.request.id": req.api_id, "gen_ai.usage.prompt_tokens": req.prompt,
                "gen_ai.usage.completion_tokens": req.output,
                "gen_ai.request.max_tokens": req.max_tokens}),
            "events": events, "status": {}}


def _batched(scope: str, spans: Iterable[tuple[int, dict[str, Any]]], per_line: int
             ) -> list[tuple[int, bytes]]:
    ordered = sorted(spans, key=lambda ts: ts[0])
    return [(ordered[i + per_line - 1 if i + per_line <= len(ordered) else -1][0],
             export_line(scope, [s for _, s in ordered[i:i + per_line]]))
            for i in range(0, len(ordered), per_line)]


def trace_lines(result: SimResult) -> list[bytes]:
    """Every export line of the experiment, in export order, then perturbed as configured
    (lines moved out of order, malformed lines inserted). Deterministic given the seed."""
    cfg = result.config
    ids = _Ids(cfg.seed)
    off = cfg.wall_offset_ns
    lines = step_lines(result, ids)
    if cfg.journey:
        lines += _batched(JOURNEY_SCOPE, ((r.finished_ns or r.queued_ns,
                                           _journey_span(r, off, ids)) for r in result.requests),
                          cfg.spans_per_line)
    if cfg.api:
        lines += _batched(API_SCOPE, ((r.departed_ns or r.arrival_ns, _api_span(r, off, ids))
                                      for r in result.requests), cfg.spans_per_line)
    lines.sort(key=lambda tl: tl[0])
    out = [line for _, line in lines]
    rng = np.random.default_rng([cfg.seed, 104729])
    if cfg.out_of_order > 0 and len(out) > 1:
        for i in range(len(out)):
            if rng.random() < cfg.out_of_order:
                j = min(len(out) - 1, i + int(rng.integers(1, 6)))
                out[i], out[j] = out[j], out[i]
    for _ in range(cfg.malformed_lines):
        victim = out[int(rng.integers(0, len(out)))] if out else b"{}"
        junk = victim[: int(rng.integers(1, max(2, len(victim) - 1)))]
        out.insert(int(rng.integers(0, len(out) + 1)), junk)
    return out
