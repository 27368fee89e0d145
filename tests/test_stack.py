"""The local stack as a new user runs it (``make serve`` / ``make stop``), end to end:
start it, upload experiments with the documented command, let the sensor and the
on-upload recalibration make a candidate, promote it through the API the UI's Run form
uses (and once through the form itself, in a real browser), see a refusal, restart, stop.

Everything is real and bound to 127.0.0.1: PostgreSQL (Prefect's database), the Prefect
server and UI, SeaweedFS S3, a Ray head and the served deployments, in their own
processes, started by ``python -m deploy.stack`` in a temporary ``BLIS_RUN_DIR``.

The browser test drives Debian's Chromium (``make stack-deps`` installs it as root) with
Playwright; it skips, saying why, only where Chromium cannot be installed (not root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from deploy.s3_local import free_ports

pytestmark = [pytest.mark.services, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "corpus" / "h100-real-steps"
EXPERIMENTS = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
PY = sys.executable
CLI = str(Path(sys.executable).parent / "blis-model")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@dataclass
class Stack:
    run_dir: Path
    env: dict[str, str]  # the environment of a user who sourced .run/env
    api: str
    ui: str
    timings: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def store(self) -> str:
        return self.env["BLIS_STORE"]


def clean_env(**extra: str) -> dict[str, str]:
    """A shell's environment without AWS, BLIS or Prefect settings (a new user's)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "BLIS_", "PREFECT_"))}
    env.update({"OPENBLAS_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "AWS_EC2_METADATA_DISABLED": "true",
                "COLUMNS": "400", **extra})
    return env


def read_env_file(path: Path) -> dict[str, str]:
    import shlex

    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


def stack_cmd(run_dir: Path, action: str, **extra: str) -> tuple[float, str]:
    """``python -m deploy.stack <action>``; (seconds, output)."""
    started = time.monotonic()
    proc = subprocess.run([PY, "-m", "deploy.stack", action], cwd=ROOT, capture_output=True,
                          text=True, timeout=400,
                          env=clean_env(BLIS_RUN_DIR=str(run_dir), **extra))
    took = time.monotonic() - started
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return took, proc.stdout


def cli(stack: Stack, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """The blis-model CLI in a shell that sourced ``.run/env``."""
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300,
                          env={**clean_env(), **stack.env})
    assert proc.returncode == expect, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc


