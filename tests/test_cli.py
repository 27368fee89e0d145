"""The ``blis-model`` CLI as users and scripts run it: a real subprocess of the installed
entry point, stdout for results, stderr for everything else."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from blis_model.calibration import featurize
from blis_model.cli import app
from blis_model.models.registry import FAMILIES
from blis_model.releases.read import load_release, predict_frame

SAMPLE = Path(__file__).resolve().parents[1] / "corpus" / "h100-real-steps"
SAMPLE_EXPERIMENTS = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
BIN = Path(sys.executable).parent / "blis-model"
HEADER = ["experiment", "step_id", "predicted_us"]


def run(*args: str, env: dict[str, str] | None = None, expect: int = 0
        ) -> subprocess.CompletedProcess[str]:
    """Run the CLI; without ``env`` overrides, AWS settings of the caller are dropped."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BLIS_S3"))}
    base.update({"OPENBLAS_NUM_THREADS": "1", "COLUMNS": "160"})
    proc = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=180,
                          env={**base, **(env or {})})
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def fitted_release(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, str]:
    """(release URL, store, stderr) of one ``fit`` of the sample corpus."""
    store = tmp_path_factory.mktemp("cli") / "store"
    proc = run("fit", str(SAMPLE), "--store", str(store))
    return last_line(proc.stdout), store, proc.stderr


def test_fit_prints_the_release_url_last_and_progress_on_stderr(
        fitted_release: tuple[str, Path, str]) -> None:
    url, store, stderr = fitted_release
    assert Path(url).parent == store / "releases"
    assert (Path(url) / "manifest.json").is_file() and (Path(url) / "defaults.yaml").is_file()
    assert "featurize" in stderr and "LOO MAPE" in stderr


def test_predict_writes_one_row_per_traced_step(fitted_release: tuple[str, Path, str],
                                                tmp_path: Path) -> None:
    url, _, _ = fitted_release
    out = tmp_path / "pred.csv"
    proc = run("predict", url, str(SAMPLE), "--out", str(out))
    assert last_line(proc.stdout) == str(out)
    assert out.read_text().splitlines()[0] == ",".join(HEADER)
    header, rows = read_csv(out)
    assert header == HEADER
    assert len(rows) == 791
    keys = [(r["experiment"], int(r["step_id"])) for r in rows]
    assert keys == sorted(keys) and len(set(keys)) == 791
    assert sorted({r["experiment"] for r in rows}) == SAMPLE_EXPERIMENTS
    predicted = np.array([float(r["predicted_us"]) for r in rows])
    assert np.isfinite(predicted).all() and (predicted > 0).all()
    # the CLI's numbers are the library's numbers for the same release
    items = [featurize.featurize(e) for e in featurize.load_experiments(str(SAMPLE))]
    frame = featurize.training_frame(items).sort_values(["experiment", "step_id"])
    np.testing.assert_allclose(predicted, predict_frame(load_release(url), frame), rtol=1e-12)


