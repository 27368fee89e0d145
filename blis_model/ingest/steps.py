"""The per-step table: one row per traced scheduler step, with the batch-composition
aggregates every feature needs.

Composition comes from ``step.REQUEST_SNAPSHOT`` events when present
(``composition == "snapshot"``); otherwise from the step's ``BATCH_SUMMARY`` with
contexts estimated from KV usage (``composition == "summary"``).

Invariants: ``duration_us > 0``; ``pf_tokens + dc_count == scheduled tokens`` for
snapshot steps; all aggregates ≥ 0; rows sorted by ``step_id`` and unique per step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from blis_model.ingest.otlp import STEP_SCOPE, Event, Problem

# BATCH_SUMMARY attribute → column (all numeric)
SUMMARY_FIELDS: dict[str, str] = {
    "step.id": "step_id",
    "step.ts_start_ns": "ts_start_ns",
    "step.duration_us": "duration_us",
    "queue.running_depth": "running_depth",
    "queue.waiting_depth": "waiting_depth",
    "batch.num_prefill_reqs": "num_prefill_reqs",
    "batch.num_decode_reqs": "num_decode_reqs",
    "batch.prefill_tokens": "prefill_tokens",
    "batch.decode_tokens": "decode_tokens",
    "batch.num_finished": "num_finished",
    "batch.num_preempted": "num_preempted",
    "kv.usage_gpu_ratio": "kv_usage_ratio",
    "kv.blocks_total_gpu": "kv_blocks_total",
    "kv.blocks_free_gpu": "kv_blocks_free",
}
SNAPSHOT_FIELDS: dict[str, str] = {
    "step.id": "step_id",
    "request.num_prompt_tokens": "prompt",
    "request.num_computed_tokens": "computed",
    "request.num_output_tokens": "output",
    "request.scheduled_tokens_this_step": "scheduled",
    "request.num_preemptions": "preemptions",
    "kv.blocks_allocated_gpu": "blocks_allocated",
    "kv.blocks_cached_gpu": "blocks_cached",
}

# Composition aggregates (per step). t = chunk tokens, c = context computed before the
# chunk, s = full prompt length, ctx = decode context (tokens computed so far).
COMPOSITION_COLUMNS: dict[str, str] = {
    "pf_count": "prefill requests",
    "pf_tokens": "Σ t (prefill tokens)",
    "pf_tokens_sq": "Σ t² (tokens²)",
    "pf_ctx_tokens": "Σ t·c (tokens², context before the chunk)",
    "pf_prompt_tokens": "Σ t·s (tokens², BLIS's full-prompt approximation)",
    "pf_kv_tokens": "Σ (c + t) (KV tokens read by prefill attention)",
    "pf_ctx_max": "max (c + t) (tokens)",
    "pf_sampling": "prefill requests finishing their prompt this step (need logits)",
    "dc_count": "decode requests (1 token each)",
    "dc_ctx_sum": "Σ ctx (tokens)",
    "dc_ctx_max": "max ctx (tokens)",
    "blocks_allocated": "Σ KV blocks held by the batch",
    "blocks_cached": "Σ KV blocks served by the prefix cache",
    "preempted_before": "batch requests preempted at least once before",
}

STEP_SCHEMA = pa.schema(
    [pa.field("experiment", pa.string()), pa.field("step_id", pa.int64())]
    + [pa.field(c, pa.float64()) for c in SUMMARY_FIELDS.values() if c != "step_id"]
    + [pa.field(c, pa.float64()) for c in COMPOSITION_COLUMNS]
    + [pa.field("composition", pa.string())]
)


@dataclass
class StepTableBuilder:
    """Accumulates step events of one experiment, then aggregates them into a table.

    Memory is O(traced steps + snapshots); call :meth:`table` once at the end.
    """

    experiment: str
    block_size: int = 16
    problems: list[Problem] = field(default_factory=list)
    _summary: dict[str, list[float]] = field(default_factory=dict)
    _snap: dict[str, list[float]] = field(default_factory=dict)
    _snap_prefill: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._summary = {c: [] for c in SUMMARY_FIELDS.values()}
        self._snap = {c: [] for c in SNAPSHOT_FIELDS.values()}

    def add(self, event: Event) -> None:
        if event.scope != STEP_SCOPE:
            return
        a = event.attrs
        if event.name == "step.BATCH_SUMMARY":
            if "step.id" not in a:
                return
            for key, col in SUMMARY_FIELDS.items():
                value = a.get(key)
                self._summary[col].append(np.nan if value is None else float(value))
        elif event.name == "step.REQUEST_SNAPSHOT":
            if "step.id" not in a:
                return
            for key, col in SNAPSHOT_FIELDS.items():
                self._snap[col].append(float(a.get(key) or 0))
            self._snap_prefill.append(a.get("request.phase") == "PREFILL")

    def add_all(self, events: Iterable[Event]) -> None:
        for event in events:
            self.add(event)

    def table(self) -> tuple[pa.Table, dict[str, int]]:
        """The step table and counts: steps seen, kept, dropped (by reason)."""
        s = {c: np.asarray(v, dtype=np.float64) for c, v in self._summary.items()}
        n_seen = len(s["step_id"])
        ids = s["step_id"].astype(np.int64) if n_seen else np.zeros(0, np.int64)
        order = np.argsort(ids, kind="stable")
        ids_sorted = ids[order]
        first = np.ones(len(ids_sorted), bool)
        first[1:] = ids_sorted[1:] != ids_sorted[:-1]
        keep = order[first]
        duplicates = int(n_seen - len(keep))
        dur = s["duration_us"][keep]
        valid = np.isfinite(dur) & (dur > 0)
        keep = keep[valid]
        counts = {"steps_seen": n_seen, "steps_duplicate": duplicates,
                  "steps_bad_duration": int((~valid).sum())}
        cols = {c: v[keep] for c, v in s.items()}
        cols["step_id"] = ids[keep]
        comp, has_snap = self._composition(cols["step_id"])
        fallback = self._summary_composition(cols)
        for name in COMPOSITION_COLUMNS:
            comp[name] = np.where(has_snap, comp[name], fallback[name])
        counts["steps_kept"] = len(keep)
        counts["steps_with_snapshots"] = int(has_snap.sum())
        arrays = {"experiment": pa.array([self.experiment] * len(keep), pa.string()),
                  "step_id": pa.array(cols["step_id"], pa.int64())}
        for c in SUMMARY_FIELDS.values():
            if c != "step_id":
                arrays[c] = pa.array(np.nan_to_num(cols[c], nan=0.0), pa.float64())
        for c in COMPOSITION_COLUMNS:
            arrays[c] = pa.array(comp[c], pa.float64())
        arrays["composition"] = pa.array(np.where(has_snap, "snapshot", "summary"), pa.string())
        return pa.table(arrays, schema=STEP_SCHEMA), counts

    def _composition(self, step_ids: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        n = len(step_ids)
        out = {c: np.zeros(n) for c in COMPOSITION_COLUMNS}
        snap = {c: np.asarray(v, dtype=np.float64) for c, v in self._snap.items()}
        if not len(snap["step_id"]) or not n:
            return out, np.zeros(n, bool)
        row = np.searchsorted(step_ids, snap["step_id"].astype(np.int64))
        row_ok = row < n
        row_ok[row_ok] &= step_ids[row[row_ok]] == snap["step_id"][row_ok].astype(np.int64)
        row, pf = row[row_ok], np.asarray(self._snap_prefill, bool)[row_ok]
        snap = {c: v[row_ok] for c, v in snap.items()}
        t, c, s = snap["scheduled"], snap["computed"], snap["prompt"]
        dc = ~pf

        def total(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
            return np.bincount(row[mask], weights=values[mask], minlength=n)

        def peak(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
            result = np.zeros(n)
            np.maximum.at(result, row[mask], values[mask])
            return result

        ones = np.ones(len(row))
        out["pf_count"] = total(ones, pf)
        out["pf_tokens"] = total(t, pf)
        out["pf_tokens_sq"] = total(t * t, pf)
        out["pf_ctx_tokens"] = total(t * c, pf)
        out["pf_prompt_tokens"] = total(t * s, pf)
        out["pf_kv_tokens"] = total(c + t, pf)
        out["pf_ctx_max"] = peak(c + t, pf)
        out["pf_sampling"] = total(ones, pf & (c + t >= s))
        out["dc_count"] = total(ones, dc)
        out["dc_ctx_sum"] = total(c, dc)
        out["dc_ctx_max"] = peak(c, dc)
        out["blocks_allocated"] = total(snap["blocks_allocated"], np.ones(len(row), bool))
        out["blocks_cached"] = total(snap["blocks_cached"], np.ones(len(row), bool))
        out["preempted_before"] = total(ones, snap["preemptions"] > 0)
        has = np.bincount(row, minlength=n) > 0
        return out, has

    def _summary_composition(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Estimate composition from BATCH_SUMMARY alone: counts are exact; contexts are
        apportioned from KV blocks in use (blocks × block_size), prefill chunks assumed to
        start at context 0."""
        pf_n, dc_n = cols["num_prefill_reqs"], cols["num_decode_reqs"]
        pf_t = cols["prefill_tokens"]
        used = np.maximum(cols["kv_blocks_total"] - cols["kv_blocks_free"], 0) * self.block_size
        ctx_for_decode = np.maximum(used - pf_t, 0)
        mean_chunk = np.divide(pf_t, pf_n, out=np.zeros_like(pf_t), where=pf_n > 0)
        mean_ctx = np.divide(ctx_for_decode, dc_n, out=np.zeros_like(pf_t), where=dc_n > 0)
        zeros = np.zeros_like(pf_t)
        return {
            "pf_count": pf_n, "pf_tokens": pf_t, "pf_tokens_sq": pf_t * mean_chunk,
            "pf_ctx_tokens": zeros, "pf_prompt_tokens": pf_t * mean_chunk,
            "pf_kv_tokens": pf_t, "pf_ctx_max": mean_chunk, "pf_sampling": pf_n,
            "dc_count": dc_n, "dc_ctx_sum": np.where(dc_n > 0, ctx_for_decode, 0),
            "dc_ctx_max": mean_ctx, "blocks_allocated": used / self.block_size,
            "blocks_cached": zeros, "preempted_before": zeros,
        }
