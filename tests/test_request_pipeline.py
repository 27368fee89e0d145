"""Request level wired into the pipeline: known step-time coefficients and alphas are
recovered through featurize (snapshots, or journey reconstruction without them), the
request validation gate stops a corrupted corpus, overloaded experiments can be left out,
``blis-model synth`` output calibrates end to end and ``blis-model gate`` tells a worse
release from an equal one."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from blis_model.calibration import evaluation, featurize
from blis_model.calibration.gate import compare_releases, load_golden
from blis_model.cli import app
from blis_model.configuration.architecture import arch_from_hf_config, bundled_model_config
from blis_model.configuration.hardware import hardware_spec
from blis_model.errors import CorpusError
from blis_model.features.context import FeatureContext
from blis_model.features.frame import feature_frame
from blis_model.features.registry import compute
from blis_model.ingest.reader import read_step_table
from blis_model.releases.read import load_release
from blis_model.requests import stage as request_level
from blis_model.requests.stage import RequestSettings
from blis_model.synth import SynthConfig, write_experiment

SAMPLE = Path(__file__).resolve().parents[1] / "corpus" / "h100-real-steps"

# Ground truth: a step time linear in five of OUR physics features (µs per feature unit).
FEATURES = ("gemm_compute_us", "prefill_attention_us", "decode_attention_us",
            "request_overhead", "step_overhead")
BETA = np.array([1.4, 2.0, 1.8, 30.0, 2500.0])
ALPHAS = (800.0, 1500.0, 4.0)  # generator's α0 µs, α1 µs, α2 µs/output token


@dataclasses.dataclass(frozen=True)
class PhysicsLaw:
    """Step time (µs) = BETA · physics features of the batch, × lognormal(0, σ) noise."""

    model: str
    noise_sigma: float = 0.02
    seed: int = 0

    @cached_property
    def context(self) -> FeatureContext:
        arch = arch_from_hf_config(bundled_model_config(self.model), self.model)
        return FeatureContext(arch, hardware_spec("H100"))

    def __call__(self, agg) -> float:
        """``agg``: the step's aggregates (step-table column names)."""
        cols = {k: np.array([getattr(agg, k)], float) for k in (
            "pf_tokens", "pf_tokens_sq", "pf_ctx_tokens", "pf_count", "dc_count", "dc_ctx_sum")}
        mean = float(compute(FEATURES, cols, self.context)[0] @ BETA)
        rng = np.random.default_rng([self.seed, agg.step_id])
        return mean * math.exp(self.noise_sigma * rng.standard_normal())


def law_corpus(root: Path, snapshots: bool) -> None:
    """Two configurations (two models, two token budgets) under the same physics law."""
    for name, model, mnbt, seed in (("a", "meta-llama/Llama-3.1-8B", 2048, 1),
                                    ("b", "meta-llama/Llama-2-7b-hf", 1024, 2)):
        cfg = SynthConfig(seed=seed, num_requests=200, arrival_rate=30.0, model=model,
                          max_num_batched_tokens=mnbt, max_num_seqs=48,
                          step_time_us=PhysicsLaw(model, seed=seed), alpha0_us=ALPHAS[0],
                          alpha1_us=ALPHAS[1], alpha2_us=ALPHAS[2], snapshots=snapshots,
                          sample_every=1 if snapshots else 3, gzip=snapshots)
        write_experiment(str(root / name), cfg)


@pytest.mark.parametrize("snapshots", [True, False], ids=["snapshots", "reconstructed"])
def test_pipeline_recovers_the_generators_coefficients_and_alphas(tmp_path, snapshots) -> None:
    law_corpus(tmp_path, snapshots)
    items = [featurize.featurize(e) for e in featurize.load_experiments(str(tmp_path))]
    assert all(i.requests is not None and i.requests.validation.n_failed == 0 for i in items)
    for i in items:  # without snapshots every traced step is rebuilt from journeys
        comp = set(i.requests.steps.column("composition").to_pylist())
        assert comp == ({"snapshot"} if snapshots else {"journey"})
    frame = featurize.training_frame(items)
    model = evaluation.fit_model(frame, "picf", features=FEATURES, ridge=0.0)
    ratio = model.coef_ / BETA
    # global set: ±3 % on the well-determined terms, ±8 % on prefill attention (a few % of
    # step time); per configuration (fewer steps each): ±5 % / ±15 %
    np.testing.assert_allclose(ratio[[0, 2, 3, 4]], 1.0, atol=0.03)
    assert ratio[1] == pytest.approx(1.0, abs=0.08)
    for coef in model.config_coef_.values():
        np.testing.assert_allclose((coef / BETA)[[0, 2, 3, 4]], 1.0, atol=0.05)
        assert coef[1] / BETA[1] == pytest.approx(1.0, abs=0.15)
    stage = request_level.request_stage(featurize.request_items(items), model, "picf")
    a = stage.alphas.pooled
    assert a is not None and a.n_pre_queue == 400
    assert a.alpha0_us == pytest.approx(ALPHAS[0], rel=0.08)
    assert a.alpha1_us == pytest.approx(ALPHAS[1], rel=0.10)
    assert a.alpha2_us == pytest.approx(ALPHAS[2], rel=0.15)
    assert len(stage.alphas.per_config) == 2
    summary = stage.evaluation["request_level"]["summary"]
    assert summary["itl_mape"] < 5 and summary["e2e_mape"] < 5 and summary["ttft_mape"] < 10
    assert stage.release_kwargs["alphas"] == a.blis_alphas


