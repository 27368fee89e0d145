"""BLIS in the loop: ``blis-model replay --blis BLIS`` runs the workload through a BLIS
binary with the release's ``defaults.yaml`` and prints BLIS's table next to ours. A fake
``blis`` (a Python script) records its arguments and the files it was given, and answers
in BLIS's result shape (SimResult JSON): TTFT a constant, E2E = TTFT + a constant per
output token, and the workload's last request never completes."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import stat
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from blis_model.cli import app
from blis_model.releases.blis_binary import (
    TRACE_COLUMNS,
    BlisRunError,
    run_blis,
    trace_rows,
)
from blis_model.releases.read import load_release
from blis_model.requests.measured import MeasuredExperiment, load_measured
from blis_model.requests.workload import Workload
from blis_model.synth import SynthConfig
from blis_model.synth.client_view import physics_step_time, write_synth_corpus

LLAMA3, LLAMA2 = "meta-llama/Llama-3.1-8B", "meta-llama/Llama-2-7b-hf"
BETA = {"gemm_ridge_us": 0.2, "prefill_attention_us": 1.5, "decode_attention_us": 1.2,
        "mixed_decode_attention_us": 0.3, "decode_attention_tail_us": 0.1, "lm_head_us": 1.1,
        "activation_io_us": 1.2, "tp_allreduce_us": 1.0, "layer_kernels": 5.0,
        "request_overhead": 8.0, "step_overhead": 300.0, "gemm_roofline_us": 1.25}
TTFT_US, PER_TOKEN_US = 40_000.0, 900.0
TRAINED = ("llama3-a", "llama3-b")  # the release is fit on these; llama2 is zero-shot

FAKE = """#!{python}
import csv, json, os, sys
from pathlib import Path

argv = sys.argv[1:]
flags = dict(zip(argv[1::2], argv[2::2]))
defaults = Path(flags["--defaults-filepath"])
model_dir = defaults.parent / "model_configs" / flags["--model"].split("/", 1)[-1]


def read(path):
    path = Path(path)
    return path.read_text() if path.is_file() else None


record = {{"argv": argv, "cwd": os.getcwd(), "header": read(flags["--trace-header"]),
          "data": read(flags["--trace-data"]), "defaults": read(defaults),
          "hardware": read(defaults.parent / "hardware_config.json"),
          "model_config": read(model_dir / "config.json")}}
with open({log!r}, "a") as fh:
    fh.write(json.dumps(record) + "\\n")
sys.stderr.write('time="2026-01-01T00:00:00Z" level=info msg="Loaded trace"\\n')
if {code}:
    sys.stderr.write('time="2026-01-01T00:00:00Z" level=fatal msg="{message}"\\n')
    sys.exit({code})
with open(flags["--trace-data"]) as fh:
    rows = list(csv.DictReader(fh))
results = [{{"request_id": int(r["request_id"]), "ttft_us": {ttft},
            "e2e_us": {ttft} + {per_token} * int(r["output_tokens"]),
            "input_tokens": int(r["input_tokens"]) + int(r["prefix_length"]),
            "output_tokens": int(r["output_tokens"])}}
           for r in rows if int(r["request_id"]) != len(rows) - 1]
with open(flags["--results-path"], "w") as fh:
    json.dump(results, fh)
print(json.dumps({{"instance_id": "cluster", "completed_requests": len(results)}}))
"""


def fake_blis(folder: Path, code: int = 0, message: str = "") -> tuple[Path, Path]:
    """A fake ``blis`` executable and the JSON-lines file it records its calls in."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "calls.jsonl"
    script = folder / "blis"
    script.write_text(FAKE.format(python=sys.executable, log=str(log), code=code,
                                  message=message, ttft=TTFT_US, per_token=PER_TOKEN_US))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script, log


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def flags_of(argv: list[str]) -> dict[str, str]:
    assert argv[0] == "replay"
    assert len(argv) % 2 == 1, argv  # every flag has a value
    return dict(zip(argv[1::2], argv[2::2], strict=True))


def _config(model: str, rate: float, seed: int) -> SynthConfig:
    base = SynthConfig(seed=seed, num_requests=80, arrival_rate=rate, model=model,
                       max_num_seqs=64, num_gpu_blocks=4000, alpha0_us=2000.0,
                       alpha1_us=1500.0, alpha2_us=10.0)
    return dataclasses.replace(base, step_time_us=physics_step_time(BETA, base, seed=seed))


def invoke(*args: str, expect: int = 0):  # noqa: ANN201 - click Result
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workload")
    write_synth_corpus(str(root), {"llama3-a": _config(LLAMA3, 12.0, 1),
                                   "llama3-b": _config(LLAMA3, 25.0, 2),
                                   "llama2": _config(LLAMA2, 15.0, 3)},
                       traces=False, client_view=True)
    return root


