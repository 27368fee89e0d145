"""Releases: the files a fitted model is shipped as, and how to read them back.

A release is a folder (see ``release_store`` for where it lives) holding:

* ``manifest.json`` — version id, creation time (UTC), corpus URL (redacted) and
  fingerprint, code version, family, metrics (in-sample / temporal / leave-one-out and the
  BLIS projection's loss), feature schema, ingest counts and problems per experiment, the
  experiments and their configuration keys, and the SHA-256 of every other file. It is
  the commit marker: written last, a folder without it is not a release.
* ``coefficients.json`` — ``{"version", "family", "model": model.to_dict(),
  "blis_projection": {...}}``: every native coefficient set (global and per
  configuration, with units) and the BLIS alphas/betas with names and units.
* ``defaults.yaml`` — loadable by BLIS as-is (only BLIS's allowed top-level keys):
  ``trained_physics_coefficients`` (3 alphas, 11 betas, finite and ≥ 0), ``defaults``
  per lower-cased model id, ``version``.
* ``hardware_config.json`` — BLIS's format, keyed by GPU name, for the GPUs involved.
* ``model_configs/<name>/config.json`` — the HF config of each model, where ``<name>``
  is the lower-cased model id without its organisation (``meta-llama/Llama-2-7b-hf`` →
  ``llama-2-7b-hf``): the folder BLIS looks up beside ``defaults.yaml``.
* ``MODEL_CARD.md`` — the human summary (``model_card.render``), linking the plots.
* ``plots/*.png`` — predicted vs measured step time, error by batch regime and the
  calibration learning curve (``plots.release_plots``); the learning curve's points are
  in the manifest (``plots``).

The BLIS betas are the best projection of the release onto BLIS's 11-term basis:
non-negative least squares on relative error of the basis columns onto the MODEL's
predictions. The alphas are fit on the corpus's request-level (journey + API) traces when
it has some (``request_level``), else BLIS's shipped defaults.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import secrets
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from blis_model.architecture import bundled_model_config
from blis_model.dataset import BLIS_COLUMNS
from blis_model.errors import BlisModelError, ReleaseError
from blis_model.experiment import Experiment
from blis_model.features.blis_parity import ALPHA_NAMES, BETA_NAMES, BETA_UNITS, blis_step_time
from blis_model.features.registry import REGISTRY, describe
from blis_model.metrics import summary
from blis_model.models.base import StepTimeModel
from blis_model.models.registry import model_from_dict
from blis_model.models.solvers import RelativeGram, nonneg_ridge
from blis_model.pipeline import corpus_fingerprint
from blis_model.storage import filesystem, join, redact, storage_errors

MANIFEST = "manifest.json"
COEFFICIENTS = "coefficients.json"
DEFAULTS = "defaults.yaml"
HARDWARE_CONFIG = "hardware_config.json"
MODEL_CARD = "MODEL_CARD.md"
MODEL_CONFIGS = "model_configs"
SCHEMA = "blis-model-release/1"

#: Top-level keys BLIS's strict defaults.yaml parser accepts.
ALLOWED_DEFAULTS_KEYS: tuple[str, ...] = (
    "defaults", "workloads", "trained_physics_coefficients", "lora", "kv_offload_devices",
    "version",
)
#: BLIS's shipped trained-physics coefficients ("iter29"): alphas in µs, µs, µs/token.
BLIS_SHIPPED_ALPHAS: tuple[float, ...] = (15563.2, 777.3, 45.9)
BLIS_SHIPPED_BETAS: tuple[float, ...] = (
    0.152128, 0.0, 1.36252915, 0.752037, 32.09546717, 4.41684444, 126.024825, 481.8613888,
    0.0, 1.94710771, 0.752037,
)
ALPHA_UNITS: tuple[str, ...] = ("µs", "µs", "µs/output token")
ALPHA_SOURCE = ("BLIS shipped defaults (iter29), NOT fit: the corpus has no request-level "
                "(journey + API) traces")
BETA_SOURCE = ("non-negative relative-error least squares of BLIS's trained-physics basis onto "
               "this release's model predictions (the model's best projection onto BLIS)")
MAX_PROBLEMS = 5  # problems listed per experiment in the manifest
_VERSION_RE = r"^\d{8}T\d{6}Z-[0-9a-f]{8}$"


# --------------------------------------------------------------------------- ids, code


def new_version(now: dt.datetime | None = None) -> str:
    """A release version id ``YYYYMMDDTHHMMSSZ-<8 hex>``: sortable by time, unique even
    for concurrent runs (32 random bits)."""
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def is_version(text: str) -> bool:
    """True when ``text`` has the shape of a release version id."""
    return bool(re.match(_VERSION_RE, text))


def code_version() -> dict[str, str | None]:
    """Installed package version and the git commit of the source tree (if any)."""
    try:
        version = metadata.version("blis-model")
    except metadata.PackageNotFoundError:
        version = None
    commit = None
    source = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=source,
                             capture_output=True, text=True, timeout=5, check=False)
        lines = out.stdout.split()
        if out.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == source:
            commit = lines[1]  # only when this package IS the checkout's source tree
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": "blis-model", "version": version, "git_commit": commit}


# ----------------------------------------------------------------------- projection


@dataclass(frozen=True)
class BlisProjection:
    """The release expressed in BLIS's trained-physics basis, and what that costs."""

    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    per_experiment: dict[str, dict[str, Any]]  # model / projection / shipped summaries
    summary: dict[str, float]
    alpha_source: str = ALPHA_SOURCE

    def coefficient_block(self) -> dict[str, Any]:
        """Names, units and values (for coefficients.json)."""
        return {
            "alpha_coeffs": [{"index": i, "name": n, "unit": u, "value": v} for i, (n, u, v)
                             in enumerate(zip(ALPHA_NAMES, ALPHA_UNITS, self.alphas, strict=True))],
            "alpha_source": self.alpha_source,
            "beta_coeffs": [{"index": i, "name": n, "unit": u, "value": v} for i, (n, u, v)
                            in enumerate(zip(BETA_NAMES, BETA_UNITS, self.betas, strict=True))],
            "beta_source": BETA_SOURCE,
        }


