"""The vectorized ingest equals its references exactly, on journey corpora with preemption,
prefix caching, 1-in-k sampling, out-of-order, repeated and malformed lines:

* the block decoder (``ingest.blocks``) against the generic (orjson) decoder;
* the bulk request table against the event-by-event one (``requests._EventBuilder``);
* the vectorized journey reconstruction against the per-step sweep it replaced
  (``tests/reference_ingest.py``), also on random request tables with odd lifecycles.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import random

import numpy as np
import pyarrow as pa
import pytest
from reference_ingest import reconstruct_steps_reference

from blis_model.calibration.featurize import featurize
from blis_model.configuration.experiment import load_experiment
from blis_model.ingest.blocks import scan_block
from blis_model.ingest.otlp import API_SCOPE, JOURNEY_SCOPE, Event, decode_line
from blis_model.ingest.reader import REQUEST_SCOPES, read_tables
from blis_model.ingest.reconstruct import reconstruct_steps
from blis_model.ingest.requests import (
    REQUEST_EVENTS,
    REQUEST_SCHEMA,
    RequestTableBuilder,
    _EventBuilder,
    request_table,
)
from blis_model.ingest.scan import concat_columns, generic_with_events
from blis_model.ingest.steps import STEP_EVENTS
from blis_model.requests.stage import RequestSettings
from blis_model.synth import SynthConfig, write_experiment

BUSY = SynthConfig(seed=3, num_requests=150, arrival_rate=60.0, max_num_batched_tokens=1024,
                   max_num_seqs=32, num_gpu_blocks=260)
CONFIGS = {
    # scarce KV: hundreds of preemptions and recomputations; lines moved, junk lines
    "busy": dataclasses.replace(BUSY, out_of_order=0.2, malformed_lines=3),
    # prefix-cache hits, 1 step in 3 traced without snapshots (reconstruction needed)
    "prefix-sampled": dataclasses.replace(BUSY, seed=6, prefix_caching=True,
                                          num_gpu_blocks=400, snapshots=False,
                                          sample_every=3, out_of_order=0.3),
    # prefix caching with snapshots, small spans and lines (many layouts per block)
    "prefix-small-spans": dataclasses.replace(BUSY, seed=10, prefix_caching=True,
                                              num_gpu_blocks=400, steps_per_span=7,
                                              spans_per_line=3),
}
NAMES = [*CONFIGS, "repeated"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    for name, cfg in CONFIGS.items():
        write_experiment(str(root / name), cfg)
    # a third of the lines exported twice, everything shuffled
    src = root / "busy"
    dst = root / "repeated"
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "traces.json.gz":
            (dst / f.name).write_bytes(f.read_bytes())
    lines = gzip.decompress((src / "traces.json.gz").read_bytes()).splitlines()
    rng = random.Random(1)
    lines += rng.sample(lines, len(lines) // 3)
    rng.shuffle(lines)
    (dst / "traces.json.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    return root


def assert_same_table(a: pa.Table, b: pa.Table) -> None:
    """Same schema and values (NaN equals NaN)."""
    assert a.schema == b.schema
    for col in a.column_names:
        x, y = a.column(col).to_pylist(), b.column(col).to_pylist()
        same = [u == v or (u != u and v != v) for u, v in zip(x, y, strict=True)]
        assert all(same), (col, same.index(False))


def decoded_events(path) -> list[Event]:
    """Every event of every readable line, in file order (the generic decoder)."""
    events = []
    for line in gzip.decompress(path.read_bytes()).splitlines():
        if line.strip():
            try:
                events += decode_line(line)
            except ValueError:
                continue
    return events


@pytest.mark.parametrize("name", NAMES)
def test_block_decoder_equals_the_generic_decoder(corpus, name):
    exp = load_experiment(str(corpus), name)
    steps, report, requests = read_tables(exp)
    g_steps, g_report, g_requests = read_tables(exp, fast=False)
    assert_same_table(steps, g_steps)
    assert_same_table(requests, g_requests)
    assert report.to_dict(10**6) == g_report.to_dict(10**6)
    assert steps.num_rows and requests.num_rows == BUSY.num_requests
    if name in ("busy", "repeated"):
        assert report.lines_malformed >= CONFIGS["busy"].malformed_lines


@pytest.mark.parametrize("name", NAMES)
def test_bulk_request_table_equals_the_event_by_event_one(corpus, name):
    exp = load_experiment(str(corpus), name)
    reference = _EventBuilder(exp.name)
    reference.add_all(decoded_events(corpus / name / "traces.json.gz"))
    assert_same_table(read_tables(exp)[2], reference.table())


@pytest.mark.parametrize("name", NAMES)
def test_vectorized_reconstruction_equals_the_sweep(corpus, name):
    exp = load_experiment(str(corpus), name)
    steps, _, requests = read_tables(exp)
    mnbt, bs = exp.server.max_num_batched_tokens, exp.server.block_size
    traced = steps.column("step_id").to_numpy()
    for ids in (None, traced, np.arange(traced.min() - 5, traced.max() + 40, 3)):
        rebuilt, report = reconstruct_steps(requests, mnbt, ids, bs)
        expected, expected_report = reconstruct_steps_reference(requests, mnbt, ids, bs)
        assert_same_table(rebuilt, expected)
        assert dataclasses.asdict(report) == dataclasses.asdict(expected_report)
    assert report.segments > report.requests_used  # preempted requests: several segments
    if name == "busy":
        assert report.prefills_preempted > 0


@pytest.mark.parametrize("name", NAMES)
def test_featurize_is_the_same_through_both_decoders(corpus, name, monkeypatch):
    exp = load_experiment(str(corpus), name)
    settings = RequestSettings(max_request_failure_rate=None)
    fast = featurize(exp, settings=settings)
    monkeypatch.setattr("blis_model.calibration.featurize.read_tables",
                        lambda e, o=None: read_tables(e, o, fast=False))
    generic = featurize(exp, settings=settings)
    assert fast.frame.equals(generic.frame)
    assert_same_table(fast.requests.full_steps, generic.requests.full_steps)
    assert dataclasses.asdict(fast.requests.reconstruction) == dataclasses.asdict(
        generic.requests.reconstruction)


# -- random request tables: odd lifecycles ---------------------------------------------
def random_requests(rng: random.Random, n: int) -> pa.Table:
    rows = []
    for i in range(n):
        s0 = rng.randint(0, 300)
        prompt = rng.choice([1, 2, 17, 300, 2500, 5000])
        f = s0 + rng.randint(-1, 12)
        e = f + rng.randint(-2, 80)
        pre, outs, res, hits = [], [], [], []
        k = s0
        for _ in range(rng.choice([0, 0, 0, 1, 2, 3])):
            p = k + rng.randint(0, 30)
            r = p + rng.randint(-1, 20)
            pre.append(p)
            outs.append(rng.randint(0, 40))
            res.append(r)
            hits.append(rng.choice([0, 0, 16, 400]))
            k = r
        odd = rng.random()
        if odd < 0.05:  # an unmatched preemption
            res = res[:-1]
        elif odd < 0.1:  # no end
            e = None
        row = {
            "experiment": "x", "request_id": None if odd > 0.97 else f"r{i}",
            "api_request_id": None, "queued_ns": rng.choice([None, rng.randint(0, 10**6)]),
            "scheduled_step": s0, "first_token_step": rng.choice([f, f, None]),
            "finished_step": e, "prompt_tokens": prompt,
            "scheduled_done_tokens": rng.choice([None, 0, 16, 48, prompt]),
            "preempted_steps": pre, "preempted_outputs": outs, "resumed_steps": res,
            "resumed_done_tokens": rng.choice([hits, None, []]),
        }
        rows.append(row)
    names = REQUEST_SCHEMA.names
    return pa.table({name: pa.array([r.get(name) for r in rows],
                                    REQUEST_SCHEMA.field(name).type) for name in names},
                    schema=REQUEST_SCHEMA)


@pytest.mark.parametrize("seed", range(6))
def test_random_request_tables_reconstruct_like_the_sweep(seed):
    rng = random.Random(seed)
    table = random_requests(rng, 120)
    for mnbt, bs in ((512, 16), (64, 16), (2048, 7)):
        for ids in (None, np.arange(-3, 500, 7)):
            got, got_report = reconstruct_steps(table, mnbt, ids, bs)
            want, want_report = reconstruct_steps_reference(table, mnbt, ids, bs)
            assert_same_table(got, want)
            assert dataclasses.asdict(got_report) == dataclasses.asdict(want_report)


# -- the request table: unusual values take the event-by-event path ---------------------
def journey(rid: str, kind: str, attrs: dict) -> Event:
    return Event(JOURNEY_SCOPE, f"journey.{kind}", 0, attrs, "llm_core",
                 {"gen_ai.request.id": rid})


def api(rid, name: str, attrs: dict, **span) -> Event:
    return Event(API_SCOPE, name, 0, attrs, "llm_request", {"gen_ai.request.id": rid, **span})


def test_unusual_request_events_give_the_event_by_event_table():
    events = [
        api("a", "api.ARRIVED", {"event.ts.monotonic": 1.0}, **{"gen_ai.usage.prompt_tokens": 9}),
        journey("a-0", "QUEUED", {"ts.monotonic_ns": 1_100_000_000, "scheduler.step": 1}),
        # a step spelled as a float, a time in seconds only, a count that is a bool
        journey("a-0", "SCHEDULED", {"ts.monotonic": 1.2, "scheduler.step": 2.0,
                                     "prefill.done_tokens": 0}),
        journey("a-0", "FINISHED", {"ts.monotonic_ns": 3_000_000_000, "scheduler.step": 9,
                                    "finish.status": "length", "decode.done_tokens": True}),
        # two different (re)schedules at the same instant, an unknown journey event
        journey("b-1", "SCHEDULED", {"ts.monotonic_ns": 5, "scheduler.step": 4}),
        journey("b-1", "SCHEDULED", {"ts.monotonic_ns": 5, "scheduler.step": 3}),
        journey("b-1", "PREEMPTED", {"ts.monotonic_ns": 6, "scheduler.step": 5,
                                     "decode.done_tokens": 2}),
        journey("b-1", "SOMETHING", {"prefill.total_tokens": 77, "decode.max_tokens": 5}),
        journey("b-1", "FINISHED", {"ts.monotonic_ns": 9, "scheduler.step": 8,
                                    "finish.status": "length"}),
        journey("b-1", "FINISHED", {"ts.monotonic_ns": 9, "scheduler.step": 8,
                                    "finish.status": "stopped"}),  # the last one seen wins
        # aborts with and without a reason, a time as a string, a bare API span
        api("c", "api.ABORTED", {"event.ts.monotonic": 2.5, "reason": "client"}),
        api("c", "api.ABORTED", {"event.ts.monotonic": 2.0}),
        api("d", "api.ARRIVED", {"event.ts.monotonic": "4.5"}),
        api("e", "", {}, **{"gen_ai.request.max_tokens": 64}),
        journey("f", "QUEUED", {"ts.monotonic_ns": 12, "scheduler.step": None}),
        journey("f", "QUEUED", {"ts.monotonic_ns": 12, "scheduler.step": 3}),  # tie: first
    ]
    for order in (events, events[::-1], events + events):
        reference = _EventBuilder("x")
        reference.add_all(order)
        assert_same_table(request_table(order, "x"), reference.table())


def test_request_columns_and_events_mix_in_file_order():
    """The block decoder's columns and whole events of one request, interleaved by seq."""
    line = json.dumps({"resourceSpans": [{"scopeSpans": [{
        "scope": {"name": JOURNEY_SCOPE},
        "spans": [{"name": "llm_core", "attributes": [
            {"key": "gen_ai.request.id", "value": {"stringValue": "q-1"}}],
            "events": [
                {"timeUnixNano": "1", "name": "journey.FINISHED", "attributes": [
                    {"key": "ts.monotonic_ns", "value": {"intValue": "50"}},
                    {"key": "scheduler.step", "value": {"intValue": "9"}},
                    {"key": "finish.status", "value": {"stringValue": "length"}}]},
                {"timeUnixNano": "2", "name": "journey.FINISHED", "attributes": [
                    {"key": "ts.monotonic_ns", "value": {"doubleValue": 50.0}},
                    {"key": "scheduler.step", "value": {"intValue": "9"}},
                    {"key": "finish.status", "value": {"stringValue": "stopped"}}]}]}]}]}]},
        separators=(",", ":")).encode()
    scanned = scan_block([(1, line)], REQUEST_EVENTS, REQUEST_SCOPES)
    builder = RequestTableBuilder("x")
    for chunks in scanned.columns:
        for cols in chunks:
            builder.add_columns(cols)
    for seq, event in scanned.events:
        builder.add(event, seq)
    assert [e.name for _, e in scanned.events] == ["journey.FINISHED"]  # a double: whole
    reference = _EventBuilder("x")
    reference.add_all(decode_line(line))
    assert_same_table(builder.table(), reference.table())
    assert builder.table().column("finish_status").to_pylist() == ["stopped"]


