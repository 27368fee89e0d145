"""A small vLLM-V1-style serving simulator with a known ground truth.

Requests arrive by a Poisson process at the API, enter the engine queue ``α0`` later and
are served by continuous batching: each step first gives running requests their tokens
(decodes 1 token, partially prefilled requests the next chunk), in running order, then
admits waiting requests (FCFS) while the ``max_num_batched_tokens`` budget and
``max_num_seqs`` allow, chunking the last prefill to fit. KV blocks (``block_size``
tokens each, ``num_gpu_blocks`` in all) are allocated per step; when they run out, the
most recently admitted running request is preempted (blocks freed, recomputed later),
as vLLM V1 does. With ``prefix_caching``, a share of requests start with one of a few
shared prefixes; a request admitted while another running request holds its prefix's
full blocks starts with those tokens computed (compute is saved, KV blocks are still
charged to each request). A step's duration is ``step_time_us(batch)``; the response leaves the
API ``α1 + α2·output_tokens`` after the engine finishes.

Journey events follow vLLM: QUEUED carries the id of the next step to run (time = queue
entry); SCHEDULED (``FIRST``/``RESUME``) and PREEMPTED the step being scheduled (time =
its start); FIRST_TOKEN and FINISHED the step that produced the token (time = its end).
A decode is a 1-token step of a request whose other tokens are all computed; anything
else (first prefill chunks, recomputation after preemption) is a prefill chunk.

Everything is deterministic given ``SynthConfig.seed``. Times are monotonic ns unless a
name says otherwise.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blis_model.errors import ConfigError


@dataclass(frozen=True)
class StepBatch:
    """The composition of one scheduler step (what the step-time function sees).

    ``prefills``: (chunk tokens t, context computed before the chunk c) per prefilling
    request; ``decode_contexts``: tokens computed before the step per decoding request.
    """

    step_id: int
    prefills: tuple[tuple[int, int], ...] = ()
    decode_contexts: tuple[int, ...] = ()
    prefill_ids: tuple[str, ...] = ()
    decode_ids: tuple[str, ...] = ()

    @property
    def prefill_tokens(self) -> int:
        return sum(t for t, _ in self.prefills)

    @property
    def prefill_ctx_tokens(self) -> int:
        """Σ t·c over prefill chunks (tokens²)."""
        return sum(t * c for t, c in self.prefills)

    @property
    def decode_count(self) -> int:
        return len(self.decode_contexts)

    @property
    def decode_ctx_sum(self) -> int:
        return sum(self.decode_contexts)


@dataclass(frozen=True)
class LinearStepTime:
    """Ground-truth step time (µs): ``max(floor, base + prefill·Σt + prefill_ctx·Σt·c +
    decode·n_dec + decode_ctx·Σctx)`` (two regimes when ``floor`` > 0: launch-bound small
    batches, then linear), times heavy-tailed noise: lognormal(0, ``noise_sigma``) and, with
    probability ``spike_prob``, a Pareto(``spike_shape``) slowdown of scale ``spike_scale``.

    Noise is a pure function of (``seed``, step id), so reruns are identical.
    """

    base_us: float = 2500.0
    floor_us: float = 0.0  # launch-bound regime: no step is faster than this
    prefill_token_us: float = 0.12
    prefill_ctx_us: float = 2e-6
    decode_us: float = 20.0
    decode_ctx_us: float = 0.004
    noise_sigma: float = 0.02
    spike_prob: float = 0.01
    spike_shape: float = 2.5
    spike_scale: float = 0.2
    seed: int = 0

    def mean_us(self, batch: StepBatch) -> float:
        """The noise-free step time (µs)."""
        linear = (self.base_us + self.prefill_token_us * batch.prefill_tokens
                  + self.prefill_ctx_us * batch.prefill_ctx_tokens
                  + self.decode_us * batch.decode_count
                  + self.decode_ctx_us * batch.decode_ctx_sum)
        return max(self.floor_us, linear)

    def __call__(self, batch: StepBatch) -> float:
        mean = self.mean_us(batch)
        if self.noise_sigma <= 0 and self.spike_prob <= 0:
            return mean
        rng = np.random.default_rng([self.seed, batch.step_id])
        factor = math.exp(self.noise_sigma * rng.standard_normal())
        if rng.random() < self.spike_prob:
            factor *= 1.0 + self.spike_scale * rng.pareto(self.spike_shape)
        return mean * factor


StepTimeFn = Callable[[StepBatch], float]


@dataclass(frozen=True)
class SynthConfig:
    """Workload, server and trace options of one synthetic experiment.

    Lengths are tokens (lognormal by median and sigma, clipped to [min, max]); rates are
    requests/s, with gamma inter-arrival gaps of coefficient of variation ``arrival_cv``
    (1: Poisson, > 1: bursty); overheads are µs with multiplicative lognormal(0,
    ``overhead_sigma``) noise and, with probability ``overhead_spike_prob``, a
    1 + ``overhead_spike_scale``·Pareto(1.5) slowdown (heavy tail).
    ``sample_every``: trace 1 step in k; ``out_of_order``: fraction of export lines moved
    a few places; ``malformed_lines``: junk lines inserted.
    """

    seed: int = 0
    num_requests: int = 200
    arrival_rate: float = 20.0
    arrival_cv: float = 1.0  # coefficient of variation of inter-arrival gaps: 1 Poisson
    prompt_median: float = 400.0
    prompt_sigma: float = 0.8
    prompt_min: int = 8
    prompt_max: int = 3000
    output_median: float = 80.0
    output_sigma: float = 0.8
    output_min: int = 1
    output_max: int = 600
    model: str = "meta-llama/Llama-3.1-8B"
    hardware: str = "H100"
    tensor_parallelism: int = 1
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    block_size: int = 16
    num_gpu_blocks: int = 4000
    step_time_us: StepTimeFn = field(default_factory=LinearStepTime)
    step_gap_us: float = 0.0
    alpha0_us: float = 800.0
    alpha1_us: float = 1500.0
    alpha2_us: float = 2.0
    overhead_sigma: float = 0.3
    overhead_spike_prob: float = 0.0
    overhead_spike_scale: float = 10.0
    prefix_caching: bool = False
    prefix_share: float = 0.5  # fraction of requests starting with a shared prefix
    num_prefixes: int = 4
    prefix_tokens: int = 256
    snapshots: bool = True
    journey: bool = True
    api: bool = True
    sample_every: int = 1
    out_of_order: float = 0.0
    malformed_lines: int = 0
    gzip: bool = True
    steps_per_span: int = 100
    spans_per_line: int = 8
    mono_start_ns: int = 10_000 * 10**9
    wall_offset_ns: int = 1_700_000_000 * 10**9

    def __post_init__(self) -> None:
        for name in ("num_requests", "max_num_batched_tokens", "max_num_seqs", "block_size",
                     "num_gpu_blocks", "sample_every", "steps_per_span", "spans_per_line",
                     "prompt_min", "output_min", "tensor_parallelism", "num_prefixes"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"must be a positive integer, got {getattr(self, name)!r}",
                                  key=name)
        for name in ("arrival_rate", "arrival_cv"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be > 0, got {getattr(self, name)!r}", key=name)
        if self.prompt_max < self.prompt_min or self.output_max < self.output_min:
            raise ConfigError("max length below min length", key="prompt_max/output_max")
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ConfigError("max_num_seqs must not exceed max_num_batched_tokens",
                              key="max_num_seqs")
        prefix = self.prefix_tokens if self.prefix_caching else 0
        longest = -(-(self.prompt_max + prefix + self.output_max) // self.block_size)
        if longest > self.num_gpu_blocks:
            raise ConfigError(f"the longest request needs {longest} KV blocks but only "
                              f"{self.num_gpu_blocks} exist", key="num_gpu_blocks")
        for name in ("out_of_order", "prefix_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"must be in [0, 1], got {getattr(self, name)!r}", key=name)


@dataclass
class JourneyEvent:
    """One journey event as the engine would emit it (attributes decoded)."""

    name: str  # QUEUED | SCHEDULED | FIRST_TOKEN | PREEMPTED | FINISHED
    time_ns: int
    step: int
    attrs: dict[str, Any]


@dataclass
class SimRequest:
    """A request's workload, scheduler state and ground-truth lifecycle."""

    api_id: str
    journey_id: str
    arrival_ns: int
    queued_ns: int
    prompt: int
    target_output: int
    max_tokens: int
    post_finish_us: float
    computed: int = 0
    output: int = 0
    blocks: int = 0
    preemptions: int = 0
    scheduled_once: bool = False
    prefix_group: int = -1  # shared prefix id, -1 for none
    cached_blocks: int = 0  # blocks served by the prefix cache in the current stay
    holds_prefix: bool = False  # its computed KV covers its group's full prefix blocks
    waiting: bool = True
    scheduled_ns: int | None = None
    first_token_ns: int | None = None
    finished_ns: int | None = None
    departed_ns: int | None = None
    queued_step: int = 0
    scheduled_step: int | None = None
    first_token_step: int | None = None
    finished_step: int | None = None
    events: list[JourneyEvent] = field(default_factory=list)

    @property
    def known_tokens(self) -> int:
        return self.prompt + self.output

    @property
    def status(self) -> str:
        return "length" if self.output >= self.max_tokens else "stopped"


