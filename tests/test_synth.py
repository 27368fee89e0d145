"""The trace generator: its output is real-format OTLP that the project's ingest reads back
exactly (steps and requests), with the generator's overheads recoverable."""

from __future__ import annotations

import dataclasses
import gzip

import numpy as np
import pytest

from blis_model.configuration.experiment import load_experiment
from blis_model.errors import ConfigError
from blis_model.ingest.otlp import JOURNEY_SCOPE, iter_events
from blis_model.ingest.reader import read_step_table
from blis_model.ingest.requests import read_request_table, request_table, validate_requests
from blis_model.synth import LinearStepTime, SynthConfig, simulate, write_experiment

# a loaded server with scarce KV: chunked prefill, queueing and preemption all happen
BUSY = SynthConfig(seed=3, num_requests=120, arrival_rate=60.0, max_num_batched_tokens=1024,
                   max_num_seqs=32, num_gpu_blocks=260)


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    truth = write_experiment(str(root / "busy"), BUSY)
    return truth, load_experiment(str(root), "busy")


def test_step_table_equals_the_generators_truth(busy) -> None:
    truth, exp = busy
    table, report = read_step_table(exp)
    steps = truth.steps.to_pandas()
    got = table.to_pandas()
    assert not report.problems and len(got) == len(steps) > 500
    np.testing.assert_array_equal(got["step_id"], steps["step_id"])
    np.testing.assert_array_equal(got["duration_us"], steps["duration_us"])
    np.testing.assert_array_equal(got["pf_tokens"], steps["prefill_tokens"])
    np.testing.assert_array_equal(got["pf_count"], steps["num_prefill_reqs"])
    np.testing.assert_array_equal(got["pf_ctx_tokens"], steps["prefill_ctx_tokens"])
    np.testing.assert_array_equal(got["dc_count"], steps["decode_count"])
    np.testing.assert_array_equal(got["dc_ctx_sum"], steps["decode_ctx_sum"])
    assert (got["composition"] == "snapshot").all()
    # the workload really exercised the scheduler
    assert steps["num_preempted"].sum() > 0
    assert (steps["prefill_tokens"] + steps["decode_count"]).max() == BUSY.max_num_batched_tokens
    assert (steps["num_prefill_reqs"] + steps["decode_count"]).max() <= BUSY.max_num_seqs


def test_batches_respect_the_scheduler_invariants(busy) -> None:
    truth, _ = busy
    for batch in truth.batches:
        assert batch.prefill_tokens + batch.decode_count <= BUSY.max_num_batched_tokens
        assert len(batch.prefills) + batch.decode_count <= BUSY.max_num_seqs
        assert batch.prefill_tokens + batch.decode_count > 0
    # every request's tokens were computed: Σ prefill + Σ decode = prompts + outputs − 1 each
    # (the last sampled token is never fed back) + recomputation after preemption
    req = truth.requests.to_pandas()
    work = sum(b.prefill_tokens + b.decode_count for b in truth.batches)
    assert work >= (req["prompt_tokens"] + req["output_tokens"] - 1).sum()
    if req["num_preemptions"].sum() == 0:
        assert work == (req["prompt_tokens"] + req["output_tokens"] - 1).sum()


def test_request_table_matches_truth_and_validates(busy) -> None:
    truth, exp = busy
    table, problems = read_request_table(exp)
    assert not problems
    got = table.to_pandas().set_index("request_id")
    want = truth.requests.to_pandas().set_index("request_id")
    got = got.loc[want.index]
    for col in ("api_request_id", "arrival_ns", "queued_ns", "scheduled_ns", "first_token_ns",
                "finished_ns", "departed_ns", "queued_step", "scheduled_step",
                "first_token_step", "finished_step", "prompt_tokens", "output_tokens",
                "num_preemptions"):
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)
    report = validate_requests(table, max_num_batched_tokens=BUSY.max_num_batched_tokens)
    assert report.n_failed == 0 and report.n_requests == BUSY.num_requests
    # overheads are heavy-tailed (lognormal σ=0.3): medians recover the generator's values
    assert np.median(got["pre_queue_us"]) == pytest.approx(BUSY.alpha0_us, rel=0.1)
    per_token = got["post_finish_us"] / (BUSY.alpha1_us + BUSY.alpha2_us * got["output_tokens"])
    assert np.median(per_token) == pytest.approx(1.0, rel=0.1)


