"""Faults of issue 5, each against real services: the session's Prefect server, local Ray
and S3 server, and an S3 server of its own for the test that stops it mid-run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from builders import upload_sample
from flow_services import task_runs_of_last

from blis_model.calibration import evaluation, featurize

pytestmark = pytest.mark.services

SAMPLE = Path(__file__).resolve().parents[1] / "corpus" / "h100-real-steps"
EXPERIMENTS = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
BIN = Path(sys.executable).parent / "blis-model"


def cli_env(server: Any, prefect_api: str, **overrides: str | None) -> dict[str, str]:
    """The environment of a CLI subprocess: ``server``'s S3 settings, one S3 attempt per
    call (fail fast), the session's Prefect server; ``None`` overrides unset a variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BLIS_S3"))}
    env.update(server.env, AWS_MAX_ATTEMPTS="1", PREFECT_API_URL=prefect_api,
               OPENBLAS_NUM_THREADS="1", COLUMNS="160")
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def test_bad_bucket_or_credentials_is_one_clear_error(s3_server: Any, prefect_api: str
                                                      ) -> None:
    bucket = s3_server.make_bucket()
    missing = f"nobucket-{uuid.uuid4().hex[:8]}"
    wrong = "Zz" + s3_server.secret_key[2:]
    cases = {  # name: (command, environment overrides, the error's gist)
        "missing bucket": (["calibrate", f"s3://{missing}/x", "--store", f"s3://{missing}/s"],
                           {}, f"bucket '{missing}' does not exist"),
        "wrong secret": (["calibrate", f"s3://{bucket}/x", "--store", f"s3://{bucket}/s"],
                         {"AWS_SECRET_ACCESS_KEY": wrong}, "access denied"),
        # (a lighter command: no flow start-up; calibrate's preflight says the same)
        "no credentials": (["releases", "list", f"s3://{bucket}/s"],
                           {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
                           "no S3 credentials"),
    }
    procs = {name: subprocess.Popen([str(BIN), *args], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=cli_env(s3_server, prefect_api, **env))
             for name, (args, env, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1, (name, stdout, stderr)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and cases[name][2] in errors[0], (name, stderr)
        assert "Traceback" not in stderr and stdout == "", (name, stderr)
        for secret in (s3_server.secret_key, wrong, wrong[2:]):
            assert secret not in stderr, name


def worker_env(prefect_api: str, env: dict[str, str]) -> Any:
    """Ray task options giving the tasks submitted inside it workers of their own, with
    ``env`` added to their environment (new workers: a few seconds)."""
    from prefect_ray.context import remote_options

    from flows.runtime import WORKER_ENV

    return remote_options(runtime_env={"env_vars": {**WORKER_ENV, **env,
                                                    "PREFECT_API_URL": prefect_api}})


@pytest.fixture(scope="module")
def workers(prefect_api: str, s3_server: Any, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[dict[str, str], Path]:
    """(worker environment, crash folder) shared by the tests below, so that they share
    their Ray workers too: the session S3 server's settings and the crash-once hook
    (``tests/fault_injection/sitecustomize.py``, loaded by the workers at start-up)."""
    crash = tmp_path_factory.mktemp("crash-once")
    hook = Path(__file__).resolve().parent / "fault_injection"
    path = os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**s3_server.env, "BLIS_TEST_CRASH_ONCE_DIR": str(crash), "PYTHONPATH": path}, crash


def coefficients(url: str) -> dict[str, Any]:
    from blis_model.releases.files import COEFFICIENTS
    from blis_model.storage import filesystem, join

    fs, path = filesystem(join(url, COEFFICIENTS))
    return json.loads(fs.cat_file(path))


def test_a_ray_worker_dying_in_featurize_is_retried_with_the_same_result(
        local_ray: None, prefect_api: str, workers: tuple[dict[str, str], Path],
        tmp_path: Path) -> None:
    from flows.calibrate import run_calibration

    env, crash = workers
    corpus = tmp_path / "corpus"
    for name in EXPERIMENTS[:2]:
        shutil.copytree(SAMPLE / name, corpus / name)

    (crash / EXPERIMENTS[1]).touch()  # its featurize task kills its Ray worker, once
    with worker_env(prefect_api, env):
        url = run_calibration(str(corpus), str(tmp_path / "crashed"), family="picf")

    assert not (crash / EXPERIMENTS[1]).exists()  # its worker died ...
    runs = {r.name: r for r in task_runs_of_last("calibrate-corpus")}
    assert all(r.state.is_completed() for r in runs.values())  # ... and Ray ran it again
    assert coefficients(url)["model"] == clean_model(str(corpus), "picf")


def clean_model(corpus: str, family: str) -> dict[str, Any]:
    """The coefficients a clean in-process fit (no Prefect, no Ray) publishes."""

    from blis_model.releases.build import dumps_json

    items = [featurize.featurize(e) for e in featurize.load_experiments(corpus)]
    model = evaluation.fit_model(featurize.training_frame(items), family)
    return json.loads(dumps_json(model.to_dict()))


def test_corrupt_trace_objects_are_skipped_and_reported(
        local_ray: None, prefect_api: str, s3_server: Any, s3_env: dict[str, str],
        workers: tuple[dict[str, str], Path]) -> None:
    import pandas as pd

    from blis_model.configuration.experiment import load_experiment
    from blis_model.releases.read import read_manifest
    from blis_model.releases.store import list_releases
    from flows.calibrate import run_calibration

    bucket = s3_server.make_bucket()
    corpus, store = f"s3://{bucket}/traces", f"s3://{bucket}/store"
    upload_sample(s3_server, bucket, "traces", EXPERIMENTS)
    half, garbage = EXPERIMENTS[1], EXPERIMENTS[2]
    raw = (SAMPLE / half / "traces.json.gz").read_bytes()
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key=f"traces/{half}/traces.json.gz",
                      Body=raw[: len(raw) // 2])  # a half-uploaded object
    client.put_object(Bucket=bucket, Key=f"traces/{garbage}/traces.json.gz",
                      Body=b"\x00not gzip" * 64)

    with worker_env(prefect_api, workers[0]):
        url = run_calibration(corpus, store, family="picf")

    assert [r["url"] for r in list_releases(store)] == [url]
    manifest = read_manifest(url)
    ingest = manifest["ingest"]
    assert ingest[half]["problems"][0].startswith(
        f"{half}/traces.json.gz:2: truncated compressed data")
    assert ingest[garbage]["problems"][0].startswith(
        f"{garbage}/traces.json.gz:1: corrupt compressed data")
    steps = {e["name"]: e["steps"] for e in manifest["experiments"]}
    assert steps[garbage] == 0 and 0 < steps[half] < 256
    assert steps[EXPERIMENTS[0]] == 123 and steps[EXPERIMENTS[3]] > 0  # the rest, whole
    # The steps kept from the half object are exactly those of its complete lines.
    kept = featurize.featurize(load_experiment(corpus, half)).frame
    whole = featurize.featurize(load_experiment(str(SAMPLE), half)).frame
    assert len(kept) == steps[half]
    columns = ["step_id", "duration_us"]
    merged = kept[columns].merge(whole[columns], on="step_id", suffixes=("", "_whole"))
    assert len(merged) == len(kept)
    pd.testing.assert_series_equal(merged["duration_us"], merged["duration_us_whole"],
                                   check_names=False)


def restart(server: Any) -> Any:
    """Start a stopped S3 server again: same data folder, ports and credentials."""
    import dataclasses
    import time

    with open(server.log_path, "ab") as log:
        process = subprocess.Popen(server.process.args, cwd=server.root,
                                   stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    again = dataclasses.replace(server, process=process)
    deadline = time.monotonic() + 60
    while True:
        try:  # ready = its objects read back (the volume server registers after the S3 API)
            client = again.client()
            for bucket in client.list_buckets().get("Buckets", []):
                listing = client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=1)
                for obj in listing.get("Contents", []):
                    client.get_object(Bucket=bucket["Name"], Key=obj["Key"])["Body"].read()
            return again
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                again.stop()
                raise
            time.sleep(0.2)


def stop_when(server: Any, ready: Any, stopped: Any, timeout: float = 120.0) -> None:
    """Stop ``server`` as soon as ``ready()`` is true (polled); then set ``stopped``."""
    import time

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if ready():
                server.stop()
                break
            time.sleep(0.05)
    finally:
        stopped.set()


def logs_of(task_run: Any) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run.id])))
    return [log.message for log in sorted(logs, key=lambda x: x.timestamp)]


