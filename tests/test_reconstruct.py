"""Step reconstruction from journey events equals the generator's true batches."""

from __future__ import annotations

import dataclasses
import gzip

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem

from blis_model.calibration import featurize
from blis_model.configuration.experiment import load_experiment
from blis_model.features.frame import feature_frame
from blis_model.ingest.otlp import JOURNEY_SCOPE, STEP_SCOPE
from blis_model.ingest.reader import IngestReport, read_step_table, read_tables
from blis_model.ingest.reconstruct import (
    compare_with_snapshots,
    compare_with_summaries,
    fill_compositions,
    reconstruct_steps,
)
from blis_model.ingest.requests import read_request_table, validate_requests
from blis_model.ingest.steps import COMPOSITION_COLUMNS
from blis_model.requests.stage import RequestSettings, request_data
from blis_model.synth import SynthConfig, write_experiment

# scarce KV: hundreds of preemptions, chunked prefills, recomputation after resume
BUSY = SynthConfig(seed=3, num_requests=150, arrival_rate=60.0, max_num_batched_tokens=1024,
                   max_num_seqs=32, num_gpu_blocks=260)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    with_snap = write_experiment(str(root / "snap"), BUSY)
    without = write_experiment(str(root / "sampled"), dataclasses.replace(
        BUSY, snapshots=False, sample_every=5, out_of_order=0.2))
    return root, with_snap, without


def test_reconstruction_matches_every_snapshot_column(corpus) -> None:
    root, truth, _ = corpus
    exp = load_experiment(str(root), "snap")
    steps, _ = read_step_table(exp)
    requests, _ = read_request_table(exp)
    rebuilt, report = reconstruct_steps(requests, BUSY.max_num_batched_tokens,
                                        steps.column("step_id").to_numpy(), BUSY.block_size)
    assert report.requests_used == BUSY.num_requests and not report.requests_skipped
    assert report.forced_chunks == 0 and report.prefills_preempted > 0
    assert truth.steps.column("num_preempted").to_numpy().sum() > 50
    for column in COMPOSITION_COLUMNS:
        np.testing.assert_array_equal(rebuilt.column(column).to_numpy(),
                                      steps.column(column).to_numpy(), err_msg=column)
    agreement = compare_with_snapshots(steps, rebuilt)
    assert agreement["steps"] == steps.num_rows
    assert all(agreement[c]["exact_share"] == 1.0 for c in ("pf_tokens", "dc_ctx_sum"))


def test_sampled_steps_without_snapshots_get_their_true_batches(corpus) -> None:
    root, _, truth = corpus
    exp = load_experiment(str(root), "sampled")
    steps, _ = read_step_table(exp)
    assert set(steps.column("composition").to_pylist()) == {"summary"}
    requests, _ = read_request_table(exp)
    rebuilt, _ = reconstruct_steps(requests, BUSY.max_num_batched_tokens,
                                   steps.column("step_id").to_numpy(), BUSY.block_size)
    filled = fill_compositions(steps, rebuilt)
    assert set(filled.column("composition").to_pylist()) == {"journey"}
    want = truth.steps.filter(truth.steps.column("traced"))
    for ours, theirs in (("pf_count", "num_prefill_reqs"), ("pf_tokens", "prefill_tokens"),
                         ("pf_ctx_tokens", "prefill_ctx_tokens"), ("dc_count", "decode_count"),
                         ("dc_ctx_sum", "decode_ctx_sum")):
        np.testing.assert_array_equal(filled.column(ours).to_numpy(),
                                      want.column(theirs).to_numpy(), err_msg=ours)
    # the summaries' own counts agree with the reconstruction
    agreement = compare_with_summaries(steps, rebuilt)
    assert agreement["steps"] == steps.num_rows
    assert all(agreement[c]["exact_share"] == 1.0 for c in ("pf_tokens", "pf_count",
                                                             "dc_count"))


def test_incomplete_journeys_are_skipped_and_counted(corpus) -> None:
    root, _, _ = corpus
    requests, _ = read_request_table(load_experiment(str(root), "snap"))
    finished = requests.column("finished_step").to_pylist()
    finished[0] = None  # its FINISHED event was lost
    broken = requests.set_column(requests.schema.get_field_index("finished_step"),
                                 "finished_step", pa.array(finished, pa.int64()))
    _, report = reconstruct_steps(broken, BUSY.max_num_batched_tokens)
    assert report.requests_skipped == {"incomplete lifecycle": 1}
    assert report.requests_used == BUSY.num_requests - 1


def test_prefix_cache_hits_are_reconstructed_exactly(tmp_path) -> None:
    cfg = dataclasses.replace(BUSY, seed=4, num_requests=100, num_gpu_blocks=500,
                              prefix_caching=True, prefix_share=0.7, prefix_tokens=300)
    write_experiment(str(tmp_path / "e"), cfg)
    exp = load_experiment(str(tmp_path), "e")
    steps, _ = read_step_table(exp)
    requests, _ = read_request_table(exp)
    assert (requests.column("scheduled_done_tokens").to_numpy() > 0).sum() > 10
    assert steps.column("blocks_cached").to_numpy().sum() > 0
    report = validate_requests(requests, max_num_batched_tokens=cfg.max_num_batched_tokens)
    assert report.n_failed == 0
    rebuilt, _ = reconstruct_steps(requests, cfg.max_num_batched_tokens,
                                   steps.column("step_id").to_numpy(), cfg.block_size)
    for column in COMPOSITION_COLUMNS:
        np.testing.assert_array_equal(rebuilt.column(column).to_numpy(),
                                      steps.column(column).to_numpy(), err_msg=column)


