"""Bad input, end to end through the CLI: what is skipped and counted, and what stops the
run with one clear line (experiment, file, key) and a non-zero exit, never a release."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from builders import (
    MALFORMED_LINE,
    UNSET,
    ExperimentSpec,
    Step,
    step_lines,
    synthetic_steps,
    truncate_file,
    write_corpus,
)
from typer.testing import CliRunner

from blis_model.cli import app
from blis_model.configuration.hardware import known_hardware

runner = CliRunner()


def cli(*args: str, expect: int = 0):  # noqa: ANN201 - click Result
    result = runner.invoke(app, list(args))
    assert result.exit_code == expect, (result.exit_code, result.stdout, result.stderr,
                                        result.exception)
    assert "Traceback" not in result.stderr
    return result


def fit(corpus: Path, store: Path, *extra: str, expect: int = 0):  # noqa: ANN201
    return cli("fit", str(corpus), "--store", str(store), *extra, expect=expect)


def manifest_of(result) -> dict:  # noqa: ANN001
    url = result.stdout.strip().splitlines()[-1]
    return json.loads((Path(url) / "manifest.json").read_text())


def single_error(result) -> str:  # noqa: ANN001
    """The one error line of a failed run (progress output may precede it)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert result.stdout == ""
    return errors[0]


def assert_no_release(store: Path) -> None:
    releases = store / "releases"
    assert not releases.exists() or not any(releases.iterdir())


def healthy(seed: int = 1, n: int = 40) -> ExperimentSpec:
    return ExperimentSpec(steps=synthetic_steps(n, seed=seed))


# ----------------------------------------------------------- skipped and counted


def test_malformed_json_line_is_reported_skipped_and_counted(tmp_path: Path) -> None:
    steps = synthetic_steps(30, seed=2)
    lines = step_lines(steps, steps_per_line=10)
    lines.insert(1, MALFORMED_LINE)  # line 2 of the file
    corpus = write_corpus(tmp_path / "corpus", {"bad": ExperimentSpec(lines=lines),
                                                "good": healthy()})
    result = fit(corpus, tmp_path / "store")
    assert "bad/traces.json:2" in result.stderr
    manifest = manifest_of(result)
    report = manifest["ingest"]["bad"]
    assert report["lines_malformed"] == 1
    assert report["problems"][0].startswith("bad/traces.json:2: malformed JSON")
    assert report["steps_kept"] == 30  # every step of the good lines, none lost
    assert manifest["ingest"]["good"]["lines_malformed"] == 0
    card = (Path(result.stdout.strip()) / "MODEL_CARD.md").read_text()
    assert "bad/traces.json:2" in card


def test_truncated_gzip_keeps_the_readable_part_and_reports_the_rest(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", {
        "cut": ExperimentSpec(steps=synthetic_steps(200, seed=3), gz=True), "good": healthy()})
    truncate_file(corpus / "cut" / "traces.json.gz", 0.6)
    result = fit(corpus, tmp_path / "store")
    assert "cut/traces.json.gz" in result.stderr
    report = manifest_of(result)["ingest"]["cut"]
    assert 0 < report["steps_kept"] < 200
    assert any(p.startswith("cut/traces.json.gz:") and "truncated" in p
               for p in report["problems"])


def test_non_positive_or_missing_durations_are_excluded_and_counted(tmp_path: Path) -> None:
    steps = synthetic_steps(30, seed=4)
    bad_ids = {3: 0, 7: -5, 11: UNSET}
    steps = [Step(s.id, bad_ids.get(s.id, s.duration_us), s.prefills, s.decodes) for s in steps]
    corpus = write_corpus(tmp_path / "corpus", {"exp": ExperimentSpec(steps=steps)})
    result = fit(corpus, tmp_path / "store")
    report = manifest_of(result)["ingest"]["exp"]
    assert report["steps_bad_duration"] == 3 and report["steps_kept"] == 27
    assert "3 step(s) with missing or non-positive duration" in result.stderr
    out = tmp_path / "pred.csv"
    cli("predict", result.stdout.strip(), str(corpus), "--out", str(out))
    with open(out, newline="") as fh:
        ids = [int(r["step_id"]) for r in csv.DictReader(fh)]
    assert len(ids) == 27 and not set(ids) & set(bad_ids)


