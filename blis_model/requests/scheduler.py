"""vLLM V1's scheduler, one step at a time, fast: the engine of every replay.

Semantics (vLLM ``vllm/v1/core/sched/scheduler.py``, FCFS, recompute preemption):

* each step first serves the RUNNING requests in running order — a decode 1 token, a
  partially prefilled request its next chunk — each capped by the remaining token budget
  ``max_num_batched_tokens``, allocating KV blocks for the new tokens; when allocation
  fails the LAST running request is preempted (blocks freed, computed tokens reset: it
  recomputes, from the FRONT of the waiting queue), until it fits or the request itself
  was the victim;
* then, only if nothing was preempted, WAITING requests in order while budget > 0 and
  fewer than ``max_num_seqs`` run: prefix-cache hit (``kv.KVPool``), chunk = what is left
  of the budget, stop at the first that cannot get its blocks;
* a request produces a token at the END of a step in which its known tokens (prompt +
  outputs) become all computed; it finishes with its ``output_tokens``-th token.

Speed: running decodes advance uniformly, so they are kept in aggregate — the context of
a decode at step k is ``base + k``, so Σctx is ``Σbase + n·k``; the maximum comes from a
lazy heap of bases; finishes from a heap keyed by finish step; new KV blocks per step
from counts of bases mod ``block_size``. Only chunks, admissions, finishes, preemptions
and aborts cost per-request work. This is exact because of an invariant of the policy:
in running order every decode precedes every request with tokens left to (re)compute
(there is at most one, the last admitted: a chunk is cut only when the budget runs out,
which stops admission), and decodes always fit the budget (``max_num_seqs`` ≤ budget).
When a step's blocks do not fit, it is scheduled request by request in running order
(rare; O(running requests)).

Units: times µs, lengths tokens, KV in blocks. Step ids count executed steps from 0.
"""

from __future__ import annotations

import heapq
import math
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from blis_model.requests.kv import KVPool
from blis_model.requests.workload import ServerLimits, Workload

# request states
PENDING, WAITING, PREFILL, DECODE, FINISHED, ABORTED, REJECTED = range(7)
STATUS = {PENDING: "unfinished", WAITING: "unfinished", PREFILL: "unfinished",
          DECODE: "unfinished", FINISHED: "finished", ABORTED: "aborted",
          REJECTED: "rejected"}
# how a stay in the running batch ended
STAY_OPEN, STAY_FINISHED, STAY_PREEMPTED, STAY_ABORTED = 0, 1, 2, 3

AGGREGATES: tuple[str, ...] = (
    "pf_count", "pf_tokens", "pf_tokens_sq", "pf_ctx_tokens", "pf_prompt_tokens",
    "pf_kv_tokens", "pf_ctx_max", "pf_sampling", "dc_count", "dc_ctx_sum", "dc_ctx_max",
    "blocks_allocated", "blocks_cached", "preempted_before", "running_depth",
    "waiting_depth", "num_prefill_reqs", "num_decode_reqs", "prefill_tokens",
    "decode_tokens", "num_finished", "num_preempted", "kv_blocks_total", "kv_blocks_free",
    "kv_usage_ratio")
"""The step-table columns (``ingest.steps``) a step-time function sees, by name."""
_PF_FIELDS = AGGREGATES[:8]


class StepAggregates:
    """One step's batch, as the step table records it (``ingest.steps`` column names):
    prefill chunks (t tokens, c computed before, s prompt length): ``pf_count``, Σt,
    Σt², Σt·c, Σt·s, Σ(c+t), max(c+t), chunks completing their prompt; decodes (context
    ctx = tokens computed): ``dc_count``, Σctx, max ctx; Σ KV blocks of the batch, Σ blocks
    from the prefix cache, requests preempted before; queue depths after scheduling,
    finishes and preemptions of the step, KV blocks. Plus ``step_id``.

    ONE object is reused for every step: read it inside ``step_time``, never keep it."""

    __slots__ = ("step_id", *AGGREGATES)

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}


