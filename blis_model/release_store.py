"""Where releases live: ``<store>/releases/<version>/`` under any store URL.

Releases are immutable and appear atomically: files are written to a local temporary
folder, then published with :func:`storage.publish_directory` (a rename locally; on S3
``manifest.json`` is uploaded last). A folder without ``manifest.json`` is invisible.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from blis_model.errors import ReleaseError
from blis_model.release import MANIFEST, is_version, read_manifest
from blis_model.storage import (
    StorageError,
    filesystem,
    is_remote,
    join,
    publish_directory,
    redact,
    storage_errors,
)

log = logging.getLogger(__name__)

RELEASES = "releases"


def _store_root(store_url: str) -> str:
    """The store URL as given for remote stores, an absolute path for local ones."""
    if is_remote(store_url) or store_url.startswith("file://"):
        return store_url
    return os.path.abspath(os.path.expanduser(store_url))


def release_url(store_url: str, version: str) -> str:
    return join(_store_root(store_url), RELEASES, version)


def _safe_relpath(rel: str) -> str:
    parts = rel.replace("\\", "/").split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ReleaseError(f"invalid release file name '{rel}'")
    return os.path.join(*parts)


def publish(files: Mapping[str, bytes], store_url: str, version: str,
            options: dict[str, Any] | None = None) -> str:
    """Publish a built release (relative path → bytes) as ``<store>/releases/<version>``
    and return its URL. All or nothing: on any failure no release is visible."""
    if not is_version(version):
        raise ReleaseError(f"invalid release version '{version}'")
    if MANIFEST not in files:
        raise ReleaseError(f"a release needs {MANIFEST}")
    dest = release_url(store_url, version)
    with tempfile.TemporaryDirectory(prefix="blis-release-") as tmp:
        for rel, data in files.items():
            if not isinstance(data, bytes | bytearray):
                raise ReleaseError(f"release file {rel}: expected bytes, got "
                                   f"{type(data).__name__}")
            path = os.path.join(tmp, _safe_relpath(rel))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)
        try:
            publish_directory(tmp, dest, options)
        except OSError as exc:
            raise StorageError(f"{dest}: cannot publish: {exc}") from exc
    return dest


def _summary(url: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    s = ((manifest.get("metrics") or {}).get("summary")) or {}
    proj = (((manifest.get("metrics") or {}).get("blis_projection")) or {}).get("summary") or {}
    corpus = manifest.get("corpus") or {}
    return {"version": manifest.get("version"), "created_at": manifest.get("created_at"),
            "family": manifest.get("family"), "url": url,
            "experiments": corpus.get("experiments"), "steps": corpus.get("steps"),
            "in_sample_mape": s.get("in_sample_mape"), "temporal_mape": s.get("temporal_mape"),
            "loo_mape": s.get("loo_mape"), "blis_projection_mape": proj.get("projection_mape"),
            "base_version": manifest.get("base_version")}


def list_releases(store_url: str, options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Committed releases of a store (those with a manifest), oldest first: version,
    created_at, family, url, experiments, steps and the headline MAPEs."""
    root_url = join(_store_root(store_url), RELEASES)
    fs, root = filesystem(root_url, options)
    root = root.rstrip("/")
    with storage_errors(root_url, options):
        fs.invalidate_cache(root)
        if not is_remote(root_url) and not os.path.isdir(root):
            if os.path.exists(root):
                raise StorageError(f"{root_url}: not a directory")
            return []
        found = fs.glob(f"{root}/*/{MANIFEST}")
    out = []
    for path in sorted(found):
        version = path.rstrip("/").split("/")[-2]
        if not is_version(version):
            continue
        url = join(_store_root(store_url), RELEASES, version)
        try:
            manifest = read_manifest(url, options)
        except (ReleaseError, json.JSONDecodeError) as exc:
            log.warning("skipping unreadable release %s: %s", redact(url), redact(str(exc)))
            continue
        out.append(_summary(url, manifest))
    return sorted(out, key=lambda r: (str(r["created_at"]), str(r["version"])))


