"""Scale: fits from shard statistics equal fits on frames; the bulk generator writes real
format the fast path parses; the scale flow runs on a multi-node Ray cluster and
re-featurizes only what changed."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blis_model import pipeline, shards
from blis_model.ingest.reader import read_step_table
from blis_model.ingest.scan import _fast_columns
from blis_model.ingest.steps import STEP_EVENTS
from blis_model.models.picf import PICF
from blis_model.synth.bulk import corpus_size, write_bulk_corpus

ROOT = Path(__file__).resolve().parents[1]
REAL = str(ROOT / "corpus" / "h100-real-steps")


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory: pytest.TempPathFactory):
    """The real corpus: its frame and one shard per experiment."""
    work = tmp_path_factory.mktemp("shards")
    experiments = pipeline.load_experiments(REAL)
    frame = pipeline.training_frame([pipeline.featurize(e) for e in experiments])
    summaries = [shards.featurize_to_shard(e, str(work / f"{e.name}.parquet"))
                 for e in experiments]
    return frame, summaries


def test_stats_fit_equals_frame_fit(real_shards) -> None:
    frame, summaries = real_shards
    direct, pooled = PICF().fit(frame), shards.fit_picf_from_stats(summaries)
    scale = np.max(np.abs(direct.coef_))
    assert np.max(np.abs(direct.coef_ - pooled.coef_)) <= 1e-9 * scale
    assert set(direct.config_coef_) == set(pooled.config_coef_) and len(pooled.config_coef_) == 4
    for key, coef in direct.config_coef_.items():
        assert np.max(np.abs(coef - pooled.config_coef_[key])) <= 1e-9 * np.max(np.abs(coef))
    assert sum(s.rows for s in summaries) == len(frame)


def test_loo_and_temporal_from_stats_equal_pipeline(real_shards) -> None:
    frame, summaries = real_shards
    for from_frame, from_stats in (
            (pipeline.leave_one_experiment_out(frame, "picf"), shards.loo_from_stats(summaries)),
            (pipeline.temporal_holdout(frame, "picf"), shards.temporal_from_stats(summaries))):
        assert set(from_frame) == set(from_stats) and len(from_stats) == 4
        for name, score in from_frame.items():
            assert from_stats[name]["n"] == score["n"]
            for key in ("mape", "median_ape", "p90_ape"):
                assert from_stats[name][key] == pytest.approx(score[key], rel=1e-6)
    # the flow's task: every score of one experiment from one read of its shard
    model = shards.fit_picf_from_stats(summaries)
    temporal_model = shards.fit_picf_from_stats(summaries, train=True)
    loo, temporal = shards.loo_from_stats(summaries), shards.temporal_from_stats(summaries)
    for item in summaries:
        scores = shards.validate_shard(model, temporal_model, summaries, item.experiment)
        assert scores["loo"] == loo[item.experiment]
        assert scores["temporal"] == temporal[item.experiment]
        assert scores["in_sample"] == shards.in_sample_from_shard(model, item)


def test_summary_round_trips_and_marks_reuse(real_shards) -> None:
    _, summaries = real_shards
    again = shards.load_summary(summaries[0].shard_url)
    assert again is not None and again.from_cache and again.rows == summaries[0].rows
    assert np.array_equal(again.stats.gram, summaries[0].stats.gram)
    assert shards.load_summary(summaries[0].shard_url + ".missing.parquet") is None


def test_bulk_corpus_parses_on_the_fast_path(tmp_path: Path) -> None:
    results = write_bulk_corpus(str(tmp_path), 2, 1500, snapshot_every=50, seed=3)
    size = corpus_size(results)
    assert size["bytes_compressed"] < size["bytes_uncompressed"] / 5
    experiments = pipeline.load_experiments(str(tmp_path))
    assert len({e.config_key for e in experiments}) == 2
    for exp, result in zip(experiments, results, strict=True):
        step_lines = 0
        with gzip.open(exp.trace_url, "rb") as fh:
            for line in fh:
                if b'"vllm.scheduler.step"' in line:
                    step_lines += 1
                    assert _fast_columns(line.rstrip(b"\n"), STEP_EVENTS) is not None
        assert step_lines == -(-result.steps // 100)
        table, report = read_step_table(exp)
        assert table.num_rows == result.steps and not report.problems
        assert report.counts["steps_with_snapshots"] == -(-result.steps // 50)
        item = pipeline.featurize(exp)
        assert item.requests is not None
        assert item.requests.validation.n_requests == result.requests
        assert item.requests.validation.n_failed == 0
        assert len(item.frame) == result.steps


def test_scale_flow_on_a_two_node_cluster(tmp_path: Path, prefect_api: str) -> None:
    """Runs in a subprocess: a ``ray.cluster_utils.Cluster`` cannot share this process
    with the session's local Ray."""
    corpus, store = tmp_path / "corpus", tmp_path / "store"
    write_bulk_corpus(str(corpus), 3, 1200)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "RAY_AUTH_MODE": "disabled",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "scale_cluster_run.py"),
                          str(corpus), str(store)], env=env, capture_output=True, text=True,
                         timeout=240, cwd=ROOT)
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert out["nodes"] == 2
    first, second = out["runs"]
    for r in (first, second):
        assert (Path(r["url"]) / "manifest.json").is_file()  # committed
        assert r["scale"]["sample_rows"] == r["summary"]["steps"]  # small corpus: all rows
        assert r["summary"]["loo_mape"] > 0
    assert first["experiments"] == 3 and first["scale"]["experiments_featurized"] == 3
    assert second["experiments"] == 4
    assert second["scale"]["experiments_featurized"] == 1
    assert second["scale"]["experiments_reused"] == 3
