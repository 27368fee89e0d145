"""Release channels: compare-and-swap pointers, the golden gate, history, rollback and the
``releases`` commands — on a local store and on the real S3 server."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blis_model.calibration import evaluation as evaluations
from blis_model.calibration import featurize as featurization
from blis_model.calibration.gate import GoldenSet, compare_releases
from blis_model.cli import app
from blis_model.errors import ReleaseError
from blis_model.releases import channels
from blis_model.releases.build import build_release, release_version
from blis_model.releases.channels import ChannelConflict, GateRefused, GateRequired
from blis_model.releases.diff import diff_releases
from blis_model.releases.store import list_releases, publish
from blis_model.storage.layout import release_url

SAMPLE = Path(__file__).resolve().parents[1] / "corpus" / "h100-real-steps"


@dataclass(frozen=True)
class Built:
    good: dict[str, bytes]  # fit on the whole sample corpus
    bad: dict[str, bytes]  # fit on one experiment only: worse on the others
    gate: channels.Gate  # the golden gate on the sample corpus
    rebuild: Callable[[], dict[str, bytes]]  # the good release again, with a new version

    @property
    def versions(self) -> tuple[str, str]:
        return release_version(self.good), release_version(self.bad)


@pytest.fixture(scope="module")
def built() -> Built:
    experiments = featurization.load_experiments(str(SAMPLE))
    items = [featurization.featurize(e) for e in experiments]
    frame = featurization.training_frame(items)
    builders = []
    for keep in (experiments, experiments[:1]):
        names = {e.name for e in keep}
        part = frame[frame["experiment"].isin(names)].reset_index(drop=True)
        model = evaluations.fit_model(part, "picf")
        evaluation = evaluations.evaluate(part, model, "picf")
        reports = [i.report for i in items if i.experiment.name in names]
        builders.append(functools.partial(build_release, model, part, keep, reports,
                                          str(SAMPLE), evaluation, "picf"))
    gate = functools.partial(compare_releases, golden=GoldenSet(str(SAMPLE), frame))
    return Built(builders[0](), builders[1](), gate, builders[0])


def fill(store: str, built: Built, options: dict | None = None) -> tuple[str, str]:
    for files in (built.good, built.bad):
        publish(files, store, release_version(files), options)
    return built.versions


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A local store, or one on the real S3 server (AWS_* env set for the test)."""
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    request.getfixturevalue("s3_env")
    return f"s3://{server.make_bucket()}/store"


def invoke(*args: str, expect: int = 0):  # noqa: ANN201 - click Result
    result = CliRunner().invoke(app, list(args), env={"BLIS_GOLDEN": None})
    assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    return result


def test_promote_gate_rollback_and_history(store: str, built: Built) -> None:
    good, bad = fill(store, built)
    assert channels.read_channel(store, "stable").pointer is None

    first = channels.promote(store, good, "stable", by="alice", reason="first release",
                             gate=built.gate)
    assert (first.version, first.previous, first.seq, first.by) == (good, None, 1, "alice")
    assert first.gate["passed"] and first.gate["baseline"] is None

    with pytest.raises(GateRefused, match=r"worse than .* by more than 1 percentage point"):
        channels.promote(store, bad, "stable", by="bob", reason="try", gate=built.gate,
                         run={"flow_run_id": "r1", "flow_run_name": "brave-fox"})
    assert channels.read_channel(store, "stable").pointer == first  # unchanged

    # stable moves without a gate only with a reason to skip it, which is recorded.
    with pytest.raises(GateRequired, match="needs the golden gate"):
        channels.promote(store, bad, "stable", by="bob", reason="forced, no gate")
    with pytest.raises(GateRequired):
        channels.promote(store, bad, "stable", by="bob", skip_gate="   ")
    assert channels.read_channel(store, "stable").pointer == first
    moved = channels.promote(store, bad, "stable", by="bob", reason="forced, no gate",
                             skip_gate="golden corpus being rebuilt")
    assert (moved.version, moved.previous, moved.seq) == (bad, good, 2)
    assert (moved.gate, moved.gate_skipped) == (None, "golden corpus being rebuilt")
    with pytest.raises(ReleaseError, match="already points to"):
        channels.promote(store, bad, "stable", gate=built.gate)

    back = channels.rollback(store, "stable", by="carol", reason="regression")
    assert (back.version, back.previous, back.action) == (good, None, "rollback")
    with pytest.raises(ReleaseError, match="no previous version"):
        channels.rollback(store, "stable")

    events = channels.history(store, "stable")
    assert [(e.seq, e.action, e.version, e.by, e.reason) for e in events] == [
        (1, "promote", good, "alice", "first release"),
        (1, "refused", bad, "bob", "try"),
        (2, "promote", bad, "bob", "forced, no gate"),
        (3, "rollback", good, "carol", "regression")]
    refused = events[1]
    assert refused.previous == good and not refused.gate["passed"]
    assert "worse than" in refused.gate["reasons"][0]
    assert refused.run == {"flow_run_id": "r1", "flow_run_name": "brave-fox"}
    assert events[2].gate_skipped == "golden corpus being rebuilt"
    assert all(e.updated_at.endswith("Z") for e in events)
    assert channels.list_channels(store) == {"stable": back}


