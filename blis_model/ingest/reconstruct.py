"""Step composition rebuilt from journey events, for steps without ``REQUEST_SNAPSHOT``.

Teacher-forced on the observed schedule: a request is in the batch from its SCHEDULED
step to its FINISHED step, minus each gap from a PREEMPTED step (not in that batch) to
the RESUME step. Within each such *segment* it first (re)computes its tokens — the
prompt, or after a preemption the prompt plus the outputs it had — in chunks, then
decodes one token per step at context ``tokens computed``. Chunks follow the vLLM V1
rule: decodes take one token each first, then prefills in admission order take what is
left of ``max_num_batched_tokens``; a chunking whose end is known (FIRST_TOKEN) is forced
to end exactly there.

Only the chunking is sequential: one sweep visits just the steps where some segment is
still (re)computing its tokens — a few per request — with the decode count it needs from
a heap of pending changes. Everything else is interval arithmetic over all steps at
once: decode counts, context sums, KV blocks (per residue of the block size) and the
prefix-cache blocks by difference arrays, the longest decode context by a segment-tree
range maximum. Output columns are those of ``ingest.steps.COMPOSITION_COLUMNS``.
Prefix-cache hits are known from the prompt tokens already computed at each (re)schedule
(journey ``prefill.done_tokens``).
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from blis_model.ingest.steps import COMPOSITION_COLUMNS

COMPARED = ("pf_count", "pf_tokens", "pf_ctx_tokens", "dc_count", "dc_ctx_sum")
_LOW = np.iinfo(np.int64).min // 4  # "no value yet" for maxima (room for + step)


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
    rank: int = 0  # position in admission order (sorted keys)


@dataclass
class ReconstructionReport:
    """What the reconstruction used and where it had to force the observed schedule."""

    requests_used: int = 0
    requests_skipped: dict[str, int] = field(default_factory=dict)
    segments: int = 0
    forced_chunks: int = 0  # chunks that had to exceed the budget to end at FIRST_TOKEN
    prefills_preempted: int = 0  # segments preempted before their (re)computation ended
    # agreement with the traced steps (compare_with_snapshots / compare_with_summaries),
    # set by request_level.request_data: {"snapshots": ... or None, "summaries": ...}
    agreement: dict[str, Any] | None = None

    def skip(self, reason: str) -> None:
        self.requests_skipped[reason] = self.requests_skipped.get(reason, 0) + 1


def _segments(row: dict[str, Any], report: ReconstructionReport, index: int,
              block_size: int) -> list[_Segment]:
    """The segments of one request (a row of the request table as a dict)."""
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


def _column(requests: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(int64 values with 0 for null, valid mask) of an integer column."""
    col = requests.column(name)
    valid = np.asarray(col.is_valid()) if len(col) else np.zeros(0, bool)
    values = np.asarray(col.fill_null(0).to_numpy(), np.int64) if len(col) else (
        np.zeros(0, np.int64))
    return values, valid


