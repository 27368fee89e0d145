"""The generator's ground-truth records: step batches, journey events, requests, steps.

Filled from one replay (``synth.from_replay``); serialized by ``synth.otlp_writer``.
Times are monotonic ns unless a name says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepBatch:
    """The exact composition of one scheduler step.

    ``prefills``: (chunk tokens t, context computed before the chunk c) per prefilling
    request; ``decode_contexts``: tokens computed before the step per decoding request.
    Also answers the aggregate names a step-time law reads (``pf_tokens``, ...).
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

    # the step-table names a step-time function reads (``requests.scheduler.AGGREGATES``)
    @property
    def pf_count(self) -> int:
        return len(self.prefills)

    @property
    def pf_tokens(self) -> int:
        return self.prefill_tokens

    @property
    def pf_tokens_sq(self) -> int:
        return sum(t * t for t, _ in self.prefills)

    @property
    def pf_ctx_tokens(self) -> int:
        return self.prefill_ctx_tokens

    @property
    def dc_count(self) -> int:
        return self.decode_count

    @property
    def dc_ctx_sum(self) -> int:
        return self.decode_ctx_sum


@dataclass
class JourneyEvent:
    """One journey event as the engine would emit it (attributes decoded)."""

    name: str  # QUEUED | SCHEDULED | FIRST_TOKEN | PREEMPTED | FINISHED
    time_ns: int
    step: int
    attrs: dict[str, Any]


@dataclass
class SimRequest:
    """A request's workload and ground-truth lifecycle (filled from the replay)."""

    api_id: str
    journey_id: str
    arrival_ns: int
    queued_ns: int
    prompt: int
    target_output: int
    max_tokens: int
    post_finish_us: float
    prefix_group: int = -1  # shared prefix id, -1 for none
    output: int = 0
    preemptions: int = 0
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
