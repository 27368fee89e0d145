"""The generator's client view: request measurements of the same run the traces describe,
read back exactly, and an inverse problem with a known answer — the step law and alphas
fit from client-only measurements (``requests.replay_fit``) recover the generator's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from blis_model.cli import app
from blis_model.configuration.experiment import discover_experiments, load_experiment
from blis_model.configuration.kinds import MEASUREMENTS, TRACES
from blis_model.errors import ConfigError
from blis_model.ingest.measurements import read_measurements
from blis_model.ingest.reader import read_step_table
from blis_model.ingest.requests import read_request_table
from blis_model.requests.latency import accuracy, step_features
from blis_model.requests.measured import measured_experiment
from blis_model.requests.replay import replay
from blis_model.requests.replay_fit import (
    GLOBAL,
    ReplayFitSettings,
    StepLaw,
    fit_from_requests,
    initial_law,
    replay_with,
)
from blis_model.requests.scheduler import AGGREGATES, StepAggregates
from blis_model.requests.step_time import compile_part
from blis_model.synth import SynthConfig, simulate, write_experiment
from blis_model.synth.client_view import (
    PhysicsStepTime,
    client_requests,
    physics_step_time,
    synth_experiment,
    write_synth_corpus,
    write_synth_experiment,
)

LLAMA3, LLAMA2 = "meta-llama/Llama-3.1-8B", "meta-llama/Llama-2-7b-hf"

# A physically plausible truth: GPU corrections near 1 (GEMMs at ~75-85% of peak, per
# configuration), ~5 µs per kernel launch, small per-request and per-step host costs.
SHARED_BETA = {"gemm_ridge_us": 0.2, "prefill_attention_us": 1.5, "decode_attention_us": 1.2,
               "mixed_decode_attention_us": 0.3, "decode_attention_tail_us": 0.1,
               "lm_head_us": 1.1, "activation_io_us": 1.2, "tp_allreduce_us": 1.0,
               "layer_kernels": 5.0, "request_overhead": 8.0, "step_overhead": 300.0}
GEMM_EFFICIENCY = {LLAMA3: 1.30, LLAMA2: 1.20}  # gemm_roofline_us: per configuration
ALPHAS = (2000.0, 1500.0, 10.0)  # α0 µs, α1 µs, α2 µs per output token


def _config(model: str, rate: float, seed: int, num_requests: int = 300,
            **changes: object) -> SynthConfig:
    base = SynthConfig(seed=seed, num_requests=num_requests, arrival_rate=rate, model=model,
                       max_num_seqs=64, num_gpu_blocks=4000, alpha0_us=ALPHAS[0],
                       alpha1_us=ALPHAS[1], alpha2_us=ALPHAS[2], overhead_spike_prob=0.02,
                       **changes)
    law = physics_step_time({**SHARED_BETA, "gemm_roofline_us": GEMM_EFFICIENCY[model]}, base,
                            noise=0.02, seed=seed)
    return dataclasses.replace(base, step_time_us=law)


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_client_view_round_trip(tmp_path: Path, prefix_caching: bool) -> None:
    cfg = _config(LLAMA3, 25.0, seed=5, num_requests=150, prefix_caching=prefix_caching)
    truth = write_synth_experiment(str(tmp_path / "exp"), cfg, traces=False)
    assert "traces.json.gz" not in truth.files
    m = read_measurements(str(tmp_path / "exp"))
    req = m.requests.to_pandas()
    want = truth.requests.to_pandas()  # arrival order
    assert len(req) == cfg.num_requests and m.validation.n_invalid == 0
    assert (req["status"] == "ok").all() and req["valid"].all() and not req["has_error"].any()
    assert not m.validation.warnings
    np.testing.assert_array_equal(req["input_tokens"], want["prompt_tokens"])
    np.testing.assert_array_equal(req["output_tokens"], want["output_tokens"])
    assert (req["output_tokens_source"] == "recorded").all()
    arrival = (want["arrival_ns"] - want["arrival_ns"].iloc[0]) / 1e3
    assert np.abs(req["arrival_us"] - arrival).max() <= 0.5
    # TTFT = first-token step end + α2·f − arrival; E2E = the API span's departure − arrival
    e2e = (want["departed_ns"] - want["arrival_ns"]) / 1e3
    assert np.abs(req["e2e_us"] - e2e).max() <= 0.5
    ttft_engine = (want["first_token_ns"] - want["arrival_ns"]) / 1e3
    extra = req["ttft_us"] - ttft_engine
    assert (extra > -0.5).all() and np.median(extra) == pytest.approx(ALPHAS[2], abs=2.0)
    assert (req["ttft_us"] < req["e2e_us"]).all()
    # the server, the load and the per-stage report
    assert m.server.num_gpu_blocks == cfg.num_gpu_blocks
    assert m.server.block_size == cfg.block_size
    assert m.workload is not None and len(m.workload.stages) == 1
    stage = m.workload.stages[0]
    assert stage.rate == cfg.arrival_rate
    assert stage.duration_s == pytest.approx(cfg.num_requests / cfg.arrival_rate)
    assert (req["stage"] == 0).all() and m.workload.ignore_eos is False
    assert m.summary_metrics["load_summary"]["count"] == cfg.num_requests
    if prefix_caching:
        assert m.workload.data_type == "shared_prefix"
        sp = m.workload.shared_prefix
        assert sp.num_unique_system_prompts == cfg.num_prefixes
        assert sp.system_prompt_len == cfg.prefix_tokens
    else:
        assert m.workload.data_type == "random" and m.workload.shared_prefix is None
    # ready to replay: the server's limits and every request a fit target
    exp = load_experiment(str(tmp_path), "exp")
    assert exp.kinds == frozenset({MEASUREMENTS})
    assert exp.config_key == synth_experiment(cfg).config_key
    item = measured_experiment(exp, m)
    assert item.limits.num_gpu_blocks == cfg.num_gpu_blocks
    assert item.targets.sum() == (want["output_tokens"] >= 2).sum() and not item.overloaded


def test_unfinished_requests_are_client_errors() -> None:
    result = simulate(_config(LLAMA2, 20.0, seed=6, num_requests=40))
    last = max(result.requests, key=lambda r: r.arrival_ns)
    last.first_token_ns = None  # as if the run had stopped before its first token
    table = client_requests(result).to_pandas()
    assert table["has_error"].tolist() == [False] * 39 + [True]
    assert table[["ttft_us", "e2e_us"]].iloc[-1].isna().all()
    assert table[["ttft_us", "e2e_us"]].iloc[:-1].notna().all().all()


# -------------------------------------------------------------------- a mixed corpus


def test_folder_with_traces_and_measurements_is_one_experiment_of_both_kinds(
        tmp_path: Path) -> None:
    both = _config(LLAMA3, 30.0, seed=7, num_requests=80)
    truths = write_synth_corpus(str(tmp_path), {"both": both})
    write_synth_corpus(str(tmp_path), {"client-only": dataclasses.replace(both, seed=8)},
                       traces=False)
    write_synth_corpus(str(tmp_path), {"traces-only": both}, client_view=False)
    assert discover_experiments(str(tmp_path)) == ["both", "client-only", "traces-only"]
    kinds = {n: load_experiment(str(tmp_path), n).kinds for n in
             discover_experiments(str(tmp_path))}
    assert kinds == {"both": frozenset({TRACES, MEASUREMENTS}),
                     "client-only": frozenset({MEASUREMENTS}),
                     "traces-only": frozenset({TRACES})}
    # one run: the traces' steps and API spans are the measurements' run
    exp = load_experiment(str(tmp_path), "both")
    steps, report = read_step_table(exp)
    assert not report.problems
    np.testing.assert_array_equal(steps.column("duration_us").to_numpy(),
                                  truths["both"].steps.column("duration_us").to_numpy())
    traced, problems = read_request_table(exp)
    assert not problems
    t = traced.to_pandas().sort_values("arrival_ns")
    m = read_measurements(str(tmp_path / "both")).requests.to_pandas()
    np.testing.assert_allclose(m["e2e_us"], (t["departed_ns"] - t["arrival_ns"]) / 1e3, atol=0.5)
    np.testing.assert_array_equal(m["input_tokens"], t["prompt_tokens"])
    assert exp.server.num_gpu_blocks == both.num_gpu_blocks
    # traces alone are exactly what write_experiment writes
    write_experiment(str(tmp_path / "reference"), both)
    for name in ("traces.json.gz", "exp-config.yaml"):
        assert ((tmp_path / "traces-only" / name).read_bytes()
                == (tmp_path / "reference" / name).read_bytes())


def test_cli_client_view_and_client_only(tmp_path: Path) -> None:
    runner = CliRunner()
    for flag, kinds in (("--client-view", {TRACES, MEASUREMENTS}),
                        ("--client-only", {MEASUREMENTS})):
        out = tmp_path / flag.strip("-")
        result = runner.invoke(app, ["synth", str(out), "--experiments", "2", "--requests",
                                     "40", flag])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip().splitlines()[-1] == str(out)
        names = discover_experiments(str(out))
        assert len(names) == 2
        for name in names:
            assert load_experiment(str(out), name).kinds == frozenset(kinds)
            assert read_measurements(str(out / name)).requests.num_rows == 40


def test_cli_step_law_physics_times_steps_with_the_physics_law(tmp_path: Path) -> None:
    """``--step-law physics``: every generated step takes PHYSICS_LAW · physics features
    (± the law's noise); the default linear law does not; a bad value is one clear error."""
    from blis_model.ingest.reader import read_step_table
    from blis_model.synth.client_view import PHYSICS_LAW, physics_step_time
    from blis_model.synth.simulator import SynthConfig

    runner = CliRunner()
    for law in ("physics", "linear"):
        out = tmp_path / law
        result = runner.invoke(app, ["synth", str(out), "--experiments", "1", "--requests",
                                     "30", "--step-law", law, "--no-gzip"])
        assert result.exit_code == 0, result.output
    name = discover_experiments(str(tmp_path / "physics"))[0]
    truth = SynthConfig(seed=0, num_requests=30)  # the first demo configuration's server
    expected = physics_step_time(PHYSICS_LAW, truth)
    assert expected.coefficients()["layer_kernels"] == PHYSICS_LAW["layer_kernels"]
    steps = {law: read_step_table(load_experiment(str(tmp_path / law), name))[0]
             for law in ("physics", "linear")}
    ratio = {law: np.median(t.column("duration_us").to_numpy()
                            / expected.mean_of(t)) for law, t in steps.items()}
    assert abs(ratio["physics"] - 1.0) < 0.02  # lognormal noise of 2%, median unbiased
    assert abs(ratio["linear"] - 1.0) > 0.05
    bad = runner.invoke(app, ["synth", str(tmp_path / "bad"), "--step-law", "cubic"])
    assert bad.exit_code != 0 and "--step-law" in bad.output


# ---------------------------------------------------------------- the physics step law


def test_physics_step_time_is_the_compiled_law() -> None:
    cfg = _config(LLAMA2, 30.0, seed=9, num_requests=60)
    law = cfg.step_time_us
    assert isinstance(law, PhysicsStepTime)
    run = simulate(cfg).replay
    assert run is not None
    steps = run.steps
    # the compiled law, step by step, is β · physics features of the run's steps
    agg = StepAggregates()
    cols = {c: steps.column(c).to_numpy() for c in AGGREGATES}
    per_step = []
    for k in range(steps.num_rows):
        for c in AGGREGATES:
            setattr(agg, c, cols[c][k])
        per_step.append(law.mean_us(agg))
    np.testing.assert_allclose(per_step, law.mean_of(steps), rtol=1e-9)
    assert law.coefficients()["gemm_roofline_us"] == GEMM_EFFICIENCY[LLAMA2]
    # the durations are the law times ~2% lognormal noise, reproducible per step
    ratio = steps.column("duration_us").to_numpy() / law.mean_of(steps)
    assert abs(np.median(np.log(ratio))) < 0.01 and 0.01 < np.std(np.log(ratio)) < 0.03
    again = simulate(cfg).replay
    assert again is not None
    np.testing.assert_array_equal(again.steps.column("duration_us").to_numpy(),
                                  steps.column("duration_us").to_numpy())
    # a law compiled for one model is refused for another
    wrong = dataclasses.replace(_config(LLAMA3, 30.0, seed=9, num_requests=20),
                                step_time_us=law)
    with pytest.raises(ConfigError, match="compiled for"):
        write_synth_experiment("/nonexistent/never-written", wrong)


# -------------------------------------------------------------------- the inverse problem

# Two configurations, three loads: light and near-saturation Llama-3.1-8B (the queue
# builds to dozens of requests), medium Llama-2-7B.
INVERSE = {"llama31-light": (LLAMA3, 12.0, 1), "llama31-busy": (LLAMA3, 40.0, 2),
           "llama2-medium": (LLAMA2, 20.0, 3)}


@pytest.fixture(scope="module")
def inverse(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = str(tmp_path_factory.mktemp("client-only"))
    configs = {name: _config(model, rate, seed) for name, (model, rate, seed) in INVERSE.items()}
    write_synth_corpus(root, configs, traces=False)
    items = [measured_experiment(load_experiment(root, n), read_measurements(f"{root}/{n}"))
             for n in configs]
    fit = fit_from_requests(items, ReplayFitSettings(config_features=("gemm_roofline_us",)))
    return {"configs": configs, "items": items, "fit": fit}


def _true_law(configs: dict[str, SynthConfig], items: list, features: tuple[str, ...]
              ) -> StepLaw:
    coef = {}
    for item, cfg in zip(items, configs.values(), strict=True):
        beta = cfg.step_time_us.coefficients()
        coef[item.config_key] = np.array([beta.get(f, 0.0) for f in features])
    coef[GLOBAL] = next(iter(coef.values()))
    return StepLaw(features, coef, {k: ALPHAS for k in coef})


def _step_time_error(fitted: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """(|Σ fitted / Σ true − 1|, mean |fitted / true − 1|) over steps."""
    return abs(fitted.sum() / true.sum() - 1.0), float(np.mean(np.abs(fitted / true - 1.0)))


def test_client_only_fit_recovers_the_step_law(inverse: dict) -> None:
    configs, items, fit = inverse["configs"], inverse["items"], inverse["fit"]
    law = fit.law
    prior = initial_law([i.config_key for i in items], features=law.features)
    busy = simulate(configs["llama31-busy"]).replay
    assert busy is not None and busy.steps.column("waiting_depth").to_numpy().max() >= 20
    assert not any(i.overloaded for i in items)
    for item, (name, cfg) in zip(items, configs.items(), strict=True):
        truth: PhysicsStepTime = cfg.step_time_us
        beta, alphas = law.for_config(item.config_key)
        # (a) the steps the generator's server ran
        run = simulate(cfg).replay
        assert run is not None
        F = step_features(run.steps, item, law.features)
        true = truth.mean_of(run.steps)
        total, mean = _step_time_error(np.maximum(F @ beta, 1.0), true)
        assert total < 0.02 and mean < 0.03, (name, total, mean)
        # the physical prior the fit started from was far off, step by step
        _, start = _step_time_error(np.maximum(F @ prior.for_config(item.config_key)[0], 1.0),
                                    true)
        assert start > 0.05 and start > 2 * mean, (name, start, mean)
        # (b) the steps the fitted law's replay ran
        part = compile_part(law.features, beta, item.experiment,
                            item.limits.max_num_batched_tokens)
        rerun = replay(item.workload_with(alphas[0]), item.limits,
                       lambda agg, p=part: max(p(agg), 1.0))
        F = step_features(rerun.steps, item, law.features)
        total, mean = _step_time_error(np.maximum(F @ beta, 1.0), truth.mean_of(rerun.steps))
        assert total < 0.02 and mean < 0.03, (name, total, mean)


def test_client_only_fit_reaches_the_noise_floor(inverse: dict) -> None:
    """Request latencies of the fitted law against those of the TRUE law replayed the same
    way (constant α0, no step noise): what no fit can beat."""
    configs, items, fit = inverse["configs"], inverse["items"], inverse["fit"]
    true_law = _true_law(configs, items, fit.law.features)
    for item, replayed in zip(items, fit.replays, strict=True):
        got = accuracy(item, replayed)
        floor = accuracy(item, replay_with(item, true_law))
        for m in ("e2e", "itl"):
            assert got[m]["mape"] <= floor[m]["mape"] + 1.0, (item.name, m, got, floor)
            assert got[m]["mape"] < 3.0
        assert got["ttft"]["mape"] <= 1.5 * floor["ttft"]["mape"] + 1.0, (item.name, got, floor)
    assert fit.iterations[-1].objective < 0.5 * fit.iterations[0].objective
