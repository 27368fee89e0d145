"""Request-measurement corpora, the way a user runs them: ``blis-model fit`` on client
measurements only publishes a BLIS-ready release fit by replay, ``blis-model replay``
writes one row per request and prints the accuracy tables, and bad inputs get one clear
error. The corpora are generated (the client view of the synthetic generator, with a
physics step law), so every test runs everywhere."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from blis_model.cli import app
from blis_model.synth import SynthConfig
from blis_model.synth.client_view import physics_step_time, write_synth_corpus

REPO = Path(__file__).resolve().parents[1]
LLAMA3, LLAMA2 = "meta-llama/Llama-3.1-8B", "meta-llama/Llama-2-7b-hf"
BETA = {"gemm_ridge_us": 0.2, "prefill_attention_us": 1.5, "decode_attention_us": 1.2,
        "mixed_decode_attention_us": 0.3, "decode_attention_tail_us": 0.1, "lm_head_us": 1.1,
        "activation_io_us": 1.2, "tp_allreduce_us": 1.0, "layer_kernels": 5.0,
        "request_overhead": 8.0, "step_overhead": 300.0, "gemm_roofline_us": 1.25}
HEADER = ["experiment", "index", "ttft_us", "e2e_us", "itl_us", "queue_us", "steps", "status"]


def _config(model: str, rate: float, seed: int) -> SynthConfig:
    base = SynthConfig(seed=seed, num_requests=160, arrival_rate=rate, model=model,
                       max_num_seqs=64, num_gpu_blocks=4000, alpha0_us=2000.0,
                       alpha1_us=1500.0, alpha2_us=10.0)
    return dataclasses.replace(base, step_time_us=physics_step_time(BETA, base, seed=seed))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("measured")
    write_synth_corpus(str(root), {"llama3-light": _config(LLAMA3, 12.0, 1),
                                   "llama3-busy": _config(LLAMA3, 30.0, 2),
                                   "llama2": _config(LLAMA2, 18.0, 3)},
                       traces=False, client_view=True)
    return root


def invoke(*args: str, expect: int = 0):  # noqa: ANN201 - click Result
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def release(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("store")
    result = invoke("fit", str(corpus), "--store", str(store))
    url = Path(result.stdout.strip().splitlines()[-1])
    assert url.parent == store / "releases"
    assert "replayed vs measured request latencies" in result.stderr
    return url


def test_fit_on_measurements_publishes_a_blis_ready_release(release: Path) -> None:
    manifest = json.loads((release / "manifest.json").read_text())
    replay = manifest["metrics"]["request_replay"]
    assert sorted(replay["in_sample"]) == ["llama2", "llama3-busy", "llama3-light"]
    assert sorted(replay["leave_one_experiment_out"]) == sorted(replay["in_sample"])
    s = replay["summary"]
    assert s["in_sample_e2e_mape"] < 3.0 and s["in_sample_itl_mape"] < 3.0
    assert s["loo_e2e_mape"] < 10.0
    rounds = replay["convergence"]["iterations"]
    assert rounds[-1]["objective"] < rounds[0]["objective"] / 2
    doc = yaml.safe_load((release / "defaults.yaml").read_text())
    coeffs = doc["trained_physics_coefficients"]
    assert len(coeffs["alpha_coeffs"]) == 3 and len(coeffs["beta_coeffs"]) == 11
    assert all(math.isfinite(v) and v >= 0 for v in coeffs["alpha_coeffs"]
               + coeffs["beta_coeffs"])
    assert manifest["blis"]["alphas_fit"] is True
    coefficients = json.loads((release / "coefficients.json").read_text())
    assert coefficients["family"] == "picf"
    assert len(coefficients["request_alphas"]["per_config"]) == 2  # two configurations
    assert (release / "plots" / "latency_cdfs.png").is_file()
    card = (release / "MODEL_CARD.md").read_text()
    assert "request latencies replayed vs measured" in card


def test_replay_writes_one_row_per_request_and_prints_the_tables(
        release: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "replay.csv"
    report = tmp_path / "report.json"
    result = invoke("replay", str(release), str(corpus), "--out", str(out), "--report",
                    str(report))
    assert result.stdout.strip().splitlines()[-1] == str(out)
    with out.open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == HEADER and len(rows) == 1 + 3 * 160
    finished = [r for r in rows[1:] if r[7] == "finished"]
    assert len(finished) == 3 * 160 and all(float(r[3]) > float(r[2]) > 0 for r in finished)
    assert "simulated steps/s" in result.stderr or "steps/s" in result.stderr
    tables = json.loads(report.read_text())
    assert sorted(tables) == ["llama2", "llama3-busy", "llama3-light"]
    for table in tables.values():
        assert table["accuracy"]["e2e"]["mape"] < 5.0
        assert table["distribution_ms"]["ttft"]["simulated_p99"] > 0


def test_replay_without_ground_truth_writes_the_rows_only(release: Path, corpus: Path,
                                                          tmp_path: Path) -> None:
    import shutil

    workload = tmp_path / "workload"
    shutil.copytree(corpus / "llama2", workload / "llama2")
    (workload / "llama2" / "ground_truth.json.gz").unlink()
    out = tmp_path / "rows.csv"
    result = invoke("replay", str(release), str(workload), "--out", str(out))
    with out.open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:4] == HEADER[:4] and len(rows) == 161
    assert "MAPE" not in result.stderr  # nothing to compare with


def test_bad_measurement_corpora_get_one_clear_error(corpus: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(corpus / "llama2", broken / "llama2")
    config = yaml.safe_load((broken / "llama2" / "exp-config.yaml").read_text())
    del config["num_gpu_blocks"]
    (broken / "llama2" / "exp-config.yaml").write_text(yaml.safe_dump(config))
    result = invoke("fit", str(broken), "--store", str(tmp_path / "s"), expect=1)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "llama2/exp-config.yaml" in line
    assert "num_gpu_blocks" in line
    empty = tmp_path / "empty"
    shutil.copytree(corpus / "llama2", empty / "llama2")
    (empty / "llama2" / "requests.json.gz").unlink()
    result = invoke("fit", str(empty), "--store", str(tmp_path / "s2"), expect=1)
    assert "requests.json" in result.stderr.strip().splitlines()[-1]
    assert "llama2 holds neither" in result.stderr
    assert not (tmp_path / "s2" / "releases").exists()


def test_gate_replays_a_golden_corpus_of_request_measurements(release: Path, corpus: Path,
                                                              tmp_path: Path) -> None:
    """The promotion gate on client measurements: both releases replay the measured
    workloads; a release of another engine (the bundled step sample's: a 5 ms step floor)
    is refused on the replayed latencies."""
    same = invoke("gate", str(release), "--baseline", str(release), "--golden", str(corpus),
                  "--json")
    verdict = json.loads(same.stdout)
    assert verdict["passed"] and "step" not in verdict["metrics"]
    assert set(verdict["compared"]) == {"replayed_ttft", "replayed_itl", "replayed_e2e"}
    assert verdict["metrics"]["replayed_e2e"]["n"] > 400
    assert verdict["metrics"]["replayed_e2e"]["candidate"] < 5.0
    other = invoke("fit", str(REPO / "corpus" / "h100-real-steps"), "--store",
                   str(tmp_path / "store"), "--family", "picf").stdout.strip().splitlines()[-1]
    refused = invoke("gate", other, "--baseline", str(release), "--golden", str(corpus),
                     expect=1)
    assert "replayed E2E MAPE on the golden corpus" in " ".join(refused.stderr.split())
