"""The operations loop end to end against the session's real services: the S3 server
(traces and releases), the Prefect server (deployments, events, automations, artifacts)
and the local Ray.

The trigger is real: the sensor's events reach the server, whose automation creates the
``on-upload`` flow runs. Those runs are then executed in this process (what ``prefect
serve``'s runner would do in a subprocess) so they share the session's Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from builders import upload_sample

from blis_model.calibration import evaluation, featurize
from blis_model.releases import channels
from blis_model.releases.build import build_release, release_version
from blis_model.releases.store import list_releases, publish
from deploy.deployments import UPLOAD_EVENT, Settings, build_deployments

pytestmark = pytest.mark.services

SAMPLE = Path(__file__).resolve().parents[1] / "corpus" / "h100-real-steps"
EXPERIMENTS = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())


@dataclass(frozen=True)
class Ops:
    bucket: str
    settings: Settings
    deployment_ids: dict[str, Any]
    env: dict[str, str]


@pytest.fixture(scope="module")
def ops(prefect_api: str, s3_server: Any) -> Iterator[Ops]:
    """The deployments registered on the session's Prefect server, for a fresh bucket."""
    import os

    bucket = s3_server.make_bucket()
    settings = Settings(store=f"s3://{bucket}/store", corpus=f"s3://{bucket}/traces",
                        watch_prefix=f"s3://{bucket}/traces", golden=f"s3://{bucket}/golden",
                        nightly_cron="30 3 * * *", timezone="Europe/Paris",
                        watch_interval_s=60, settle_s=0, family="picf")
    saved = {k: os.environ.get(k) for k in s3_server.env}
    os.environ.update(s3_server.env)
    try:
        ids = {f"{d.flow_name}/{d.name}": d.apply() for d in build_deployments(settings)}
        yield Ops(bucket, settings, ids, dict(s3_server.env))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def poll(what: str, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def ray_env(prefect_api: str, env: dict[str, str]) -> Any:
    """Ray task options giving the session Ray's workers this test's S3 credentials (new
    workers, ~10 s) unless its workers have them already."""
    import contextlib

    import ray
    from prefect_ray.context import remote_options

    from flows.runtime import WORKER_ENV

    job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    if all(job_env.get(k) == v for k, v in env.items()):
        return contextlib.nullcontext()
    return remote_options(runtime_env={"env_vars": {**WORKER_ENV, **env,
                                                    "PREFECT_API_URL": prefect_api}})


def run_created(flow: Any, flow_run: Any, return_type: str = "result") -> Any:
    """Execute a flow run created on the server (by a trigger or the UI form)."""
    from prefect.flow_engine import run_flow

    return run_flow(flow, flow_run=flow_run, parameters=flow_run.parameters,
                    return_type=return_type)


def test_deployments_registered_with_schedule_and_trigger(ops: Ops) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("recalibrate/nightly")
        [schedule] = nightly.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("30 3 * * *",
                                                                      "Europe/Paris")
        assert nightly.parameters["corpus"] == ops.settings.corpus
        assert nightly.parameters["store"] == ops.settings.store
        sensor = client.read_deployment_by_name("watch-uploads/sensor")
        assert sensor.schedules[0].schedule.interval.total_seconds() == 60
        promote = client.read_deployment_by_name("promote/promote")
        form = promote.parameter_openapi_schema["properties"]
        assert {"version", "reviewer", "channel", "reason", "skip_gate",
                "skip_gate_reason"} <= set(form)
        assert promote.parameter_openapi_schema["required"] == ["version", "reviewer"]
        assert all(field.get("description") for field in form.values()), form
        assert promote.parameters["golden"] == ops.settings.golden
        on_upload = client.read_deployment_by_name("recalibrate/on-upload")
        automations = client.read_automations()
        mine = [a for a in automations if any(getattr(x, "deployment_id", None) == on_upload.id
                                              for x in a.actions)]
        assert len(mine) == 1 and UPLOAD_EVENT in mine[0].trigger.expect


def test_upload_triggers_calibration_that_moves_candidate(ops: Ops, local_ray: None,
                                                         prefect_api: str, s3_server: Any
                                                         ) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        DeploymentFilter,
        DeploymentFilterId,
    )
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect.events.filters import EventFilter, EventNameFilter

    from flows.nightly import recalibrate
    from flows.watch import watch_uploads

    s = ops.settings
    # Before the first upload the prefix does not exist: 0 experiments, not an error.
    state = watch_uploads(s.watch_prefix, s.store, settle_s=0, return_state=True)
    assert state.is_completed() and state.message.startswith("0 experiments under")
    upload_sample(s3_server, ops.bucket, "traces", EXPERIMENTS[:3])
    assert watch_uploads(s.watch_prefix, s.store, settle_s=0) == EXPERIMENTS[:3]
    assert watch_uploads(s.watch_prefix, s.store, settle_s=0) == []  # remembered
    upload_sample(s3_server, ops.bucket, "traces", EXPERIMENTS[3:])
    assert watch_uploads(s.watch_prefix, s.store, settle_s=0) == EXPERIMENTS[3:]

    on_upload = ops.deployment_ids["recalibrate/on-upload"]
    with get_client(sync_client=True) as client:
        def upload_events() -> list[Any] | None:
            page = client.read_events(EventFilter(event=EventNameFilter(name=[UPLOAD_EVENT])),
                                      limit=50)
            found = [e for e in page.events if e.resource.get("blis.corpus") == s.watch_prefix]
            return found if len(found) >= 4 else None

        def triggered_runs() -> list[Any] | None:
            found = client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[on_upload])))
            return found if len(found) >= 4 else None

        events = poll("the upload events", upload_events)
        assert sorted(e.resource["blis.experiment"] for e in events) == EXPERIMENTS
        # The automation turned every event into a run of the on-upload deployment.
        runs = poll("the triggered runs", triggered_runs, timeout=180)
    reasons = sorted(r.parameters["reason"] for r in runs)
    assert reasons == [f"upload of {name}" for name in EXPERIMENTS]
    assert {r.parameters["corpus"] for r in runs} == {s.watch_prefix}

    first, second = runs[0], runs[1]
    with ray_env(prefect_api, ops.env):
        url = run_created(recalibrate, first)
    version = release_version_of(url)
    candidate = channels.read_channel(s.store, "candidate").pointer
    assert candidate is not None and candidate.version == version
    assert candidate.by.startswith(f"prefect flow run {first.name}")
    # Uploads arriving together are one recalibration, and its reason names them all.
    assert candidate.reason == f"upload of {', '.join(EXPERIMENTS)}"
    assert candidate.run["flow_run_id"] == str(first.id)
    assert candidate.run["deployment_id"] == str(on_upload)
    [release] = list_releases(s.store)
    assert release["experiments"] == 4 and release["steps"] == 791

    # The next queued run sees an unchanged corpus: no second calibration.
    assert run_created(recalibrate, second) == url
    assert len(list_releases(s.store)) == 1
    assert channels.read_channel(s.store, "candidate").pointer == candidate

    with get_client(sync_client=True) as client:  # the newest artifact of each key
        artifacts: dict[str, Any] = {}
        for a in client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(like_="blis-")), sort=ArtifactSort.CREATED_DESC):
            artifacts.setdefault(a.key, a)
    assert {"blis-model-card", "blis-metrics", "blis-plots", "blis-candidate"} <= set(artifacts)
    # The recalibration run itself links to the subflow's artifacts, for the reviewer.
    note = str(artifacts["blis-candidate"].data)
    assert artifacts["blis-candidate"].flow_run_id == first.id and version in note
    for key in ("blis-model-card", "blis-metrics", "blis-plots"):
        assert f"(/artifacts/artifact/{artifacts[key].id})" in note
    plots = str(artifacts["blis-plots"].data)
    assert plots.count("](data:image/png;base64,") == 3 and "learning curve" in plots
    assert "](data:image/png;base64," in str(artifacts["blis-model-card"].data)
    rows = artifacts["blis-metrics"].data
    assert version in str(artifacts["blis-model-card"].data) and "h100-llama-2-7b-bf16" in str(
        rows)
    for artifact in artifacts.values():
        assert s3_server.secret_key not in str(artifact.data)
        assert s3_server.access_key not in str(artifact.data)