# -- the block decoder on lines of every kind --------------------------------------------
def step_line(step: int, extra: str = "", name: str = "step.BATCH_SUMMARY",
              scope: str = "vllm.scheduler.step") -> bytes:
    attrs = [{"key": "step.id", "value": {"intValue": str(step)}},
             {"key": "step.duration_us", "value": {"intValue": "100"}},
             {"key": "kv.usage_gpu_ratio", "value": {"doubleValue": 0.25 + step}}]
    event = {"timeUnixNano": "1", "name": name, "attributes": attrs}
    obj = {"resourceSpans": [{"scopeSpans": [{"scope": {"name": scope}, "spans": [
        {"name": "s" + extra, "events": [event, dict(event)]}]}]}]}
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def test_block_decoder_equals_line_by_line_on_odd_lines():
    lines = [
        step_line(1),
        step_line(2, extra="é"),  # non-ASCII: the line decoder takes it
        step_line(3, extra="\\\\"),  # an escape
        step_line(4).replace(b'"attributes"', b' "attributes"'),  # whitespace in an event
        b'{"resourceSpans": [',  # malformed
        step_line(5, name="journey.QUEUED", scope=JOURNEY_SCOPE),  # foreign kinds
        step_line(6, scope=JOURNEY_SCOPE),  # a step event inside a journey span
        step_line(7).replace(b'"events":[', b'"events":["\\t",'),  # a string for an event
        step_line(8).replace(b'"100"', b'"1e2"'),  # not an integer: malformed
        step_line(9),
    ]
    numbered = list(enumerate(lines, 1))
    scanned = scan_block(numbered, STEP_EVENTS, REQUEST_SCOPES)
    expected_cols: list[list] = [[] for _ in STEP_EVENTS]
    expected_events, problems = [], []
    for lineno, line in numbered:
        try:
            cols, events = generic_with_events(line, STEP_EVENTS, REQUEST_SCOPES)
        except ValueError as exc:
            problems.append((lineno, str(exc)))
            continue
        for c in cols:
            expected_cols[STEP_EVENTS.index(c.wanted)].append(c)
        expected_events += events
    assert scanned.problems == problems and [p[0] for p in problems] == [5, 8, 9]
    assert [e for _, e in scanned.events] == expected_events
    for got, want in zip(scanned.columns, expected_cols, strict=True):
        if not want:
            assert not got
            continue
        got, want = concat_columns(got), concat_columns(want)
        assert got.size == want.size
        for key in want.numbers:
            np.testing.assert_array_equal(got.numbers[key], want.numbers[key])
        assert got.strings == want.strings