def _mean(results: Mapping[str, Mapping[str, Any]], key: str) -> float:
    values = [r[key] for r in results.values() if r.get("n")]
    return float(np.mean(values)) if values else float("nan")


def project_onto_blis(model: StepTimeModel, frame: pd.DataFrame) -> BlisProjection:
    """Fit BLIS's 11 betas (≥ 0) to the model's predictions on ``frame`` by relative-error
    least squares, and measure per experiment the MAPE vs measured of the model, of the
    projection and of BLIS's shipped betas."""
    basis = frame.loc[:, list(BLIS_COLUMNS)].to_numpy(dtype=np.float64)
    predicted = np.asarray(model.predict(frame), dtype=np.float64)
    usable = np.isfinite(predicted) & (predicted > 0) & np.isfinite(basis).all(axis=1)
    if not usable.any():
        raise ReleaseError("cannot project onto BLIS's basis: the model predicts no positive "
                           "step time")
    stats = RelativeGram.from_rows(basis[usable], predicted[usable])
    zeros = np.zeros(len(BLIS_COLUMNS))
    betas = np.maximum(nonneg_ridge(stats, zeros, zeros), 0.0)
    if not np.isfinite(betas).all():
        raise ReleaseError("BLIS projection produced non-finite betas")
    projected = blis_step_time(basis, betas)
    shipped = blis_step_time(basis, np.asarray(BLIS_SHIPPED_BETAS))
    measured = frame["duration_us"].to_numpy(dtype=np.float64)
    per_exp: dict[str, dict[str, Any]] = {}
    for name, idx in frame.groupby("experiment", sort=True).indices.items():
        m, p = summary(predicted[idx], measured[idx]), summary(projected[idx], measured[idx])
        per_exp[str(name)] = {
            "model": m, "projection": p,
            "projection_vs_model": summary(projected[idx], predicted[idx]),
            "blis_shipped": summary(shipped[idx], measured[idx]),
            "mape_loss": p["mape"] - m["mape"],
        }
    models = {k: v["model"] for k, v in per_exp.items()}
    projections = {k: v["projection"] for k, v in per_exp.items()}
    shipped_all = {k: v["blis_shipped"] for k, v in per_exp.items()}
    overall = {"model_mape": _mean(models, "mape"), "projection_mape": _mean(projections, "mape"),
               "blis_shipped_mape": _mean(shipped_all, "mape")}
    overall["mape_loss"] = overall["projection_mape"] - overall["model_mape"]
    return BlisProjection(tuple(float(a) for a in BLIS_SHIPPED_ALPHAS),
                          tuple(float(b) for b in betas), per_exp, overall)


