"""Request table: journey ↔ API join, out-of-order events, lifecycle validation."""

from __future__ import annotations

import pytest

from blis_model.errors import CorpusError
from blis_model.ingest.otlp import API_SCOPE, JOURNEY_SCOPE, Event
from blis_model.ingest.requests import request_table, unresumed_preemptions, validate_requests

MS = 1_000_000  # ns


class Trace:
    """Builds decoded journey/API events for a handful of requests, in time units of ms."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def api(self, rid: str, arrived_ms: float, departed_ms: float | None, prompt: int = 100,
            output: int = 10) -> Trace:
        span = {"gen_ai.request.id": rid, "gen_ai.usage.prompt_tokens": prompt,
                "gen_ai.usage.completion_tokens": output}
        self.events.append(Event(API_SCOPE, "api.ARRIVED", 0,
                                 {"event.ts.monotonic": arrived_ms / 1e3}, "llm_request", span))
        if departed_ms is not None:
            self.events.append(Event(API_SCOPE, "api.DEPARTED", 0,
                                     {"event.ts.monotonic": departed_ms / 1e3}, "llm_request",
                                     span))
        return self

    def journey(self, rid: str, *events: tuple, prompt: int = 100, output: int = 10) -> Trace:
        """events: (KIND, time ms, step[, extra attrs])."""
        for kind, ms, step, *extra in events:
            attrs = {"ts.monotonic_ns": int(ms * MS), "scheduler.step": step,
                     "prefill.total_tokens": prompt,
                     "decode.done_tokens": output if kind == "FINISHED" else 0,
                     **(extra[0] if extra else {})}
            self.events.append(Event(JOURNEY_SCOPE, f"journey.{kind}", 0, attrs, "llm_core",
                                     {"gen_ai.request.id": rid}))
        return self

    def normal(self, api_id: str, suffix: str = "-0-1f2e", t0: float = 0.0, **kw) -> Trace:
        """A complete, well-ordered request lifecycle starting at ``t0`` ms."""
        self.api(api_id, t0, t0 + 100)
        return self.journey(api_id + suffix, ("QUEUED", t0 + 1, 3),
                            ("SCHEDULED", t0 + 2, 3, {"schedule.kind": "FIRST"}),
                            ("FIRST_TOKEN", t0 + 10, 3), ("FINISHED", t0 + 90, 40,
                                                          {"finish.status": "stopped"}), **kw)


def by_id(table) -> dict[str, dict]:
    return {r["request_id"] or r["api_request_id"]: r for r in table.to_pylist()}


def test_api_id_joins_its_journey_by_prefix_not_a_shorter_lookalike() -> None:
    t = Trace().normal("cmpl-abc").api("cmpl-ab", 5, 50).api("cmpl-abc-9", 7, 70)
    rows = by_id(request_table(t.events, "exp"))
    row = rows["cmpl-abc-0-1f2e"]
    assert row["api_request_id"] == "cmpl-abc"
    assert row["pre_queue_us"] == pytest.approx(1000.0)
    assert row["post_finish_us"] == pytest.approx(10_000.0)
    assert row["ttft_us"] == pytest.approx(10_000.0)
    assert (row["queued_step"], row["scheduled_step"], row["first_token_step"],
            row["finished_step"]) == (3, 3, 3, 40)
    assert row["finish_status"] == "stopped" and row["output_tokens"] == 10
    assert rows["cmpl-ab"]["request_id"] is None  # an API span with no journey keeps a row


def test_out_of_order_and_repeated_events_give_the_same_table() -> None:
    t = Trace().normal("cmpl-a").normal("cmpl-b", t0=50)
    forward = request_table(t.events, "exp")
    backward = request_table(list(reversed(t.events)), "exp")
    twice = request_table(t.events + t.events, "exp")  # every line exported twice
    assert forward.equals(backward) and forward.equals(twice)
    assert validate_requests(twice).n_failed == 0


def test_preemption_must_be_followed_by_a_resume() -> None:
    assert unresumed_preemptions([10, 30], [20, 40]) == 0
    assert unresumed_preemptions([10, 30], [20]) == 1
    assert unresumed_preemptions([10, 30], [5, 40]) == 1  # a resume before the preemption
    t = Trace().api("cmpl-p", 0, 100).journey(
        "cmpl-p-0-1", ("QUEUED", 1, 1), ("SCHEDULED", 2, 1, {"schedule.kind": "FIRST"}),
        ("FIRST_TOKEN", 5, 1), ("PREEMPTED", 7, 3), ("SCHEDULED", 9, 5, {"schedule.kind":
                                                                          "RESUME"}),
        ("FINISHED", 90, 30, {"finish.status": "length"}))
    t.api("cmpl-q", 0, 100).journey(
        "cmpl-q-0-1", ("QUEUED", 1, 1), ("SCHEDULED", 2, 1, {"schedule.kind": "FIRST"}),
        ("FIRST_TOKEN", 5, 1), ("PREEMPTED", 7, 3),
        ("FINISHED", 90, 30, {"finish.status": "length"}))
    rows = by_id(request_table(t.events))
    assert rows["cmpl-p-0-1"]["num_preemptions"] == 1 and rows["cmpl-p-0-1"]["num_resumes"] == 1
    report = validate_requests(request_table(t.events), "exp")
    assert report.n_failed == 1 and report.reasons == {"unresumed_preemption": 1}
    assert report.examples[0].startswith("cmpl-q-0-1")


def test_validation_flags_incomplete_and_disordered_requests_and_gates() -> None:
    t = Trace().normal("cmpl-ok").normal("cmpl-ok2", t0=20)
    t.api("cmpl-nofin", 0, 100).journey("cmpl-nofin-0-1", ("QUEUED", 1, 1),
                                         ("SCHEDULED", 2, 1), ("FIRST_TOKEN", 5, 1))
    t.api("cmpl-late", 10, 100).journey(  # queued before it arrived at the API
        "cmpl-late-0-1", ("QUEUED", 1, 1), ("SCHEDULED", 12, 1), ("FIRST_TOKEN", 15, 1),
        ("FINISHED", 50, 9, {"finish.status": "stopped"}))
    t.api("cmpl-steps", 0, 100).journey(  # first token reported at an earlier step
        "cmpl-steps-0-1", ("QUEUED", 1, 5), ("SCHEDULED", 2, 5), ("FIRST_TOKEN", 5, 4),
        ("FINISHED", 50, 9, {"finish.status": "stopped"}))
    t.api("cmpl-lost", 0, None)  # never departed, never reached the engine
    table = request_table(t.events, "exp")
    report = validate_requests(table)
    assert report.experiment == "exp" and report.n_requests == 6
    assert report.reasons == {"missing_finished": 1, "time_order": 1, "step_order": 1,
                              "no_journey": 1, "missing_departed": 1}
    assert report.n_failed == 4 and report.failure_rate == pytest.approx(4 / 6)
    report.check(max_failure_rate=0.7)
    with pytest.raises(CorpusError, match="fail validation"):
        report.check(max_failure_rate=0.5)


def test_journey_only_corpus_does_not_require_api_spans() -> None:
    t = Trace().normal("cmpl-a")
    t.events = [e for e in t.events if e.scope == JOURNEY_SCOPE]
    report = validate_requests(request_table(t.events, "exp"))
    assert report.n_failed == 0 and report.n_requests == 1


def test_prefill_cannot_beat_the_token_budget_and_aborts_are_not_failures() -> None:
    t = Trace().api("cmpl-big", 0, 100).journey(  # 3000-token prompt done in one step
        "cmpl-big-0-1", ("QUEUED", 1, 1), ("SCHEDULED", 2, 1), ("FIRST_TOKEN", 5, 1),
        ("FINISHED", 50, 9, {"finish.status": "stopped"}), prompt=3000)
    t.normal("cmpl-ok", prompt=3000)  # scheduled at step 3, first token at step 3 too
    t.api("cmpl-gone", 0.2, None)  # aborted by the client before reaching the engine
    t.events.append(Event(API_SCOPE, "api.ABORTED", 0, {"event.ts.monotonic": 0.5,
                                                        "reason": "client"},
                          "llm_request", {"gen_ai.request.id": "cmpl-gone"}))
    table = request_table(t.events, "exp")
    assert validate_requests(table).n_failed == 0
    report = validate_requests(table, max_num_batched_tokens=1024)
    assert report.reasons == {"prefill_too_fast": 2}
    assert validate_requests(table, max_num_batched_tokens=4096).n_failed == 0
    assert by_id(table)["cmpl-gone"]["finish_status"] == "aborted"
