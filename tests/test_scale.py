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

from blis_model.calibration import evaluation, featurize, selection
from blis_model.ingest.reader import read_step_table
from blis_model.ingest.scan import _fast_columns
from blis_model.ingest.steps import STEP_EVENTS
from blis_model.models.picf import PICF
from blis_model.models.registry import make_model
from blis_model.scale import sampling as scale_families
from blis_model.scale import shards
from blis_model.scale.sampling import ShardModels, score_shard
from blis_model.synth.bulk import corpus_size, write_bulk_corpus

ROOT = Path(__file__).resolve().parents[1]
REAL = str(ROOT / "corpus" / "h100-real-steps")


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory: pytest.TempPathFactory):
    """The real corpus: its frame and one shard per experiment."""
    work = tmp_path_factory.mktemp("shards")
    experiments = featurize.load_experiments(REAL)
    frame = featurize.training_frame([featurize.featurize(e) for e in experiments])
    summaries = [shards.featurize_to_shard(e, str(work / f"{e.name}.parquet"))
                 for e in experiments]
    return frame, summaries


def test_stats_fit_equals_frame_fit(real_shards) -> None:
    frame, summaries = real_shards
    direct, pooled = PICF().fit(frame), shards.fit_picf_from_stats(summaries)
    scale = np.max(np.abs(direct.coef_))
    assert np.max(np.abs(direct.coef_ - pooled.coef_)) <= 1e-9 * scale
    assert set(direct.config_coef_) == set(pooled.config_coef_)
    for key, coef in direct.config_coef_.items():
        assert np.max(np.abs(coef - pooled.config_coef_[key])) <= 1e-9 * np.max(np.abs(coef))
    # every configuration's choice of terms (time-ordered CV) is made from block statistics
    assert len(pooled.config_choice_) == 4
    for key, choice in direct.config_choice_.items():
        theirs = pooled.config_choice_[key]
        assert (choice["choice"], choice["folds"]) == (theirs["choice"], theirs["folds"])
        for mine, other in zip(choice["candidates"], theirs["candidates"], strict=True):
            assert mine["cv_rmsre_pct"] == pytest.approx(other["cv_rmsre_pct"], rel=1e-9)
    assert sum(s.rows for s in summaries) == len(frame)


def test_loo_and_temporal_from_stats_equal_pipeline(real_shards) -> None:
    frame, summaries = real_shards
    for from_frame, from_stats in (
            (evaluation.leave_one_experiment_out(frame, "picf"), shards.loo_from_stats(summaries)),
            (evaluation.temporal_holdout(frame, "picf"), shards.temporal_from_stats(summaries))):
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
        models = ShardModels(model, temporal_model,
                             shards.picf_without_config(summaries, item.config_key))
        scores = score_shard({"picf": models}, item)["picf"]
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
    experiments = featurize.load_experiments(str(tmp_path))
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
        item = featurize.featurize(exp)
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


# ------------------------------------------------------------- any family at scale


def scale_scores(summaries, families, sample) -> dict[str, dict[str, dict]]:
    """family → kind → experiment → score, as the scale flow computes them."""
    configs = sorted({s.config_key for s in summaries})
    out: dict[str, dict[str, dict]] = {f: {"in_sample": {}, "temporal": {}, "loo": {}}
                                       for f in families}
    models = {f: (scale_families.fit_scale_model(f, summaries, sample),
                  scale_families.fit_scale_model(f, summaries, sample, train=True),
                  {c: scale_families.fit_scale_model(f, summaries, sample, held_config=c)
                   for c in configs}) for f in families}
    for item in summaries:
        scores = scale_families.score_shard(
            {f: scale_families.ShardModels(m, t, folds[item.config_key])
             for f, (m, t, folds) in models.items()}, item)
        for f, kinds in scores.items():
            for kind, value in kinds.items():
                if value is not None:
                    out[f][kind][item.experiment] = value
    return out


def assert_scores_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want) and len(got) == 4
    for name, score in want.items():
        assert got[name]["n"] == score["n"]
        for key in ("mape", "median_ape", "p90_ape"):
            assert got[name][key] == pytest.approx(score[key], rel=1e-9)


def test_sample_fit_of_any_family_equals_the_frame_fit(real_shards) -> None:
    frame, summaries = real_shards
    sample = scale_families.draw_fit_sample(summaries, len(frame))  # the whole corpus
    assert sample.rows == len(frame) and sample.total_steps == len(frame)
    assert scale_families.sample_size(summaries, len(frame)) == (sample.rows,
                                                                 int(sample.train.sum()))
    direct = make_model("overlap").fit(frame).predict(frame)
    fitted = scale_families.fit_scale_model("overlap", summaries, sample).predict(frame)
    assert np.max(np.abs(fitted - direct) / np.abs(direct)) <= 1e-9
    scores = scale_scores(summaries, ["overlap"], sample)["overlap"]
    assert_scores_equal(scores["loo"], evaluation.leave_one_experiment_out(frame, "overlap"))
    assert_scores_equal(scores["temporal"], evaluation.temporal_holdout(frame, "overlap"))
    assert_scores_equal(scores["in_sample"], evaluation.evaluate(
        frame, make_model("overlap").fit(frame), "overlap", loo={}, temporal={})["in_sample"])