@dataclass(frozen=True)
class StepRecord:
    """One executed step: its batch, timing (monotonic ns, integer µs) and summary."""

    batch: StepBatch
    ts_start_ns: int
    duration_us: int
    running_depth: int
    waiting_depth: int
    num_finished: int
    num_preempted: int
    blocks_free: int
    snapshots: tuple[dict[str, Any], ...]

    @property
    def ts_end_ns(self) -> int:
        return self.ts_start_ns + self.duration_us * 1000


@dataclass
class SimResult:
    config: SynthConfig
    requests: list[SimRequest]
    steps: list[StepRecord]


def _lengths(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int
             ) -> np.ndarray:
    draws = np.exp(np.log(median) + sigma * rng.standard_normal(n))
    return np.clip(np.round(draws), lo, hi).astype(np.int64)


def make_requests(config: SynthConfig, rng: np.random.Generator) -> list[SimRequest]:
    """Draw arrivals, lengths, ids and API overheads for every request."""
    n = config.num_requests
    mean_gap = 1e9 / config.arrival_rate
    if config.arrival_cv == 1.0:
        gaps_ns = rng.exponential(mean_gap, n)
    else:  # gamma with the same mean and the requested coefficient of variation
        shape = 1.0 / config.arrival_cv**2
        gaps_ns = rng.gamma(shape, mean_gap / shape, n)
    arrivals = config.mono_start_ns + np.cumsum(np.round(gaps_ns)).astype(np.int64)
    prompts = _lengths(rng, n, config.prompt_median, config.prompt_sigma, config.prompt_min,
                       config.prompt_max)
    outputs = _lengths(rng, n, config.output_median, config.output_sigma, config.output_min,
                       config.output_max)
    pre = config.alpha0_us * np.exp(config.overhead_sigma * rng.standard_normal(n))
    post = (config.alpha1_us + config.alpha2_us * outputs) * np.exp(
        config.overhead_sigma * rng.standard_normal(n))
    ids = rng.integers(0, 2**63, size=(n, 2))
    if config.overhead_spike_prob > 0:
        for overhead in (pre, post):
            spikes = rng.random(n) < config.overhead_spike_prob
            overhead[spikes] *= 1.0 + config.overhead_spike_scale * rng.pareto(1.5, spikes.sum())
    groups = np.full(n, -1)
    if config.prefix_caching:
        shared = rng.random(n) < config.prefix_share
        groups = np.where(shared, rng.integers(0, config.num_prefixes, n), -1)
        prompts = prompts + np.where(shared, config.prefix_tokens, 0)
    requests = []
    for i in range(n):
        api_id = f"cmpl-{int(ids[i, 0]):016x}"
        requests.append(SimRequest(
            api_id=api_id, journey_id=f"{api_id}-0-{int(ids[i, 1]) & 0xFFFFFFFF:08x}",
            arrival_ns=int(arrivals[i]), queued_ns=int(arrivals[i]) + round(pre[i] * 1e3),
            prompt=int(prompts[i]), target_output=int(outputs[i]),
            max_tokens=config.output_max, post_finish_us=float(post[i]),
            prefix_group=int(groups[i])))
    requests.sort(key=lambda r: r.queued_ns)
    return requests