# ---------------------------------------------------------------------------- files


def blis_model_config_name(model_id: str) -> str:
    """Folder name BLIS looks up under ``model_configs/`` for a model: the lower-cased id
    without its organisation prefix (``meta-llama/Llama-2-7b-hf`` → ``llama-2-7b-hf``)."""
    short = model_id.strip().split("/", 1)[-1].lower()
    if not short or short in (".", "..") or "/" in short or "\\" in short:
        raise ReleaseError(f"model id '{model_id}' cannot name a model_configs folder")
    return short


def read_hf_config(exp: Experiment, options: dict | None = None) -> dict[str, Any]:
    """The HF config.json the experiment was featurized with (its own, else the bundled)."""
    url = join(exp.url, "config.json")
    fs, path = filesystem(url, options)
    with storage_errors(url, options):
        if fs.exists(path):
            with fs.open(path, "rb") as fh:
                return json.loads(fh.read())
    bundled = bundled_model_config(exp.server.model)
    if bundled is None:
        raise ReleaseError(f"experiment {exp.name}: model config for {exp.server.model} "
                           "is no longer readable")
    return bundled


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN/inf → None, numpy scalars → Python."""
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps_json(data: Any) -> bytes:
    return (json.dumps(_finite(data), indent=2, ensure_ascii=False, allow_nan=False)
            + "\n").encode()


def _report_dict(report: Any) -> dict[str, Any]:
    data = report.to_dict(max_problems=MAX_PROBLEMS) if hasattr(report, "to_dict") else dict(
        report)
    data["problems"] = [redact(str(p)) for p in data.get("problems", [])[:MAX_PROBLEMS]]
    total = len(getattr(report, "problems", []) or [])
    data["problems_total"] = max(total, len(data["problems"]))
    return data


def _deployment_defaults(experiments: Sequence[Experiment], frame: pd.DataFrame
                         ) -> dict[str, dict[str, Any]]:
    """BLIS ``defaults:`` per lower-cased model id: the GPU/TP of the model's experiment
    with the most steps (ties: first by name)."""
    steps = frame.groupby("experiment").size().to_dict() if len(frame) else {}
    best: dict[str, tuple[int, Experiment]] = {}
    for exp in sorted(experiments, key=lambda e: e.name):
        key = exp.server.model.lower()
        n = int(steps.get(exp.name, 0))
        if key not in best or n > best[key][0]:
            best[key] = (n, exp)
    return {key: {"GPU": exp.hardware.name, "tensor_parallelism": exp.server.tensor_parallelism,
                  "hf_repo": exp.server.model} for key, (_, exp) in sorted(best.items())}


def defaults_yaml(projection: BlisProjection, deployments: Mapping[str, Any], version: str
                  ) -> bytes:
    """BLIS's defaults.yaml: only allowed keys, every coefficient finite and ≥ 0."""
    alphas = [float(a) for a in projection.alphas]
    betas = [float(b) for b in projection.betas]
    if len(alphas) != 3 or len(betas) != 11:
        raise ReleaseError(f"BLIS needs 3 alphas and 11 betas, got {len(alphas)}/{len(betas)}")
    bad = [v for v in alphas + betas if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ReleaseError(f"BLIS coefficients must be finite and >= 0, got {bad}")
    doc = {"trained_physics_coefficients": {"alpha_coeffs": alphas, "beta_coeffs": betas},
           "defaults": {k: dict(v) for k, v in deployments.items()}, "version": version}
    assert set(doc) <= set(ALLOWED_DEFAULTS_KEYS)
    header = (f"# blis-model release {version}\n"
              "# beta_coeffs: projection of the release onto BLIS's trained-physics basis\n"
              f"# alpha_coeffs: {projection.alpha_source}\n")
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, allow_unicode=True,
                          width=1000)
    return (header + body).encode()


def _feature_names(model: StepTimeModel) -> list[str]:
    names = getattr(model, "features", None)
    if names is None:
        names = model.to_dict().get("features", [])
    return list(names)


