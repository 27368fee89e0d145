"""Reference implementations the vectorized ingest must reproduce exactly: the
per-step journey reconstruction sweep as it was before it was vectorized (verbatim,
``reconstruct_steps_reference``). The event-by-event request table is kept in the library
as ``ingest.requests._EventBuilder`` (it rebuilds the requests with unusual values).

Only tests import this module.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from blis_model.ingest.reconstruct import ReconstructionReport
from blis_model.ingest.steps import COMPOSITION_COLUMNS


@dataclass
class _Segment:
    """One uninterrupted stay of a request in the running batch (steps start..end)."""

    key: tuple
    start: int
    end: int
    need: int  # tokens to compute before decoding (prompt, or prompt + outputs so far)
    prompt: int
    known_done: int | None  # step whose chunk completes the prefill, when observed
    resumed_output: int  # outputs the request had when this segment began
    resumed: bool = False  # a segment after a preemption
    done: int = 0  # tokens computed so far (starts at the prefix-cache hit)
    cached_blocks: int = 0  # KV blocks served by the prefix cache in this segment




def _segments(row: dict[str, Any], report: ReconstructionReport, index: int,
              block_size: int) -> list[_Segment]:
    s0, f, e, prompt = (row["scheduled_step"], row["first_token_step"], row["finished_step"],
                        row["prompt_tokens"])
    if s0 is None or e is None or prompt is None:
        report.skip("incomplete lifecycle")
        return []
    pre = row.get("preempted_steps") or []
    outs = row.get("preempted_outputs") or []
    res = row.get("resumed_steps") or []
    hits = [row.get("scheduled_done_tokens") or 0] + list(
        row.get("resumed_done_tokens") or [0] * len(res))
    if len(pre) != len(res) or len(outs) != len(pre) or len(hits) != len(res) + 1:
        report.skip("unmatched preemption")
        return []
    starts, ends, needs, resumed = [s0], [], [prompt], [0]
    for p, o, r in zip(pre, outs, res, strict=True):
        ends.append(p - 1)
        starts.append(r)
        needs.append(prompt + o)
        resumed.append(o)
    ends.append(e)
    if any(b < a - 1 for a, b in zip(starts, ends, strict=True)) or any(
            ends[i] >= starts[i + 1] for i in range(len(ends) - 1)):
        report.skip("steps out of order")
        return []
    segs = []
    key: tuple = (s0, 1, row["queued_ns"] or 0, index)  # new requests: queue (FCFS) order
    for i, (a, b, need, out) in enumerate(zip(starts, ends, needs, resumed, strict=True)):
        if i:  # preempted requests return to the queue front, latest preempted first, then
            key = (a, 0, -pre[i - 1], key)  # in their former running order
        if b < a:
            continue  # preempted in the very step it was resumed
        known = f if (f is not None and out == 0 and a <= f <= b) else None
        hit = min(int(hits[i] or 0), need - 1)
        segs.append(_Segment(key, a, b, need, prompt, known, out, resumed=i > 0, done=hit,
                             cached_blocks=hit // block_size))
    report.requests_used += 1
    return segs


@dataclass
class _Decodes:
    """Running decode aggregates: context of a decode at step k is ``base + k``."""

    block_size: int = 16
    count: int = 0
    base_sum: int = 0
    cached_blocks: int = 0
    residues: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    heap: list[tuple[int, int]] = field(default_factory=list)
    removed: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.residues = np.zeros(self.block_size, np.int64)  # decodes per base mod block

    def add(self, base: int, ident: int, cached_blocks: int = 0) -> None:
        self.count += 1
        self.base_sum += base
        self.cached_blocks += cached_blocks
        self.residues[base % self.block_size] += 1
        heapq.heappush(self.heap, (-base, ident))

    def remove(self, base: int, ident: int, cached_blocks: int = 0) -> None:
        self.count -= 1
        self.base_sum -= base
        self.cached_blocks -= cached_blocks
        self.residues[base % self.block_size] -= 1
        self.removed.add(ident)

    def blocks(self, k: int) -> int:
        """Σ ⌈(ctx + 1) / block_size⌉ over decodes at step k (KV blocks they hold)."""
        bs = self.block_size
        pad = (-(np.arange(bs) + k + 1)) % bs  # round-up of (r + k + 1) to a block multiple
        return (self.base_sum + self.count * (k + 1) + int(self.residues @ pad)) // bs

    def max_base(self) -> int | None:
        while self.heap and self.heap[0][1] in self.removed:
            self.removed.discard(heapq.heappop(self.heap)[1])
        return -self.heap[0][0] if self.heap else None


def reconstruct_steps_reference(requests: pa.Table, max_num_batched_tokens: int,
                      step_ids: np.ndarray | None = None, block_size: int = 16
                      ) -> tuple[pa.Table, ReconstructionReport]:
    """Composition of every step in ``step_ids`` (default: every step some request was in)
    from the request table's journey columns. Columns: ``step_id`` + COMPOSITION_COLUMNS."""
    report = ReconstructionReport()
    by_start: dict[int, list[_Segment]] = defaultdict(list)
    for index, row in enumerate(requests.to_pylist()):
        if row.get("request_id") is None:
            continue
        for seg in _segments(row, report, index, block_size):
            by_start[seg.start].append(seg)
            report.segments += 1
    wanted = None if step_ids is None else np.unique(np.asarray(step_ids, np.int64))
    cols: dict[str, list[float]] = {c: [] for c in COMPOSITION_COLUMNS}
    ids: list[int] = []
    if not by_start:
        return _table(ids, cols), report
    first = min(by_start)
    last = max(s.end for segs in by_start.values() for s in segs)
    if wanted is not None and len(wanted):
        last = max(last, int(wanted[-1]))
    active: list[_Segment] = []
    decodes = _Decodes(block_size)
    ending: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    preempted_active = 0  # resumed segments currently in the batch (prefill or decode)
    resumed_ending: dict[int, int] = defaultdict(int)
    ident = 0
    want_set = None if wanted is None else set(wanted.tolist())
    for k in range(first, last + 1):
        for seg in by_start.get(k, ()):
            bisect.insort(active, seg, key=lambda s: s.key)
            if seg.resumed:
                preempted_active += 1
                resumed_ending[seg.end] += 1
        budget = max_num_batched_tokens - decodes.count
        pf: list[tuple[int, int, int]] = []  # (t, c, s)
        extra_dc: list[int] = []  # 1-token completions of a recompute: decodes
        cached = 0  # prefix-cache blocks of the batch's prefill members
        keep: list[_Segment] = []
        new_decodes: list[tuple[int, int, int]] = []  # (base, end, cached blocks)
        for seg in active:
            if k > seg.end:
                report.prefills_preempted += 1
                continue
            rem = seg.need - seg.done
            if seg.known_done == k:
                t = rem
                report.forced_chunks += t > budget
            elif seg.known_done is not None:
                t = min(budget, rem - 1)
            else:
                t = min(budget, rem)
            if t <= 0:
                keep.append(seg)
                continue
            c = seg.done
            seg.done += t
            budget -= t
            cached += seg.cached_blocks
            if seg.done < seg.need:
                keep.append(seg)
                pf.append((t, c, seg.prompt))
                continue
            if seg.resumed_output >= 1 and t == 1:
                extra_dc.append(c)
            else:
                pf.append((t, c, seg.prompt))
            if seg.end > k:  # decodes from k + 1 at context need + (step - k) - 1
                new_decodes.append((seg.need - k - 1, seg.end, seg.cached_blocks))
        active = keep
        if want_set is None or k in want_set:
            ids.append(k)
            _record(cols, k, pf, extra_dc, decodes, preempted_active, block_size)
            cols["blocks_cached"][-1] = cached + decodes.cached_blocks
        for base, end, blocks in new_decodes:
            decodes.add(base, ident, blocks)
            ending[end].append((base, ident, blocks))
            ident += 1
        for base, who, blocks in ending.pop(k, ()):
            decodes.remove(base, who, blocks)
        preempted_active -= resumed_ending.pop(k, 0)
    table = _table(ids, cols)
    if wanted is not None:  # steps outside every segment are empty batches
        table = _align(table, wanted)
    return table, report