def _all_segments(requests: pa.Table, report: ReconstructionReport, block_size: int
                  ) -> list[_Segment]:
    """Every request's segments (:func:`_segments`), the one-segment requests — no
    preemption — in bulk; skip reasons counted in row order, as row by row."""
    n = requests.num_rows
    if not n:
        return []
    journey = np.asarray(requests.column("request_id").is_valid())
    s0, has_s0 = _column(requests, "scheduled_step")
    f, has_f = _column(requests, "first_token_step")
    e, has_e = _column(requests, "finished_step")
    prompt, has_prompt = _column(requests, "prompt_tokens")
    queued, _ = _column(requests, "queued_ns")
    hit0, _ = _column(requests, "scheduled_done_tokens")
    lists = ("preempted_steps", "preempted_outputs", "resumed_steps", "resumed_done_tokens")
    lengths = [np.asarray(pc.list_value_length(requests.column(c)).fill_null(0)) for c in lists]
    plain = journey & (lengths[0] == 0) & (lengths[1] == 0) & (lengths[2] == 0) & (
        lengths[3] == 0)
    incomplete = ~(has_s0 & has_e & has_prompt)
    reasons: list[tuple[int, str]] = []  # (row, reason) of skipped plain rows
    segs: list[_Segment] = []
    rows = np.flatnonzero(plain & ~incomplete)
    reasons += [(i, "incomplete lifecycle") for i in np.flatnonzero(plain & incomplete)]
    disorder = e[rows] < s0[rows] - 1
    reasons += [(i, "steps out of order") for i in rows[disorder]]
    rows = rows[~disorder]
    used = rows.tolist()
    live = rows[e[rows] >= s0[rows]]  # (e = s0 - 1: preempted at once, no segment)
    a, b, need = s0[live], e[live], prompt[live]
    known = np.where(has_f[live] & (a <= f[live]) & (f[live] <= b), f[live], -1)
    hit = np.minimum(hit0[live], need - 1)
    for i, (ai, bi, ni, ki, hi, qi) in zip(
            live.tolist(), zip(a.tolist(), b.tolist(), need.tolist(), known.tolist(),
                               hit.tolist(), queued[live].tolist(), strict=True), strict=True):
        segs.append(_Segment((ai, 1, qi, i), ai, bi, ni, ni, None if ki < 0 else ki, 0,
                             done=hi, cached_blocks=hi // block_size))
    # the rest (preempted or resumed requests) one by one
    other = np.flatnonzero(journey & ~plain).tolist()
    if other:
        table = requests.take(pa.array(other, pa.int64())).to_pylist()
        for i, row in zip(other, table, strict=True):
            sub = ReconstructionReport()
            segs += _segments(row, sub, i, block_size)
            if sub.requests_used:
                used.append(i)
            reasons += [(i, reason) for reason in sub.requests_skipped]
    report.requests_used += len(used)
    for _, reason in sorted(reasons, key=lambda pair: pair[0]):
        report.skip(reason)
    return segs


_PREFILL_SUMS = ("pf_count", "pf_tokens", "pf_tokens_sq", "pf_ctx_tokens", "pf_prompt_tokens",
                 "pf_kv_tokens", "pf_sampling", "pf_blocks", "cached", "extra_count",
                 "extra_sum", "extra_blocks")
_PREFILL_MAXIMA = ("pf_ctx_max", "extra_max")


def _sweep(segs: list[_Segment], first: int, last: int, budget_max: int, block_size: int,
           report: ReconstructionReport
           ) -> tuple[dict[str, np.ndarray], list[tuple[int, int, int, int]]]:
    """The sequential part: every segment's chunks, visiting only steps where some
    segment still computes tokens. Returns per-step prefill aggregates (int64 arrays over
    first..last; maxima :data:`_LOW` where none) and the decode intervals (first step,
    last step, context base, cached blocks): a decode's context at step k is ``base + k``."""
    bs = block_size
    by_start = sorted(segs, key=lambda s: s.start)
    visited: dict[int, list[int]] = {}  # step offset → sums then maxima (Python ints)
    decodes: list[tuple[int, int, int, int]] = []
    changes: list[tuple[int, int]] = []  # (step, ±1): decode count changes
    count = 0
    active: list[_Segment] = []
    ranks: list[int] = []
    nxt = 0
    k = first
    while k <= last and (active or nxt < len(by_start)):
        if not active:
            k = max(k, by_start[nxt].start)
            if k > last:
                break
        while nxt < len(by_start) and by_start[nxt].start == k:
            seg = by_start[nxt]
            at = bisect.bisect(ranks, seg.rank)
            ranks.insert(at, seg.rank)
            active.insert(at, seg)
            nxt += 1
        while changes and changes[0][0] <= k:
            count += heapq.heappop(changes)[1]
        budget = budget_max - count
        keep: list[_Segment] = []
        # pf count, tokens, tokens², t·c, t·s, kv, sampling, blocks, cached; extra count,
        # sum, blocks; then the maxima: pf kv, extra context
        acc = [0] * 12 + [_LOW, _LOW]
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
            acc[8] += seg.cached_blocks
            if seg.done < seg.need:
                keep.append(seg)
            if seg.done < seg.need or not (seg.resumed_output >= 1 and t == 1):
                kv = c + t
                acc[0] += 1
                acc[1] += t
                acc[2] += t * t
                acc[3] += t * c
                acc[4] += t * seg.prompt
                acc[5] += kv
                acc[6] += kv >= seg.prompt
                acc[7] += -(-kv // bs)
                acc[12] = max(acc[12], kv)
            else:  # the 1-token completion of a recompute: a decode
                acc[9] += 1
                acc[10] += c
                acc[11] += -(-(c + 1) // bs)
                acc[13] = max(acc[13], c)
            if seg.done >= seg.need and seg.end > k:  # decodes from k + 1 at need + (s - k) - 1
                decodes.append((k + 1, seg.end, seg.need - k - 1, seg.cached_blocks))
                heapq.heappush(changes, (k + 1, 1))
                heapq.heappush(changes, (seg.end + 1, -1))
        visited[k - first] = acc
        if len(keep) != len(active):
            active = keep
            ranks = [s.rank for s in keep]
        k += 1
    size = last - first + 1
    at_steps = np.fromiter(visited, np.int64, len(visited))
    values = np.array(list(visited.values()), np.int64).reshape(-1, 14)
    out: dict[str, np.ndarray] = {}
    for j, name in enumerate(_PREFILL_SUMS + _PREFILL_MAXIMA):
        col = np.full(size, _LOW if name in _PREFILL_MAXIMA else 0, np.int64)
        col[at_steps] = values[:, j]
        out[name] = col
    return out, decodes


def _interval_sum(size: int, lo: np.ndarray, hi: np.ndarray, values: np.ndarray
                  ) -> np.ndarray:
    """Σ ``values`` of the intervals [lo, hi] (offsets) covering each of ``size`` steps."""
    diff = np.zeros(size + 1, np.int64)
    np.add.at(diff, lo, values)
    np.add.at(diff, hi + 1, -values)
    return np.cumsum(diff[:-1])


def _interval_max(size: int, lo: np.ndarray, hi: np.ndarray, values: np.ndarray,
                  none: int) -> np.ndarray:
    """Max ``values`` of the intervals [lo, hi] covering each step (``none``: no interval),
    by a segment tree: each interval on its O(log n) canonical nodes, then pushed down."""
    width = 1
    while width < size:
        width *= 2
    tree = np.full(2 * width, none, np.int64)
    left, right = lo + width, hi + width + 1
    vals = values.copy()
    while len(left):
        odd = (left < right) & (left & 1 == 1)
        np.maximum.at(tree, left[odd], vals[odd])
        left = left + odd
        odd = (left < right) & (right & 1 == 1)
        right = right - odd
        np.maximum.at(tree, right[odd], vals[odd])
        left, right = left >> 1, right >> 1
        live = left < right
        left, right, vals = left[live], right[live], vals[live]
    level = 1
    while level < width:
        parents = np.arange(level, 2 * level)
        for child in (2 * parents, 2 * parents + 1):
            tree[child] = np.maximum(tree[child], tree[parents])
        level *= 2
    return tree[width:width + size]


def reconstruct_steps(requests: pa.Table, max_num_batched_tokens: int,
                      step_ids: np.ndarray | None = None, block_size: int = 16
                      ) -> tuple[pa.Table, ReconstructionReport]:
    """Composition of every step in ``step_ids`` (default: every step some request was in)
    from the request table's journey columns. Columns: ``step_id`` + COMPOSITION_COLUMNS."""
    report = ReconstructionReport()
    segs = _all_segments(requests, report, block_size)
    report.segments = len(segs)
    if not segs:
        return _table(np.zeros(0, np.int64), {c: np.zeros(0) for c in COMPOSITION_COLUMNS}
                      ), report
    for rank, seg in enumerate(sorted(segs, key=lambda s: s.key)):
        seg.rank = rank
    wanted = None if step_ids is None else np.unique(np.asarray(step_ids, np.int64))
    first = min(s.start for s in segs)
    last = max(s.end for s in segs)
    if wanted is not None and len(wanted):
        last = max(last, int(wanted[-1]))
    size = last - first + 1
    p, decodes = _sweep(segs, first, last, max_num_batched_tokens, block_size, report)
    bs = block_size
    steps = np.arange(first, last + 1, dtype=np.int64)
    d = np.array(decodes, np.int64).reshape(-1, 4)
    lo, hi, base, cached = d[:, 0] - first, d[:, 1] - first, d[:, 2], d[:, 3]
    ones = np.ones(len(d), np.int64)
    count = _interval_sum(size, lo, hi, ones)
    base_sum = _interval_sum(size, lo, hi, base)
    # Σ ⌈(base + k + 1) / bs⌉ = (Σ base + count·(k + 1) + Σ pad) / bs, the pad of a decode
    # depending only on (base + k + 1) mod bs: counted per residue of base
    residue = base % bs
    per_residue = np.zeros((size + 1, bs), np.int64)
    np.add.at(per_residue, (lo, residue), 1)
    np.add.at(per_residue, (hi + 1, residue), -1)
    per_residue = np.cumsum(per_residue[:-1], axis=0)
    pad = -(np.arange(bs)[None, :] + steps[:, None] + 1) % bs
    blocks = (base_sum + count * (steps + 1) + (per_residue * pad).sum(axis=1)) // bs
    top = _interval_max(size, lo, hi, base, _LOW)
    dc_max = np.where(count > 0, top + steps, _LOW)
    dc_max = np.where(p["extra_count"] > 0, np.maximum(dc_max, p["extra_max"]), dc_max)
    dc_max = np.where((count > 0) | (p["extra_count"] > 0), dc_max, 0)
    resumed = [s for s in segs if s.resumed]
    again = _interval_sum(size, np.array([s.start - first for s in resumed], np.int64),
                          np.array([s.end - first for s in resumed], np.int64),
                          np.ones(len(resumed), np.int64))
    cols = {
        "pf_count": p["pf_count"], "pf_tokens": p["pf_tokens"],
        "pf_tokens_sq": p["pf_tokens_sq"], "pf_ctx_tokens": p["pf_ctx_tokens"],
        "pf_prompt_tokens": p["pf_prompt_tokens"], "pf_kv_tokens": p["pf_kv_tokens"],
        "pf_ctx_max": np.where(p["pf_count"] > 0, p["pf_ctx_max"], 0),
        "pf_sampling": p["pf_sampling"],
        "dc_count": count + p["extra_count"],
        "dc_ctx_sum": base_sum + count * steps + p["extra_sum"],
        "dc_ctx_max": dc_max,
        "blocks_allocated": p["pf_blocks"] + blocks + p["extra_blocks"],
        "blocks_cached": p["cached"] + _interval_sum(size, lo, hi, cached),
        "preempted_before": again,
    }
    cols = {c: np.asarray(v, np.float64) for c, v in cols.items()}
    table = _table(steps, cols)
    if wanted is not None:  # steps outside every segment are empty batches
        table = _align(table, wanted)
    return table, report


def _table(ids: np.ndarray, cols: dict[str, np.ndarray]) -> pa.Table:
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


def _is(table: pa.Table, composition: str) -> np.ndarray:
    """Rows of ``table`` whose ``composition`` is ``composition`` (bool array)."""
    return np.asarray(pc.equal(table.column("composition"), composition).combine_chunks()
                      .to_numpy(zero_copy_only=False), bool)


def fill_compositions(steps: pa.Table, rebuilt: pa.Table) -> pa.Table:
    """The step table with every ``summary`` row's composition replaced by the journey
    reconstruction (``composition = "journey"``); snapshot rows are kept."""
    rebuilt = _align(rebuilt, steps.column("step_id").to_numpy())
    replace = _is(steps, "summary")
    arrays = {}
    for f in steps.schema:
        if f.name in COMPOSITION_COLUMNS:
            arrays[f.name] = pa.array(np.where(replace, rebuilt.column(f.name).to_numpy(),
                                               steps.column(f.name).to_numpy()), pa.float64())
        elif f.name == "composition":
            arrays[f.name] = pc.if_else(pa.array(replace), "journey",
                                        steps.column(f.name).combine_chunks())
        else:
            arrays[f.name] = steps.column(f.name)
    return pa.table(arrays, schema=steps.schema)


def compare_with_snapshots(steps: pa.Table, rebuilt: pa.Table,
                           columns: tuple[str, ...] = COMPARED) -> dict[str, Any]:
    """Agreement of the reconstruction with snapshot-derived rows: per column, the share of
    steps that agree exactly and the relative error of the column's total."""
    snap = _is(steps, "snapshot")
    ids = steps.column("step_id").to_numpy()[snap]
    rebuilt = _align(rebuilt, ids)
    out: dict[str, Any] = {"steps": int(snap.sum())}
    for c in columns:
        out[c] = _agreement(steps.column(c).to_numpy()[snap], rebuilt.column(c).to_numpy())
    return out


def _agreement(truth: np.ndarray, guess: np.ndarray) -> dict[str, float]:
    total = float(np.abs(truth).sum())
    return {"exact_share": float(np.mean(truth == guess)) if len(truth) else float("nan"),
            "total_rel_error": float(abs(guess.sum() - truth.sum()) / total) if total else 0.0}


SUMMARY_PAIRS = {"pf_tokens": "prefill_tokens", "pf_count": "num_prefill_reqs",
                 "dc_count": "num_decode_reqs"}


def compare_with_summaries(steps: pa.Table, rebuilt: pa.Table) -> dict[str, Any]:
    """Agreement of the reconstruction with every traced step's BATCH_SUMMARY counts
    (available even without snapshots): per pair, the share of steps that agree exactly
    and the relative error of the total. Disagreement means the journey-based schedule
    does not match the engine's (missing events, another scheduling policy)."""
    ids = steps.column("step_id").to_numpy()
    rebuilt = _align(rebuilt, ids)
    out: dict[str, Any] = {"steps": int(len(ids))}
    for ours, theirs in SUMMARY_PAIRS.items():
        out[ours] = _agreement(steps.column(theirs).to_numpy(), rebuilt.column(ours).to_numpy())
    return out