def build_release(model: StepTimeModel, frame: pd.DataFrame, experiments: Sequence[Experiment],
                  reports: Sequence[Any], corpus_url: str, evaluation: Mapping[str, Any],
                  family: str, base_version: str | None = None, *, version: str | None = None,
                  options: dict | None = None, created_at: dt.datetime | None = None,
                  alphas: Sequence[float] | None = None, alpha_source: str | None = None,
                  request_level: Mapping[str, Any] | None = None,
                  with_plots: bool = True) -> dict[str, bytes]:
    """Every file of a release (relative path → bytes); see the module docstring.

    ``reports`` are the experiments' ``IngestReport`` (or their ``to_dict()``);
    ``evaluation`` is ``pipeline.evaluate``'s result; ``options`` are the corpus storage
    options (to read the models' config.json). The version id is generated unless given.
    ``alphas`` (BLIS order: α0 µs, α1 µs, α2 µs/output token) replace BLIS's shipped
    defaults when request-level traces were fit; ``alpha_source`` says how (or why not).
    ``request_level`` (``request_level.release_block``: alpha fits pooled and per
    configuration, request validation per experiment) goes to the manifest, its alphas
    to coefficients.json too. ``with_plots`` draws ``plots/*.png`` (about 1 s).
    """
    created = (created_at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).replace(microsecond=0)
    version = version or new_version(created)
    projection = project_onto_blis(model, frame)
    if alphas is not None:
        projection = replace(projection, alphas=tuple(float(a) for a in alphas),
                             alpha_source=alpha_source or "fit on request-level traces")
    elif alpha_source:
        projection = replace(projection, alpha_source=alpha_source)
    features = _feature_names(model)
    steps = frame.groupby("experiment").size().to_dict() if len(frame) else {}

    files: dict[str, bytes] = {}
    model_dict = model.to_dict()
    files[COEFFICIENTS] = dumps_json({"version": version, "family": family, "model": model_dict,
                                      "blis_projection": projection.coefficient_block(),
                                      **({"request_alphas": request_level["alphas"]}
                                         if request_level and "alphas" in request_level
                                         else {})})
    files[DEFAULTS] = defaults_yaml(projection, _deployment_defaults(experiments, frame),
                                    version)
    gpus = {e.hardware.name: e.hardware.to_blis() for e in experiments}
    files[HARDWARE_CONFIG] = dumps_json(dict(sorted(gpus.items())))
    config_names: dict[str, str] = {}
    for exp in sorted(experiments, key=lambda e: e.name):
        name = blis_model_config_name(exp.server.model)
        path = f"{MODEL_CONFIGS}/{name}/config.json"
        if path not in files:  # two orgs' same-named models share BLIS's folder: first wins
            files[path] = dumps_json(read_hf_config(exp, options))
        config_names.setdefault(exp.server.model, name)

    manifest = {
        "schema": SCHEMA,
        "version": version,
        "created_at": created.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "family": family,
        "base_version": base_version,
        "corpus": {"url": redact(corpus_url), "fingerprint": corpus_fingerprint(experiments),
                   "experiments": len(experiments), "steps": int(len(frame))},
        "code": code_version(),
        "metrics": {**dict(evaluation), "blis_projection": {
            "summary": projection.summary, "per_experiment": projection.per_experiment}},
        "feature_schema": {
            "features": describe([n for n in features if n in REGISTRY]),
            "blis_basis": [{"index": i, "name": n, "coefficient_unit": u}
                           for i, (n, u) in enumerate(zip(BETA_NAMES, BETA_UNITS, strict=True))],
            "blis_alphas": [{"index": i, "name": n, "unit": u}
                            for i, (n, u) in enumerate(zip(ALPHA_NAMES, ALPHA_UNITS, strict=True))],
        },
        "blis": {"alpha_coeffs": list(projection.alphas), "alphas_fit": alphas is not None,
                 "alpha_source": projection.alpha_source, "beta_coeffs": list(projection.betas),
                 "beta_source": BETA_SOURCE, "model_configs": config_names},
        "experiments": [{"name": e.name, "config_key": e.config_key, "hardware": e.hardware.name,
                         "model": e.server.model,
                         "tensor_parallelism": e.server.tensor_parallelism,
                         "steps": int(steps.get(e.name, 0))}
                        for e in sorted(experiments, key=lambda e: e.name)],
        "ingest": {r["experiment"]: r for r in (_report_dict(x) for x in reports)},
        **({"request_level": dict(request_level)} if request_level else {}),
        "files": {},
    }
    if with_plots:
        images, manifest["plots"] = _plots(model, frame, family)
        files.update(images)
    from blis_model.model_card import render  # local: model_card imports this module

    coefficients = json.loads(files[COEFFICIENTS])
    files[MODEL_CARD] = render(_finite(manifest), coefficients).encode()
    manifest["files"] = {p: hashlib.sha256(b).hexdigest() for p, b in sorted(files.items())}
    files[MANIFEST] = dumps_json(manifest)
    return files