# ------------------------------------------------------------ stop with one line


@pytest.mark.parametrize("key", ["model", "max_num_batched_tokens", "max_num_seqs"])
def test_missing_exp_config_key_names_experiment_file_and_key(tmp_path: Path, key: str) -> None:
    corpus = write_corpus(tmp_path / "corpus", {
        "ok": healthy(), "team/broken": ExperimentSpec(drop_keys=(key,))})
    message = single_error(fit(corpus, tmp_path / "store", expect=1))
    assert "team/broken" in message and "exp-config.yaml" in message and f"'{key}'" in message
    assert_no_release(tmp_path / "store")


def test_missing_hardware_is_an_error_unless_a_default_is_given(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", {"old": ExperimentSpec(drop_keys=("hardware",))})
    message = single_error(fit(corpus, tmp_path / "store", expect=1))
    assert "old" in message and "exp-config.yaml" in message and "'hardware'" in message
    assert_no_release(tmp_path / "store")
    result = fit(corpus, tmp_path / "store", "--default-hardware", "H100")
    assert manifest_of(result)["experiments"][0]["hardware"] == "H100"


def test_unknown_hardware_lists_the_known_names(tmp_path: Path) -> None:
    spec = ExperimentSpec()
    spec.exp_config["hardware"] = "TPU-v9"
    corpus = write_corpus(tmp_path / "corpus", {"ok": healthy(), "tpu": spec})
    message = single_error(fit(corpus, tmp_path / "store", expect=1))
    assert "tpu" in message and "exp-config.yaml" in message and "'hardware'" in message
    assert "TPU-v9" in message
    assert all(name in message for name in known_hardware())
    assert_no_release(tmp_path / "store")


def test_model_without_config_names_experiment_file_and_key(tmp_path: Path) -> None:
    spec = ExperimentSpec(hf_config=None)
    spec.exp_config["model"] = "acme/mystery-13b"
    corpus = write_corpus(tmp_path / "corpus", {"ok": healthy(), "mystery": spec})
    message = single_error(fit(corpus, tmp_path / "store", expect=1))
    assert "mystery" in message and "exp-config.yaml" in message and "'model'" in message
    assert "config.json" in message and "acme/mystery-13b" in message
    assert_no_release(tmp_path / "store")


def test_bundled_model_config_is_used_when_config_json_is_absent(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", {"bundled": ExperimentSpec(hf_config=None)})
    url = fit(corpus, tmp_path / "store").stdout.strip()
    assert (Path(url) / "model_configs" / "llama-2-7b-hf" / "config.json").is_file()


def test_empty_corpus_is_a_clear_error_and_writes_no_release(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    message = single_error(fit(tmp_path / "empty", tmp_path / "store", expect=1))
    assert "no experiments" in message and str(tmp_path / "empty") in message
    assert_no_release(tmp_path / "store")
    message = single_error(fit(tmp_path / "absent", tmp_path / "store", expect=1))
    assert "does not exist" in message


def test_corpus_without_a_usable_step_writes_no_release(tmp_path: Path) -> None:
    steps = [Step(i, 0, (), (100,)) for i in range(5)]
    corpus = write_corpus(tmp_path / "corpus", {
        "junk": ExperimentSpec(lines=[MALFORMED_LINE]),
        "zeros": ExperimentSpec(steps=steps)})
    message = single_error(fit(corpus, tmp_path / "store", expect=1))
    assert "no usable steps" in message
    assert_no_release(tmp_path / "store")


def test_store_that_cannot_hold_releases_is_one_line(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", {"ok": healthy()})
    (tmp_path / "file").write_text("not a folder")
    message = single_error(fit(corpus, tmp_path / "file" / "store", expect=1))
    assert "not a directory" in message