def test_concurrent_updates_exactly_one_wins(store: str, built: Built) -> None:
    good, bad = fill(store, built)
    channels.promote(store, good, "candidate")
    snapshot = channels.read_channel(store, "candidate")
    barrier = threading.Barrier(6)
    outcomes: list[object] = []

    def contender(i: int) -> None:
        barrier.wait()
        try:
            outcomes.append(channels.write_channel(store, "candidate", bad, snapshot,
                                                   by=f"writer-{i}"))
        except ChannelConflict as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [o for o in outcomes if isinstance(o, channels.Pointer)]
    losers = [o for o in outcomes if isinstance(o, ChannelConflict)]
    assert len(winners) == 1 and len(losers) == 5, outcomes
    assert "moved by someone else" in str(losers[0]) and "nothing was changed" in str(losers[0])
    assert channels.read_channel(store, "candidate").pointer == winners[0]
    assert [e.by for e in channels.history(store, "candidate")][-1] == winners[0].by

    # A first-time creation races the same way.
    empty = channels.read_channel(store, "nightly")
    channels.write_channel(store, "nightly", good, empty)
    with pytest.raises(ChannelConflict):
        channels.write_channel(store, "nightly", bad, empty)


def test_diff_shows_coefficient_and_metric_changes(store: str, built: Built) -> None:
    good, bad = fill(store, built)
    diff = diff_releases(release_url(store, good), release_url(store, bad))
    assert (diff["a"]["version"], diff["b"]["version"]) == (good, bad)
    names = {row["name"] for row in diff["coefficients"]}
    assert "model.global.step_overhead" in names and "blis.beta.0" in names
    assert any(row["name"] == "summary.in_sample_mape" for row in diff["metrics"])
    assert diff_releases(release_url(store, good), release_url(store, good))["coefficients"] == []


