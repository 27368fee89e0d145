"""Teacher-forced TTFT / ITL / E2E: exact with a perfect model, close with the true law on
a sampled, snapshot-free trace whose untraced steps are rebuilt from journeys."""

from __future__ import annotations

import numpy as np
import pytest

from blis_model.configuration.experiment import load_experiment
from blis_model.ingest.reader import read_step_table
from blis_model.ingest.reconstruct import reconstruct_steps
from blis_model.ingest.requests import read_request_table
from blis_model.requests.accuracy import (
    full_step_table,
    request_accuracy,
    request_accuracy_per_experiment,
    teacher_forced,
)
from blis_model.requests.alphas import AlphaFit, fit_alphas
from blis_model.synth import LinearStepTime, SynthConfig, write_experiment

LAW = LinearStepTime(seed=1)


def test_perfect_model_reproduces_every_request_exactly(tmp_path) -> None:
    cfg = SynthConfig(seed=21, num_requests=80, arrival_rate=50.0, num_gpu_blocks=300,
                      max_num_batched_tokens=1024, max_num_seqs=32, overhead_sigma=0.0)
    truth = write_experiment(str(tmp_path / "e"), cfg)
    requests, _ = read_request_table(load_experiment(str(tmp_path), "e"))
    alphas = AlphaFit("exact", cfg.alpha0_us, 0.0, cfg.alpha1_us, cfg.alpha2_us, 0, 0)
    per_request = teacher_forced(requests, truth.steps.column("step_id").to_numpy(),
                                 truth.steps.column("duration_us").to_numpy(), alphas)
    assert len(per_request) == cfg.num_requests
    assert truth.requests.column("num_preemptions").to_numpy().sum() > 0
    for metric in ("ttft", "itl", "e2e"):
        both = per_request[[f"{metric}_obs_us", f"{metric}_pred_us"]].dropna()
        np.testing.assert_allclose(both.iloc[:, 1], both.iloc[:, 0], atol=0.01, err_msg=metric)
    assert request_accuracy(per_request)["e2e"]["mape"] < 1e-4


def test_true_law_on_sampled_trace_without_snapshots(tmp_path) -> None:
    cfg = SynthConfig(seed=22, num_requests=120, arrival_rate=50.0, num_gpu_blocks=400,
                      max_num_batched_tokens=1024, max_num_seqs=32, step_time_us=LAW,
                      snapshots=False, sample_every=7)
    write_experiment(str(tmp_path / "e"), cfg)
    exp = load_experiment(str(tmp_path), "e")
    steps, _ = read_step_table(exp)
    requests, _ = read_request_table(exp)
    rebuilt, report = reconstruct_steps(requests, cfg.max_num_batched_tokens,
                                        block_size=cfg.block_size)
    assert not report.requests_skipped
    full = full_step_table(steps, rebuilt, exp.name)
    assert full.num_rows > 5 * steps.num_rows  # most steps were never traced
    assert set(full.column("composition").to_pylist()) == {"journey"}
    c = {k: full.column(k).to_numpy() for k in ("pf_tokens", "pf_ctx_tokens", "dc_count",
                                                "dc_ctx_sum")}
    predicted = (LAW.base_us + LAW.prefill_token_us * c["pf_tokens"]
                 + LAW.prefill_ctx_us * c["pf_ctx_tokens"] + LAW.decode_us * c["dc_count"]
                 + LAW.decode_ctx_us * c["dc_ctx_sum"])
    per_request = teacher_forced(requests, full.column("step_id").to_numpy(), predicted,
                                 fit_alphas(requests))
    accuracy = request_accuracy_per_experiment(per_request)[exp.name]
    assert accuracy["ttft"]["n"] == cfg.num_requests
    assert accuracy["ttft"]["mape"] < 5 and accuracy["itl"]["mape"] < 5
    assert accuracy["e2e"]["mape"] < 5
    late = request_accuracy(per_request, min_step=int(np.median(per_request["scheduled_step"])))
    assert 0 < late["e2e"]["n"] < cfg.num_requests
    slow = teacher_forced(requests, full.column("step_id").to_numpy(), 1.1 * predicted,
                          fit_alphas(requests))  # a model 10 % too slow shows in ITL
    assert request_accuracy(slow)["itl"]["mape"] == pytest.approx(10.0, abs=1.0)


def test_predictions_must_cover_contiguous_steps(tmp_path) -> None:
    cfg = SynthConfig(seed=23, num_requests=10)
    truth = write_experiment(str(tmp_path / "e"), cfg)
    requests, _ = read_request_table(load_experiment(str(tmp_path), "e"))
    alphas = AlphaFit("x", 1.0, 0.0, 1.0, 0.0, 0, 0)
    ids = truth.steps.column("step_id").to_numpy()
    with pytest.raises(ValueError, match="contiguous"):
        teacher_forced(requests, ids[::2], np.ones(len(ids[::2])), alphas)


def test_temporal_request_holdout_with_a_real_family(tmp_path) -> None:
    from blis_model.configuration.experiment import discover_experiments
    from blis_model.requests.accuracy import load_request_data, temporal_request_holdout
    from blis_model.synth import demo_configs, write_corpus

    write_corpus(str(tmp_path), demo_configs(num_requests=100))
    items = [load_request_data(load_experiment(str(tmp_path), name))
             for name in discover_experiments(str(tmp_path))]
    assert all(d.validation.n_failed == 0 for d in items)
    sampled = next(d for d in items if "sampled" in d.experiment.name)
    assert set(sampled.steps.column("composition").to_pylist()) == {"journey"}
    assert sampled.full_steps.num_rows > 4 * sampled.steps.num_rows
    results = temporal_request_holdout(items, "picf")
    assert set(results) == {d.experiment.name for d in items}
    for result in results.values():
        assert result["steps"]["n"] > 0 and result["e2e"]["n"] > 0
        assert result["steps"]["mape"] < 10
        assert result["itl"]["mape"] < 10 and result["e2e"]["mape"] < 10
        assert result["alphas"]["alpha0_us"] > 0
