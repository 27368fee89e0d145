"""Step reconstruction from journey events equals the generator's true batches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from blis_model.experiment import load_experiment
from blis_model.ingest.reader import read_step_table
from blis_model.ingest.reconstruct import (
    compare_with_snapshots,
    compare_with_summaries,
    fill_compositions,
    reconstruct_steps,
)
from blis_model.ingest.requests import read_request_table, validate_requests
from blis_model.ingest.steps import COMPOSITION_COLUMNS
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
