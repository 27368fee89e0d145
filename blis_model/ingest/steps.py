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
import pyarrow.compute as pc

from blis_model.ingest.otlp import STEP_SCOPE, Event, Problem
from blis_model.ingest.scan import EventColumns, Wanted, columns_from_events

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


STEP_EVENTS: tuple[Wanted, ...] = (
    Wanted(STEP_SCOPE, "step.REQUEST_SNAPSHOT", numbers=tuple(SNAPSHOT_FIELDS),
           strings=("request.phase", "request.id")),
    Wanted(STEP_SCOPE, "step.BATCH_SUMMARY", numbers=tuple(SUMMARY_FIELDS)),
)
"""What the step table needs from a trace: these attributes of these two events. The
most frequent kind comes first: the fast scanner removes kinds in this order, so later
passes run over a much shorter line."""
SNAPSHOT, SUMMARY = STEP_EVENTS


def _concat(chunks: list[EventColumns], wanted: Wanted) -> EventColumns:
    if len(chunks) == 1:
        return chunks[0]
    numbers = {k: np.concatenate([c.numbers[k] for c in chunks] or [np.zeros(0)])
               for k in wanted.numbers}
    strings = {k: [x for c in chunks for x in c.strings[k]] for k in wanted.strings}
    return EventColumns(wanted, sum(c.size for c in chunks), numbers, strings)


def _repeats(step: np.ndarray, request_ids: list[bytes | None], usable: np.ndarray
             ) -> np.ndarray:
    """Indices of snapshots repeating an earlier (step, request id) pair among the
    ``usable`` rows with a request id; the first occurrence is not a repeat."""
    if request_ids.count(None):
        usable = usable & np.array([r is not None for r in request_ids], dtype=bool)
    rows = np.flatnonzero(usable)
    if len(rows) < 2:
        return rows[:0]
    # prefilter on a hash of the pair: all distinct → no repeats (the common case)
    hashes = np.fromiter(map(hash, request_ids), dtype=np.int64, count=len(request_ids))
    step_bits = (step[rows] + 0.0).view(np.int64)  # + 0.0 folds -0.0 into 0.0
    key = hashes[rows] + step_bits * np.int64(1_000_003)  # wraps around: fine for a filter
    if len(np.unique(key)) == len(rows):
        return rows[:0]
    seen: set[tuple[float, bytes | None]] = set()
    repeats = []
    steps = step.tolist()
    for i in rows.tolist():
        pair = (steps[i], request_ids[i])
        if pair in seen:
            repeats.append(i)
        else:
            seen.add(pair)
    return np.asarray(repeats, dtype=np.int64)


