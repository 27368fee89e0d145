"""Releases built from a fit on the real sample corpus: files, BLIS formats, round trip,
atomic publishing and version ids."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from blis_model.calibration import evaluation, featurize
from blis_model.configuration import experiment
from blis_model.configuration.defaults import BLIS_SHIPPED_ALPHAS
from blis_model.configuration.experiment import Experiment
from blis_model.configuration.hardware import known_hardware
from blis_model.errors import ReleaseError
from blis_model.features.blis_parity import blis_step_time
from blis_model.features.frame import BLIS_COLUMNS
from blis_model.models.base import StepTimeModel
from blis_model.models.registry import FAMILIES
from blis_model.releases.build import build_release, release_version
from blis_model.releases.files import ALLOWED_DEFAULTS_KEYS
from blis_model.releases.read import load_release, predict_frame
from blis_model.releases.store import list_releases, publish
from blis_model.releases.versions import new_version
from blis_model.storage import StorageError

SAMPLE = Path(__file__).resolve().parents[1] / "corpus" / "h100-real-steps"
VERSION_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")
MODEL_CONFIG_NAMES = {"codellama-34b-hf", "llama-2-7b-hf", "llama-3.1-8b", "mixtral-8x7b-v0.1"}


@dataclass
class Fitted:
    experiments: list[Experiment]
    items: list[featurize.Featurized]
    frame: pd.DataFrame
    model: StepTimeModel
    evaluation: dict

    def build(self, **kwargs: object) -> dict[str, bytes]:
        return build_release(self.model, self.frame, self.experiments,
                             [i.report for i in self.items], str(SAMPLE), self.evaluation,
                             "picf", **kwargs)


@pytest.fixture(scope="module")
def fitted() -> Fitted:
    experiments = featurize.load_experiments(str(SAMPLE))
    items = [featurize.featurize(e) for e in experiments]
    frame = featurize.training_frame(items)
    model = evaluation.fit_model(frame)
    return Fitted(experiments, items, frame, model, evaluation.evaluate(frame, model))


@pytest.fixture(scope="module")
def files(fitted: Fitted) -> dict[str, bytes]:
    return fitted.build(learning_curve=evaluation.learning_curve(fitted.frame, "picf"))


@pytest.fixture(scope="module")
def manifest(files: dict[str, bytes]) -> dict:
    return json.loads(files["manifest.json"])


def _tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_published_release_has_every_file(files: dict[str, bytes], tmp_path: Path) -> None:
    url = publish(files, str(tmp_path / "store"), release_version(files))
    folder = Path(url)
    assert folder.parent == tmp_path / "store" / "releases"
    expected = {"manifest.json", "coefficients.json", "defaults.yaml", "hardware_config.json",
                "MODEL_CARD.md"} | {f"model_configs/{n}/config.json" for n in MODEL_CONFIG_NAMES}
    expected |= {f"plots/{n}.png" for n in ("predicted_vs_measured", "error_by_regime",
                                             "learning_curve")}
    assert _tree(folder) == expected
    for rel, data in files.items():
        assert (folder / rel).read_bytes() == data
    # readable by everyone who may read the store (a shared filesystem): 0755 / 0644
    assert {oct(p.stat().st_mode & 0o777) for p in [folder, *folder.rglob("*")] if p.is_dir()
            } == {"0o755"}
    assert {oct(p.stat().st_mode & 0o777) for p in folder.rglob("*") if p.is_file()} == {"0o644"}
    # the model config shipped is the one the experiment was featurized with
    shipped = json.loads((folder / "model_configs/llama-2-7b-hf/config.json").read_text())
    assert shipped == json.loads((SAMPLE / "h100-llama-2-7b-bf16/config.json").read_text())
    # nothing but the release itself was left in the store
    assert sorted(os.listdir(folder.parent)) == [folder.name]


def test_defaults_yaml_is_what_blis_loads(files: dict[str, bytes], manifest: dict) -> None:
    doc = yaml.safe_load(files["defaults.yaml"])
    assert set(doc) <= set(ALLOWED_DEFAULTS_KEYS)
    coeffs = doc["trained_physics_coefficients"]
    assert set(coeffs) == {"alpha_coeffs", "beta_coeffs"}
    alphas, betas = coeffs["alpha_coeffs"], coeffs["beta_coeffs"]
    assert len(alphas) == 3 and len(betas) == 11
    for value in alphas + betas:
        assert isinstance(value, float) and math.isfinite(value) and value >= 0
    assert tuple(alphas) == BLIS_SHIPPED_ALPHAS
    assert manifest["blis"]["alphas_fit"] is False and "NOT fit" in manifest["blis"]["alpha_source"]
    assert betas == manifest["blis"]["beta_coeffs"]
    assert doc["version"] == manifest["version"]
    hardware = json.loads(files["hardware_config.json"])
    assert set(doc["defaults"]) == {e["model"].lower() for e in manifest["experiments"]}
    for model_id, entry in doc["defaults"].items():
        assert set(entry) == {"GPU", "tensor_parallelism", "hf_repo"}
        assert entry["GPU"] in hardware and entry["tensor_parallelism"] == 1
        assert entry["hf_repo"].lower() == model_id


def test_hardware_config_is_in_blis_format(files: dict[str, bytes]) -> None:
    hardware = json.loads(files["hardware_config.json"])
    assert set(hardware) == {"H100"}
    assert set(hardware) <= set(known_hardware())
    entry = hardware["H100"]
    assert set(entry) == {"TFlopsPeak", "TFlopsFP8", "BwPeakTBs", "mfuPrefill", "mfuDecode",
                          "MemoryGiB"}
    assert entry["TFlopsPeak"] == 989.5 and entry["BwPeakTBs"] == 3.35
    assert all(isinstance(v, float) and v > 0 for v in entry.values())


def test_manifest_records_provenance_metrics_and_schema(manifest: dict, fitted: Fitted,
                                                        files: dict[str, bytes]) -> None:
    assert VERSION_RE.match(manifest["version"])
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", manifest["created_at"])
    assert manifest["family"] == "picf" and manifest["base_version"] is None
    assert manifest["corpus"]["url"] == str(SAMPLE)
    assert manifest["corpus"]["fingerprint"] == experiment.corpus_fingerprint(fitted.experiments)
    assert manifest["corpus"]["steps"] == 791
    assert manifest["code"]["package"] == "blis-model" and manifest["code"]["version"]
    names = sorted(e.name for e in fitted.experiments)
    for key in ("in_sample", "temporal_holdout", "leave_one_experiment_out"):
        assert sorted(manifest["metrics"][key]) == names
        for result in manifest["metrics"][key].values():
            assert {"mape", "median_ape", "p90_ape", "n"} <= set(result)
    projection = manifest["metrics"]["blis_projection"]
    assert sorted(projection["per_experiment"]) == names
    assert [f["name"] for f in manifest["feature_schema"]["features"]] == list(
        fitted.model.features)
    assert [b["name"] for b in manifest["feature_schema"]["blis_basis"]][:3] == [
        "T_pf_compute", "T_dc_compute", "T_weight"]
    assert [e["name"] for e in manifest["experiments"]] == names
    assert {e["config_key"] for e in manifest["experiments"]} == set(fitted.frame["config_key"])
    assert all(e["hardware"] == "H100" for e in manifest["experiments"])
    ingest = manifest["ingest"]
    assert sum(ingest[n]["steps_kept"] for n in names) == 791
    assert all(ingest[n]["lines_malformed"] == 0 and ingest[n]["problems"] == [] for n in names)
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256(files[rel]).hexdigest() == digest
    assert set(manifest["files"]) == set(files) - {"manifest.json"}


def test_blis_betas_are_the_best_projection_and_its_loss_is_recorded(
        manifest: dict, fitted: Fitted) -> None:
    frame = fitted.frame
    basis = frame.loc[:, list(BLIS_COLUMNS)].to_numpy()
    target = fitted.model.predict(frame)
    betas = np.array(manifest["blis"]["beta_coeffs"])

    def objective(b: np.ndarray) -> float:  # squared relative error to the model
        return float(np.sum((blis_step_time(basis, b) / target - 1.0) ** 2))

    best = objective(betas)
    rng = np.random.default_rng(0)
    for _ in range(50):  # no non-negative perturbation does better
        trial = np.maximum(betas * rng.uniform(0.9, 1.1, 11) + rng.uniform(0, 1e-3, 11), 0)
        assert objective(trial) >= best - 1e-9 * best
    per = manifest["metrics"]["blis_projection"]["per_experiment"]
    measured = frame["duration_us"].to_numpy()
    for name, idx in frame.groupby("experiment").indices.items():
        ape = np.abs(blis_step_time(basis[idx], betas) - measured[idx]) / measured[idx] * 100
        assert per[name]["projection"]["mape"] == pytest.approx(ape.mean(), rel=1e-9)
        assert per[name]["mape_loss"] == pytest.approx(
            per[name]["projection"]["mape"] - per[name]["model"]["mape"])
    summary = manifest["metrics"]["blis_projection"]["summary"]
    assert summary["projection_mape"] < summary["blis_shipped_mape"]


def test_round_trip_reproduces_in_memory_predictions(files: dict[str, bytes], fitted: Fitted,
                                                     tmp_path: Path) -> None:
    url = publish(files, str(tmp_path / "store"), release_version(files))
    release = load_release(url)
    assert release.version == release_version(files)
    assert release.model.to_dict() == fitted.model.to_dict()
    np.testing.assert_allclose(predict_frame(release, fitted.frame),
                               fitted.model.predict(fitted.frame), rtol=1e-9, atol=0)
    unseen = fitted.frame.assign(config_key="some/other-model|H200|tp2|bf16|mnbt1|mns1")
    np.testing.assert_allclose(predict_frame(release, unseen), fitted.model.predict(unseen),
                               rtol=1e-9, atol=0)


def test_model_card_has_metric_tables_coefficients_and_projection(files: dict[str, bytes],
                                                                  manifest: dict) -> None:
    card = files["MODEL_CARD.md"].decode()
    assert manifest["version"] in card
    for title in ("In-sample", "Temporal holdout", "Leave one experiment out",
                  "## Coefficients", "## BLIS projection", "## Ingest problems"):
        assert title in card
    assert card.count("| experiment | MAPE | median APE | p90 APE | steps |") == 3
    for exp in manifest["experiments"]:
        assert exp["name"] in card
    assert "gemm_roofline_us" in card and "µs per kernel launch" in card and "T_pf_compute" in card


def test_load_release_refuses_missing_or_tampered_releases(files: dict[str, bytes],
                                                           tmp_path: Path) -> None:
    with pytest.raises(ReleaseError, match="no release"):
        load_release(str(tmp_path / "nothing-here"))
    url = publish(files, str(tmp_path / "store"), release_version(files))
    coefficients = Path(url) / "coefficients.json"
    coefficients.write_bytes(coefficients.read_bytes().replace(b'"value": 1', b'"value": 2', 1))
    with pytest.raises(ReleaseError, match="checksum"):
        load_release(url)


def test_failed_publish_leaves_no_visible_release(files: dict[str, bytes],
                                                  tmp_path: Path) -> None:
    store = tmp_path / "store"
    version = release_version(files)
    broken = {**files, "model_configs/zz/config.json": None}  # dies while writing files
    with pytest.raises(ReleaseError):
        publish(broken, str(store), version)  # type: ignore[arg-type]
    assert list_releases(str(store)) == []
    assert not (store / "releases" / version).exists()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the store's folder should be")
    with pytest.raises((StorageError, OSError)):
        publish(files, str(blocked), version)
    assert blocked.read_text().startswith("a file")
    # an interrupted publish (all files but the manifest) is invisible, then completed
    partial = store / "releases" / version
    partial.mkdir(parents=True)
    (partial / "coefficients.json").write_bytes(files["coefficients.json"])
    assert list_releases(str(store)) == []
    with pytest.raises(ReleaseError):
        load_release(str(partial))


def test_releases_are_immutable(files: dict[str, bytes], tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    publish(files, store, release_version(files))
    with pytest.raises(StorageError, match="already exists"):
        publish(files, store, release_version(files))


def test_two_releases_in_a_row_get_distinct_versions(fitted: Fitted, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    urls = [publish(f, store, release_version(f)) for f in (fitted.build(), fitted.build())]
    listed = list_releases(store)
    assert len({r["version"] for r in listed}) == 2
    assert sorted(r["url"] for r in listed) == sorted(urls)
    assert all(VERSION_RE.match(r["version"]) for r in listed)
    assert len({new_version() for _ in range(2000)}) == 2000


def test_publish_over_s3_is_atomic(files: dict[str, bytes], s3_server) -> None:  # noqa: ANN001
    bucket = s3_server.make_bucket()
    store = f"s3://{bucket}/store"
    options = s3_server.storage_options
    version = release_version(files)
    client = s3_server.client()
    # a publish that died before its commit: objects without manifest.json
    client.put_object(Bucket=bucket, Key=f"store/releases/{version}/coefficients.json",
                      Body=b"partial")
    assert list_releases(store, options) == []
    with pytest.raises(ReleaseError, match="no release"):
        load_release(f"{store}/releases/{version}", options)
    url = publish(files, store, version, options)
    assert url == f"{store}/releases/{version}"
    assert [r["version"] for r in list_releases(store, options)] == [version]
    assert load_release(url, options).manifest["version"] == version


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_builds_a_release_that_round_trips(family: str, fitted: Fitted,
                                                        tmp_path: Path) -> None:
    model = evaluation.fit_model(fitted.frame, family)
    files = build_release(model, fitted.frame, fitted.experiments,
                          [i.report for i in fitted.items], str(SAMPLE), {"summary": {}}, family)
    release = load_release(publish(files, str(tmp_path), release_version(files)))
    assert release.family == family and "## Coefficients" in files["MODEL_CARD.md"].decode()
    np.testing.assert_allclose(predict_frame(release, fitted.frame), model.predict(fitted.frame),
                               rtol=1e-9, atol=0)
    betas = yaml.safe_load(files["defaults.yaml"])["trained_physics_coefficients"]["beta_coeffs"]
    assert len(betas) == 11 and all(math.isfinite(b) and b >= 0 for b in betas)


def test_fitted_alphas_replace_the_shipped_defaults(fitted: Fitted) -> None:
    files = fitted.build(alphas=(900.0, 1800.0, 4.0), alpha_source="median fit on 400 requests")
    doc = yaml.safe_load(files["defaults.yaml"])
    assert doc["trained_physics_coefficients"]["alpha_coeffs"] == [900.0, 1800.0, 4.0]
    blis = json.loads(files["manifest.json"])["blis"]
    assert blis["alphas_fit"] is True and blis["alpha_source"] == "median fit on 400 requests"
    with pytest.raises(ReleaseError, match=">= 0"):
        fitted.build(alphas=(900.0, -1.0, 4.0))


def test_manifest_and_card_record_each_configurations_choice_of_terms(
        files: dict[str, bytes], manifest: dict, fitted: Fitted) -> None:
    """``metrics.calibration``: per configuration the candidates' time-ordered CV errors,
    the choice and why; the card shows them and, per configuration with terms of its
    own, which terms moved from the global value (ratio) and which sit at a bound."""
    block = manifest["metrics"]["calibration"]
    keys = {e["config_key"] for e in manifest["experiments"]}
    assert set(block["per_config"]) == keys and block["method"]["bound_factor"] == 4.0
    coefficients = json.loads(files["coefficients.json"])["model"]["calibration"]
    card = files["MODEL_CARD.md"].decode()
    assert "## Per-configuration calibration" in card
    for key, rec in block["per_config"].items():
        assert set(rec["cv_rmsre_pct"]) == {"none", "host", "scale", "terms@200", "terms@50",
                                            "terms@12.5"}
        assert rec["host_effect"] is None or rec["host_effect"] > 0
        assert ("host_factor" in rec) == (rec["choice"] == "host")
        assert rec["choice"] == coefficients["per_config"][key]["choice"]
        assert rec["choice"] in rec["cv_rmsre_pct"] and rec["reason"]
        assert f"`{key.replace('|', chr(92) + '|')}`" in card
        moved = coefficients["per_config"][key]["moved"]
        assert (rec["choice"] == "none") == (key not in fitted.model.config_coef_)
        if moved:
            assert f"### Terms that moved: `{key}`" in card
        for m in moved:
            lo, hi = m["range"]
            assert lo <= m["config"] * (1 + 1e-9) and (hi is None or m["config"] <= hi * (1 + 1e-9))
            if m["at_bound"]:
                assert f"{m['term']} ({m['at_bound']})" in rec["at_bound"]
    assert sum(block["choices"].values()) == len(keys)
    assert block["method"]["candidates"][:3] == ["none", "host", "scale"]
    assert set(block["machine_host_factors"]) == {k.split("|")[1] for k in keys}
    assert "### Machine host factors" in card
    for machine, entry in block["machine_host_factors"].items():
        assert entry["factor"] == coefficients["machine_host_factors"][machine]["factor"]
        assert f"| {machine} |" in card


def test_a_calibrated_release_records_the_target_configurations_choice(fitted: Fitted) -> None:
    frame = fitted.frame
    name = "h100-mixtral-8x7b-bf16"
    target = frame[frame["experiment"] == name].sort_values("step_id").iloc[:100]
    base = evaluation.fit_model(frame[frame["config_key"] != target["config_key"].iloc[0]])
    calibrated = evaluation.fit_model(target, base=base)
    report = evaluation.calibration_report(calibrated)
    key = target["config_key"].iloc[0]
    assert report is not None and report["per_config"][key]["steps"] == 100
    assert report["per_config"][key]["choice"] != "none"  # the MoE model needs its terms
    files = build_release(calibrated, target, fitted.experiments, [], str(SAMPLE),
                          evaluation.evaluate(target, calibrated, loo={}, temporal={}), "picf",
                          base_version="20260101T000000Z-00000000", with_plots=False)
    card = files["MODEL_CARD.md"].decode()
    assert "calibrated from release `20260101T000000Z-00000000`" in card
    assert f"### Terms that moved: `{key}`" in card