def test_step_only_corpus_is_featurized_as_before() -> None:
    for exp in featurize.load_experiments(str(SAMPLE))[:2]:
        item = featurize.featurize(exp)
        assert item.requests is None
        before = feature_frame(exp, read_step_table(exp)[0])
        assert item.frame.equals(before)
    stage = request_level.request_stage([], None, "picf")
    assert stage.alphas.pooled is None and stage.block is None and stage.evaluation == {}
    assert stage.release_kwargs["alphas"] is None
    assert "NOT fit" in stage.release_kwargs["alpha_source"]


def _drop_journeys(path: Path, every: int) -> None:
    """Remove every ``every``-th journey export line of an uncompressed trace."""
    lines = path.read_bytes().splitlines()
    journeys = [i for i, line in enumerate(lines) if b'"vllm.scheduler"' in line]
    drop = set(journeys[::every])
    path.write_bytes(b"\n".join(x for i, x in enumerate(lines) if i not in drop) + b"\n")


def run(*args: str, expect: int = 0):  # noqa: ANN201 - click Result
    """Run the CLI in-process (typer's runner keeps stdout and stderr apart)."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    return result


def test_request_validation_gate_stops_a_corrupted_corpus(tmp_path) -> None:
    corpus = tmp_path / "corpus"
    cfg = SynthConfig(seed=5, num_requests=80, arrival_rate=30.0, gzip=False)
    write_experiment(str(corpus / "clean"), cfg)
    write_experiment(str(corpus / "broken"), dataclasses.replace(cfg, seed=6))
    _drop_journeys(corpus / "broken" / "traces.json", every=3)
    exp = featurize.load_experiments(str(corpus))[0]
    assert exp.name == "broken"
    with pytest.raises(CorpusError, match=r"experiment broken: .*no_journey"):
        featurize.featurize(exp)
    proc = run("fit", str(corpus), "--store", str(tmp_path / "store"), expect=1)
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: experiment broken:") and "no_journey=" in line
    assert "above the 5.0% gate" in line
    assert not (tmp_path / "store" / "releases").exists() or not any(
        (tmp_path / "store" / "releases").iterdir())
    # a looser gate lets it through, with the failures recorded per experiment
    item = featurize.featurize(exp, settings=RequestSettings(max_request_failure_rate=0.9))
    assert item.requests.validation.reasons["no_journey"] > 0.05 * cfg.num_requests


def test_overloaded_experiments_can_be_excluded(tmp_path) -> None:
    light = SynthConfig(seed=1, num_requests=100, arrival_rate=10.0)
    over = dataclasses.replace(light, arrival_rate=200.0, max_num_seqs=16, num_gpu_blocks=400)
    write_experiment(str(tmp_path / "light"), light)
    write_experiment(str(tmp_path / "over"), over)
    items = [featurize.featurize(e) for e in featurize.load_experiments(str(tmp_path))]
    kept, excluded = featurize.split_overloaded(items, RequestSettings())
    assert len(kept) == 2 and not excluded
    kept, excluded = featurize.split_overloaded(items, RequestSettings(exclude_overloaded=True))
    assert [i.experiment.name for i in kept] == ["light"]
    assert list(excluded) == ["over"] and "overloaded" in excluded["over"]
    with pytest.raises(CorpusError, match="every experiment was excluded"):
        featurize.split_overloaded([i for i in items if i.experiment.name == "over"],
                                  RequestSettings(exclude_overloaded=True))


def test_synth_output_calibrates_end_to_end_with_fit(tmp_path) -> None:
    corpus, store = tmp_path / "synth", tmp_path / "store"
    out = run("synth", str(corpus), "--experiments", "3", "--requests", "80", "--seed", "3",
              "--no-gzip")
    assert out.stdout.strip().splitlines()[-1] == str(corpus)
    assert sorted(p.name for p in corpus.iterdir()) == [
        "synth-llama-2-7b-bursty", "synth-llama-3.1-8b-mnbt1024-sampled",
        "synth-llama-3.1-8b-mnbt2048"]
    assert (corpus / "synth-llama-2-7b-bursty" / "traces.json").exists()
    url = run("fit", str(corpus), "--store", str(store)).stdout.strip().splitlines()[-1]
    release = load_release(url)
    m = release.manifest
    assert m["blis"]["alphas_fit"] is True and "fit on 240 requests" in m["blis"]["alpha_source"]
    alphas = release.coefficients["request_alphas"]
    assert alphas["fit"] and len(alphas["per_config"]) == 3
    assert alphas["pooled"]["alpha0_us"] == pytest.approx(800.0, rel=0.15)
    levels = m["metrics"]["request_level"]
    assert set(levels["in_sample"]) == set(levels["temporal_holdout"]) == {
        p.name for p in corpus.iterdir()}
    assert levels["summary"]["e2e_mape"] < 10
    assert m["request_level"]["experiments"]["synth-llama-3.1-8b-mnbt1024-sampled"][
        "steps_reconstructed"] > 0
    card = (Path(url) / "MODEL_CARD.md").read_text()
    assert "## Request level" in card and "TTFT" in card
    defaults = yaml.safe_load((Path(url) / "defaults.yaml").read_text())
    assert defaults["trained_physics_coefficients"]["alpha_coeffs"] == pytest.approx(
        [alphas["pooled"][k] for k in ("alpha0_us", "alpha1_us", "alpha2_us")])


def test_gate_passes_an_equal_release_and_refuses_a_worse_one(tmp_path) -> None:
    golden, worse, store = tmp_path / "golden", tmp_path / "worse", tmp_path / "store"
    law = PhysicsLaw("meta-llama/Llama-3.1-8B", seed=8)
    base = SynthConfig(seed=8, num_requests=60, arrival_rate=20.0, step_time_us=law)
    write_experiment(str(golden / "e"), base)
    write_experiment(str(worse / "e"), dataclasses.replace(
        base, seed=9, alpha0_us=3200.0, step_time_us=lambda b: 1.4 * law(b)))
    good_url = run("fit", str(golden), "--store", str(store)).stdout.strip().splitlines()[-1]
    bad_url = run("fit", str(worse), "--store", str(store)).stdout.strip().splitlines()[-1]

    same = run("gate", good_url, "--baseline", good_url, "--golden", str(golden), "--json")
    result = json.loads(same.stdout)
    assert result["passed"] and result["compared"] == ["step", "ttft", "itl", "e2e"]
    assert result["metrics"]["step"]["change"] == 0.0 and result["requests"] == 60

    refused = run("gate", bad_url, "--baseline", good_url, "--golden", str(golden),
                  "--tolerance", "2", expect=1)
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("error: gate refused") and "step MAPE" in line and "TTFT" in line

    # the library call the promotion code uses
    gs = load_golden(str(golden))
    verdict = compare_releases(load_release(bad_url), load_release(good_url), gs, 2.0)
    assert not verdict.passed and verdict.metrics["step"]["candidate"] > 20
    assert verdict.metrics["ttft"]["candidate"] > verdict.metrics["ttft"]["baseline"] + 2
    alone = compare_releases(load_release(bad_url), None, gs)
    assert alone.passed and alone.compared == ()


def test_gzip_flag_and_snapshots_override(tmp_path) -> None:
    out = tmp_path / "s"
    run("synth", str(out), "--experiments", "1", "--requests", "20", "--no-snapshots",
        "--sample-every", "2")
    trace = out / "synth-llama-3.1-8b-mnbt2048" / "traces.json.gz"
    text = gzip.decompress(trace.read_bytes())
    assert b"REQUEST_SNAPSHOT" not in text and b"llm_core" in text


@pytest.mark.services
def test_flow_and_fit_publish_the_same_request_level_release(local_ray, tmp_path) -> None:
    from flows.calibrate import run_calibration

    corpus = tmp_path / "synth"
    run("synth", str(corpus), "--experiments", "2", "--requests", "60", "--seed", "4")
    flow_url = run_calibration(str(corpus), str(tmp_path / "flow-store"))
    fit_url = run("fit", str(corpus), "--store", str(tmp_path / "fit-store")).stdout.split()[-1]
    flow, fit = load_release(flow_url), load_release(fit_url)
    assert flow.coefficients["request_alphas"] == fit.coefficients["request_alphas"]
    assert flow.manifest["blis"]["alpha_coeffs"] == fit.manifest["blis"]["alpha_coeffs"]
    assert flow.manifest["request_level"] == fit.manifest["request_level"]
    got, want = (r.manifest["metrics"]["request_level"] for r in (flow, fit))
    assert sorted(got["in_sample"]) == sorted(want["in_sample"]) == sorted(
        p.name for p in corpus.iterdir())
    for name, metrics in want["in_sample"].items():
        for m in ("ttft", "itl", "e2e"):
            assert got["in_sample"][name][m]["mape"] == pytest.approx(metrics[m]["mape"],
                                                                      rel=1e-6)