def test_predict_is_zero_shot_for_experiments_the_release_never_saw(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    for name in SAMPLE_EXPERIMENTS[:3]:
        shutil.copytree(SAMPLE / name, seen / name)
    url = last_line(run("fit", str(seen), "--store", str(tmp_path / "store")).stdout)
    out = tmp_path / "pred.csv"
    proc = run("predict", url, str(SAMPLE), "--out", str(out))
    _, rows = read_csv(out)
    assert len(rows) == 791
    unseen = [float(r["predicted_us"]) for r in rows if r["experiment"] == SAMPLE_EXPERIMENTS[3]]
    assert len(unseen) > 0 and all(np.isfinite(unseen)) and min(unseen) > 0
    assert "zero-shot" in proc.stderr


def test_fit_with_base_calibrates_a_published_release(fitted_release: tuple[str, Path, str],
                                                      tmp_path: Path) -> None:
    base, store, _ = fitted_release
    one = tmp_path / "one"
    shutil.copytree(SAMPLE / SAMPLE_EXPERIMENTS[1], one / SAMPLE_EXPERIMENTS[1])
    url = last_line(run("fit", str(one), "--store", str(store), "--base", base).stdout)
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    assert manifest["base_version"] == Path(base).name
    base_manifest = json.loads((Path(base) / "manifest.json").read_text())
    assert manifest["family"] == base_manifest["family"] and manifest["corpus"]["steps"] > 0


def test_fit_chooses_the_family_by_leave_one_out(fitted_release: tuple[str, Path, str]
                                                 ) -> None:
    url, _, _ = fitted_release
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    selection = manifest["metrics"]["family_selection"]
    scores = selection["scores"]
    assert selection["winner"] == manifest["family"] == scores[0]["family"]
    assert scores[0]["loo_mape"] == min(s["loo_mape"] for s in scores)
    assert len(scores) == len(FAMILIES) and manifest["family"] in selection["reason"]
    assert manifest["metrics"]["summary"]["loo_mape"] == pytest.approx(scores[0]["loo_mape"])


def invoke(*args: str, expect: int = 0):  # noqa: ANN201 - click Result
    """Run the CLI in-process (typer's runner keeps stdout and stderr apart)."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    return result


def test_releases_list_and_show(fitted_release: tuple[str, Path, str]) -> None:
    url, store, _ = fitted_release
    version = Path(url).name
    assert version in invoke("releases", "list", str(store)).stdout
    listed = json.loads(invoke("releases", "list", str(store), "--json").stdout)
    assert version in [r["version"] for r in listed]
    entry = next(r for r in listed if r["version"] == version)
    family = json.loads((Path(url) / "manifest.json").read_text())["family"]
    assert entry["family"] == family and entry["url"] == url and entry["loo_mape"] > 0
    human = invoke("releases", "show", url).stdout
    assert version in human and all(name in human for name in SAMPLE_EXPERIMENTS)
    shown = json.loads(invoke("releases", "show", url, "--json").stdout)
    assert shown == json.loads((Path(url) / "manifest.json").read_text())


def test_errors_are_one_line_with_exit_code_1(fitted_release: tuple[str, Path, str],
                                              tmp_path: Path) -> None:
    _, store, _ = fitted_release
    result = invoke("predict", str(store), str(SAMPLE), "--out", str(tmp_path / "p.csv"),
                    expect=1)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "is a release store" in lines[0] and "releases list" in lines[0]
    assert result.stdout == "" and not (tmp_path / "p.csv").exists()
    invoke("releases", "show", str(tmp_path / "missing"), expect=1)
    invoke("fit", str(SAMPLE), expect=2)  # usage error: --store is required


def test_cli_does_not_import_prefect_or_ray() -> None:
    code = ("import sys, blis_model.cli; "
            "bad = [m for m in ('prefect', 'ray') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_cli_starts_without_the_model_families_or_plotting() -> None:
    """`releases list/history/promote` stay fast: the CLI imports pandas, scikit-learn,
    matplotlib and the families only in the commands that need them."""
    heavy = ("pandas", "sklearn", "matplotlib", "scipy", "blis_model.models.registry")
    code = ("import sys, blis_model.cli; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout


def test_help_names_every_family() -> None:
    from blis_model.cli import AUTO_FAMILY as CLI_AUTO
    from blis_model.cli import FAMILY_NAMES
    from blis_model.models.registry import AUTO_FAMILY

    assert tuple(sorted(FAMILIES)) == FAMILY_NAMES and CLI_AUTO == AUTO_FAMILY


def test_upload_puts_an_experiment_under_the_watched_prefix(tmp_path: Path) -> None:
    from blis_model.ingest.uploads import scan

    prefix = tmp_path / "traces"
    folders = [str(SAMPLE / name) for name in SAMPLE_EXPERIMENTS[:2]]
    proc = run("upload", *folders, "--to", str(prefix))
    assert proc.stdout.split() == [str(prefix / n) for n in SAMPLE_EXPERIMENTS[:2]]
    assert sorted(scan(str(prefix))) == SAMPLE_EXPERIMENTS[:2]
    for name in SAMPLE_EXPERIMENTS[:2]:
        assert sorted(p.name for p in (prefix / name).iterdir()) == sorted(
            p.name for p in (SAMPLE / name).iterdir())
    # $BLIS_CORPUS is the default destination; a folder that is no experiment is refused.
    run("upload", folders[0], env={"BLIS_CORPUS": str(tmp_path / "other")})
    assert (tmp_path / "other" / SAMPLE_EXPERIMENTS[0] / "exp-config.yaml").is_file()
    bad = run("upload", str(tmp_path), "--to", str(prefix), expect=1)
    assert bad.stderr.startswith("error: ") and "not an experiment folder" in bad.stderr
    broken = tmp_path / "broken"
    shutil.copytree(SAMPLE / SAMPLE_EXPERIMENTS[0], broken)
    (broken / "exp-config.yaml").write_text("model: no/such-model\nhardware: H100\n")
    refused = run("upload", str(broken), "--to", str(prefix), expect=1)
    assert "broken" in refused.stderr and not (prefix / "broken").exists()


def test_upload_writes_the_experiment_config_last(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The sensor recognises an experiment by its exp-config.yaml: it must arrive last."""
    from blis_model.ingest import uploads

    order: list[str] = []
    real = uploads.filesystem

    def recording(url, options=None):  # noqa: ANN001, ANN202
        fs, path = real(url, options)
        put = fs.put_file

        def put_file(src, dst, **kw):  # noqa: ANN001, ANN202, ANN003
            order.append(Path(dst).name)
            return put(src, dst, **kw)

        monkeypatch.setattr(fs, "put_file", put_file)
        return fs, path

    monkeypatch.setattr(uploads, "filesystem", recording)
    uploads.upload_experiment(str(SAMPLE / SAMPLE_EXPERIMENTS[0]), str(tmp_path / "t"))
    assert order[-1] == "exp-config.yaml" and len(order) >= 2


def test_blis_s3_credentials_leave_the_shells_aws_credentials_alone(monkeypatch) -> None:  # noqa: ANN001
    from blis_model.storage import storage_options_for

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUSERSOWNKEY00000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "user-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "user-token")
    monkeypatch.delenv("BLIS_S3_ENDPOINT_URL", raising=False)
    opts = storage_options_for("s3://b/x")
    assert (opts["key"], opts["token"]) == ("AKIAUSERSOWNKEY00000", "user-token")
    monkeypatch.setenv("BLIS_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("BLIS_S3_ACCESS_KEY_ID", "AKIALOCALSTACK000000")
    monkeypatch.setenv("BLIS_S3_SECRET_ACCESS_KEY", "stack-secret")
    monkeypatch.setenv("BLIS_S3_REGION", "us-east-1")
    opts = storage_options_for("s3://b/x")
    assert (opts["key"], opts["secret"]) == ("AKIALOCALSTACK000000", "stack-secret")
    assert "token" not in opts and opts["client_kwargs"] == {
        "endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"}


@pytest.mark.services
def test_s3_end_to_end_without_leaking_credentials(s3_server, tmp_path: Path) -> None:  # noqa: ANN001
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    for path in SAMPLE.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"corpus/{path.relative_to(SAMPLE).as_posix()}")
    env = s3_server.env
    fit = run("fit", f"s3://{bucket}/corpus", "--store", f"s3://{bucket}/store", env=env)
    url = last_line(fit.stdout)
    assert url.startswith(f"s3://{bucket}/store/releases/")
    out = tmp_path / "pred.csv"
    pred = run("predict", url, f"s3://{bucket}/corpus", "--out", str(out), env=env)
    header, rows = read_csv(out)
    assert header == HEADER and len(rows) == 791
    listed = run("releases", "list", f"s3://{bucket}/store", "--json", env=env)
    assert [r["url"] for r in json.loads(listed.stdout)] == [url]
    shown = run("releases", "show", url, env=env)
    assert Path(url).name in shown.stdout
    key = url.split(f"s3://{bucket}/", 1)[1]
    manifest = client.get_object(Bucket=bucket, Key=f"{key}/manifest.json")["Body"].read()
    assert json.loads(manifest)["corpus"]["url"] == f"s3://{bucket}/corpus"
    denied = run("fit", f"s3://{bucket}/corpus", "--store", f"s3://{bucket}/store2",
                 env={**env, "AWS_SECRET_ACCESS_KEY": "Zz" + s3_server.secret_key[2:]}, expect=1)
    assert denied.stderr.startswith("error: ") and len(denied.stderr.splitlines()) == 1
    for text in (fit.stdout, fit.stderr, pred.stdout, pred.stderr, listed.stdout, shown.stdout,
                 denied.stderr, manifest.decode()):
        assert s3_server.secret_key not in text
        assert s3_server.secret_key[2:] not in text
