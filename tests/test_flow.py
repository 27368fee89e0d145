"""The calibration flow end to end: real Prefect (a temporary server for the session) and
a real local Ray (2 CPUs) on the sample corpus."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from flow_services import task_runs_of_last

from blis_model.calibration import recipe
from blis_model.calibration.selection import candidate_families
from blis_model.errors import ConfigError
from blis_model.releases.files import COEFFICIENTS, DEFAULTS
from blis_model.releases.read import read_manifest
from blis_model.releases.store import list_releases
from blis_model.storage import is_committed
from flows.calibrate import run_calibration

pytestmark = pytest.mark.services

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "h100-real-steps"
EXPERIMENTS = ["h100-codellama-34b-bf16", "h100-llama-2-7b-bf16", "h100-llama-3.1-8b-bf16",
               "h100-mixtral-8x7b-bf16"]


def assert_close(got: Any, want: Any, where: str = "") -> None:
    """Equal structures whose numbers agree within 1e-9 (relative, or absolute near 0)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for key in want:
            assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9) or (
            math.isnan(got) and math.isnan(want)), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def in_process_release(corpus: str, store: Path) -> dict[str, bytes]:
    """The same release built by the library's recipe in this process, without Prefect or
    Ray (what ``blis-model fit`` does): the family chosen by leave-one-experiment-out."""
    url = Path(recipe.calibrate(corpus, str(store), cache=False))
    return {name: (url / name).read_bytes() for name in (COEFFICIENTS, DEFAULTS,
                                                         "manifest.json")}


def test_flow_publishes_the_release_the_library_builds(local_ray, tmp_path):
    store = tmp_path / "store"

    url = run_calibration(str(CORPUS), str(store))

    assert is_committed(url)
    assert [r["url"] for r in list_releases(str(store))] == [url]
    manifest = read_manifest(url)
    assert [e["name"] for e in manifest["experiments"]] == EXPERIMENTS
    assert manifest["corpus"]["steps"] == 791
    metrics = manifest["metrics"]
    assert sorted(metrics["leave_one_experiment_out"]) == EXPERIMENTS
    assert sorted(metrics["temporal_holdout"]) == EXPERIMENTS
    assert metrics["summary"]["loo_mape"] < 20.0

    want = in_process_release(str(CORPUS), tmp_path / "in-process")
    got_coef = json.loads((Path(url) / COEFFICIENTS).read_text())
    want_coef = json.loads(want[COEFFICIENTS])
    assert_close(got_coef["model"], want_coef["model"], "model")
    assert_close(got_coef["blis_projection"], want_coef["blis_projection"], "blis_projection")
    got_blis = yaml.safe_load((Path(url) / DEFAULTS).read_text())["trained_physics_coefficients"]
    want_blis = yaml.safe_load(want[DEFAULTS])["trained_physics_coefficients"]
    assert_close(got_blis, want_blis, "trained_physics_coefficients")
    want_manifest = json.loads(want["manifest.json"])
    for key in ("corpus", "metrics", "experiments", "ingest", "feature_schema", "plots"):
        assert_close(manifest[key], want_manifest[key], key)

    # Fanned out: one task per experiment, per configuration, per family's temporal
    # holdout and per family's leave-one-out fold.
    runs = task_runs_of_last("calibrate-corpus")
    assert all(r.state.is_completed() for r in runs)
    kinds = Counter(r.name.split(" ")[0] for r in runs if " " in r.name)
    families = len(candidate_families())
    assert kinds == {"featurize": 4, "fit-specialist": 4, "loo-fold": 4 * families,
                     "temporal-holdout": families}
    selection = metrics["family_selection"]
    assert selection["winner"] == manifest["family"]
    assert len(selection["scores"]) == families


def test_a_broken_experiment_fails_the_flow_and_writes_no_release(local_ray, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS / EXPERIMENTS[0], corpus / "good")
    shutil.copytree(CORPUS / EXPERIMENTS[0], corpus / "broken")
    config = yaml.safe_load((corpus / "broken" / "exp-config.yaml").read_text())
    del config["max_num_seqs"]
    (corpus / "broken" / "exp-config.yaml").write_text(yaml.safe_dump(config))
    store = tmp_path / "store"

    with pytest.raises(ConfigError, match=r"experiment broken: broken/exp-config.yaml: "
                                          r"key 'max_num_seqs'"):
        run_calibration(str(corpus), str(store))

    assert list_releases(str(store)) == []
    assert not (store / "releases").exists() or not any((store / "releases").iterdir())
    failed = [r for r in task_runs_of_last("calibrate-corpus") if r.name == "featurize broken"]
    assert len(failed) == 1 and failed[0].state.is_failed()
    assert failed[0].run_count == 1  # a configuration error is not retried