def _record(cols: dict[str, list[float]], k: int, pf: list[tuple[int, int, int]],
            extra_dc: list[int], decodes: _Decodes, preempted_active: int,
            block_size: int) -> None:
    t = np.array([p[0] for p in pf], np.float64)
    c = np.array([p[1] for p in pf], np.float64)
    s = np.array([p[2] for p in pf], np.float64)
    n_dc = decodes.count + len(extra_dc)
    dc_sum = decodes.base_sum + decodes.count * k + sum(extra_dc)
    top = decodes.max_base() if decodes.count else None
    dc_max = max(([top + k] if top is not None else []) + extra_dc, default=0)
    cols["pf_count"].append(len(pf))
    cols["pf_tokens"].append(t.sum())
    cols["pf_tokens_sq"].append((t * t).sum())
    cols["pf_ctx_tokens"].append((t * c).sum())
    cols["pf_prompt_tokens"].append((t * s).sum())
    cols["pf_kv_tokens"].append((c + t).sum())
    cols["pf_ctx_max"].append((c + t).max() if len(pf) else 0.0)
    cols["pf_sampling"].append(float((c + t >= s).sum()))
    cols["dc_count"].append(n_dc)
    cols["dc_ctx_sum"].append(dc_sum)
    cols["dc_ctx_max"].append(dc_max)
    pf_blocks = sum(math.ceil((ci + ti) / block_size) for ti, ci in zip(t, c, strict=True))
    dc_blocks = decodes.blocks(k) + sum(math.ceil((x + 1) / block_size) for x in extra_dc)
    cols["blocks_allocated"].append(pf_blocks + dc_blocks)
    cols["blocks_cached"].append(0.0)
    cols["preempted_before"].append(preempted_active)


def _table(ids: list[int], cols: dict[str, list[float]]) -> pa.Table:
    arrays = {"step_id": pa.array(ids, pa.int64())}
    arrays.update({c: pa.array(np.asarray(v, np.float64), pa.float64())
                   for c, v in cols.items()})
    return pa.table(arrays)


def _align(table: pa.Table, wanted: np.ndarray) -> pa.Table:
    have = table.column("step_id").to_numpy()
    wanted = np.asarray(wanted, np.int64)
    pos = np.minimum(np.searchsorted(have, wanted), max(len(have) - 1, 0))
    ok = have[pos] == wanted if len(have) else np.zeros(len(wanted), bool)
    arrays = {"step_id": pa.array(wanted, pa.int64())}
    for c in COMPOSITION_COLUMNS:
        values = table.column(c).to_numpy() if len(have) else np.zeros(0)
        out = np.zeros(len(wanted))
        out[ok] = values[pos[ok]]
        arrays[c] = pa.array(out, pa.float64())
    return pa.table(arrays)