def api(stack: Stack, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{stack.api}{path}", data=data,
                                 method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - 127.0.0.1
        return json.loads(resp.read())


def poll(what: str, fn: Callable[[], Any], timeout: float = 240.0, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def deployment(stack: Stack, name: str) -> dict[str, Any]:
    return api(stack, f"/deployments/name/{name}")


def runs_of(stack: Stack, name: str) -> list[dict[str, Any]]:
    return api(stack, "/flow_runs/filter",
               {"deployments": {"id": {"any_": [deployment(stack, name)["id"]]}}})


def submit(stack: Stack, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """What the UI's Run form does: POST a flow run of the deployment."""
    return api(stack, f"/deployments/{deployment(stack, name)['id']}/create_flow_run",
               {"parameters": parameters})


def finished(stack: Stack, run: dict[str, Any], timeout: float = 240.0) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        state = api(stack, f"/flow_runs/{run['id']}")["state"]
        return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") \
            else None

    return poll(f"flow run {run['name']}", final, timeout)


def history(stack: Stack, channel: str) -> list[dict[str, Any]]:
    return json.loads(cli(stack, "releases", "history", stack.store, "--channel", channel,
                          "--json").stdout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("stack") / ".run"
    settings = {"BLIS_PREFECT_PORT": str(free_ports(1)[0]), "BLIS_WATCH_INTERVAL_S": "5",
                "BLIS_WATCH_SETTLE_S": "2"}
    took, out = stack_cmd(run_dir, "start", **settings)
    env = read_env_file(run_dir / "env")
    state = json.loads((run_dir / "stack.json").read_text())
    s = Stack(run_dir, env, state["urls"]["prefect_api"], state["urls"]["prefect_ui"])
    s.timings["ready_fresh_s"] = took
    s.facts.update(start_output=out, settings=settings, state=state)
    try:
        yield s
    finally:
        if (run_dir / "stack.json").exists():
            stack_cmd(run_dir, "stop", BLIS_STOP_GRACE_S="30")
        print(f"\nstack timings: {json.dumps(s.timings)}")  # noqa: T201 - measured numbers


def test_a_fresh_stack_is_ready_safe_and_quiet(stack: Stack) -> None:
    out = stack.facts["start_output"]
    assert "ready in" in out and "promotion       golden gate on s3://blis/golden" in out
    # .run/env: blis-model's own S3 names and the Prefect API, never AWS_* (a user's own).
    assert not [k for k in stack.env if k.startswith("AWS_")]
    assert {"BLIS_S3_ENDPOINT_URL", "BLIS_S3_ACCESS_KEY_ID", "BLIS_S3_SECRET_ACCESS_KEY",
            "BLIS_STORE", "BLIS_CORPUS", "BLIS_GOLDEN", "PREFECT_API_URL"} <= set(stack.env)
    assert oct((stack.run_dir / "env").stat().st_mode & 0o777) == "0o600"
    if os.geteuid() == 0:  # make stack-deps installed PostgreSQL: no SQLite locking
        assert "PostgreSQL" in stack.facts["state"]["services"]["prefect"]["database"]
    # Ready means ready: every deployment registered with its parameters, un-paused, polled.
    for name in ("recalibrate/nightly", "recalibrate/on-upload", "watch-uploads/sensor",
                 "promote/promote"):
        d = deployment(stack, name)
        assert (d["paused"], d["status"]) == (False, "READY"), name
    promote = deployment(stack, "promote/promote")
    assert promote["parameters"]["golden"] == stack.env["BLIS_GOLDEN"] == "s3://blis/golden"
    # The sensor on a prefix nothing was uploaded to yet: Completed, "0 experiments".
    first = poll("a finished sensor run", lambda: [
        r for r in runs_of(stack, "watch-uploads/sensor") if r["state"]["type"] == "COMPLETED"])
    assert first[0]["state"]["message"].startswith("0 experiments under s3://blis/traces")
    assert not [r for r in runs_of(stack, "watch-uploads/sensor")
                if r["state"]["type"] in ("FAILED", "CRASHED")]


def test_upload_recalibrate_promote_refuse_as_documented(stack: Stack) -> None:
    # Upload with the documented command, through the same storage layer.
    started = time.monotonic()
    out = cli(stack, "upload", *(str(SAMPLE / n) for n in EXPERIMENTS[:3])).stdout
    assert out.split() == [f"s3://blis/traces/{n}" for n in EXPERIMENTS[:3]]
    candidate = poll("the candidate", lambda: history(stack, "candidate"), timeout=420,
                     every=2.0)[-1]
    stack.timings["upload_to_candidate_s"] = time.monotonic() - started
    assert candidate["reason"] == f"upload of {', '.join(EXPERIMENTS[:3])}"
    assert candidate["run"]["deployment_name"] == "recalibrate/on-upload"
    version = candidate["version"]

    # Promote it as the UI's form does: version + reviewer; the golden gate runs by default.
    run = submit(stack, "promote/promote", {"version": version, "reviewer": "erin",
                                             "reason": "first stable"})
    state = finished(stack, run)
    assert state["type"] == "COMPLETED", state
    [moved] = history(stack, "stable")
    assert (moved["version"], moved["by"], moved["reason"]) == (version, "erin", "first stable")
    assert moved["gate"]["passed"] and moved["gate"]["corpus"] == "s3://blis/golden"
    assert moved["run"]["flow_run_id"] == run["id"]
    assert moved["run"]["deployment_id"] == deployment(stack, "promote/promote")["id"]
    stack.facts["promoted_run"] = run

    # A worse release is refused: an expected outcome, recorded, not a crash.
    worse = publish_worse_release(stack)
    stack.facts["worse"] = worse
    run = submit(stack, "promote/promote", {"version": worse, "reviewer": "frank"})
    state = finished(stack, run)
    assert (state["type"], state["name"]) == ("COMPLETED", "Refused"), state
    assert "refused by the golden gate" in state["message"]
    events = history(stack, "stable")
    assert [(e["action"], e["version"], e["by"]) for e in events] == [
        ("promote", version, "erin"), ("refused", worse, "frank")]
    assert "worse than" in events[1]["gate"]["reasons"][0]
    assert events[1]["run"]["flow_run_id"] == run["id"]
    stack.facts["refused_run"] = run
    table = " ".join(cli(stack, "releases", "history", stack.store).stdout.split())
    assert f"frank via flow run {run['name']}" in table and "refused:" in table

    listed = cli(stack, "releases", "list", stack.store)
    assert f"stable → {version}" in listed.stdout and listed.stderr == ""


def publish_worse_release(stack: Stack) -> str:
    """A release fit on one experiment only, published to the stack's store."""
    from blis_model.calibration import evaluation, featurize
    from blis_model.releases.build import build_release, release_version
    from blis_model.releases.store import publish

    experiments = featurize.load_experiments(str(SAMPLE))[:1]
    items = [featurize.featurize(e) for e in experiments]
    frame = featurize.training_frame(items)
    model = evaluation.fit_model(frame, "picf")
    files = build_release(model, frame, experiments, [i.report for i in items], str(SAMPLE),
                          evaluation.evaluate(frame, model, "picf"), "picf", with_plots=False)
    options = {"key": stack.env["BLIS_S3_ACCESS_KEY_ID"],
               "secret": stack.env["BLIS_S3_SECRET_ACCESS_KEY"],
               "client_kwargs": {"endpoint_url": stack.env["BLIS_S3_ENDPOINT_URL"],
                                 "region_name": stack.env["BLIS_S3_REGION"]}}
    version = release_version(files)
    publish(files, stack.store, version, options)
    return version


def test_concurrent_submissions_all_land(stack: Stack) -> None:
    """Several runs created at once (two on-upload runs, a UI submit during a sensor run)
    all land: the stack's database serialises nothing into "database is locked"."""
    results: list[Any] = []

    def one() -> None:
        try:
            results.append(submit(stack, "watch-uploads/sensor", {}))
        except Exception as exc:  # noqa: BLE001 - reported below
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 6 and all(isinstance(r, dict) for r in results), results
    log = "".join(p.read_text(errors="replace") for p in stack.run_dir.glob("*.log"))
    assert "database is locked" not in log
    for run in results:  # (the sensor deployment runs one at a time: no need to wait)
        req = urllib.request.Request(f"{stack.api}/flow_runs/{run['id']}", method="DELETE")
        urllib.request.urlopen(req, timeout=30).close()  # noqa: S310 - 127.0.0.1


def test_restart_is_ready_only_when_really_ready_and_stop_is_graceful(stack: Stack) -> None:
    ports = json.loads((stack.run_dir / "ports.json").read_text())
    took, out = stack_cmd(stack.run_dir, "stop")
    stack.timings["stop_s"] = took
    assert "stopped in" in out and not (stack.run_dir / "stack.json").exists()
    # Restart with a changed setting: ready only once the deployments show it, un-paused.
    settings = {**stack.facts["settings"], "BLIS_WATCH_SETTLE_S": "3"}
    took, out = stack_cmd(stack.run_dir, "start", **settings)
    stack.timings["ready_restart_s"] = took
    sensor = deployment(stack, "watch-uploads/sensor")
    assert sensor["parameters"]["settle_s"] == 3.0
    for name in ("recalibrate/nightly", "recalibrate/on-upload", "watch-uploads/sensor",
                 "promote/promote"):
        d = deployment(stack, name)
        assert (d["paused"], d["status"]) == (False, "READY"), name
    # Same S3 port and keys: a shell that sourced .run/env before still works.
    assert json.loads((stack.run_dir / "ports.json").read_text())["s3"] == ports["s3"]
    assert read_env_file(stack.run_dir / "env") == stack.env
    assert cli(stack, "releases", "list", stack.store, "--json").stdout.strip() != "[]"
    # Stopping let runs in flight finish: none was cancelled or crashed.
    broken = api(stack, "/flow_runs/filter", {"flow_runs": {"state": {"type": {
        "any_": ["CANCELLED", "CRASHED", "FAILED"]}}}})
    assert broken == [], [(r["name"], r["state"]) for r in broken]


# ---------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (never `playwright install`)."""
    if not os.path.exists(CHROMIUM):
        if os.geteuid() == 0:
            pytest.fail(f"{CHROMIUM} is missing although this runs as root: `make "
                        "stack-deps` installs it (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is not installed and cannot be without root "
                    "(apt-get install chromium): the browser test needs it")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="blis-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def artifact_of(stack: Stack, key: str, flow_run_id: str | None = None,
                contains: str = "") -> dict[str, Any]:
    found = api(stack, "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}},
                                             "sort": "CREATED_DESC"})
    found = [a for a in found if (flow_run_id is None or a["flow_run_id"] == flow_run_id)
             and contains in (a.get("description") or "")]
    assert found, f"no artifact {key}"
    return found[0]


def loaded_images(page: Any) -> list[dict[str, Any]]:
    return page.eval_on_selector_all(
        "img[src^='data:image/png']",
        "els => els.map(e => ({w: e.naturalWidth, h: e.naturalHeight, done: e.complete}))")


def all_loaded(images: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The images when every one is decoded (a broken image has naturalWidth 0)."""
    return images if images and all(i["done"] and i["w"] > 0 for i in images) else None


def test_reviewer_reads_artifacts_and_promotes_from_the_form_in_a_browser(
        stack: Stack, browser: Any) -> None:
    page = browser.new_page()
    candidate = history(stack, "candidate")[-1]["version"]

    # The release's plots and model card render as images in the UI.
    for key, least in (("blis-plots", 3), ("blis-model-card", 1)):
        art = artifact_of(stack, key, contains=candidate)
        page.goto(f"{stack.ui}/artifacts/artifact/{art['id']}", wait_until="networkidle")
        page.wait_for_function(
            f"document.querySelectorAll(\"img[src^='data:image/png']\").length >= {least}")
        images = poll(f"{key}'s images to load", lambda: all_loaded(loaded_images(page)),
                      timeout=30, every=0.5)
        assert len(images) >= least and all(i["w"] >= 200 and i["h"] >= 100 for i in images)
    metrics = artifact_of(stack, "blis-metrics", contains=candidate)
    page.goto(f"{stack.ui}/artifacts/artifact/{metrics['id']}", wait_until="networkidle")
    page.get_by_text("BLIS proj. %").wait_for()
    assert page.get_by_text("mean over experiments").count() >= 1

    # The gate's verdict is shown on the promotion runs: passed, then refused.
    for run_key, verdict in (("promoted_run", "passed"), ("refused_run", "REFUSED")):
        run = stack.facts[run_key]
        gate = artifact_of(stack, "blis-promotion-gate", flow_run_id=run["id"])
        page.goto(f"{stack.ui}/artifacts/artifact/{gate['id']}", wait_until="networkidle")
        page.get_by_text(f"Promotion gate: {verdict}").wait_for()
        assert page.get_by_text("candidate MAPE %").count() >= 1
    page.goto(f"{stack.ui}/runs/flow-run/{stack.facts['refused_run']['id']}",
              wait_until="networkidle")
    page.get_by_text("Refused", exact=True).first.wait_for()

    # The promote form: every field described, the golden corpus filled in; submit it.
    promote = deployment(stack, "promote/promote")
    page.goto(f"{stack.ui}/deployments/deployment/{promote['id']}/run",
              wait_until="networkidle")
    page.get_by_text("Your name. Required").wait_for()
    body = page.inner_text("body")
    for field_name in ("version", "reviewer", "skip_gate", "skip_gate_reason", "golden"):
        assert field_name in body
    assert "Promote WITHOUT the golden gate" in body
    areas = page.locator("textarea")
    values = [areas.nth(i).input_value() for i in range(areas.count())]
    assert "s3://blis/golden" in values
    areas.nth(0).fill(stack.facts["worse"])
    areas.nth(1).fill("grace")
    areas.nth(2).fill("candidate")  # the candidate channel: not gated
    page.get_by_role("button", name="Submit").click()
    run = poll("the form's flow run", lambda: [
        r for r in runs_of(stack, "promote/promote")
        if r["parameters"].get("reviewer") == "grace"], timeout=60)[0]
    assert finished(stack, run)["type"] == "COMPLETED"
    moved = history(stack, "candidate")[-1]
    assert (moved["version"], moved["by"]) == (stack.facts["worse"], "grace")
    assert moved["run"]["flow_run_id"] == run["id"]
    page.close()
