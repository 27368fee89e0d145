"""Building a release: every file of it (``releases.files``) as bytes, from a fitted
model, its training frame, its evaluation and its request level. Nothing is fitted or
published here: the calibration recipe fits and evaluates, ``releases.store`` publishes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import yaml

from blis_model.configuration.architecture import bundled_model_config
from blis_model.configuration.experiment import Experiment, corpus_fingerprint
from blis_model.errors import ReleaseError
from blis_model.features.blis_parity import ALPHA_NAMES, BETA_NAMES, BETA_UNITS
from blis_model.features.registry import REGISTRY, describe
from blis_model.models.base import StepTimeModel
from blis_model.releases import plots
from blis_model.releases.files import (
    ALLOWED_DEFAULTS_KEYS,
    COEFFICIENTS,
    DEFAULTS,
    HARDWARE_CONFIG,
    MANIFEST,
    MODEL_CARD,
    MODEL_CONFIGS,
    SCHEMA,
)
from blis_model.releases.model_card import render
from blis_model.releases.projection import (
    ALPHA_UNITS,
    BETA_SOURCE,
    BlisProjection,
    project_onto_blis,
)
from blis_model.releases.versions import code_version, new_version
from blis_model.storage import filesystem, join, redact, storage_errors

MAX_PROBLEMS = 5  # problems listed per experiment in the manifest


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
                  learning_curve: Sequence[Mapping[str, float]] | None = None,
                  with_plots: bool = True, images: Mapping[str, bytes] | None = None
                  ) -> dict[str, bytes]:
    """Every file of a release (relative path → bytes); see the module docstring.

    ``reports`` are the experiments' ``IngestReport`` (or their ``to_dict()``);
    ``evaluation`` is ``calibration.evaluation.evaluate``'s result; ``options`` are the
    corpus storage options (to read the models' config.json). The version id is
    generated unless given.
    ``alphas`` (BLIS order: α0 µs, α1 µs, α2 µs/output token) replace BLIS's shipped
    defaults when request-level traces were fit; ``alpha_source`` says how (or why not).
    ``request_level`` (``requests.stage.release_block``: alpha fits pooled and per
    configuration, request validation per experiment) goes to the manifest, its alphas
    to coefficients.json too. ``learning_curve`` (``calibration.evaluation.
    learning_curve``'s points, computed by the recipe) goes to the manifest and its plot.
    ``with_plots`` draws the step plots ``plots/*.png`` (about 1 s) — when ``frame``'s
    durations are measured; ``images`` adds drawn plots (e.g. a request fit's latency
    CDFs, relative path → PNG). Nothing here fits a model.
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
    drawn = dict(images or {})
    if with_plots:
        predicted = np.asarray(model.predict(frame), dtype=np.float64)
        drawn.update(plots.release_plots(frame, predicted, learning_curve))
    if drawn:
        files.update(drawn)
        manifest["plots"] = {"files": sorted(drawn)}
    if learning_curve is not None:
        manifest.setdefault("plots", {})["learning_curve"] = list(learning_curve)
    coefficients = json.loads(files[COEFFICIENTS])
    files[MODEL_CARD] = render(_finite(manifest), coefficients).encode()
    manifest["files"] = {p: hashlib.sha256(b).hexdigest() for p, b in sorted(files.items())}
    files[MANIFEST] = dumps_json(manifest)
    return files


def release_version(files: Mapping[str, bytes]) -> str:
    """The version id recorded in a built release's manifest."""
    return str(json.loads(files[MANIFEST])["version"])


__all__ = ["blis_model_config_name", "build_release", "defaults_yaml", "dumps_json",
           "read_hf_config", "release_version"]