# ------------------------------------------------------------------------------- diff


def _numbers(data: Any, prefix: str = "") -> dict[str, float | int]:
    """Numeric leaves of a JSON document by path; a list of ``{"feature"|"name",
    "value"}`` entries is keyed by its names (``model.global.step_overhead``)."""
    out: dict[str, float | int] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            out.update(_numbers(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            label = str(i)
            if isinstance(item, Mapping) and "value" in item:
                label = str(item.get("feature") or item.get("name") or i)
                item = item["value"]
            out.update(_numbers(item, f"{prefix}.{label}" if prefix else label))
    elif isinstance(data, int) and not isinstance(data, bool):
        out[prefix] = data  # counts stay integers
    elif isinstance(data, float):
        out[prefix] = data
    return out


def _changes(a: Mapping[str, float | int], b: Mapping[str, float | int],
             rel_tol: float = 1e-12) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va is not None and vb is not None and abs(vb - va) <= rel_tol * max(abs(va), 1.0):
            continue
        change = vb - va if va is not None and vb is not None else None
        rel = change / abs(va) * 100.0 if change is not None and va else None
        rows.append({"name": key, "a": va, "b": vb, "change": change, "change_pct": rel})
    return rows


_METRIC_KEYS = {"in_sample": "in-sample", "temporal_holdout": "temporal",
                "leave_one_experiment_out": "loo"}


def _metric_numbers(manifest: Mapping[str, Any]) -> dict[str, float | int]:
    metrics = manifest.get("metrics") or {}
    out = {f"summary.{k}": v for k, v in _numbers(metrics.get("summary") or {}).items()}
    proj = (metrics.get("blis_projection") or {}).get("summary") or {}
    out.update({f"blis_projection.{k}": v for k, v in _numbers(proj).items()})
    for key, label in _METRIC_KEYS.items():
        for name, result in (metrics.get(key) or {}).items():
            if isinstance(result, Mapping) and result.get("mape") is not None:
                out[f"{label}.{name}.mape"] = float(result["mape"])
    return out


def diff_releases(url_a: str, url_b: str, options_a: dict[str, Any] | None = None,
                  options_b: dict[str, Any] | None = None) -> dict[str, Any]:
    """What changed from release A to release B: every coefficient (native model and BLIS
    alphas/betas) and every headline metric (MAPEs in %) that differs, with the absolute
    and relative (%) change; plus the two versions, families and corpora."""
    from blis_model.release import COEFFICIENTS, _read

    sides = []
    for url, options in ((url_a, options_a), (url_b, options_b)):
        manifest = read_manifest(url, options)
        coefficients = json.loads(_read(url, COEFFICIENTS, options))
        blis = manifest.get("blis") or {}
        numbers = {f"model.{k}": v for k, v in _numbers(coefficients.get("model") or {}).items()
                   if ".params." not in f".{k}"}
        numbers.update({f"blis.beta.{i}": float(v)
                        for i, v in enumerate(blis.get("beta_coeffs") or [])})
        numbers.update({f"blis.alpha.{i}": float(v)
                        for i, v in enumerate(blis.get("alpha_coeffs") or [])})
        sides.append((manifest, numbers, _metric_numbers(manifest)))
    (ma, ca, xa), (mb, cb, xb) = sides

    def about(m: Mapping[str, Any]) -> dict[str, Any]:
        corpus = m.get("corpus") or {}
        return {"version": m.get("version"), "family": m.get("family"),
                "created_at": m.get("created_at"), "corpus": corpus.get("url"),
                "experiments": corpus.get("experiments"), "steps": corpus.get("steps")}

    return {"a": about(ma), "b": about(mb), "coefficients": _changes(ca, cb),
            "metrics": _changes(xa, xb)}


__all__ = ["RELEASES", "diff_releases", "list_releases", "publish", "read_manifest",
           "release_url"]