def test_store_unreachable_mid_run_fails_cleanly_and_a_rerun_succeeds(
        local_ray: None, prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    import threading

    from blis_model.releases import channels
    from blis_model.releases.build import build_release, release_version
    from blis_model.releases.store import list_releases, publish
    from blis_model.storage import StorageError
    from deploy.s3_local import start_s3_server
    from flows.nightly import recalibrate

    server = start_s3_server(tmp_path / "s3")  # this test's own: it is stopped mid-run
    try:
        env = {**server.env, "AWS_MAX_ATTEMPTS": "1"}  # retries: the tasks' own
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        bucket = server.make_bucket()
        corpus, store = f"s3://{bucket}/traces", f"s3://{bucket}/store"
        upload_sample(server, bucket, "traces", EXPERIMENTS[:2])
        # The channels point at an earlier release.
        items = [featurize.featurize(e) for e in featurize.load_experiments(str(SAMPLE))[:1]]
        frame = featurize.training_frame(items)
        model = evaluation.fit_model(frame, "picf")
        files = build_release(model, frame, [i.experiment for i in items],
                              [i.report for i in items], str(SAMPLE),
                              evaluation.evaluate(frame, model, "picf"), "picf",
                              with_plots=False)
        earlier = release_version(files)
        publish(files, store, earlier)
        for channel in channels.CHANNELS:
            channels.promote(store, earlier, channel, by="test", skip_gate="test setup")
        pointers = {c: channels.read_channel(store, c).pointer for c in channels.CHANNELS}

        # The store goes away once both experiments are featurized (their feature cache
        # entries are written), before the release is published.
        client = server.client()

        def featurized() -> bool:
            listing = client.list_objects_v2(Bucket=bucket, Prefix="store/cache/features/")
            return listing.get("KeyCount", 0) == 2

        stopped = threading.Event()
        watcher = threading.Thread(target=stop_when, args=(server, featurized, stopped),
                                   daemon=True)
        watcher.start()
        with worker_env(prefect_api, env), pytest.raises(StorageError, match="cannot reach"):
            recalibrate(corpus, store, family="picf")
        assert stopped.wait(30) and server.process.poll() is not None
        [publish_run] = [r for r in task_runs_of_last("calibrate-corpus")
                         if r.name.startswith("publish-release")]
        assert publish_run.state.is_failed() and publish_run.run_count == 3
        retries = [m for m in logs_of(publish_run) if "Retry" in m]
        assert len(retries) == 2 and "Retry 1/2 will start 2 second(s)" in retries[0]
        assert "Retry 2/2 will start 4 second(s)" in retries[1]

        server = restart(server)
        # Nothing of the failed run is visible, or even left behind; channels unchanged.
        assert [r["version"] for r in list_releases(store)] == [earlier]
        keys = [o["Key"] for o in server.client().list_objects_v2(
            Bucket=bucket, Prefix="store/releases/").get("Contents", [])]
        assert keys and all(k.startswith(f"store/releases/{earlier}/") for k in keys)
        assert {c: channels.read_channel(store, c).pointer for c in channels.CHANNELS
                } == pointers

        with worker_env(prefect_api, env):
            url = recalibrate(corpus, store, family="picf")
        version = url.rstrip("/").rsplit("/", 1)[-1]
        assert [r["version"] for r in list_releases(store)] == [earlier, version]
        assert channels.read_channel(store, "candidate").pointer.version == version
        assert channels.read_channel(store, "stable").pointer == pointers["stable"]
    finally:
        server.stop()