@pytest.mark.parametrize("spelling", [
    '"0"', '"-7"', '"007"', '"-0"', '"123456789012345678"', '"1234567890123456789"',
    '"-8234567890123456789"', '"9234567890123456789"', '"12345678901234567890"', '""',
    '"-"', '"12a"', '"1 "', "42", "-42", "0", "042", "-0", "123456789012345678",
    "1234567890123456789"])
@pytest.mark.parametrize("time", ['"1"', '""', '"1700000000000000000"', '"17000000000x"',
                                  '"' + "9" * 30 + '"', '"' + "9" * 31 + '"'])
def test_block_decoder_reads_integer_and_time_spellings_as_the_generic_one(spelling, time):
    """Each step.duration_us spelling (quoted, bare, too long, not digits) and each
    timeUnixNano in a block of ordinary lines (whose layouts, quoted and bare, the block
    learns first): the same columns and problems as line by line (the block validates
    and converts them itself)."""
    bare = step_line(2).replace(b'"intValue":"100"', b'"intValue":100')
    odd = step_line(3).replace(b'"intValue":"100"', b'"intValue":' + spelling.encode())
    odd = odd.replace(b'"timeUnixNano":"1"', b'"timeUnixNano":' + time.encode())
    numbered = list(enumerate([step_line(1), bare, odd, step_line(4)], 1))
    scanned = scan_block(numbered, STEP_EVENTS, REQUEST_SCOPES)
    expected_cols: list[list] = [[] for _ in STEP_EVENTS]
    problems = []
    for lineno, line in numbered:
        try:
            cols, _ = generic_with_events(line, STEP_EVENTS, REQUEST_SCOPES)
        except ValueError as exc:
            problems.append((lineno, str(exc)))
            continue
        for c in cols:
            expected_cols[STEP_EVENTS.index(c.wanted)].append(c)
    assert scanned.problems == problems
    for got, want in zip(scanned.columns, expected_cols, strict=True):
        if not want:
            assert not got
            continue
        got, want = concat_columns(got), concat_columns(want)
        assert got.size == want.size
        for key in want.numbers:
            np.testing.assert_array_equal(got.numbers[key], want.numbers[key])
        for key in want.ints:
            np.testing.assert_array_equal(got.ints[key], want.ints[key])