def test_cli_promote_list_diff_rollback(store: str, built: Built) -> None:
    good, bad = fill(store, built)
    out = invoke("releases", "promote", store, good, "--channel", "stable", "--reason", "ok",
                 "--golden", str(SAMPLE)).stdout
    assert out.strip() == f"stable → {good}"
    refused = invoke("releases", "promote", store, bad, "--golden", str(SAMPLE), expect=1)
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "refused by the golden gate" in lines[0]
    invoke("releases", "promote", store, bad, "--channel", "candidate")  # not gated

    listed = json.loads(invoke("releases", "list", store, "--json").stdout)
    assert {r["version"]: r["channels"] for r in listed} == {good: ["stable"],
                                                             bad: ["candidate"]}
    out = invoke("releases", "list", store).stdout  # the channel lines are results too
    assert f"stable → {good}" in out and f"candidate → {bad}" in out

    diff = invoke("releases", "diff", release_url(store, good), release_url(store, bad)).stdout
    assert "coefficient changes" in diff and "model.global.step_overhead" in diff

    # stable without a gate: refused unless --no-gate with a reason (recorded).
    ungated = invoke("releases", "promote", store, bad, "--by", "ci", expect=1).stderr
    assert "needs the golden gate" in ungated and "--no-gate" in ungated
    no_reason = invoke("releases", "promote", store, bad, "--no-gate", expect=1).stderr
    assert "--no-gate needs --reason" in no_reason
    invoke("releases", "promote", store, bad, "--channel", "stable", "--by", "ci", "--no-gate",
           "--reason", "hotfix, golden corpus down")
    back = json.loads(invoke("releases", "rollback", store, "--json").stdout)
    assert back["version"] == good and back["action"] == "rollback"
    hist = json.loads(invoke("releases", "history", store, "--channel", "stable",
                             "--json").stdout)
    assert [(h["action"], h["version"]) for h in hist] == [
        ("promote", good), ("refused", bad), ("promote", bad), ("rollback", good)]
    assert hist[0]["gate"]["passed"] and hist[2]["by"] == "ci"
    assert hist[2]["gate_skipped"] == "hotfix, golden corpus down"
    table = invoke("releases", "history", store, "--channel", "stable").stdout
    assert "gate skipped: hotfix, golden corpus down by ci" in " ".join(table.split())
    assert "refused:" in table and "passed:" in table
    invoke("releases", "promote", store, "20990101T000000Z-00000000", "--golden", str(SAMPLE),
           expect=1)


RACER = """
import os, sys, time
from blis_model.releases import channels
store, version, go, name = sys.argv[1:5]
snapshot = channels.read_channel(store, "stable")
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
try:
    channels.write_channel(store, "stable", version, snapshot, by=name)
    print("won", flush=True)
except channels.ChannelConflict as exc:
    print("lost", exc, flush=True)
"""


def test_two_processes_promoting_at_once_one_loses_cleanly(tmp_path: Path, built: Built
                                                          ) -> None:
    import subprocess
    import sys

    store = str(tmp_path / "store")
    good, bad = fill(store, built)
    channels.promote(store, good, "stable", skip_gate="test setup")
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, store, bad, str(go), f"p{i}"],
                               stdout=subprocess.PIPE, text=True) for i in range(2)]
    for proc in racers:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    results = sorted(proc.communicate(timeout=60)[0].strip() for proc in racers)
    assert results[0] == "lost channel stable was moved by someone else while this update " \
                         f"was prepared (it was {good} when read); nothing was changed: " \
                         "re-read the channel and try again"
    assert results[1] == "won"
    assert [e.version for e in channels.history(store, "stable")] == [good, bad]



def test_an_unreachable_store_is_one_clear_error(built: Built) -> None:
    from blis_model.storage import StorageError
    from deploy.s3_local import free_ports

    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    options = {"key": "AKIAEXAMPLEEXAMPLE00", "secret": "Aa" + "x" * 38,
               "client_kwargs": {"endpoint_url": dead, "region_name": "us-east-1"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    version = built.versions[0]
    with pytest.raises(StorageError, match=f"cannot reach endpoint {dead}") as info:
        channels.promote("s3://bucket/store", version, "candidate", options=options)
    assert "xxxx" not in str(info.value)


def test_concurrent_calibrations_each_publish_their_own_release(store: str, built: Built
                                                                ) -> None:
    releases = [built.rebuild() for _ in range(4)]  # same second: versions differ by suffix
    barrier = threading.Barrier(len(releases))
    urls: list[str] = []

    def publisher(files: dict[str, bytes]) -> None:
        barrier.wait()
        urls.append(publish(files, store, release_version(files)))

    threads = [threading.Thread(target=publisher, args=(f,)) for f in releases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(r["url"] for r in list_releases(store)) == sorted(urls)
    assert len(set(urls)) == 4