def test_noise_free_overheads_are_recovered_exactly(tmp_path) -> None:
    cfg = SynthConfig(seed=5, num_requests=40, overhead_sigma=0.0, alpha0_us=1234.0,
                      alpha1_us=2100.0, alpha2_us=3.5, snapshots=False, gzip=False)
    write_experiment(str(tmp_path / "e"), cfg)
    table, _ = read_request_table(load_experiment(str(tmp_path), "e"))
    frame = table.to_pandas()
    np.testing.assert_allclose(frame["pre_queue_us"], 1234.0, atol=0.002)
    design = np.column_stack([np.ones(len(frame)), frame["output_tokens"]])
    coef, *_ = np.linalg.lstsq(design, frame["post_finish_us"].to_numpy(), rcond=None)
    np.testing.assert_allclose(coef, [2100.0, 3.5], rtol=1e-4)


def test_sampled_summary_only_out_of_order_trace_with_junk_lines(tmp_path) -> None:
    cfg = dataclasses.replace(BUSY, num_requests=60, snapshots=False, sample_every=4,
                              out_of_order=0.3, malformed_lines=3)
    truth = write_experiment(str(tmp_path / "e"), cfg)
    exp = load_experiment(str(tmp_path), "e")
    table, report = read_step_table(exp)
    steps = truth.steps.to_pandas()
    traced = steps[steps["traced"]]
    got = table.to_pandas()
    assert len(report.problems) == 3 and report.lines_malformed == 3
    np.testing.assert_array_equal(got["step_id"], traced["step_id"])
    assert (got["step_id"] % 4 == 0).all()
    np.testing.assert_array_equal(got["pf_tokens"], traced["prefill_tokens"])
    np.testing.assert_array_equal(got["dc_count"], traced["decode_count"])
    assert (got["composition"] == "summary").all()
    requests, problems = read_request_table(exp)
    assert len(problems) == 3
    # junk lines are truncated copies inserted next to the real ones: nothing is lost
    assert requests.num_rows == cfg.num_requests
    assert validate_requests(requests).n_failed == 0


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path) -> None:
    cfg = SynthConfig(seed=9, num_requests=30)
    write_experiment(str(tmp_path / "a"), cfg)
    write_experiment(str(tmp_path / "b"), cfg)
    write_experiment(str(tmp_path / "c"), dataclasses.replace(cfg, seed=10))
    a, b, c = ((tmp_path / x / "traces.json.gz").read_bytes() for x in "abc")
    assert a == b != c
    assert gzip.decompress(a).count(b"\n") > 0


def test_validation_flags_a_corrupted_request(busy) -> None:
    truth, exp = busy
    victim = truth.requests.column("request_id")[5].as_py()
    problems: list = []
    with open(exp.trace_url, "rb") as raw:
        events = [e for e in iter_events(raw, "t", problems)
                  if not (e.scope == JOURNEY_SCOPE and e.name == "journey.FINISHED"
                          and e.span_attrs.get("gen_ai.request.id") == victim)]
    report = validate_requests(request_table(events, "busy"))
    assert report.n_failed == 1 and report.reasons == {"missing_finished": 1}
    assert report.examples[0].startswith(victim)


def test_noise_free_step_time_is_the_linear_truth() -> None:
    law = LinearStepTime(noise_sigma=0.0, spike_prob=0.0)
    result = simulate(SynthConfig(seed=2, num_requests=20, step_time_us=law))
    for step in result.steps[:200]:
        assert step.duration_us == max(1, round(law.mean_us(step.batch)))
    noisy = LinearStepTime(seed=4)
    first = simulate(SynthConfig(seed=2, num_requests=20, step_time_us=noisy))
    again = simulate(SynthConfig(seed=2, num_requests=20, step_time_us=noisy))
    assert [s.duration_us for s in first.steps] == [s.duration_us for s in again.steps]


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ConfigError, match="num_gpu_blocks"):
        SynthConfig(num_gpu_blocks=10)
    with pytest.raises(ConfigError, match="max_num_seqs"):
        SynthConfig(max_num_seqs=4096, max_num_batched_tokens=512)