def test_only_failures_that_may_pass_next_time_are_retried():
    from prefect.states import Failed

    from blis_model.errors import CorpusError
    from blis_model.storage import StorageError
    from tasks.policy import transient

    assert transient(None, None, Failed(data=OSError("connection reset")))
    assert transient(None, None, Failed(data=StorageError("s3://b: cannot reach endpoint")))
    assert not transient(None, None, Failed(data=ConfigError("missing", key="model")))
    assert not transient(None, None, Failed(data=CorpusError("no experiments")))


def featurize_logs_of_last(flow_name: str) -> dict[str, str]:
    """Experiment → the featurize task's first log line, for the last run of ``flow_name``."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    runs = {r.id: r.name.split(" ", 1)[1] for r in task_runs_of_last(flow_name)
            if r.name.startswith("featurize ")}
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=list(runs))))
    out: dict[str, str] = {}
    for log in sorted(logs, key=lambda x: x.timestamp):
        out.setdefault(runs[log.task_run_id], log.message)
    return out


def test_unchanged_experiments_come_from_the_feature_cache(local_ray, tmp_path):
    from tasks.ingest import CACHE_HIT

    corpus, store = tmp_path / "corpus", tmp_path / "store"
    for name in EXPERIMENTS[:2]:
        shutil.copytree(CORPUS / name, corpus / name)
    cache = store / "cache" / "features"

    first = run_calibration(str(corpus), str(store), family="picf")
    logs = featurize_logs_of_last("calibrate-corpus")
    assert sorted(logs) == EXPERIMENTS[:2] and not any(CACHE_HIT in m for m in logs.values())
    entries = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(entries) == 2

    second = run_calibration(str(corpus), str(store), family="picf")
    logs = featurize_logs_of_last("calibrate-corpus")
    assert all(CACHE_HIT in logs[n] for n in EXPERIMENTS[:2])  # nothing re-read
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == entries
    coefficients = [json.loads((Path(u) / COEFFICIENTS).read_text()) for u in (first, second)]
    assert coefficients[0]["model"] == coefficients[1]["model"]

    shutil.copytree(CORPUS / EXPERIMENTS[2], corpus / EXPERIMENTS[2])
    run_calibration(str(corpus), str(store), family="picf")
    logs = featurize_logs_of_last("calibrate-corpus")
    assert [n for n in EXPERIMENTS[:3] if CACHE_HIT not in logs[n]] == [EXPERIMENTS[2]]
    assert len(list(cache.iterdir())) == 3


def test_flow_fits_request_measurements_by_replay_fanned_out(local_ray, tmp_path):
    """A corpus of client measurements only: the flow fits by replay, each round's
    replays one task per experiment, and publishes the request fit's release."""
    import dataclasses

    from blis_model.synth import SynthConfig
    from blis_model.synth.client_view import physics_step_time, write_synth_corpus

    beta = {"gemm_roofline_us": 1.25, "decode_attention_us": 1.2, "lm_head_us": 1.1,
            "activation_io_us": 1.2, "layer_kernels": 5.0, "step_overhead": 300.0}
    configs = {}
    for name, model, rate in (("llama3", "meta-llama/Llama-3.1-8B", 20.0),
                              ("llama2", "meta-llama/Llama-2-7b-hf", 15.0)):
        base = SynthConfig(seed=len(configs), num_requests=120, arrival_rate=rate, model=model,
                           max_num_seqs=64, num_gpu_blocks=4000)
        configs[name] = dataclasses.replace(base, step_time_us=physics_step_time(beta, base))
    write_synth_corpus(str(tmp_path / "measured"), configs, traces=False, client_view=True)

    url = run_calibration(str(tmp_path / "measured"), str(tmp_path / "store"))

    manifest = read_manifest(url)
    replay = manifest["metrics"]["request_replay"]
    assert sorted(replay["in_sample"]) == ["llama2", "llama3"]
    assert replay["summary"]["in_sample_e2e_mape"] < 5.0
    rounds = len(replay["convergence"]["iterations"])
    runs = task_runs_of_last("calibrate-corpus")
    assert all(r.state.is_completed() for r in runs)
    # "load-measured llama2" (a task_run_name) or "fit-by-replay-f0e" (Prefect's default)
    kinds = Counter(re.sub(r"-[0-9a-f]{3}$", "", r.name.split(" ")[0]) for r in runs)
    assert kinds["load-measured"] == 2 and kinds["fit-by-replay"] == 1
    assert kinds["replay"] >= 2 * rounds  # every round: one replay task per experiment