class _Scheduler:
    """vLLM-V1-style scheduling of one step (mutates request and KV state)."""

    def __init__(self, config: SynthConfig) -> None:
        self.config = config
        self.free_blocks = config.num_gpu_blocks
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.holders: dict[int, int] = {}  # prefix group → running requests holding it
        bs = config.block_size
        self.prefix_full = (config.prefix_tokens // bs) * bs if config.prefix_caching else 0

    def cache_hit(self, req: SimRequest) -> int:
        """Tokens of ``req`` served by the prefix cache on admission (full blocks, and at
        least one prompt token left to compute)."""
        if req.prefix_group < 0 or not self.holders.get(req.prefix_group):
            return 0
        bs = self.config.block_size
        return min(self.prefix_full, ((req.prompt - 1) // bs) * bs)

    def note_progress(self, req: SimRequest) -> None:
        """Called after a step: a request whose KV now covers its prefix holds it."""
        if (self.prefix_full and req.prefix_group >= 0 and not req.holds_prefix
                and req.computed >= self.prefix_full):
            req.holds_prefix = True
            self.holders[req.prefix_group] = self.holders.get(req.prefix_group, 0) + 1

    def _allocate(self, req: SimRequest, tokens: int) -> bool:
        need = -(-(req.computed + tokens) // self.config.block_size) - req.blocks
        if need > self.free_blocks:
            return False
        if need > 0:
            self.free_blocks -= need
            req.blocks += need
        return True

    def free(self, req: SimRequest) -> None:
        self.free_blocks += req.blocks
        req.blocks = req.cached_blocks = 0
        if req.holds_prefix:
            req.holds_prefix = False
            self.holders[req.prefix_group] -= 1

    def _preempt(self, victim: SimRequest) -> None:
        self.free(victim)
        victim.computed = 0
        victim.preemptions += 1
        victim.waiting = True
        self.waiting.appendleft(victim)

    def schedule(self) -> tuple[list[tuple[SimRequest, int, int]], list[SimRequest],
                                list[SimRequest]]:
        """(scheduled (request, tokens, computed before), newly admitted, preempted)."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[SimRequest, int, int]] = []
        preempted: list[SimRequest] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            tokens = min(req.known_tokens - req.computed, budget)
            ok = True
            while not self._allocate(req, tokens):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    ok = False
                    break
            if not ok:
                break
            scheduled.append((req, tokens, req.computed))
            budget -= tokens
            i += 1
        admitted: list[SimRequest] = []
        if not preempted:
            while (self.waiting and budget > 0
                   and len(self.running) < self.config.max_num_seqs):
                req = self.waiting[0]
                hit = self.cache_hit(req)
                req.computed, req.cached_blocks = hit, hit // self.config.block_size
                tokens = min(req.known_tokens - req.computed, budget)
                if not self._allocate(req, tokens):
                    req.computed = req.cached_blocks = 0
                    break
                self.waiting.popleft()
                req.waiting = False
                self.running.append(req)
                admitted.append(req)
                scheduled.append((req, tokens, req.computed))
                budget -= tokens
        return scheduled, admitted, preempted


def is_decode(req: SimRequest, tokens: int, computed_before: int) -> bool:
    """A decode feeds the last sampled token: 1 token, everything before it computed."""
    return req.output >= 1 and tokens == 1 and computed_before == req.known_tokens - 1


def _journey_attrs(req: SimRequest, kind: str, time_ns: int, step: int, phase: str
                   ) -> dict[str, Any]:
    return {"event.type": kind, "ts.monotonic": time_ns / 1e9, "ts.monotonic_ns": time_ns,
            "scheduler.step": step, "phase": phase,
            "prefill.done_tokens": min(req.computed, req.prompt),
            "prefill.total_tokens": req.prompt, "decode.done_tokens": req.output,
            "decode.max_tokens": req.max_tokens, "num_preemptions": req.preemptions}


def _emit(req: SimRequest, kind: str, time_ns: int, step: int, phase: str,
          **extra: Any) -> None:
    attrs = _journey_attrs(req, kind, time_ns, step, phase)
    attrs.update(extra)
    req.events.append(JourneyEvent(kind, time_ns, step, attrs))


def simulate(config: SynthConfig) -> SimResult:
    """Run the simulation to completion of every request."""
    rng = np.random.default_rng(config.seed)
    requests = make_requests(config, rng)
    sched = _Scheduler(config)
    steps: list[StepRecord] = []
    now, step_id, next_req, done = requests[0].queued_ns, 0, 0, 0
    while done < len(requests):
        while next_req < len(requests) and requests[next_req].queued_ns <= now:
            req = requests[next_req]
            req.queued_step = step_id
            sched.waiting.append(req)
            _emit(req, "QUEUED", req.queued_ns, step_id, "WAITING")
            next_req += 1
        if not sched.waiting and not sched.running:
            now = requests[next_req].queued_ns
            continue
        scheduled, admitted, preempted = sched.schedule()
        for victim in preempted:
            _emit(victim, "PREEMPTED", now, step_id, "WAITING")
        if not scheduled:
            if preempted:
                continue  # everything was preempted: reschedule from the queue
            if next_req >= len(requests):
                raise RuntimeError("simulator deadlock: nothing schedulable")  # config bug
            now = max(now, requests[next_req].queued_ns)
            continue
        for req in admitted:
            kind = "RESUME" if req.scheduled_once else "FIRST"
            if not req.scheduled_once:
                req.scheduled_once, req.scheduled_ns, req.scheduled_step = True, now, step_id
            _emit(req, "SCHEDULED", now, step_id, "PREFILL", **{"schedule.kind": kind})
        prefills, pf_ids, decodes, dc_ids, snaps = [], [], [], [], []
        for req, tokens, before in scheduled:
            decode = is_decode(req, tokens, before)
            if decode:
                decodes.append(before)
                dc_ids.append(req.journey_id)
            else:
                prefills.append((tokens, before))
                pf_ids.append(req.journey_id)
            snaps.append({
                "step.id": step_id, "request.id": req.journey_id,
                "request.phase": "DECODE" if decode else "PREFILL",
                "request.num_prompt_tokens": req.prompt,
                "request.num_computed_tokens": before,
                "request.num_output_tokens": req.output,
                "request.num_preemptions": req.preemptions,
                "request.scheduled_tokens_this_step": tokens,
                "kv.blocks_allocated_gpu": req.blocks,
                "kv.blocks_cached_gpu": req.cached_blocks})
        batch = StepBatch(step_id, tuple(prefills), tuple(decodes), tuple(pf_ids), tuple(dc_ids))
        duration_us = max(1, round(float(config.step_time_us(batch))))
        end = now + duration_us * 1000
        running_depth, waiting_depth, blocks_free = (len(sched.running), len(sched.waiting),
                                                     sched.free_blocks)
        finished = 0
        for req, tokens, _ in scheduled:
            req.computed += tokens
            sched.note_progress(req)
            if req.computed < req.known_tokens:
                continue  # a prefill chunk that does not complete the known tokens
            req.output += 1
            if req.output == 1:
                req.first_token_ns, req.first_token_step = end, step_id
                _emit(req, "FIRST_TOKEN", end, step_id, "DECODE")
            if req.output >= req.target_output:
                req.finished_ns, req.finished_step = end, step_id
                req.departed_ns = end + round(req.post_finish_us * 1e3)
                _emit(req, "FINISHED", end, step_id, "DECODE",
                      **{"finish.status": req.status})
                sched.running.remove(req)
                sched.free(req)
                finished += 1
                done += 1
        steps.append(StepRecord(batch, now, duration_us, running_depth, waiting_depth,
                                finished, len(preempted), blocks_free, tuple(snaps)))
        now = end + round(config.step_gap_us * 1e3)
        step_id += 1
    return SimResult(config, requests, steps)