def _plots(model: StepTimeModel, frame: pd.DataFrame, family: str
           ) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The release's PNGs (``plots/<name>.png``) and their manifest block: file names and
    the learning curve's points (MAPE % on the temporal holdout against training steps),
    or why there is no learning curve."""
    from blis_model import plots  # local: matplotlib is only needed to build releases

    block: dict[str, Any] = {}
    try:
        learning = plots.learning_curve(frame, family)
        block["learning_curve"] = learning
    except (ValueError, ArithmeticError, np.linalg.LinAlgError, BlisModelError) as exc:
        learning = None
        block["learning_curve_skipped"] = f"{type(exc).__name__}: {exc}"
    images = plots.release_plots(frame, np.asarray(model.predict(frame), dtype=np.float64),
                                 learning)
    block["files"] = sorted(images)
    return images, block


def release_version(files: Mapping[str, bytes]) -> str:
    """The version id recorded in a built release's manifest."""
    return str(json.loads(files[MANIFEST])["version"])


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Release:
    """A published release, read back: its manifest, coefficients and rebuilt model."""

    url: str
    manifest: dict[str, Any]
    coefficients: dict[str, Any]
    model: StepTimeModel

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", ""))

    @property
    def family(self) -> str:
        return str(self.manifest.get("family", ""))

    @property
    def config_keys(self) -> set[str]:
        return {e["config_key"] for e in self.manifest.get("experiments", [])}


def _read(url: str, name: str, options: dict | None) -> bytes:
    target = join(url, name)
    fs, path = filesystem(target, options)
    with storage_errors(target, options):
        fs.invalidate_cache(path)
        try:
            with fs.open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            if name == MANIFEST:
                raise ReleaseError(f"no release at {redact(url)} (no {MANIFEST}: missing, "
                                   "or an unfinished publish)") from None
            raise ReleaseError(f"release {redact(url)}: {name} is missing") from None
        except IsADirectoryError:
            raise ReleaseError(f"release {redact(url)}: {name} is not a file") from None


def read_manifest(url: str, options: dict | None = None) -> dict[str, Any]:
    """The manifest of the release at ``url`` (ReleaseError if there is none)."""
    try:
        data = json.loads(_read(url, MANIFEST, options))
    except json.JSONDecodeError as exc:
        raise ReleaseError(f"release {redact(url)}: {MANIFEST} is not valid JSON ({exc})"
                           ) from None
    if not isinstance(data, dict) or "version" not in data:
        raise ReleaseError(f"release {redact(url)}: {MANIFEST} has no version")
    return data


def load_release(url: str, options: dict | None = None) -> Release:
    """Read the release at ``url`` and rebuild its model (checksums verified)."""
    url = url.rstrip("/") or url
    manifest = read_manifest(url, options)
    raw = _read(url, COEFFICIENTS, options)
    expected = (manifest.get("files") or {}).get(COEFFICIENTS)
    if expected and hashlib.sha256(raw).hexdigest() != expected:
        raise ReleaseError(f"release {redact(url)}: {COEFFICIENTS} does not match its checksum "
                           "in the manifest")
    try:
        coefficients = json.loads(raw)
        model = model_from_dict(coefficients["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ReleaseError(f"release {redact(url)}: cannot rebuild the model from "
                           f"{COEFFICIENTS} ({type(exc).__name__}: {exc})") from None
    return Release(url=url, manifest=manifest, coefficients=coefficients, model=model)


def predict_frame(release: Release, frame: pd.DataFrame) -> np.ndarray:
    """Predicted step times (µs) for every row of a feature frame. A configuration the
    release was calibrated on uses its own coefficient set, any other the global one."""
    if not len(frame):
        return np.zeros(0)
    return np.asarray(release.model.predict(frame), dtype=np.float64)
