"""Publishing and listing releases in a store (``<store>/releases/<version>/``, see
``storage.layout``).

Releases are immutable and appear atomically: files are written to a local temporary
folder, then published with ``storage.publish_directory`` (a rename locally; on S3
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
from blis_model.releases.files import MANIFEST
from blis_model.releases.read import read_manifest
from blis_model.releases.versions import is_version
from blis_model.storage import (
    StorageError,
    filesystem,
    is_remote,
    publish_directory,
    redact,
    storage_errors,
)
from blis_model.storage.layout import release_url, releases_url

log = logging.getLogger(__name__)


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
    root_url = releases_url(store_url)
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
        url = release_url(store_url, version)
        try:
            manifest = read_manifest(url, options)
        except (ReleaseError, json.JSONDecodeError) as exc:
            log.warning("skipping unreadable release %s: %s", redact(url), redact(str(exc)))
            continue
        out.append(_summary(url, manifest))
    return sorted(out, key=lambda r: (str(r["created_at"]), str(r["version"])))


__all__ = ["list_releases", "publish"]