def release_version_of(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def two_releases() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """A good release (all four experiments) and a worse one (fit on one experiment)."""
    experiments = featurize.load_experiments(str(SAMPLE))
    items = [featurize.featurize(e) for e in experiments]
    frame = featurize.training_frame(items)
    out = []
    for keep in (experiments, experiments[:1]):
        names = {e.name for e in keep}
        part = frame[frame["experiment"].isin(names)].reset_index(drop=True)
        model = evaluation.fit_model(part, "picf")
        out.append(build_release(model, part, keep, [i.report for i in items
                                                     if i.experiment.name in names],
                                 str(SAMPLE), evaluation.evaluate(part, model, "picf"), "picf"))
    return out[0], out[1]


def test_promote_from_the_ui_form_gates_and_rollback_restores(
        ops: Ops, s3_server: Any, s3_env: dict[str, str],
        two_releases: tuple[dict[str, bytes], dict[str, bytes]]) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from typer.testing import CliRunner

    from blis_model.cli import app
    from flows.promote import promote

    s = ops.settings
    store = f"s3://{ops.bucket}/gate-store"
    good, bad = (release_version(f) for f in two_releases)
    for files in two_releases:
        publish(files, store, release_version(files))
    upload_sample(s3_server, ops.bucket, "golden", EXPERIMENTS)
    deployment = ops.deployment_ids["promote/promote"]

    def from_form(version: str, **fields: Any) -> Any:
        """What the UI's Run form does: a flow run of the deployment with parameters."""
        with get_client(sync_client=True) as client:
            return client.create_flow_run_from_deployment(
                deployment, parameters={"version": version, "store": store,
                                        "reason": f"promote {version}", **fields})

    def final_state(flow_run: Any) -> Any:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run.id).state

    first = from_form(good, reviewer="alice")
    pointer = run_created(promote, first)
    assert (pointer["version"], pointer["channel"], pointer["previous"]) == (good, "stable", None)
    assert pointer["gate"]["passed"] and pointer["gate"]["corpus"] == s.golden
    assert pointer["by"] == "alice" and pointer["run"]["flow_run_id"] == str(first.id)
    assert pointer["run"]["deployment_id"] == str(deployment)
    assert pointer["run"]["deployment_name"] == "promote/promote"

    # A refusal is an expected outcome: a Completed run named Refused, with the reason.
    refused = from_form(bad, reviewer="bob")
    run_created(promote, refused)
    state = final_state(refused)
    assert state.is_completed() and state.name == "Refused"
    assert "refused by the golden gate" in state.message and "worse than" in state.message
    with get_client(sync_client=True) as client:
        gate = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["blis-promotion-gate"])))
    assert any("REFUSED" in str(a.data) for a in gate)
    assert channels.read_channel(store, "stable").pointer.version == good

    # No golden corpus: stable does not move without an explicit, recorded override.
    ungated = from_form(bad, reviewer="carol", golden="")
    run_created(promote, ungated, "state")
    state = final_state(ungated)
    assert state.is_failed() and "needs the golden gate" in state.message
    no_reason = from_form(bad, reviewer="carol", golden="", skip_gate=True)
    run_created(promote, no_reason, "state")
    assert "skip_gate needs skip_gate_reason" in final_state(no_reason).message
    forced = from_form(bad, reviewer="carol", golden="", skip_gate=True,
                       skip_gate_reason="golden corpus being rebuilt")
    moved = run_created(promote, forced)
    assert moved["previous"] == good and moved["gate"] is None
    assert moved["gate_skipped"] == "golden corpus being rebuilt" and moved["by"] == "carol"

    result = CliRunner().invoke(app, ["releases", "rollback", store, "--channel", "stable",
                                      "--reason", "bad numbers", "--by", "dave"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"stable → {good}"
    history = channels.history(store, "stable")
    assert [(e.action, e.version, e.by) for e in history] == [
        ("promote", good, "alice"), ("refused", bad, "bob"), ("promote", bad, "carol"),
        ("rollback", good, "dave")]
    assert history[1].run["flow_run_id"] == str(refused.id)
    assert "worse than" in history[1].gate["reasons"][0]
    assert history[3].reason == "bad numbers"
    shown = CliRunner().invoke(app, ["releases", "history", store],
                               env={"COLUMNS": "600"}).stdout
    flat = " ".join(shown.split())
    assert "gate skipped: golden corpus being rebuilt by carol" in flat
    assert f"alice via flow run {first.name}" in flat and "refused:" in flat


def test_sensor_fails_clearly_on_a_missing_bucket_or_bad_credentials(
        ops: Ops, prefect_api: str, s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.watch import watch_uploads

    missing = watch_uploads("s3://no-such-bucket-blis/traces", ops.settings.store, settle_s=0,
                            return_state=True)
    assert missing.is_failed()
    message = missing.message or str(missing.result(raise_on_failure=False))
    assert "no-such-bucket-blis" in message and "Traceback" not in message
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "Zz" + s3_server.secret_key[2:])
    denied = watch_uploads(ops.settings.watch_prefix, ops.settings.store, settle_s=0,
                           return_state=True)
    assert denied.is_failed() and s3_server.secret_key[2:] not in (denied.message or "")


def test_settings_come_from_the_environment() -> None:
    from blis_model.errors import ConfigError

    with pytest.raises(ConfigError, match="BLIS_STORE"):
        Settings.from_env({"BLIS_CORPUS": "s3://b/traces"})
    s = Settings.from_env({"BLIS_STORE": "s3://b/store", "BLIS_CORPUS": "s3://b/traces",
                           "BLIS_NIGHTLY_CRON": "0 4 * * 1", "BLIS_RAY_ADDRESS": "h:6379"})
    assert (s.watch_prefix, s.nightly_cron, s.ray_address, s.golden) == (
        "s3://b/traces", "0 4 * * 1", "h:6379", "")


def test_an_experiment_still_uploading_waits_for_the_next_scan(tmp_path: Path) -> None:
    import shutil

    from blis_model.ingest import uploads

    # Fresh mtimes (copy, not copy2): the objects were "just uploaded".
    shutil.copytree(SAMPLE / EXPERIMENTS[0], tmp_path / "traces" / "a",
                    copy_function=shutil.copy)
    store, prefix = str(tmp_path / "store"), str(tmp_path / "traces")
    scanned = uploads.scan(prefix)
    ready, waiting = uploads.new_experiments(scanned, {}, settle_s=3600)
    assert (ready, [w.name for w in waiting]) == ([], ["a"])
    ready, _ = uploads.new_experiments(scanned, {}, settle_s=0)
    uploads.save_seen(store, prefix, {r.name: r for r in ready})
    assert uploads.load_seen(store, prefix) == {"a": scanned["a"].identity}
    (tmp_path / "traces" / "a" / "more.json").write_text("{}")  # changed: new again
    assert [r.name for r in uploads.new_experiments(
        uploads.scan(prefix), uploads.load_seen(store, prefix))[0]] == ["a"]


def test_featurized_experiments_are_reused_until_their_objects_change(tmp_path: Path
                                                                     ) -> None:
    import shutil

    import pandas as pd

    from blis_model.calibration import cache as feature_cache

    corpus, store = tmp_path / "traces", str(tmp_path / "store")
    for name in EXPERIMENTS[:2]:
        shutil.copytree(SAMPLE / name, corpus / name)
    first = [feature_cache.featurize_cached(str(corpus), n, store) for n in EXPERIMENTS[:2]]
    assert [hit for _, hit in first] == [False, False]
    again = [feature_cache.featurize_cached(str(corpus), n, store) for n in EXPERIMENTS[:2]]
    assert [hit for _, hit in again] == [True, True]
    for (a, _), (b, _) in zip(first, again, strict=True):
        pd.testing.assert_frame_equal(a.frame, b.frame)
        assert a.experiment == b.experiment and a.report.counts == b.report.counts

    # A re-upload of one experiment's config: only that one is featurized again.
    config = corpus / EXPERIMENTS[0] / "exp-config.yaml"
    config.write_text(config.read_text() + "\n# re-uploaded\n")
    hits = [feature_cache.featurize_cached(str(corpus), n, store)[1] for n in EXPERIMENTS[:2]]
    assert hits == [False, True]

    # A corrupt entry is recomputed, not trusted.
    key = feature_cache.cache_key(str(corpus), EXPERIMENTS[1])
    Path(feature_cache.entry_url(store, key)).write_bytes(b"not a pickle")
    item, hit = feature_cache.featurize_cached(str(corpus), EXPERIMENTS[1], store)
    assert not hit and len(item.frame) == len(first[1][0].frame)


def test_metrics_table_has_experiments_mean_and_families() -> None:
    from tasks.artifacts import metrics_rows

    manifest = {"family": "picf", "experiments": [{"name": "a", "steps": 3}],
                "corpus": {"steps": 3},
                "metrics": {"in_sample": {"a": {"mape": 1.23456}},
                            "summary": {"in_sample_mape": 6.518333333333},
                            "family_selection": {"winner": "picf", "scores": [
                                {"family": "picf", "loo_mape": 2.0, "temporal_mape": 1.5},
                                {"family": "overlap", "loo_mape": 3.0049999,
                                 "temporal_mape": float("nan")}]}}}
    rows = metrics_rows(manifest)
    assert [r["name"] for r in rows] == ["a", "mean over experiments (picf)",
                                         "family picf (chosen)", "family overlap"]
    assert rows[0]["in-sample %"] == 1.23 and rows[1]["in-sample %"] == 6.52
    assert rows[3]["LOO %"] == 3.0 and rows[3]["temporal %"] is None
    assert list(rows[0]) == ["name", "steps", "in-sample %", "temporal %", "LOO %",
                             "BLIS proj. %"]
    for row in rows:  # every number short: two decimals at most
        for value in row.values():
            assert not isinstance(value, float) or len(repr(value).split(".")[1]) <= 2
