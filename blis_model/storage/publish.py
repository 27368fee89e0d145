"""Writing to a store so that readers never see a partial result.

* :func:`write_bytes_atomic`: one object or file, old content or new, never a part;
* :func:`publish_directory`: a finished folder (a release) appears all at once. Locally by
  a single ``os.rename``; on S3 its commit marker (``manifest.json`` by default) is
  uploaded last, so readers treat a folder without its marker as invisible
  (:func:`is_committed`).

Published files are world-readable like any shared data (folders 0755, files 0644), so
releases on a shared filesystem can be read by everyone who may read the store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from typing import Any

import fsspec

from blis_model.storage.filesystem import (
    StorageError,
    error_code,
    filesystem,
    is_remote,
    join,
    redact,
    storage_errors,
)

log = logging.getLogger(__name__)

DIR_MODE = 0o755
FILE_MODE = 0o644

__all__ = ["DIR_MODE", "FILE_MODE", "is_committed", "publish_directory", "write_bytes_atomic"]

def write_bytes_atomic(url: str, data: bytes, options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``url`` so readers see the old content or the new, never a part."""
    fs, path = filesystem(url, options)
    if not is_remote(url):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, FILE_MODE)  # mkstemp creates 0600
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    with storage_errors(url, options):
        fs.pipe_file(path, data)  # one PUT: S3 objects appear whole
        fs.invalidate_cache(path)


def is_committed(
    url: str, options: dict[str, Any] | None = None, commit_marker: str = "manifest.json"
) -> bool:
    """True when the folder at ``url`` has its commit marker (i.e. is visible to readers)."""
    fs, path = filesystem(join(url, commit_marker), options)
    with storage_errors(url, options):
        fs.invalidate_cache(path)
        return bool(fs.exists(path))


def _local_files(local_dir: str) -> list[str]:
    """Relative POSIX paths of all files under ``local_dir``, sorted."""
    found: list[str] = []
    for root, dirs, files in os.walk(local_dir):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), local_dir)
            found.append(rel.replace(os.sep, "/"))
    return found


def publish_directory(
    local_dir: str,
    dest_url: str,
    options: dict[str, Any] | None = None,
    commit_marker: str = "manifest.json",
) -> None:
    """Publish the finished folder ``local_dir`` at ``dest_url``, all or nothing.

    Releases are immutable: an existing (committed) destination is refused with
    :class:`StorageError`. Locally the folder is copied to a hidden sibling and renamed
    into place. On S3 every file is uploaded, then ``commit_marker`` last; on failure the
    uploaded objects are removed (best effort) and the error is re-raised.
    """
    if not os.path.isdir(local_dir):
        raise StorageError(f"{local_dir}: not a directory")
    files = _local_files(local_dir)
    if commit_marker not in files:
        raise StorageError(f"{local_dir}: commit marker '{commit_marker}' is missing")
    fs, dest = filesystem(dest_url, options)
    if not is_remote(dest_url):
        _publish_local(local_dir, dest_url, dest)
    else:
        _publish_remote(local_dir, dest_url, options, fs, dest, files, commit_marker)


def _publish_local(local_dir: str, dest_url: str, dest: str) -> None:
    if os.path.lexists(dest):
        raise StorageError(f"{dest_url}: already exists (releases are immutable)")
    parent, name = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        shutil.copytree(local_dir, tmp, copy_function=shutil.copy2)
        _make_readable(tmp)
        if os.path.lexists(dest):  # lost a race with another publisher
            raise StorageError(f"{dest_url}: already exists (releases are immutable)")
        try:
            os.rename(tmp, dest)
        except OSError as exc:  # e.g. ENOTEMPTY when a concurrent publish won
            raise StorageError(f"{dest_url}: cannot publish: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(root: str) -> None:
    """Folders 0755 and files 0644 under ``root`` (a temporary folder is created 0700)."""
    os.chmod(root, DIR_MODE)
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(parent, name), DIR_MODE)
        for name in files:
            os.chmod(os.path.join(parent, name), FILE_MODE)


def _publish_remote(
    local_dir: str,
    dest_url: str,
    options: dict[str, Any] | None,
    fs: fsspec.AbstractFileSystem,
    dest: str,
    files: list[str],
    commit_marker: str,
) -> None:
    marker = f"{dest}/{commit_marker}"
    with storage_errors(dest_url, options):
        fs.invalidate_cache(dest)
        if fs.exists(marker):
            raise StorageError(f"{dest_url}: already exists (releases are immutable)")
        # Objects of an earlier publish that died before its commit.
        found = fs.find(dest, detail=True)
        leftovers = [name for name, info in found.items() if info.get("type") == "file"]
    if leftovers:
        log.warning("%s: removing %d uncommitted objects", redact(dest_url), len(leftovers))
        with storage_errors(dest_url, options):
            fs.rm(leftovers)
    uploaded: list[str] = []
    try:
        with storage_errors(dest_url, options):
            for rel in files:
                if rel == commit_marker:
                    continue
                remote = f"{dest}/{rel}"
                uploaded.append(remote)
                fs.put_file(os.path.join(local_dir, *rel.split("/")), remote)
            with open(os.path.join(local_dir, commit_marker), "rb") as fh:
                body = fh.read()
            try:
                # If-None-Match: * makes the commit exclusive on stores that support it.
                fs.pipe_file(marker, body, mode="create")
            except (FileExistsError, OSError) as exc:
                if isinstance(exc, FileExistsError) or error_code(exc) == "PreconditionFailed":
                    raise StorageError(
                        f"{dest_url}: already exists (published concurrently by another writer)"
                    ) from exc
                raise
    except BaseException as exc:
        concurrent = isinstance(exc, StorageError) and "concurrently" in str(exc)
        if not concurrent:  # the other writer's committed objects must stay
            _remove_quietly(fs, uploaded, dest_url)
        raise
    finally:
        with contextlib.suppress(Exception):
            fs.invalidate_cache(dest)


def _remove_quietly(fs: fsspec.AbstractFileSystem, paths: list[str], dest_url: str) -> None:
    for path in paths:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
        except Exception as exc:  # best effort: an uncommitted folder is invisible anyway
            log.warning("%s: could not remove %s: %s", redact(dest_url), path, redact(str(exc)))