# -- one pass over the trace feeds both tables ------------------------------------------
SMALL_BUSY = dataclasses.replace(BUSY, num_requests=60)


def _rewrite_traces(folder, rewrite) -> None:
    """Replace the experiment's ``traces.json.gz`` body by ``rewrite(body)`` (raw bytes)."""
    path = folder / "traces.json.gz"
    path.write_bytes(rewrite(gzip.decompress(path.read_bytes())))


def _mix_scopes(body: bytes) -> bytes:
    """The i-th journey/API export line merged into the i-th step line: step, journey and
    API spans share lines."""
    objs = [orjson.loads(line) for line in body.splitlines() if line.strip()]
    steps: list[dict] = []
    others: list[dict] = []
    for o in objs:
        scope = o["resourceSpans"][0]["scopeSpans"][0]["scope"]["name"]
        (steps if scope == STEP_SCOPE else others).append(o)
    for step, other in zip(steps, others, strict=False):
        step["resourceSpans"][0]["scopeSpans"] += other["resourceSpans"][0]["scopeSpans"]
    mixed = steps + others[len(steps):]
    return gzip.compress(b"\n".join(orjson.dumps(o) for o in mixed) + b"\n")


@pytest.fixture(scope="module")
def journey_corpus(tmp_path_factory):
    """Journey corpora that stress the reader: out-of-order lines with junk, exports
    mixing step and request spans in one line, and a gzip stream cut short."""
    root = tmp_path_factory.mktemp("one_pass")
    write_experiment(str(root / "junk"), dataclasses.replace(
        SMALL_BUSY, snapshots=False, sample_every=4, out_of_order=0.3, malformed_lines=3))
    write_experiment(str(root / "mixed"), SMALL_BUSY)
    _rewrite_traces(root / "mixed", _mix_scopes)
    write_experiment(str(root / "cut"), SMALL_BUSY)
    _rewrite_traces(root / "cut", lambda body: gzip.compress(body)[:-2000])
    return root


def assert_one_pass_equals_two(exp) -> IngestReport:
    steps, report, requests = read_tables(exp)
    two_steps, two_report = read_step_table(exp)
    two_requests, request_problems = read_request_table(exp)
    assert steps.equals(two_steps) and requests.equals(two_requests)
    assert report.to_dict(max_problems=10**6) == two_report.to_dict(max_problems=10**6)
    assert set(request_problems) <= set(report.problems)
    assert len(set(report.problems)) == len(report.problems)  # each problem once
    generic = read_tables(exp, fast=False)
    assert generic[0].equals(steps) and generic[2].equals(requests)
    return report


def test_one_pass_equals_the_two_separate_reads(journey_corpus) -> None:
    root = journey_corpus
    junk = assert_one_pass_equals_two(load_experiment(str(root), "junk"))
    assert junk.lines_malformed == len(junk.problems) == 3
    assert all(p.file == "junk/traces.json.gz" and p.line > 0 for p in junk.problems)

    mixed = load_experiment(str(root), "mixed")
    with gzip.open(root / "mixed" / "traces.json.gz") as fh:
        scopes = [{ss["scope"]["name"] for ss in orjson.loads(line)["resourceSpans"][0][
            "scopeSpans"]} for line in fh]
    assert any({STEP_SCOPE, JOURNEY_SCOPE} <= s for s in scopes)
    assert not assert_one_pass_equals_two(mixed).problems
    assert read_tables(mixed)[2].num_rows == SMALL_BUSY.num_requests

    cut = assert_one_pass_equals_two(load_experiment(str(root), "cut"))
    assert sum("truncated" in p.reason for p in cut.problems) == 1


@pytest.mark.parametrize("requests", [None, False])
def test_featurize_opens_a_journey_trace_once(journey_corpus, monkeypatch, requests) -> None:
    exp = load_experiment(str(journey_corpus), "junk")
    steps, _ = read_step_table(exp)
    expected = request_data(exp, steps, read_request_table(exp)[0])  # the two-pass result
    opened: list[str] = []
    original = LocalFileSystem.open

    def counting_open(self, path, *args, **kwargs):
        opened.append(str(path))
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "open", counting_open)
    item = featurize.featurize(exp, settings=RequestSettings(requests=requests))
    assert [p for p in opened if "traces.json" in p] == [exp.trace_url.removeprefix("file://")]
    assert item.report.lines_malformed == 3
    if requests is False:
        assert item.requests is None
        pd.testing.assert_frame_equal(item.frame, feature_frame(exp, steps))
        return
    assert item.requests.requests.equals(expected.requests)
    assert item.requests.steps.equals(expected.steps)
    assert item.requests.validation == expected.validation
    pd.testing.assert_frame_equal(item.frame, feature_frame(exp, expected.steps))
