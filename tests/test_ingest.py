"""Ingest: the OTLP step-trace parser and the step table, on the real sample corpus
(corpus/h100-real-steps) and on rewritten copies of it (reordered, re-laid-out,
duplicated, damaged lines).

Reference values are computed here independently, with the plain ``json`` module.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import math
import random
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from blis_model.calibration.featurize import load_experiments
from blis_model.configuration.experiment import Experiment, load_experiment
from blis_model.features.frame import feature_frame
from blis_model.ingest import otlp, scan
from blis_model.ingest.otlp import (
    API_SCOPE,
    JOURNEY_SCOPE,
    STEP_SCOPE,
    decode_line,
    iter_events,
    iter_lines,
)
from blis_model.ingest.reader import REQUEST_SCOPES, read_step_table, read_tables
from blis_model.ingest.requests import read_request_table
from blis_model.ingest.scan import scan_line, scan_with_events
from blis_model.ingest.steps import COMPOSITION_COLUMNS, STEP_EVENTS, StepTableBuilder

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "h100-real-steps"
EXPECTED_STEPS = {"h100-codellama-34b-bf16": 123, "h100-llama-2-7b-bf16": 256,
                  "h100-llama-3.1-8b-bf16": 287, "h100-mixtral-8x7b-bf16": 125}
LLAMA2 = "h100-llama-2-7b-bf16"
SMALL = "h100-codellama-34b-bf16"  # the smallest trace file (2 lines)


# -- helpers -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def experiments() -> dict[str, Experiment]:
    return {e.name: e for e in load_experiments(str(CORPUS))}


@pytest.fixture(scope="module")
def tables(experiments) -> dict[str, tuple[pa.Table, object]]:
    return {name: read_step_table(e) for name, e in experiments.items()}


def raw_lines(name: str) -> list[bytes]:
    with gzip.open(CORPUS / name / "traces.json.gz") as fh:
        return [line.rstrip(b"\n") for line in fh if line.strip()]


@functools.lru_cache
def plain_events(name: str) -> tuple[dict[int, dict], dict[int, list[dict]]]:
    """BATCH_SUMMARY attributes by step id and REQUEST_SNAPSHOT attributes per step,
    decoded with the json module alone (the independent reference)."""
    summaries: dict[int, dict] = {}
    snapshots: dict[int, list[dict]] = defaultdict(list)
    for line in raw_lines(name):
        for rs in json.loads(line)["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                assert ss["scope"]["name"] == STEP_SCOPE
                for span in ss["spans"]:
                    for ev in span["events"]:
                        attrs = {}
                        for a in ev["attributes"]:
                            (kind, value), = a["value"].items()
                            attrs[a["key"]] = int(value) if kind == "intValue" else value
                        if ev["name"] == "step.BATCH_SUMMARY":
                            summaries[attrs["step.id"]] = attrs
                        else:
                            snapshots[attrs["step.id"]].append(attrs)
    return summaries, snapshots


def with_traces(tmp_path: Path, name: str, lines: list[bytes], gz: bool = True,
                raw: bytes | None = None) -> Experiment:
    """A copy of experiment ``name`` whose traces are ``lines`` (or ``raw`` bytes)."""
    root = tmp_path / "corpus"
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("exp-config.yaml", "config.json"):
        shutil.copy(CORPUS / name / f, folder / f)
    data = raw if raw is not None else b"\n".join(lines) + b"\n"
    if gz and raw is None:
        data = gzip.compress(data, compresslevel=1)
    (folder / ("traces.json.gz" if gz else "traces.json")).write_bytes(data)
    return load_experiment(str(root), name)


def assert_same_table(a: pa.Table, b: pa.Table) -> None:
    assert a.schema == b.schema
    for col in a.column_names:
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col


def both_paths(exp: Experiment) -> tuple[pa.Table, object]:
    """The table through the fast and the generic decoder; they must agree exactly, and
    with the one-pass read of steps and requests (each problem reported once)."""
    fast, fast_report = read_step_table(exp)
    generic, generic_report = read_step_table(exp, fast=False)
    assert_same_table(fast, generic)
    assert fast_report.counts == generic_report.counts
    assert [str(p) for p in fast_report.problems] == [str(p) for p in generic_report.problems]
    requests, request_problems = read_request_table(exp)
    for one_pass in (True, False):
        steps, report, both_requests = read_tables(exp, fast=one_pass)
        assert_same_table(steps, fast)
        assert report.to_dict(max_problems=10**6) == fast_report.to_dict(max_problems=10**6)
        assert_same_table(both_requests, requests)
        assert set(request_problems) <= set(report.problems)
    return fast, fast_report


def explode(line: bytes) -> list[dict]:
    """One OTLP export object per (span, step): the events of every step on its own line."""
    obj = json.loads(line)
    out = []
    for rs in obj["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                by_step: dict[str, list] = defaultdict(list)
                for ev in span["events"]:
                    sid = next(a["value"]["intValue"] for a in ev["attributes"]
                               if a["key"] == "step.id")
                    by_step[sid].append(ev)
                for events in by_step.values():
                    out.append({"resourceSpans": [{**rs, "scopeSpans": [
                        {**ss, "spans": [{**span, "events": events}]}]}]})
    return out


def dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def export_line(scope: str, events: list[dict], span_name: str = "s") -> bytes:
    """A minimal OTLP line: one span of ``scope`` holding ``events``."""
    return dumps({"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [
        {"scope": {"name": scope}, "spans": [
            {"traceId": "t", "spanId": "s", "name": span_name, "events": events}]}]}]})


def event(name: str, **attrs: object) -> dict:
    def value(v: object) -> dict:
        if isinstance(v, bool):
            return {"boolValue": v}
        if isinstance(v, int):
            return {"intValue": str(v)}
        if isinstance(v, float):
            return {"doubleValue": v}
        return {"stringValue": v}
    return {"timeUnixNano": "1", "name": name,
            "attributes": [{"key": k.replace("__", "."), "value": value(v)}
                           for k, v in attrs.items()]}


# -- the real sample: counts, totals, a hand-checked step ---------------------------------
def test_step_counts_per_experiment(tables):
    counts = {name: t.num_rows for name, (t, _) in tables.items()}
    assert counts == EXPECTED_STEPS
    assert sum(counts.values()) == 791
    for table, report in tables.values():
        assert report.problems == [] and report.lines_malformed == 0
        assert report.counts["steps_with_snapshots"] == table.num_rows
        assert set(table.column("composition").to_pylist()) == {"snapshot"}


def test_totals_match_plain_json(tables):
    for name, (table, report) in tables.items():
        summaries, snapshots = plain_events(name)
        assert report.counts["steps_seen"] == len(summaries)
        got = {c: np.asarray(table.column(c).to_numpy()) for c in table.column_names
               if c not in ("experiment", "composition")}
        assert sorted(summaries) == got["step_id"].tolist()
        assert got["duration_us"].sum() == sum(s["step.duration_us"] for s in summaries.values())
        snaps = [s for step in snapshots.values() for s in step]
        prefill = [s for s in snaps if s["request.phase"] == "PREFILL"]
        decode = [s for s in snaps if s["request.phase"] == "DECODE"]
        assert len(prefill) + len(decode) == len(snaps)
        assert got["pf_tokens"].sum() == sum(s["request.scheduled_tokens_this_step"]
                                             for s in prefill)
        assert got["pf_count"].sum() == len(prefill)
        assert got["dc_count"].sum() == len(decode)
        assert got["dc_ctx_sum"].sum() == sum(s["request.num_computed_tokens"] for s in decode)
        assert got["pf_ctx_tokens"].sum() == sum(
            s["request.scheduled_tokens_this_step"] * s["request.num_computed_tokens"]
            for s in prefill)
        assert got["blocks_allocated"].sum() == sum(s["kv.blocks_allocated_gpu"] for s in snaps)
        assert got["kv_usage_ratio"].sum() == pytest.approx(
            sum(s["kv.usage_gpu_ratio"] for s in summaries.values()), rel=1e-12)


def test_hand_checked_step(tables):
    """llama-2-7b step 163: two prefill chunks on cached context plus three decodes."""
    # (phase, prompt s, computed c, scheduled t, output, preemptions, blocks, cached),
    # copied from the file and re-checked against it below
    snapshots = [
        ("PREFILL", 6465, 6224, 241, 0, 0, 405, 389),
        ("PREFILL", 109, 97, 12, 0, 0, 7, 6),
        ("DECODE", 21, 52, 1, 32, 0, 4, 0),
        ("DECODE", 60, 115, 1, 56, 0, 8, 0),
        ("DECODE", 55, 99, 1, 45, 0, 7, 0),
    ]
    summaries, in_file = plain_events(LLAMA2)
    assert [(s["request.phase"], s["request.num_prompt_tokens"],
             s["request.num_computed_tokens"], s["request.scheduled_tokens_this_step"],
             s["request.num_output_tokens"], s["request.num_preemptions"],
             s["kv.blocks_allocated_gpu"], s["kv.blocks_cached_gpu"])
            for s in in_file[163]] == snapshots
    expected = {
        "duration_us": 19014,
        "pf_count": 2,
        "pf_tokens": 241 + 12,  # 253
        "pf_tokens_sq": 241 * 241 + 12 * 12,  # 58081 + 144 = 58225
        "pf_ctx_tokens": 241 * 6224 + 12 * 97,  # 1_499_984 + 1_164 = 1_501_148
        "pf_prompt_tokens": 241 * 6465 + 12 * 109,  # 1_558_065 + 1_308 = 1_559_373
        "pf_kv_tokens": (6224 + 241) + (97 + 12),  # 6574
        "pf_ctx_max": 6465,  # max(6224 + 241, 97 + 12)
        "pf_sampling": 2,  # both chunks finish their prompt: c + t == s
        "dc_count": 3,
        "dc_ctx_sum": 52 + 115 + 99,  # 266
        "dc_ctx_max": 115,
        "blocks_allocated": 405 + 7 + 4 + 8 + 7,  # 431
        "blocks_cached": 389 + 6,  # 395
        "preempted_before": 0,
        "num_prefill_reqs": 2,
        "num_decode_reqs": 3,
        "prefill_tokens": 253,
        "decode_tokens": 3,
    }
    assert expected["pf_tokens_sq"] == 58225 and expected["pf_ctx_tokens"] == 1_501_148
    assert expected["pf_prompt_tokens"] == 1_559_373
    table = tables[LLAMA2][0]
    row = table.column("step_id").to_pylist().index(163)
    got = {c: table.column(c)[row].as_py() for c in expected}
    assert got == expected
    assert table.column("composition")[row].as_py() == "snapshot"
    assert summaries[163]["batch.scheduled_tokens"] == 256


def test_invariants(tables, experiments):
    for name, (table, _) in tables.items():
        cols = {c: np.asarray(table.column(c).to_numpy()) for c in table.column_names
                if c not in ("experiment", "composition")}
        summaries, _ = plain_events(name)
        scheduled = np.array([summaries[int(s)]["batch.scheduled_tokens"]
                              for s in cols["step_id"]])
        assert np.array_equal(cols["pf_tokens"] + cols["dc_count"], scheduled)
        assert np.array_equal(cols["prefill_tokens"] + cols["decode_tokens"], scheduled)
        assert np.array_equal(cols["pf_count"], cols["num_prefill_reqs"])
        assert np.array_equal(cols["dc_count"], cols["num_decode_reqs"])
        for c in COMPOSITION_COLUMNS:
            assert (cols[c] >= 0).all() and np.isfinite(cols[c]).all(), c
        assert (cols["duration_us"] > 0).all()
        ids = cols["step_id"]
        assert (np.diff(ids) > 0).all(), "step ids sorted and unique"
        assert (cols["pf_ctx_max"] <= cols["pf_kv_tokens"]).all()
        assert (cols["pf_sampling"] <= cols["pf_count"]).all()
        frame = feature_frame(experiments[name], table)
        assert len(frame) == table.num_rows
        assert np.isfinite(frame.select_dtypes("number").to_numpy()).all()


# -- fast decoder == generic decoder ----------------------------------------------------
def test_fast_and_generic_paths_agree_on_the_real_sample(experiments, tables):
    for name, exp in experiments.items():
        table, report = both_paths(exp)
        assert_same_table(table, tables[name][0])
        assert report.bytes_uncompressed == sum(len(x) + 1 for x in raw_lines(name))


def test_fast_and_generic_agree_line_by_line():
    for line in raw_lines("h100-mixtral-8x7b-bf16"):
        fast = scan_line(line, STEP_EVENTS)
        generic = scan.generic_columns(line, STEP_EVENTS)
        assert [c.wanted for c in fast] == [c.wanted for c in generic] == list(STEP_EVENTS)
        for f, g in zip(fast, generic, strict=True):
            assert f.size == g.size > 0
            for k in f.numbers:
                assert np.array_equal(f.numbers[k], g.numbers[k], equal_nan=True), k
            assert f.strings == g.strings


def test_out_of_order_lines_give_the_same_table(tmp_path, tables):
    lines = [dumps(obj) for line in raw_lines(LLAMA2) for obj in explode(line)]
    assert len(lines) == 256
    rng = random.Random(7)
    rng.shuffle(lines)
    table, report = both_paths(with_traces(tmp_path, LLAMA2, lines))
    assert report.lines_read == 256 and report.problems == []
    assert_same_table(table, tables[LLAMA2][0])


def test_shuffled_events_within_a_line_give_the_same_table(tmp_path, tables):
    rng = random.Random(3)
    lines = []
    for line in raw_lines(LLAMA2):
        obj = json.loads(line)
        for span in obj["resourceSpans"][0]["scopeSpans"][0]["spans"]:
            rng.shuffle(span["events"])
        lines.append(dumps(obj))
    table, _ = both_paths(with_traces(tmp_path, LLAMA2, lines))
    assert_same_table(table, tables[LLAMA2][0])


def _relayout(ev: dict, how: int) -> dict:
    """The same event spelled differently (valid OTLP JSON, same decoded values)."""
    attrs = list(ev["attributes"])
    if how == 0:  # attributes in reverse order
        return {**ev, "attributes": attrs[::-1]}
    if how == 1:  # event keys in another order
        return {"name": ev["name"], "attributes": attrs, "timeUnixNano": ev["timeUnixNano"]}
    if how == 2:  # an extra, unused attribute (vLLM's optional effective prompt length)
        return {**ev, "attributes": attrs + [{"key": "request.effective_prompt_len",
                                              "value": {"intValue": "7"}}]}
    if how == 3:  # integers as JSON numbers instead of strings
        return {**ev, "attributes": [
            {"key": a["key"], "value": {"intValue": int(a["value"]["intValue"])}}
            if "intValue" in a["value"] else a for a in attrs]}
    if how == 4:  # value before key
        return {**ev, "attributes": [{"value": a["value"], "key": a["key"]} for a in attrs]}
    return ev


def test_non_canonical_layouts_give_the_same_table(tmp_path, tables):
    """Every event rewritten in one of six spellings, mixed within spans and lines;
    some lines pretty-printed with spaces."""
    rng = random.Random(11)
    lines = []
    for i, line in enumerate(raw_lines(LLAMA2)):
        obj = json.loads(line)
        for span in obj["resourceSpans"][0]["scopeSpans"][0]["spans"]:
            span["events"] = [_relayout(ev, rng.randrange(6)) for ev in span["events"]]
        lines.append(json.dumps(obj).encode() if i == 1 else dumps(obj))
    table, _ = both_paths(with_traces(tmp_path, LLAMA2, lines, gz=False))
    assert_same_table(table, tables[LLAMA2][0])


def test_one_layout_change_mid_line_is_decoded_exactly():
    base = event("step.BATCH_SUMMARY", step__id=1, step__duration_us=10)
    other = {"name": "step.BATCH_SUMMARY", "timeUnixNano": "2", "attributes": [
        {"key": "step.duration_us", "value": {"intValue": "20"}},
        {"key": "step.id", "value": {"intValue": "2"}}]}
    weird = {**event("step.BATCH_SUMMARY", step__id=3), "attributes": [
        {"key": "step.id", "value": {"intValue": "3"}},
        {"key": "step.duration_us", "value": {"doubleValue": 3.5}},
        {"key": "x", "value": {"arrayValue": {"values": []}}}]}
    line = export_line(STEP_SCOPE, [base, other, weird, base | {"timeUnixNano": "9"}, other])
    fast = scan_line(line, STEP_EVENTS)
    generic = scan.generic_columns(line, STEP_EVENTS)
    assert len(fast) == len(generic) == 1
    assert fast[0].numbers["step.id"].tolist() == [1, 2, 3, 1, 2]
    assert fast[0].numbers["step.duration_us"].tolist() == [10, 20, 3.5, 10, 20]
    for k in fast[0].numbers:
        assert np.array_equal(fast[0].numbers[k], generic[0].numbers[k], equal_nan=True)


def test_random_values_convert_identically():
    rng = random.Random(5)
    events = []
    for i in range(400):
        ratio = rng.choice([rng.random(), rng.random() * 10 ** rng.randint(-30, 30), 0.0,
                            -rng.random(), float(rng.randint(0, 10**15))])
        events.append({"timeUnixNano": str(rng.randint(0, 2**63 - 1)),
                       "name": "step.BATCH_SUMMARY", "attributes": [
                           {"key": "step.id", "value": {"intValue": str(i)}},
                           {"key": "step.ts_start_ns",
                            "value": {"intValue": str(rng.randint(-2**62, 9 * 10**18 - 1))}},
                           {"key": "step.duration_us",
                            "value": {"intValue": str(rng.randint(1, 10**12))}},
                           {"key": "kv.usage_gpu_ratio", "value": {"doubleValue": ratio}},
                           {"key": "batch.num_finished",
                            "value": {"boolValue": rng.random() < 0.5}}]})
    line = export_line(STEP_SCOPE, events)
    fast = scan_line(line, STEP_EVENTS)[0]
    generic = scan.generic_columns(line, STEP_EVENTS)[0]
    assert fast.size == generic.size == 400
    for k in fast.numbers:
        assert np.array_equal(fast.numbers[k], generic.numbers[k], equal_nan=True), k
    assert not np.isnan(fast.numbers["kv.usage_gpu_ratio"]).any()


def test_step_events_outside_the_step_scope_are_ignored_by_both_paths():
    summary = event("step.BATCH_SUMMARY", step__id=1, step__duration_us=10)
    line = dumps({"resourceSpans": [{"scopeSpans": [
        {"scope": {"name": "vllm.scheduler"}, "spans": [{"events": [summary]}]},
        {"scope": {"name": STEP_SCOPE}, "spans": [{"events": [
            summary | {"attributes": summary["attributes"][:1] + [
                {"key": "step.duration_us", "value": {"intValue": "11"}}]}]}]},
    ]}]})
    for cols in (scan_line(line, STEP_EVENTS), scan.generic_columns(line, STEP_EVENTS)):
        assert len(cols) == 1 and cols[0].numbers["step.duration_us"].tolist() == [11]


def assert_same_scan(a: scan.Scanned, b: scan.Scanned) -> None:
    assert [c.wanted for c in a[0]] == [c.wanted for c in b[0]]
    for f, g in zip(a[0], b[0], strict=True):
        assert f.size == g.size
        for k in f.numbers:
            assert np.array_equal(f.numbers[k], g.numbers[k], equal_nan=True), k
        assert f.strings == g.strings
    assert a[1] == b[1]


def test_one_decode_gives_step_columns_and_whole_request_events():
    """A line mixing step, journey and API spans: the fast path keeps its speed on the step
    events and hands back the journey/API events exactly as the generic decoder does."""
    journey = {"scope": {"name": JOURNEY_SCOPE}, "spans": [{"name": "llm_core", "attributes": [
        {"key": "gen_ai.request.id", "value": {"stringValue": "cmpl-1-0"}}], "events": [
        event("journey.QUEUED", scheduler__step=3, ts__monotonic_ns=5),
        event("journey.FINISHED", **{"finish.status": "length", "scheduler.step": 9})]}]}
    api = {"scope": {"name": API_SCOPE}, "spans": [{"name": "llm_request"}]}  # bare span
    obj = json.loads(raw_lines(SMALL)[0])
    obj["resourceSpans"][0]["scopeSpans"] = [journey, *obj["resourceSpans"][0]["scopeSpans"],
                                             api]
    line = dumps(obj)
    assert scan._fast_columns(line, STEP_EVENTS, REQUEST_SCOPES) is not None  # the fast path
    fast = scan_with_events(line, STEP_EVENTS, REQUEST_SCOPES)
    assert_same_scan(fast, scan.generic_with_events(line, STEP_EVENTS, REQUEST_SCOPES))
    assert fast[1] == [e for e in decode_line(line) if e.scope in REQUEST_SCOPES]
    assert [e.name for e in fast[1]] == ["journey.QUEUED", "journey.FINISHED", ""]
    assert_same_scan((fast[0], []), (scan_line(line, STEP_EVENTS), []))
    assert scan_with_events(line, STEP_EVENTS)[1] == []  # no scope kept, no events


def test_step_events_in_a_kept_scope_stay_whole_events():
    """A step-named event inside a journey span is a journey event: never a placeholder."""
    summary = event("step.BATCH_SUMMARY", step__id=1, step__duration_us=10)
    line = dumps({"resourceSpans": [{"scopeSpans": [
        {"scope": {"name": JOURNEY_SCOPE}, "spans": [{"events": [summary]}]},
        {"scope": {"name": STEP_SCOPE}, "spans": [{"events": [summary]}]}]}]})
    fast = scan_with_events(line, STEP_EVENTS, REQUEST_SCOPES)
    assert_same_scan(fast, scan.generic_with_events(line, STEP_EVENTS, REQUEST_SCOPES))
    assert [(e.scope, e.name) for e in fast[1]] == [(JOURNEY_SCOPE, "step.BATCH_SUMMARY")]
    assert len(fast[0]) == 1 and fast[0][0].size == 1


# -- duplicates, other scopes, damaged input ----------------------------------------------
def test_duplicate_steps_are_counted_once(tmp_path, tables):
    lines = raw_lines(LLAMA2)
    table, report = both_paths(with_traces(tmp_path, LLAMA2, lines + lines[:1]))
    assert_same_table(table, tables[LLAMA2][0])
    spans = json.loads(lines[0])["resourceSpans"][0]["scopeSpans"][0]["spans"]
    names = [ev["name"] for span in spans for ev in span["events"]]
    assert report.counts["steps_duplicate"] == names.count("step.BATCH_SUMMARY") > 0
    assert report.counts["snapshots_duplicate"] == names.count("step.REQUEST_SNAPSHOT") > 0


def test_journey_and_api_lines_do_not_break_ingestion(tmp_path, tables):
    journey = export_line("vllm.scheduler", [
        event("journey.QUEUED", scheduler__step=3, phase="WAITING"),
        event("journey.FINISHED", **{"finish.status": "length"}),
    ], span_name="llm_core")
    api = export_line("vllm.api", [event("api.ARRIVED", **{"event.ts.monotonic": 1.5})],
                      span_name="llm_request")
    bare_api = dumps({"resourceSpans": [{"scopeSpans": [{"scope": {"name": "vllm.api"},
                                                          "spans": [{"name": "llm_request"}]}]}]})
    lines = raw_lines(LLAMA2)
    mixed = [journey, lines[0], api, bare_api, lines[1], journey, lines[2]]
    table, report = both_paths(with_traces(tmp_path, LLAMA2, mixed))
    assert report.problems == []
    assert_same_table(table, tables[LLAMA2][0])
    scopes = {e.scope for e in iter_events(io.BytesIO(b"\n".join(mixed)), "x", [])}
    assert scopes == {STEP_SCOPE, "vllm.scheduler", "vllm.api"}


BAD_LINES = [
    b'{"resourceSpans":[{"scopeSpans":[',  # truncated
    b"this is not json",
    b"[1, 2, 3]",  # JSON, but not an export object
    b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"events":[5]}]}]}]}',  # event not an object
    # a string where an event belongs, spelled like the fast decoder's placeholders
    export_line(STEP_SCOPE, ["L0", event("step.BATCH_SUMMARY", step__id=1)]),
    b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"events":[{"attributes":[{"value":{}}]}]}]}]}]}',
    # an event spelled inside a string: the fast path must not make this line valid
    b'{"resourceSpans":[],"x":"[' + dumps(event("step.BATCH_SUMMARY", step__id=1))
    + b']"}',
    b'{"resourceSpans":[{"scopeSpans":[{"scope":{"name":"vllm.scheduler.step"},"spans":[{'
    b'"events":[{"timeUnixNano":"1","name":"step.BATCH_SUMMARY","attributes":[{"key":"step.id",'
    b'"value":{"intValue":"1"}}]}]}]}]}]}\x00',  # trailing garbage after a valid object
]


@pytest.mark.parametrize("bad", BAD_LINES)
def test_a_malformed_line_is_reported_and_skipped(tmp_path, tables, bad):
    lines = raw_lines(SMALL)
    table, report = both_paths(with_traces(tmp_path, SMALL, [lines[0], bad, *lines[1:]]))
    assert_same_table(table, tables[SMALL][0])
    assert report.lines_malformed == 1
    (problem,) = report.problems
    assert problem.file == f"{SMALL}/traces.json.gz" and problem.line == 2
    assert str(problem).startswith(f"{SMALL}/traces.json.gz:2: ")


def test_a_step_line_cut_in_the_middle_loses_only_that_line(tmp_path, tables):
    lines = raw_lines(LLAMA2)
    cut = lines[1][: len(lines[1]) // 2]
    table, report = both_paths(with_traces(tmp_path, LLAMA2, [lines[0], cut, lines[2]]))
    assert report.lines_malformed == 1 and report.problems[0].line == 2
    assert 0 < table.num_rows < tables[LLAMA2][0].num_rows


def test_truncated_gzip_is_reported_and_the_readable_part_kept(tmp_path, tables):
    lines = raw_lines(LLAMA2)
    whole = gzip.compress(b"\n".join(lines) + b"\n")
    table, report = both_paths(with_traces(tmp_path, LLAMA2, [], raw=whole[: len(whole) - 50]))
    truncated, cut_line = report.problems
    assert "truncated" in truncated.reason and truncated.line == 3
    assert cut_line.line == 3 and "malformed" in cut_line.reason
    # the two complete lines survive, exactly as in the full file
    full = tables[LLAMA2][0]
    ids = table.column("step_id").to_pylist()
    assert 0 < len(ids) < full.num_rows
    assert_same_table(table, full.filter(pc.is_in(full.column("step_id"), pa.array(ids))))


def test_corrupt_gzip_is_reported(tmp_path):
    data = bytearray(gzip.compress(b"\n".join(raw_lines(LLAMA2)) + b"\n"))
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    exp = with_traces(tmp_path, LLAMA2, [], raw=bytes(data))
    table, report = read_step_table(exp)
    assert any("corrupt compressed data" in p.reason for p in report.problems)


def test_empty_and_missing_trace_files(tmp_path):
    table, report = read_step_table(with_traces(tmp_path, LLAMA2, [], raw=b""))
    assert table.num_rows == 0 and report.problems == []
    exp = with_traces(tmp_path / "b", LLAMA2, [b"{}"])
    (Path(exp.url) / "traces.json.gz").unlink()
    exp = load_experiment(str(tmp_path / "b" / "corpus"), LLAMA2)
    table, report = read_step_table(exp)
    assert table.num_rows == 0 and report.problems[0].reason == "no trace file"


def test_bad_durations_and_missing_step_ids_are_excluded_and_counted(tmp_path):
    line = export_line(STEP_SCOPE, [
        event("step.BATCH_SUMMARY", step__id=1, step__duration_us=100),
        event("step.BATCH_SUMMARY", step__id=2, step__duration_us=0),
        event("step.BATCH_SUMMARY", step__id=3),
        event("step.BATCH_SUMMARY", step__duration_us=5),
        event("step.BATCH_SUMMARY", step__id="4", step__duration_us=5),  # id not a number
    ])
    table, report = both_paths(with_traces(tmp_path, LLAMA2, [line]))
    assert table.column("step_id").to_pylist() == [1]
    assert table.column("composition").to_pylist() == ["summary"]
    assert report.counts["steps_bad_duration"] == 2
    assert report.counts["events_without_step_id"] == 2


# -- streaming ----------------------------------------------------------------------------
def test_lines_stream_in_bounded_chunks(monkeypatch):
    lines = [b'{"a":%d}' % i * (i % 7 + 1) for i in range(200)] + [b"x" * 5000]
    text = b"\n".join(lines) + b"\n\n  \n"
    monkeypatch.setattr(otlp, "READ_CHUNK", 97)
    monkeypatch.setattr(otlp, "INFLATE_CHUNK", 31)
    for data, name in ((text, "t.json"), (gzip.compress(text), "t.json.gz"),
                       (gzip.compress(text[:999]) + gzip.compress(text[999:]) + bytes(10),
                        "t.json.gz")):
        problems: list = []
        stats = otlp.LineStats()
        got = list(iter_lines(io.BytesIO(data), name, problems, stats))
        assert [line for _, line in got] == lines
        assert [n for n, _ in got] == list(range(1, 202))
        assert problems == [] and stats.bytes == len(text) and stats.lines == 203


def test_builder_accepts_events_and_columns_alike(experiments, tables):
    """``StepTableBuilder.add`` (generic Event objects) gives the same table."""
    exp = experiments["h100-mixtral-8x7b-bf16"]
    builder = StepTableBuilder(exp.name, block_size=exp.server.block_size)
    with open(CORPUS / exp.name / "traces.json.gz", "rb") as fh:
        builder.add_all(iter_events(fh, "x", []))
    table, counts = builder.table()
    assert_same_table(table, tables[exp.name][0])
    assert counts == tables[exp.name][1].counts
    assert not math.isnan(table.column("duration_us").to_numpy().sum())


def test_unusual_value_spellings_decode_identically():
    def summary(step: int, duration: object, ratio: object) -> dict:
        return {"timeUnixNano": "1", "name": "step.BATCH_SUMMARY", "attributes": [
            {"key": "step.id", "value": {"intValue": step}},
            {"key": "step.duration_us", "value": {"intValue": duration}},
            {"key": "kv.usage_gpu_ratio", "value": {"doubleValue": ratio}}]}
    events = [summary(1, 5, "NaN"), summary(2, "+7", "Infinity"), summary(3, 9, "0.25"),
              summary(4, "1_000", 1), summary(5, 12345678901234567890, "-Infinity"),
              summary(6, "12", 0.5)]
    line = export_line(STEP_SCOPE, events)
    fast = scan_line(line, STEP_EVENTS)[0]
    generic = scan.generic_columns(line, STEP_EVENTS)[0]
    assert fast.numbers["step.duration_us"].tolist() == [
        5, 7, 9, 1000, float(12345678901234567890), 12]
    for k in fast.numbers:
        assert np.array_equal(fast.numbers[k], generic.numbers[k], equal_nan=True), k
    bad = export_line(STEP_SCOPE, [summary(1, 5, "0.5"), summary(2, 5, "abc")])
    for decode in (scan_line, scan.generic_columns):
        with pytest.raises(ValueError, match="not a valid OTLP export object"):
            decode(bad, STEP_EVENTS)


def test_the_real_sample_takes_the_fast_path(experiments, monkeypatch):
    calls = []
    generic = scan.generic_columns
    monkeypatch.setattr(scan, "generic_columns", lambda *a: calls.append(1) or generic(*a))
    table, _ = read_step_table(experiments[LLAMA2])
    assert table.num_rows == 256 and calls == []