def test_bursty_arrivals_and_launch_bound_floor() -> None:
    law = LinearStepTime(noise_sigma=0.0, spike_prob=0.0, floor_us=2700.0)
    result = simulate(SynthConfig(seed=4, num_requests=300, arrival_cv=3.0, step_time_us=law))
    gaps = np.diff(sorted(r.arrival_ns for r in result.requests))
    assert gaps.std() / gaps.mean() > 2.0
    durations = np.array([s.duration_us for s in result.steps])
    assert durations.min() == 2700 and (durations > 2700).mean() > 0.2


def test_demo_corpus_has_several_configs_that_all_validate(tmp_path) -> None:
    from blis_model.configuration.experiment import discover_experiments
    from blis_model.synth import demo_configs, write_corpus

    truths = write_corpus(str(tmp_path), demo_configs(num_requests=40))
    names = discover_experiments(str(tmp_path))
    assert names == sorted(truths)
    keys = set()
    for name in names:
        exp = load_experiment(str(tmp_path), name)
        keys.add(exp.config_key)
        requests, _ = read_request_table(exp)
        assert validate_requests(requests).n_failed == 0 and requests.num_rows == 40
    assert len(keys) == 3


def test_overload_indicators_separate_an_overloaded_server(tmp_path) -> None:
    from blis_model.ingest.requests import overload_indicators

    light = SynthConfig(seed=1, num_requests=120, arrival_rate=10.0)
    over = dataclasses.replace(light, arrival_rate=200.0, max_num_seqs=16, num_gpu_blocks=400)
    found = {}
    for name, cfg in (("light", light), ("over", over)):
        write_experiment(str(tmp_path / name), cfg)
        table, _ = read_request_table(load_experiment(str(tmp_path), name))
        found[name] = overload_indicators(table)
    assert found["light"]["wait_growth"] < 2 < 5 < found["over"]["wait_growth"]
    assert found["light"]["preempted_share"] == 0 < found["over"]["preempted_share"]
    assert found["over"]["wait_median_ms"] > 100 * found["light"]["wait_median_ms"]


def test_snapshots_derived_from_the_replay_log_equal_its_fast_aggregates() -> None:
    """Per-request detail comes from the one scheduler's log; summed back per step it
    equals the engine's own aggregates, with preemption and prefix caching."""
    cfg = dataclasses.replace(BUSY, seed=4, num_requests=100, prefix_caching=True,
                              prefix_share=0.7, prefix_tokens=300)
    result = simulate(cfg)
    fast = result.replay.steps
    assert fast.num_rows == len(result.steps) and fast.column("num_preempted").to_numpy().sum()
    assert fast.column("blocks_cached").to_numpy().sum() > 0
    rows = [(s.batch.step_id, snap) for s in result.steps for snap in s.snapshots]
    step = np.array([k for k, _ in rows])
    snap = {key: np.array([x[key] for _, x in rows], np.float64) for key in (
        "request.num_computed_tokens", "request.scheduled_tokens_this_step",
        "request.num_prompt_tokens", "kv.blocks_allocated_gpu", "kv.blocks_cached_gpu",
        "request.num_preemptions")}
    prefill = np.array([x["request.phase"] == "PREFILL" for _, x in rows])
    c, t = snap["request.num_computed_tokens"], snap["request.scheduled_tokens_this_step"]

    def total(values, mask=None):
        mask = np.ones(len(step), bool) if mask is None else mask
        return np.bincount(step[mask], weights=values[mask], minlength=fast.num_rows)

    want = {"pf_count": total(np.ones(len(step)), prefill), "pf_tokens": total(t, prefill),
            "pf_ctx_tokens": total(t * c, prefill), "dc_count": total(np.ones(len(step)),
                                                                      ~prefill),
            "dc_ctx_sum": total(c, ~prefill),
            "blocks_allocated": total(snap["kv.blocks_allocated_gpu"]),
            "blocks_cached": total(snap["kv.blocks_cached_gpu"]),
            "preempted_before": total((snap["request.num_preemptions"] > 0) * 1.0)}
    for name, values in want.items():
        np.testing.assert_array_equal(values, fast.column(name).to_numpy(), err_msg=name)
    durations = np.array([s.duration_us for s in result.steps], np.float64)
    np.testing.assert_array_equal(durations, fast.column("duration_us").to_numpy())