def composition_of_members(step: np.ndarray, n_steps: int, prefill: np.ndarray,
                           members: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The composition columns (:data:`COMPOSITION_COLUMNS`) of ``n_steps`` steps from
    their members: one row per (step, request) with the step's index ``step``, whether it
    is a ``prefill`` chunk, and its ``scheduled`` tokens, ``computed`` context before the
    step, ``prompt`` length, ``blocks_allocated``, ``blocks_cached`` and ``preemptions``
    (the snapshot's fields). Prefill rows: counts, tokens, Σ tokens², Σ tokens·context,
    Σ tokens·prompt, KV tokens after the step, the longest context, and the chunks that
    finish their prompt (they sample); decode rows: count, Σ and max context."""
    t, c, s = members["scheduled"], members["computed"], members["prompt"]
    pf, dc = prefill, ~prefill
    ones = np.ones(len(step))

    def total(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.bincount(step[mask], weights=values[mask], minlength=n_steps)

    def peak(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = np.zeros(n_steps)
        np.maximum.at(out, step[mask], values[mask])
        return out

    every = np.ones(len(step), bool)
    return {
        "pf_count": total(ones, pf), "pf_tokens": total(t, pf),
        "pf_tokens_sq": total(t * t, pf), "pf_ctx_tokens": total(t * c, pf),
        "pf_prompt_tokens": total(t * s, pf), "pf_kv_tokens": total(c + t, pf),
        "pf_ctx_max": peak(c + t, pf), "pf_sampling": total(ones, pf & (c + t >= s)),
        "dc_count": total(ones, dc), "dc_ctx_sum": total(c, dc), "dc_ctx_max": peak(c, dc),
        "blocks_allocated": total(members["blocks_allocated"], every),
        "blocks_cached": total(members["blocks_cached"], every),
        "preempted_before": total(ones, members["preemptions"] > 0),
    }

@dataclass
class StepTableBuilder:
    """Accumulates the step events of one experiment, then aggregates them into a table.

    Feed it decoded :class:`Event` objects (:meth:`add`) or columns from the fast
    decoder (:meth:`add_columns`), in file order; the first occurrence of a step (and of
    a request's snapshot within a step) wins, later duplicates are counted and dropped.
    Memory is O(traced steps + snapshots); call :meth:`table` once at the end.
    """

    experiment: str
    block_size: int = 16
    problems: list[Problem] = field(default_factory=list)
    _chunks: dict[Wanted, list[EventColumns]] = field(default_factory=dict)
    _pending: dict[Wanted, list[Event]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._chunks = {w: [] for w in STEP_EVENTS}
        self._pending = {w: [] for w in STEP_EVENTS}
        self._by_name = {w.name: w for w in STEP_EVENTS}

    def add(self, event: Event) -> None:
        """One decoded event (anything but step events is ignored)."""
        wanted = self._by_name.get(event.name)
        if wanted is not None and event.scope == wanted.scope:
            self._pending[wanted].append(event)

    def add_all(self, events: Iterable[Event]) -> None:
        for event in events:
            self.add(event)

    def add_columns(self, columns: EventColumns) -> None:
        """Columns of step events (``ingest.scan`` with :data:`STEP_EVENTS`)."""
        if columns.wanted not in self._chunks:
            return
        self._flush()
        if columns.size:
            self._chunks[columns.wanted].append(columns)

    def _flush(self) -> None:
        for wanted, events in self._pending.items():
            if events:
                self._chunks[wanted].append(columns_from_events(wanted, events))
                self._pending[wanted] = []

    def _collected(self, wanted: Wanted) -> EventColumns:
        self._flush()
        return _concat(self._chunks[wanted], wanted)

    def table(self) -> tuple[pa.Table, dict[str, int]]:
        """The step table and counts: steps seen, kept, dropped (by reason)."""
        summary = self._collected(SUMMARY)
        has_id = np.isfinite(summary.numbers["step.id"])
        s = {col: summary.numbers[key][has_id] for key, col in SUMMARY_FIELDS.items()}
        n_seen = len(s["step_id"])
        ids = s["step_id"].astype(np.int64)
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
                  "steps_bad_duration": int((~valid).sum()),
                  "events_without_step_id": int((~has_id).sum())}
        cols = {c: v[keep] for c, v in s.items()}
        cols["step_id"] = ids[keep]
        comp, has_snap = self._composition(cols["step_id"], counts)
        fallback = self._summary_composition({c: np.nan_to_num(v) for c, v in cols.items()})
        for name in COMPOSITION_COLUMNS:
            comp[name] = np.where(has_snap, comp[name], fallback[name])
        counts["steps_kept"] = len(keep)
        counts["steps_with_snapshots"] = int(has_snap.sum())
        arrays = {"experiment": pa.repeat(pa.scalar(self.experiment, pa.string()), len(keep)),
                  "step_id": pa.array(cols["step_id"], pa.int64())}
        for c in SUMMARY_FIELDS.values():
            if c != "step_id":
                arrays[c] = pa.array(np.nan_to_num(cols[c], nan=0.0), pa.float64())
        for c in COMPOSITION_COLUMNS:
            arrays[c] = pa.array(comp[c], pa.float64())
        arrays["composition"] = pc.if_else(pa.array(has_snap, pa.bool_()), "snapshot", "summary")
        return pa.table(arrays, schema=STEP_SCHEMA), counts

    def _snapshots(self, counts: dict[str, int]
                   ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Snapshot columns (missing numbers = 0) and the PREFILL mask, without events
        lacking a step id and without repeats of a (step, request) pair."""
        raw = self._collected(SNAPSHOT)
        step = raw.numbers["step.id"]
        ok = np.isfinite(step)
        counts["events_without_step_id"] += int((~ok).sum())
        ok[_repeats(step, raw.strings["request.id"], ok)] = False
        counts["snapshots_duplicate"] = int(np.isfinite(step).sum() - ok.sum())
        snap = {col: np.nan_to_num(raw.numbers[key][ok], nan=0.0)
                for key, col in SNAPSHOT_FIELDS.items()}
        phase = np.asarray(raw.strings["request.phase"] + [None], dtype=object)[:-1]
        return snap, (phase == b"PREFILL")[ok]

    def _composition(self, step_ids: np.ndarray, counts: dict[str, int]
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        n = len(step_ids)
        out = {c: np.zeros(n) for c in COMPOSITION_COLUMNS}
        snap, prefill = self._snapshots(counts)
        if not len(snap["step_id"]) or not n:
            return out, np.zeros(n, bool)
        snap_ids = snap["step_id"].astype(np.int64)
        row = np.searchsorted(step_ids, snap_ids)
        row_ok = row < n
        row_ok[row_ok] &= step_ids[row[row_ok]] == snap_ids[row_ok]
        row, pf = row[row_ok], prefill[row_ok]
        snap = {c: v[row_ok] for c, v in snap.items()}
        out.update(composition_of_members(row, n, pf, snap))
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