@pytest.fixture(scope="module")
def release(workload: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    corpus = tmp_path_factory.mktemp("corpus")
    for name in TRAINED:
        shutil.copytree(workload / name, corpus / name)
    store = tmp_path_factory.mktemp("store")
    result = invoke("fit", str(corpus), "--store", str(store))
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def items(workload: Path) -> list[MeasuredExperiment]:
    return [load_measured(str(workload), name) for name in ("llama2", *TRAINED)]


@pytest.fixture(scope="module")
def recorded(release: Path, workload: Path, items: list[MeasuredExperiment],
             tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    blis, log = fake_blis(tmp_path_factory.mktemp("fake"))
    reports = run_blis(str(blis), load_release(str(release)), items, str(workload))
    return reports, calls(log)


def test_blis_gets_the_replay_command_with_the_release_defaults(
        recorded: tuple[dict, list], release: Path, items: list[MeasuredExperiment]) -> None:
    _, made = recorded
    assert len(made) == len(items)
    defaults = (release / "defaults.yaml").read_text()
    for call, item in zip(made, items, strict=True):
        flags = flags_of(call["argv"])
        assert flags["--latency-model"] == "trained-physics"
        path = Path(flags["--defaults-filepath"])
        assert path.name == "defaults.yaml" and path.is_absolute()
        assert release not in path.parents  # a copy, not the release itself
        assert not path.exists()  # the temporary folder is gone
        assert call["defaults"] == defaults  # verbatim
        server, limits = item.experiment.server, item.limits
        assert flags["--model"] == server.model.lower()
        assert flags["--hardware"] == "H100" == item.experiment.hardware.name
        assert flags["--tp"] == str(server.tensor_parallelism)
        assert flags["--total-kv-blocks"] == str(limits.num_gpu_blocks)
        assert flags["--block-size-in-tokens"] == str(limits.block_size)
        assert flags["--max-num-running-reqs"] == str(limits.max_num_seqs)
        assert flags["--max-num-scheduled-tokens"] == str(limits.max_num_batched_tokens)
        assert set(flags) >= {"--trace-header", "--trace-data", "--results-path"}
        assert Path(flags["--trace-header"]).parent == Path(call["cwd"])
        # BLIS finds the GPU and the model config beside defaults.yaml
        assert "H100" in json.loads(call["hardware"])
        assert json.loads(call["model_config"])["num_hidden_layers"] > 0


def test_the_trace_holds_the_workload(recorded: tuple[dict, list],
                                      items: list[MeasuredExperiment]) -> None:
    _, made = recorded
    for call, item in zip(made, items, strict=True):
        header = yaml.safe_load(call["header"])
        assert header["trace_version"] == 2 and header["time_unit"] == "microseconds"
        assert set(header) <= {"trace_version", "time_unit", "mode", "warm_up_requests",
                               "server", "created_at", "workload_seed", "workload_spec"}
        assert header["server"]["model"] == item.experiment.server.model.lower()
        assert header["server"]["max_num_seqs"] == item.limits.max_num_seqs
        rows = list(csv.DictReader(io.StringIO(call["data"])))
        assert list(rows[0]) == list(TRACE_COLUMNS)
        w = item.workload
        assert len(rows) == len(w)  # one row per request
        assert [int(r["request_id"]) for r in rows] == list(range(len(w)))
        arrivals = np.array([int(r["arrival_time_us"]) for r in rows])
        np.testing.assert_array_equal(arrivals, np.rint(w.arrival_us).astype(np.int64))
        np.testing.assert_array_equal(arrivals, [int(r["send_time_us"]) for r in rows])
        prompts = [int(r["input_tokens"]) + int(r["prefix_length"]) for r in rows]
        np.testing.assert_array_equal(prompts, w.prompt_tokens)
        np.testing.assert_array_equal([int(r["output_tokens"]) for r in rows],
                                      w.output_tokens)
        ok = [r for r in rows if r["status"] == "ok"]
        assert ok and all(int(r["last_chunk_time_us"]) > int(r["first_chunk_time_us"])
                          > int(r["arrival_time_us"]) - 1 for r in ok)
        assert all(r["deadline_us"] == "0" for r in rows)


def test_blis_results_become_our_report(recorded: tuple[dict, list],
                                        items: list[MeasuredExperiment]) -> None:
    reports, _ = recorded
    assert sorted(reports) == sorted(item.name for item in items)
    for item in items:
        r = reports[item.name]
        n = len(item.workload)
        assert r["requests"] == n and r["completed_simulated"] == n - 1
        assert set(r["accuracy"]) == {"ttft", "itl", "e2e"}
        assert all(np.isfinite(r["accuracy"][m]["mape"]) for m in ("ttft", "itl", "e2e"))
        d = r["distribution_ms"]
        assert d["ttft"]["simulated_p50"] == pytest.approx(TTFT_US / 1e3)
        out = item.workload.output_tokens[:-1]
        e2e = (TTFT_US + PER_TOKEN_US * out) / 1e3
        assert d["e2e"]["simulated_p99"] <= e2e.max() + 1e-9
        itl = PER_TOKEN_US * out / (out - 1) / 1e3
        assert itl.min() - 1e-9 <= d["itl"]["simulated_p50"] <= itl.max() + 1e-9
        assert d["ttft"]["measured_mean"] > 0
        assert r["blis"]["token_mismatches"] == 0


def test_a_model_and_gpu_the_release_never_saw_are_added_to_the_copy(
        recorded: tuple[dict, list]) -> None:
    reports, made = recorded
    assert reports["llama2"]["blis"]["supplemented"] == ["model_configs/llama-2-7b-hf/config.json"]
    assert json.loads(made[0]["model_config"])["num_hidden_layers"] == 32


def test_replay_with_blis_prints_both_tables_and_reports_both(
        release: Path, workload: Path, tmp_path: Path) -> None:
    blis, log = fake_blis(tmp_path / "fake")
    out, report = tmp_path / "rows.csv", tmp_path / "report.json"
    result = invoke("replay", str(release), str(workload), "--out", str(out), "--report",
                    str(report), "--blis", str(blis))
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert "replayed (TTFT / ITL / E2E" in result.stderr
    assert f"BLIS ({blis})" in result.stderr
    tables = json.loads(report.read_text())
    assert sorted(tables) == ["blis", "blis-model"]
    assert sorted(tables["blis"]) == sorted(tables["blis-model"]) == [
        "llama2", "llama3-a", "llama3-b"]
    assert tables["blis"]["llama2"]["completed_simulated"] == 79
    assert len(calls(log)) == 3


def test_a_failing_blis_is_one_line_with_its_stderr(release: Path, workload: Path,
                                                    tmp_path: Path) -> None:
    blis, _ = fake_blis(tmp_path / "fake", code=3, message="Failed to load trace: boom")
    result = invoke("replay", str(release), str(workload), "--out", str(tmp_path / "o.csv"),
                    "--blis", str(blis), expect=1)
    lines = result.stderr.strip().splitlines()
    line = lines[-1]
    assert line.startswith("error: ") and str(blis) in line and "llama2" in line
    assert "exit 3" in line and "Failed to load trace: boom" in line


def test_a_missing_blis_is_one_line(release: Path, workload: Path, tmp_path: Path,
                                    items: list[MeasuredExperiment]) -> None:
    missing = tmp_path / "no-such-blis"
    result = invoke("replay", str(release), str(workload), "--out", str(tmp_path / "o.csv"),
                    "--blis", str(missing), expect=1)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(missing) in line and "not found" in line
    with pytest.raises(BlisRunError, match="not found"):
        run_blis("no-such-blis-on-path", load_release(str(release)), items, "w")


def test_shared_prefixes_keep_one_prompt_token_outside_the_group(
        items: list[MeasuredExperiment]) -> None:
    item = items[0]
    w = item.workload
    n = len(w)
    group = np.where(np.arange(n) % 2 == 0, 7, -1)
    prefix = np.where(group >= 0, w.prompt_tokens, 0)
    shared = dataclasses.replace(item, workload=Workload(
        arrival_us=w.arrival_us, prompt_tokens=w.prompt_tokens, output_tokens=w.output_tokens,
        prefix_group=group, prefix_tokens=prefix))
    rows = [dict(zip(TRACE_COLUMNS, r, strict=True)) for r in trace_rows(shared)]
    for i, r in enumerate(rows):
        prompt = int(w.prompt_tokens[i])
        if i % 2 == 0:
            assert r["prefix_group"] == "g7" and int(r["prefix_length"]) == prompt - 1
            assert r["input_tokens"] == "1"
        else:
            assert r["prefix_group"] == "" and r["prefix_length"] == "0"
            assert int(r["input_tokens"]) == prompt


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\nimport sys, time\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize(("body", "message"), [
    ("time.sleep(30)", "timed out after 0.5 s on experiment llama2: still working"),
    ("pass", "wrote no results file on experiment llama2"),
    ("open(sys.argv[sys.argv.index('--results-path') + 1], 'w').write('{\"a\": 1}')",
     "results of experiment llama2 are not a list"),
])
def test_a_blis_that_hangs_or_writes_no_results_is_an_error(
        body: str, message: str, release: Path, items: list[MeasuredExperiment],
        tmp_path: Path) -> None:
    prefix = "sys.stderr.write('still working\\n'); sys.stderr.flush()\n"
    blis = _script(tmp_path / "blis", prefix + body)
    with pytest.raises(BlisRunError, match=message.replace("(", r"\(")) as info:
        run_blis(str(blis), load_release(str(release)), items, "w", timeout_s=0.5)
    assert str(blis) in str(info.value) and "\n" not in str(info.value)