def test_auto_at_scale_chooses_as_the_frame_comparison(real_shards) -> None:
    frame, summaries = real_shards
    families = ["picf", "overlap"]  # picf from exact statistics, overlap from the sample
    sample = scale_families.draw_fit_sample(summaries, scale_families.MAX_FIT_ROWS)
    got = scale_scores(summaries, families, sample)
    chosen = selection.choose([selection.score(f, got[f]["loo"], got[f]["temporal"])
                               for f in families])
    want = selection.compare_families(frame, families)
    assert chosen.winner == want.winner
    for mine, theirs in zip(chosen.scores, want.scores, strict=True):
        assert mine.family == theirs.family
        assert mine.loo_mape == pytest.approx(theirs.loo_mape, rel=1e-9)
        assert mine.temporal_mape == pytest.approx(theirs.temporal_mape, rel=1e-9)


def test_a_small_fit_sample_is_bounded_stratified_and_deterministic(real_shards) -> None:
    frame, summaries = real_shards
    limit = 60
    sample = scale_families.draw_fit_sample(summaries, limit)
    again = scale_families.draw_fit_sample(summaries, limit)
    assert sample.rows <= limit and sample.total_steps == len(frame)
    assert sample.frame.equals(again.frame) and np.array_equal(sample.train, again.train)
    assert scale_families.sample_size(summaries, limit) == (sample.rows, int(sample.train.sum()))
    quotas = shards.sample_quotas(summaries, limit)
    for item in summaries:  # every experiment, its whole time range, its quota at most
        rows = sample.frame[sample.frame["experiment"] == item.experiment]
        steps = shards.read_shard(item.shard_url, ["step_id"])["step_id"]
        assert 2 <= len(rows) <= quotas[item.experiment]
        assert rows["step_id"].iloc[0] == steps.iloc[0]
        assert rows["step_id"].iloc[-1] == steps.iloc[-1]
        assert rows.reset_index(drop=True).equals(
            shards.sample_shard(item, quotas[item.experiment]))  # the release's sampler
        # temporal train part: exactly the sampled rows among its first 70% of steps
        train = sample.train[(sample.frame["experiment"] == item.experiment).to_numpy()]
        first = set(steps.iloc[:item.train_rows])
        assert [s in first for s in rows["step_id"]] == train.tolist()
    # the fits see the sample only: the model, the temporal model, each fold
    fitted = scale_families.fit_scale_model("overlap", summaries, sample)
    assert np.array_equal(fitted.predict(frame),
                          make_model("overlap").fit(sample.frame).predict(frame))
    held = summaries[0].config_key
    fold = sample.part(held_config=held)
    assert held not in set(fold["config_key"]) and len(fold) < sample.rows
    assert len(sample.part(train=True)) == int(sample.train.sum()) < sample.rows
    assert scale_families.fit_description("overlap", len(frame), sample.rows,
                                          int(sample.train.sum()), limit).startswith(
        f"a deterministic sample of {sample.rows} of {len(frame)} steps")


def test_unknown_family_is_refused_naming_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="allowed: auto, bsr_ard"):
        scale_families.check_family("linear")
    assert scale_families.families_for("OVERLAP") == ["overlap"]
    assert scale_families.families_for("auto")[0] == "picf"


@pytest.mark.services
def test_scale_flow_fits_any_family_on_a_sample(local_ray, tmp_path: Path) -> None:
    from collections import Counter

    from flow_services import task_runs_of_last

    from blis_model.releases.read import read_manifest
    from flows.calibrate_at_scale import run_at_scale

    url = run_at_scale(REAL, str(tmp_path / "store"), work=str(tmp_path / "work"),
                       family="overlap", max_fit_rows=400)
    manifest = read_manifest(url)
    assert manifest["family"] == "overlap"
    metrics = manifest["metrics"]
    scale = metrics["scale"]
    assert scale["family"] == "overlap" and scale["max_fit_rows"] == 400
    assert 4 <= scale["fit_rows"] <= 400 and scale["total_steps"] == 791
    assert scale["fit"].startswith(f"a deterministic sample of {scale['fit_rows']} of 791")
    assert len(metrics["leave_one_experiment_out"]) == 4
    assert len(metrics["temporal_holdout"]) == 4
    assert sum(r["n"] for r in metrics["in_sample"].values()) == 791  # scored on all steps
    runs = task_runs_of_last("calibrate-shards")
    assert all(r.state.is_completed() for r in runs)
    kinds = Counter(r.name.split(" ")[0] for r in runs if " " in r.name)
    assert kinds["fit-fold"] == 4 and kinds["score"] == 4 and kinds["shard"] == 4
