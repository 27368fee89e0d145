"""A synthetic vLLM-V1 serving experiment with a known ground truth, on the replay engine.

Requests arrive by a (gamma) renewal process at the API and enter the engine queue ``α0``
later; :func:`blis_model.requests.replay.replay` schedules them exactly as vLLM V1 does
(continuous batching, chunked prefill, KV blocks, recompute preemption of the last
running request, LRU prefix caching when ``prefix_caching``: a share of requests start
with one of a few shared prefixes, whose full blocks are shared once computed and stay
cached until evicted). A step's duration is ``step_time_us(aggregates)`` rounded to whole
µs; the response leaves the API ``α1 + α2·output_tokens`` after the engine finishes.

Everything per request — journey events and per-step snapshots — is derived from the
replay's log (``synth.from_replay``), never from a second scheduler. Journey events
follow vLLM: QUEUED carries the id of the next step to run (time = queue entry);
SCHEDULED (``FIRST``/``RESUME``) and PREEMPTED the step being scheduled (time = its
start); FIRST_TOKEN and FINISHED the step that produced the token (time = its end).
A decode is a 1-token step of a request whose other tokens are all computed; anything
else (first prefill chunks, recomputation after preemption) is a prefill chunk.

Everything is deterministic given ``SynthConfig.seed``. Times are monotonic ns unless a
name says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from blis_model.errors import ConfigError
from blis_model.requests.replay import ReplayResult, ServerLimits, Workload, replay
from blis_model.requests.scheduler import StepAggregates
from blis_model.synth.from_replay import sim_requests, step_records
from blis_model.synth.records import JourneyEvent, SimRequest, StepBatch, StepRecord

__all__ = ["JourneyEvent", "LinearStepTime", "SimRequest", "SimResult", "StepBatch",
           "StepRecord", "StepTimeFn", "SynthConfig", "make_requests", "simulate"]


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

    def mean_us(self, batch: StepAggregates | StepBatch) -> float:
        """The noise-free step time (µs) of a step's aggregates (or a :class:`StepBatch`)."""
        linear = (self.base_us + self.prefill_token_us * batch.pf_tokens
                  + self.prefill_ctx_us * batch.pf_ctx_tokens
                  + self.decode_us * batch.dc_count
                  + self.decode_ctx_us * batch.dc_ctx_sum)
        return max(self.floor_us, linear)

    def __call__(self, batch: StepAggregates | StepBatch) -> float:
        mean = self.mean_us(batch)
        if self.noise_sigma <= 0 and self.spike_prob <= 0:
            return mean
        rng = np.random.default_rng([self.seed, batch.step_id])
        factor = math.exp(self.noise_sigma * rng.standard_normal())
        if rng.random() < self.spike_prob:
            factor *= 1.0 + self.spike_scale * rng.pareto(self.spike_shape)
        return mean * factor


StepTimeFn = Callable[[StepAggregates], float]
"""µs of one step from its aggregates (the step-table columns, ``requests.scheduler``)."""


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
class SimResult:
    """The requests (in queue order) and steps of one experiment; ``replay`` is the engine
    run they were derived from (its step table holds the same steps' aggregates)."""

    config: SynthConfig
    requests: list[SimRequest]
    steps: list[StepRecord]
    replay: ReplayResult | None = None


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


def workload_of(config: SynthConfig, requests: list[SimRequest], t0_ns: int) -> Workload:
    """The replay workload of ``requests`` (given in arrival order), times in µs from
    ``t0_ns``, pre-queue overheads as drawn."""
    group = np.array([r.prefix_group for r in requests], np.int64)
    return Workload(
        arrival_us=np.array([(r.arrival_ns - t0_ns) / 1e3 for r in requests]),
        prompt_tokens=np.array([r.prompt for r in requests], np.int64),
        output_tokens=np.array([r.target_output for r in requests], np.int64),
        prefix_group=group,
        prefix_tokens=np.where(group >= 0, config.prefix_tokens, 0),
        pre_queue_us=np.array([(r.queued_ns - r.arrival_ns) / 1e3 for r in requests]))


def limits_of(config: SynthConfig) -> ServerLimits:
    """The server of a synthetic experiment."""
    return ServerLimits(max_num_batched_tokens=config.max_num_batched_tokens,
                        max_num_seqs=config.max_num_seqs, block_size=config.block_size,
                        num_gpu_blocks=config.num_gpu_blocks,
                        prefix_caching=config.prefix_caching)


def simulate(config: SynthConfig) -> SimResult:
    """Draw the workload, replay it until every request finished, and derive the
    journeys and per-step records from the replay's log. The engine clock starts at the
    first queue entry; step durations are whole µs."""
    rng = np.random.default_rng(config.seed)
    requests = make_requests(config, rng)
    t0 = requests[0].queued_ns
    law = config.step_time_us

    def whole_us(agg: StepAggregates) -> float:
        return float(max(1, round(float(law(agg)))))

    by_arrival = sorted(requests, key=lambda r: r.arrival_ns)
    workload = workload_of(config, by_arrival, t0)
    result = replay(workload, limits_of(config), whole_us,
                    step_gap_us=round(config.step_gap_us * 1e3) / 1e3, detail=True)
    sim_requests(result, workload, by_arrival, t0)
    steps = step_records(result, workload, by_arrival, t0, config.block_size)
    return SimResult(config, requests, steps, result)