StepTime = Callable[[StepAggregates], float]


@dataclass
class EngineLog:
    """Per-request detail of a run (only with ``detail=True``), from which journeys and
    per-step request snapshots are derived (``requests.detail``).

    ``chunk_*``: every scheduled piece of a request that still had tokens to (re)compute
    (step, request, tokens, computed before). ``stay_*``: every stay in the running batch
    (request, first step, tokens from the prefix cache, outputs and preemptions at its
    start, last step in the batch, how it ended, the step at which it ended)."""

    chunk_step: list[int] = field(default_factory=list)
    chunk_req: list[int] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    chunk_computed: list[int] = field(default_factory=list)
    stay_req: list[int] = field(default_factory=list)
    stay_start: list[int] = field(default_factory=list)
    stay_hit: list[int] = field(default_factory=list)
    stay_output: list[int] = field(default_factory=list)
    stay_preemptions: list[int] = field(default_factory=list)
    stay_last: list[int] = field(default_factory=list)
    stay_end: list[int] = field(default_factory=list)
    stay_end_step: list[int] = field(default_factory=list)


@dataclass
class EngineRun:
    """Raw output of :class:`Engine` (per-step columns, per-request lists)."""

    steps: dict[str, np.ndarray]
    requests: dict[str, list]
    seconds: float
    log: EngineLog | None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rejections(workload: Workload, limits: ServerLimits) -> list[str | None]:
    """Per request: why the server refuses it up front (None: accepted). A request that
    exceeds ``max_model_len``, or whose KV could never fit in ``num_gpu_blocks`` (it
    would preempt itself forever), is rejected."""
    prompt, output = workload.prompt_tokens, workload.output_tokens
    total = prompt + output
    needed = -(-(total - 1) // limits.block_size)
    out: list[str | None] = [None] * len(workload)
    if limits.max_model_len is not None:
        for i in np.flatnonzero(total > limits.max_model_len).tolist():
            out[i] = (f"prompt + output = {int(total[i])} tokens exceeds max_model_len "
                      f"{limits.max_model_len}")
    for i in np.flatnonzero(needed > limits.num_gpu_blocks).tolist():
        out[i] = out[i] or (f"needs {int(needed[i])} KV blocks, the server has "
                            f"{limits.num_gpu_blocks}")
    return out


def prefix_blocks(workload: Workload, limits: ServerLimits) -> tuple[list[int], list[int]]:
    """(group of each request as dense ids 0.., or -1; full KV blocks of each group's
    shared prefix — the shortest ``prefix_tokens`` of its requests). No caching → all -1."""
    n = len(workload)
    if not limits.prefix_caching:
        return [-1] * n, []
    raw = workload.prefix_group
    member = (raw >= 0) & (workload.prefix_tokens >= limits.block_size)
    if not member.any():
        return [-1] * n, []
    ids, dense = np.unique(raw[member], return_inverse=True)
    full = np.full(len(ids), np.iinfo(np.int64).max)
    np.minimum.at(full, dense, workload.prefix_tokens[member] // limits.block_size)
    group = np.full(n, -1, np.int64)
    group[member] = dense
    return group.tolist(), full.tolist()


class Engine:
    """One replay of ``workload`` on a server with ``limits`` (see module docstring).

    ``step_time(aggregates) -> µs`` gives each step's duration; the clock advances by it
    plus ``step_gap_us``. ``max_steps`` stops the run early (remaining requests are
    "unfinished"). ``detail`` keeps an :class:`EngineLog`."""

    def __init__(self, workload: Workload, limits: ServerLimits, step_time: StepTime, *,
                 step_gap_us: float = 0.0, max_steps: int | None = None,
                 detail: bool = False) -> None:
        if not math.isfinite(step_gap_us) or step_gap_us < 0:
            raise ValueError(f"step_gap_us must be finite and >= 0, got {step_gap_us!r}")
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps!r}")
        self.workload, self.limits, self.step_time = workload, limits, step_time
        self.step_gap_us, self.max_steps = float(step_gap_us), max_steps
        n = len(workload)
        bs = self.bs = limits.block_size
        self.prompt: list[int] = workload.prompt_tokens.tolist()
        self.target: list[int] = workload.output_tokens.tolist()
        self.group, full = prefix_blocks(workload, limits)
        self.pool = KVPool(limits.num_gpu_blocks, full)
        self.reasons = rejections(workload, limits)
        # per-request scheduler state (decodes: see _enter_decode)
        self.state = [REJECTED if r else PENDING for r in self.reasons]
        self.computed = [0] * n
        self.output = [0] * n
        self.blocks = [0] * n  # KV blocks in its table (shared + private)
        self.shared = [0] * n  # of which blocks in its group's cache
        self.pinned = [False] * n
        self.hit = [0] * n  # blocks served by the prefix cache in the current stay
        self.preemptions = [0] * n
        self.base = [0] * n  # decodes: context at step k is base + k
        self.finish_step = [-1] * n
        self.stay = [-1] * n  # index of the current stay in the log
        nan = math.nan
        self.queued_us, self.scheduled_us = [nan] * n, [nan] * n
        self.first_token_us, self.finished_us = [nan] * n, [nan] * n
        self.queued_step, self.scheduled_step = [-1] * n, [-1] * n
        self.first_token_step, self.finished_step = [-1] * n, [-1] * n
        # queues
        self.running: list[int] = []  # running order
        self.prefilling: list[int] = []  # running requests with tokens left to compute
        self.waiting: deque[int] = deque()  # may hold aborted requests: skipped lazily
        self.n_waiting = 0
        # decode aggregates
        self.n_dc = 0
        self.base_sum = 0
        self.residues = [0] * bs  # decodes per base mod block_size
        self.dc_blocks = 0  # Σ KV blocks of decodes
        self.dc_cached = 0  # Σ prefix-cache blocks of decodes
        self.dc_preempted = 0  # decodes preempted before
        self.ctx_heap: list[tuple[int, int]] = []  # (-base, request), lazy
        self.finish_heap: list[tuple[int, int]] = []  # (finish step, request), lazy
        self.log = EngineLog() if detail else None
        # queue entries and aborts, in time order
        self._order: list[int] = workload.queue_order.tolist()
        self._queue_at: list[float] = workload.queue_us.tolist()
        self._abort_at: list[float] = workload.abort_us.tolist()
        self._aborts = sorted((a, r) for r, a in enumerate(self._abort_at)
                              if a == a and self.state[r] != REJECTED)  # a == a: not NaN
        self._next = self._next_abort = 0
        self.next_queue = self._queue_at[self._order[0]]
        self.next_abort = self._aborts[0][0] if self._aborts else math.inf

    # ----------------------------------------------------------------- request moves

    def _enqueue(self, r: int, now: float, k: int) -> None:
        self.state[r] = WAITING
        self.queued_us[r], self.queued_step[r] = now, k
        self.waiting.append(r)
        self.n_waiting += 1

    def _release(self, r: int) -> None:
        """Free a leaving request's KV: private blocks to the free list, unpin its group."""
        self.pool.give(self.blocks[r] - self.shared[r])
        if self.pinned[r]:
            self.pool.unpin(self.group[r])
            self.pinned[r] = False
        self.blocks[r] = self.shared[r] = self.hit[r] = 0

    def _enter_decode(self, r: int, k: int) -> None:
        """After step k completed its known tokens (token emitted, more to come)."""
        b = self.computed[r] - (k + 1)
        self.base[r] = b
        self.state[r] = DECODE
        fin = k + self.target[r] - self.output[r]
        self.finish_step[r] = fin
        self.n_dc += 1
        self.base_sum += b
        self.residues[b % self.bs] += 1
        self.dc_blocks += self.blocks[r]
        self.dc_cached += self.hit[r]
        self.dc_preempted += self.preemptions[r] > 0
        heapq.heappush(self.ctx_heap, (-b, r))
        heapq.heappush(self.finish_heap, (fin, r))

    def _leave_decode(self, r: int, computed: int) -> None:
        """Take a decode out of the aggregates, with ``computed`` tokens (its state is set
        by the caller; heap entries die lazily)."""
        b = self.base[r]
        self.n_dc -= 1
        self.base_sum -= b
        self.residues[b % self.bs] -= 1
        blocks = _cdiv(computed, self.bs)
        self.dc_blocks -= blocks
        self.blocks[r] = blocks
        self.dc_cached -= self.hit[r]
        self.dc_preempted -= self.preemptions[r] > 0
        self.computed[r] = computed
        self.output[r] = computed - self.prompt[r] + 1

    def _end_stay(self, r: int, how: int, last: int, at: int) -> None:
        if self.log is not None:
            i = self.stay[r]
            self.log.stay_last[i], self.log.stay_end[i], self.log.stay_end_step[i] = (
                last, how, at)

    def _preempt(self, r: int, k: int) -> None:
        """Preempt running ``r`` during step k's scheduling (before its own allocation)."""
        if self.state[r] == DECODE:
            self._leave_decode(r, self.base[r] + k)
        else:
            self.prefilling.remove(r)
        self._release(r)
        self.computed[r] = 0
        self.preemptions[r] += 1
        self.state[r] = WAITING
        self.waiting.appendleft(r)
        self.n_waiting += 1
        self._end_stay(r, STAY_PREEMPTED, k - 1, k)

    def _abort(self, r: int, now: float, k: int) -> None:
        """The server aborts ``r`` at the boundary before step k."""
        state = self.state[r]
        if state in (FINISHED, ABORTED, REJECTED):
            return
        if state == PENDING:
            self.reasons[r] = "aborted before entering the engine queue"
            now = self._abort_at[r]
        elif state == WAITING:
            self.n_waiting -= 1  # dropped from the deque when it reaches the front
        elif state == DECODE:
            self._leave_decode(r, self.base[r] + k)
            self.running.remove(r)
            self._release(r)
            self._end_stay(r, STAY_ABORTED, k - 1, k)
        elif state == PREFILL:
            self.prefilling.remove(r)
            self.running.remove(r)
            self._release(r)
            self._end_stay(r, STAY_ABORTED, k - 1, k)
        self.state[r] = ABORTED
        self.finished_us[r], self.finished_step[r] = now, k

    # -------------------------------------------------------------------- scheduling

    def _schedule_running(self, k: int) -> tuple[list[tuple[int, int, int]], int, int]:
        """Serve the running requests of step k: (prefill chunks (request, tokens,
        computed before), budget left, requests preempted)."""
        budget = self.limits.max_num_batched_tokens - self.n_dc
        dc_new = self.residues[-k % self.bs]
        need = dc_new
        chunks = []
        if self.prefilling:
            bs, computed, blocks = self.bs, self.computed, self.blocks
            for r in self.prefilling:
                if budget <= 0:
                    break
                c = computed[r]
                t = min(self.prompt[r] + self.output[r] - c, budget)
                need += _cdiv(c + t, bs) - blocks[r]
                chunks.append((r, t, c))
                budget -= t
        pool = self.pool
        if need <= pool.free + pool.evictable:
            if need:
                pool.take(need)
            self.dc_blocks += dc_new
            for r, t, c in chunks:
                self.blocks[r] = _cdiv(c + t, self.bs)
                self._cache_prefix(r, c + t)
            return chunks, budget, 0
        return self._schedule_running_in_order(k)

    def _schedule_running_in_order(self, k: int) -> tuple[list[tuple[int, int, int]], int, int]:
        """The same, request by request in running order, preempting the last running
        request while a request's blocks do not fit (vLLM's loop)."""
        bs, pool, running = self.bs, self.pool, self.running
        budget = self.limits.max_num_batched_tokens
        chunks: list[tuple[int, int, int]] = []
        preempted = 0
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            decode = self.state[r] == DECODE
            if decode:
                t, need = 1, int((self.base[r] + k) % bs == 0)
            else:
                c = self.computed[r]
                t = min(self.prompt[r] + self.output[r] - c, budget)
                need = _cdiv(c + t, bs) - self.blocks[r]
            while need > pool.free + pool.evictable:
                victim = running.pop()
                self._preempt(victim, k)
                preempted += 1
                if victim == r:
                    break
            else:
                pool.take(need)
                if decode:
                    self.dc_blocks += need
                else:
                    self.blocks[r] += need
                    chunks.append((r, t, c))
                    self._cache_prefix(r, c + t)
                budget -= t
                i += 1
                continue
            break
        if i < len(running):  # the invariant in the module docstring guarantees this
            raise RuntimeError(f"step {k}: running requests left unscheduled")
        return chunks, budget, preempted

    def _admit(self, k: int, now: float, budget: int, chunks: list[tuple[int, int, int]]
               ) -> None:
        """Admit waiting requests FCFS into step k (appends their first chunks)."""
        limits, pool, bs = self.limits, self.pool, self.bs
        waiting, state, group = self.waiting, self.state, self.group
        while self.n_waiting and budget > 0 and len(self.running) < limits.max_num_seqs:
            r = waiting[0]
            if state[r] != WAITING:
                waiting.popleft()
                continue
            known = self.prompt[r] + self.output[r]
            g = group[r]
            hit = min(pool.cached[g], (known - 1) // bs) if g >= 0 else 0
            c = hit * bs
            t = min(known - c, budget)
            blocks = _cdiv(c + t, bs)
            if not pool.admit(g, hit, blocks - hit):
                break
            waiting.popleft()
            self.n_waiting -= 1
            state[r] = PREFILL
            self.computed[r], self.blocks[r], self.shared[r], self.hit[r] = c, blocks, hit, hit
            self.pinned[r] = hit > 0
            self.running.append(r)
            self.prefilling.append(r)
            chunks.append((r, t, c))
            self._cache_prefix(r, c + t)
            budget -= t
            if self.scheduled_step[r] < 0:
                self.scheduled_us[r], self.scheduled_step[r] = now, k
            log = self.log
            if log is not None:
                self.stay[r] = len(log.stay_req)
                log.stay_req.append(r)
                log.stay_start.append(k)
                log.stay_hit.append(c)
                log.stay_output.append(self.output[r])
                log.stay_preemptions.append(self.preemptions[r])
                log.stay_last.append(-1)
                log.stay_end.append(STAY_OPEN)
                log.stay_end_step.append(-1)

    def _cache_prefix(self, r: int, computed: int) -> None:
        """``r`` was given blocks for ``computed`` tokens this step. Covering its group's
        whole prefix completes the group's cache right away: vLLM caches full blocks when
        it allocates them, so a request admitted later in the same step can hit them."""
        g = self.group[r]
        pool = self.pool
        if g < 0 or not pool.cached[g] < pool.full[g] <= computed // self.bs:
            return
        if not self.pinned[r]:
            pool.pin(g)
            self.pinned[r] = True
        self.shared[r] += pool.complete(g)

    # ----------------------------------------------------------------------- the run

    def _boundary(self, now: float, k: int) -> None:
        """Requests entering the queue by ``now``, then aborts due by ``now``."""
        order, queue_at, abort_at = self._order, self._queue_at, self._abort_at
        while self.next_queue <= now:
            r = order[self._next]
            self._next += 1
            if self.state[r] == PENDING:
                if abort_at[r] <= queue_at[r]:
                    self.state[r] = ABORTED
                    self.finished_us[r], self.finished_step[r] = abort_at[r], k
                    self.reasons[r] = "aborted before entering the engine queue"
                else:
                    self._enqueue(r, queue_at[r], k)
            self.next_queue = queue_at[order[self._next]] if self._next < len(order) else math.inf
        aborts = self._aborts
        while self.next_abort <= now:
            self._abort(aborts[self._next_abort][1], now, k)
            self._next_abort += 1
            self.next_abort = (aborts[self._next_abort][0] if self._next_abort < len(aborts)
                               else math.inf)

    def _finishing(self, k: int) -> list[int]:
        """Decodes producing their last token in step k (taken off the finish heap)."""
        out, heap, state, finish_step = [], self.finish_heap, self.state, self.finish_step
        while heap and heap[0][0] <= k:
            f, r = heapq.heappop(heap)
            if f == k and state[r] == DECODE and finish_step[r] == k:
                out.append(r)
        return out

    def _decode_max_base(self) -> int:
        """The largest base among running decodes (stale heap entries dropped)."""
        heap, state, base = self.ctx_heap, self.state, self.base
        while True:
            nb, r = heap[0]
            if state[r] == DECODE and base[r] == -nb:
                return -nb
            heapq.heappop(heap)

    def _chunk_aggregates(self, chunks: list[tuple[int, int, int]], agg: StepAggregates
                          ) -> tuple[int, int, int, int, int, int, int]:
        """Set ``agg``'s prefill fields from the step's chunks; return what the chunks add
        to the rest: (decodes, Σctx, max ctx) of 1-token completions (decodes in all but
        name), KV blocks, cached blocks, members preempted before, finishing requests."""
        prompt, output, target = self.prompt, self.output, self.target
        blocks, hit, preemptions = self.blocks, self.hit, self.preemptions
        pf_n = pf_t = pf_sq = pf_tc = pf_ts = pf_kv = pf_max = pf_smp = 0
        dc_n = dc_sum = dc_max = b_alloc = b_cached = pre = fin = 0
        for r, t, c in chunks:
            b_alloc += blocks[r]
            b_cached += hit[r]
            pre += preemptions[r] > 0
            known = prompt[r] + output[r]
            if c + t == known and output[r] + 1 == target[r]:
                fin += 1
            if t == 1 and output[r] and c + 1 == known:
                dc_n += 1
                dc_sum += c
                dc_max = max(dc_max, c)
                continue
            s = prompt[r]
            pf_n += 1
            pf_t += t
            pf_sq += t * t
            pf_tc += t * c
            pf_ts += t * s
            pf_kv += c + t
            pf_max = max(pf_max, c + t)
            pf_smp += c + t >= s
        agg.pf_count = agg.num_prefill_reqs = pf_n
        agg.pf_tokens = agg.prefill_tokens = pf_t
        agg.pf_tokens_sq, agg.pf_ctx_tokens, agg.pf_prompt_tokens = pf_sq, pf_tc, pf_ts
        agg.pf_kv_tokens, agg.pf_ctx_max, agg.pf_sampling = pf_kv, pf_max, pf_smp
        return dc_n, dc_sum, dc_max, b_alloc, b_cached, pre, fin

    def _advance(self, chunks: list[tuple[int, int, int]], finishing: list[int], end: float,
                 k: int) -> None:
        """After step k (ending at ``end``): chunks advance; requests whose known tokens
        are all computed produce a token, then decode or finish; decodes finish."""
        prompt, output, target, log = self.prompt, self.output, self.target, self.log
        for r, t, c in chunks:
            if log is not None:
                log.chunk_step.append(k)
                log.chunk_req.append(r)
                log.chunk_tokens.append(t)
                log.chunk_computed.append(c)
            done = self.computed[r] = c + t
            if done < prompt[r] + output[r]:
                continue
            output[r] += 1
            if output[r] == 1:
                self.first_token_us[r], self.first_token_step[r] = end, k
            self.prefilling.remove(r)
            if output[r] < target[r]:
                self._enter_decode(r, k)
            else:
                self._finish(r, end, k)
        for r in finishing:
            self._leave_decode(r, self.base[r] + k + 1)
            self._finish(r, end, k)

    def _finish(self, r: int, end: float, k: int) -> None:
        self.state[r] = FINISHED
        self.finished_us[r], self.finished_step[r] = end, k
        self.running.remove(r)
        self._release(r)
        self._end_stay(r, STAY_FINISHED, k, k)

    def run(self) -> EngineRun:
        """Replay every request to completion (or ``max_steps``). The hot path — a step of
        decodes only — touches aggregates, never a request."""
        t0 = time.perf_counter()
        running, pool, total_blocks = self.running, self.pool, self.pool.num_blocks
        step_time, gap, inf = self.step_time, self.step_gap_us, math.inf
        max_steps = self.max_steps if self.max_steps is not None else -1
        agg = StepAggregates()
        agg.kv_blocks_total = total_blocks
        pf_dirty = False  # agg's prefill fields are not all 0
        # per-step columns (float64 buffers: appends as cheap as a list's, no conversion);
        # prefill aggregates, finishes and preemptions only on the steps that have them
        col_start, col_dur, col_run, col_wait, col_free, col_dc, col_dcsum, col_dcmax = (
            array("d") for _ in range(8))
        col_blocks, col_cached, col_pre = array("d"), array("d"), array("d")
        sparse_pf: list[tuple] = []
        sparse_events: list[tuple[int, int, int]] = []
        now, k = self.next_queue, 0
        while k != max_steps:
            if self.next_queue <= now or self.next_abort <= now:
                self._boundary(now, k)
            if not running and not self.n_waiting:
                if self.next_queue == inf:
                    break
                self.waiting.clear()  # only aborted requests were left in it
                now = max(now, self.next_queue)
                continue
            chunks, budget, n_preempted = self._schedule_running(k)
            if not n_preempted and self.n_waiting:
                self._admit(k, now, budget, chunks)
            n_dc = self.n_dc
            if not n_dc and not chunks:
                if n_preempted:
                    continue  # everything was preempted: schedule again from the queue
                raise RuntimeError(f"step {k}: nothing schedulable")  # rejections prevent it
            heap = self.finish_heap
            finishing = self._finishing(k) if heap and heap[0][0] <= k else []
            dc_sum = self.base_sum + n_dc * k
            dc_max = k + self._decode_max_base() if n_dc else 0
            b_alloc, b_cached, pre_before = self.dc_blocks, self.dc_cached, self.dc_preempted
            n_fin = len(finishing)
            if chunks:
                dn, dsum, dmax, ba, bc, pb, fin = self._chunk_aggregates(chunks, agg)
                n_dc, dc_sum, dc_max = n_dc + dn, dc_sum + dsum, max(dc_max, dmax)
                b_alloc, b_cached, pre_before, n_fin = (b_alloc + ba, b_cached + bc,
                                                        pre_before + pb, n_fin + fin)
                if agg.pf_count:
                    sparse_pf.append((k, *(getattr(agg, name) for name in _PF_FIELDS)))
                pf_dirty = True
            elif pf_dirty:
                for name in _PF_FIELDS:
                    setattr(agg, name, 0)
                agg.num_prefill_reqs = agg.prefill_tokens = 0
                pf_dirty = False
            free = pool.free + pool.evictable
            n_run, n_wait = len(running), self.n_waiting
            agg.step_id = k
            agg.dc_count = agg.num_decode_reqs = agg.decode_tokens = n_dc
            agg.dc_ctx_sum, agg.dc_ctx_max = dc_sum, dc_max
            agg.blocks_allocated, agg.blocks_cached = b_alloc, b_cached
            agg.preempted_before = pre_before
            agg.running_depth, agg.waiting_depth = n_run, n_wait
            agg.num_finished, agg.num_preempted = n_fin, n_preempted
            agg.kv_blocks_free = free
            agg.kv_usage_ratio = 1.0 - free / total_blocks
            dt = step_time(agg)
            if not 0.0 < dt < inf:
                raise ValueError(f"step_time returned {dt!r} µs for step {k}: a step "
                                 "time must be finite and > 0")
            col_start.append(now)
            col_dur.append(dt)
            col_run.append(n_run)
            col_wait.append(n_wait)
            col_free.append(free)
            col_dc.append(n_dc)
            col_dcsum.append(dc_sum)
            col_dcmax.append(dc_max)
            col_blocks.append(b_alloc)
            col_cached.append(b_cached)
            col_pre.append(pre_before)
            if n_fin or n_preempted:
                sparse_events.append((k, n_fin, n_preempted))
            end = now + dt
            if chunks or finishing:
                self._advance(chunks, finishing, end, k)
            now = end + gap
            k += 1
        seconds = time.perf_counter() - t0
        return EngineRun(self._step_columns(
            k, col_start, col_dur, col_run, col_wait, col_free, col_dc, col_dcsum, col_dcmax,
            col_blocks, col_cached, col_pre, sparse_pf, sparse_events),
            self._request_columns(k), seconds, self._close_log(k))

    # ----------------------------------------------------------------------- outputs

    def _step_columns(self, n: int, start: array, dur: array, run: array, wait: array,
                      free: array, dc: array, dcsum: array, dcmax: array, blocks: array,
                      cached: array, pre: array, sparse_pf: list[tuple],
                      sparse_events: list[tuple[int, int, int]]) -> dict[str, np.ndarray]:
        def f64(buffer: array) -> np.ndarray:
            return np.frombuffer(buffer, np.float64) if len(buffer) else np.zeros(0)

        cols = {"step_id": np.arange(n, dtype=np.int64),
                "ts_start_us": f64(start), "duration_us": f64(dur),
                "running_depth": f64(run), "waiting_depth": f64(wait),
                "kv_blocks_free": f64(free), "dc_count": f64(dc), "dc_ctx_sum": f64(dcsum),
                "dc_ctx_max": f64(dcmax), "blocks_allocated": f64(blocks),
                "blocks_cached": f64(cached), "preempted_before": f64(pre)}
        pf = np.asarray(sparse_pf, np.float64).reshape(-1, 1 + len(_PF_FIELDS))
        rows = pf[:, 0].astype(np.int64)
        for j, name in enumerate(_PF_FIELDS):
            cols[name] = np.zeros(n)
            cols[name][rows] = pf[:, j + 1]
        ev = np.asarray(sparse_events, np.int64).reshape(-1, 3)
        for j, name in ((1, "num_finished"), (2, "num_preempted")):
            cols[name] = np.zeros(n)
            cols[name][ev[:, 0]] = ev[:, j]
        total = float(self.pool.num_blocks)
        cols["kv_blocks_total"] = np.full(n, total)
        cols["kv_usage_ratio"] = 1.0 - cols["kv_blocks_free"] / total
        cols["num_prefill_reqs"] = cols["pf_count"]
        cols["prefill_tokens"] = cols["pf_tokens"]
        cols["num_decode_reqs"] = cols["decode_tokens"] = cols["dc_count"]
        return cols

    def _request_columns(self, steps: int) -> dict[str, list]:
        for r in self.running:  # decodes still running: their outputs after the last step
            if self.state[r] == DECODE:
                self.output[r] = self.base[r] + steps - self.prompt[r] + 1
        return {"queued_us": self.queued_us, "scheduled_us": self.scheduled_us,
                "first_token_us": self.first_token_us, "finished_us": self.finished_us,
                "queued_step": self.queued_step, "scheduled_step": self.scheduled_step,
                "first_token_step": self.first_token_step,
                "finished_step": self.finished_step, "num_preemptions": self.preemptions,
                "generated_tokens": self.output,
                "status": [STATUS[s] for s in self.state], "reason": self.reasons}

    def _close_log(self, steps: int) -> EngineLog | None:
        log = self.log
        if log is not None:
            for i, how in enumerate(log.stay_end):
                if how == STAY_OPEN:
                    log.stay_last[i], log.stay_end_step[i] = steps - 1, steps
        return log
