"""New experiments under a watched prefix, recognised by object identity.

An experiment is a folder holding ``exp-config.yaml`` (see ``experiment``). Its identity
is a digest of its objects' names and identities (the ETag on S3, size and mtime
locally), so a re-upload of a changed trace is new again and an unchanged folder is not.
What was already seen is remembered in ``<store>/state/seen.json``, per watched prefix.
An experiment is only reported once its newest object is ``settle_s`` seconds old, so a
folder still being uploaded waits for the next scan.

Pure library code: listing and state only; the sensor flow (``flows.watch``) emits events.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from blis_model.configuration.experiment import EXP_CONFIG
from blis_model.errors import CorpusError
from blis_model.storage import (
    check_reachable,
    filesystem,
    is_remote,
    redact,
    storage_errors,
    write_bytes_atomic,
)
from blis_model.storage.layout import calibrated_state_url, seen_state_url, store_root


@dataclass(frozen=True)
class Seen:
    """One experiment folder as listed: identity digest, object count, bytes, newest
    object time (UTC epoch seconds)."""

    name: str
    identity: str
    files: int
    bytes: int
    newest: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _object_identity(info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    return f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or ''}"


def _mtime(info: dict[str, Any]) -> float:
    value = info.get("LastModified") or info.get("mtime") or info.get("last_modified") or 0.0
    if isinstance(value, dt.datetime):
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def scan(prefix: str, options: dict[str, Any] | None = None) -> dict[str, Seen]:
    """Every experiment folder under ``prefix`` (name relative to it → :class:`Seen`),
    from one recursive listing. A prefix that does not exist (yet) holds no experiment:
    ``{}``, not an error (a missing bucket or bad credentials still raise)."""
    fs, root = filesystem(prefix, options)
    root = root.rstrip("/")
    with storage_errors(prefix, options):
        fs.invalidate_cache(root)
        if not fs.exists(root):
            check_reachable(prefix, options)  # a missing bucket or bad credentials raise
            return {}
        found = fs.find(root, detail=True)
    objects = {p: info for p, info in found.items() if info.get("type", "file") == "file"}
    folders = sorted({p.rsplit("/", 1)[0] for p in objects if p.rsplit("/", 1)[-1] == EXP_CONFIG})
    out: dict[str, Seen] = {}
    for folder in folders:
        mine = {p: i for p, i in objects.items() if p.startswith(folder + "/")}
        # Objects of a nested experiment belong to it, not to this folder.
        nested = [f for f in folders if f != folder and f.startswith(folder + "/")]
        mine = {p: i for p, i in mine.items() if not any(p.startswith(n + "/") for n in nested)}
        digest = hashlib.sha256()
        for path in sorted(mine):
            digest.update(f"{path[len(folder) + 1:]}\0{_object_identity(mine[path])}\n".encode())
        name = folder[len(root) + 1:] if folder != root else "."
        out[name] = Seen(name=name, identity=digest.hexdigest(), files=len(mine),
                         bytes=int(sum(int(i.get("size") or 0) for i in mine.values())),
                         newest=max((_mtime(i) for i in mine.values()), default=0.0))
    return out


def state_url(store_url: str) -> str:
    return seen_state_url(store_url)


def _prefix_key(prefix: str) -> str:
    return redact(prefix if is_remote(prefix) else store_root(prefix)).rstrip("/")


def _read_state(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """A state object's JSON, fresh from the store ({} when missing or unreadable)."""
    fs, path = filesystem(url, options)
    with storage_errors(url, options):
        fs.invalidate_cache(path)
        try:
            return json.loads(fs.cat_file(path))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}


def _write_prefixes(url: str, prefixes: dict[str, Any], options: dict[str, Any] | None) -> None:
    write_bytes_atomic(url, (json.dumps({"prefixes": prefixes}, indent=2) + "\n").encode(),
                       options)


def load_seen(store_url: str, prefix: str, options: dict[str, Any] | None = None
              ) -> dict[str, str]:
    """What was already reported under ``prefix``: experiment name → identity."""
    url = state_url(store_url)
    fs, path = filesystem(url, options)
    with storage_errors(url, options):
        fs.invalidate_cache(path)
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            return {}
    try:
        state = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{redact(url)} is not valid JSON ({exc}): remove it to rescan "
                          "every experiment") from None
    entries = (state.get("prefixes") or {}).get(_prefix_key(prefix)) or {}
    return {name: str(entry.get("identity")) for name, entry in entries.items()}


def save_seen(store_url: str, prefix: str, seen: dict[str, Seen],
              options: dict[str, Any] | None = None) -> None:
    """Remember ``seen`` as the experiments reported under ``prefix`` (other prefixes'
    entries are kept)."""
    url = state_url(store_url)
    state = _read_state(url, options)
    prefixes = dict(state.get("prefixes") or {})
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    prefixes[_prefix_key(prefix)] = {name: {**s.to_dict(), "seen_at": now}
                                     for name, s in sorted(seen.items())}
    _write_prefixes(url, prefixes, options)


def new_experiments(scanned: dict[str, Seen], seen: dict[str, str], settle_s: float = 0.0,
                    now: float | None = None) -> tuple[list[Seen], list[Seen]]:
    """``(ready, waiting)``: experiments new or changed since ``seen``, split by whether
    their newest object is at least ``settle_s`` seconds old."""
    now = dt.datetime.now(dt.UTC).timestamp() if now is None else now
    changed = [s for name, s in sorted(scanned.items()) if seen.get(name) != s.identity]
    ready = [s for s in changed if now - s.newest >= settle_s]
    waiting = [s for s in changed if now - s.newest < settle_s]
    return ready, waiting


def corpus_identity(scanned: dict[str, Seen]) -> str:
    """One digest of every experiment's identity under a prefix."""
    digest = hashlib.sha256()
    for name, item in sorted(scanned.items()):
        digest.update(f"{name}\0{item.identity}\n".encode())
    return digest.hexdigest()


def last_calibrated(store_url: str, prefix: str, options: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """``{"identity", "version", "experiments"}`` of the last release calibrated on
    ``prefix`` ({} if none; ``experiments``, name → identity, when it was recorded)."""
    state = _read_state(calibrated_state_url(store_url), options)
    return dict((state.get("prefixes") or {}).get(_prefix_key(prefix)) or {})


def mark_calibrated(store_url: str, prefix: str, identity: str, version: str,
                    options: dict[str, Any] | None = None, *,
                    experiments: dict[str, Seen] | None = None) -> None:
    """Remember that release ``version`` was calibrated on ``prefix`` as it was then
    (and, with ``experiments``, each experiment's identity)."""
    url = calibrated_state_url(store_url)
    prefixes = dict(_read_state(url, options).get("prefixes") or {})
    entry: dict[str, Any] = {"identity": identity, "version": version}
    if experiments is not None:
        entry["experiments"] = {n: s.identity for n, s in sorted(experiments.items())}
    prefixes[_prefix_key(prefix)] = entry
    _write_prefixes(url, prefixes, options)


def changed_since(scanned: dict[str, Seen], last: dict[str, Any]) -> list[str]:
    """Names of the experiments of ``scanned`` that are new or changed since ``last``
    (:func:`last_calibrated`); every experiment when ``last`` has no per-experiment record."""
    before = last.get("experiments") or {}
    return [name for name, s in sorted(scanned.items()) if before.get(name) != s.identity]




def upload_experiment(folder: str, prefix: str, options: dict[str, Any] | None = None,
                      name: str | None = None, default_hardware: str | None = None) -> str:
    """Upload the local experiment ``folder`` to ``<prefix>/<name>/`` (``name``: the
    folder's name) through the storage layer and return its URL.

    The folder is checked first (its ``exp-config.yaml`` parses, its model and GPU are
    known, it holds traces or measurements: ConfigError/CorpusError otherwise), and
    ``exp-config.yaml`` is uploaded LAST: :func:`scan` recognises an experiment by that
    object, so a watcher never sees a half-uploaded folder as an experiment."""
    import os

    from blis_model.configuration.experiment import load_experiment
    from blis_model.storage import join

    root = os.path.abspath(folder)
    if not os.path.isfile(os.path.join(root, EXP_CONFIG)):
        raise CorpusError(f"{folder}: not an experiment folder (no {EXP_CONFIG})")
    name = name or os.path.basename(root)
    experiment = load_experiment(os.path.dirname(root), os.path.basename(root),
                                 default_hardware=default_hardware)
    if not experiment.kinds:
        raise CorpusError(f"{folder}: no traces (traces.json[.gz]) and no request "
                          "measurements to upload")
    files = sorted(os.path.relpath(os.path.join(d, f), root)
                   for d, _, names in os.walk(root) for f in names)
    files = [f for f in files if f != EXP_CONFIG] + [EXP_CONFIG]
    dest = join(prefix, name)
    fs, base = filesystem(dest, options)
    with storage_errors(dest, options):
        for rel in files:
            target = f"{base.rstrip('/')}/{rel.replace(os.sep, '/')}"
            if not is_remote(dest):
                os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.put_file(os.path.join(root, rel), target)
        fs.invalidate_cache(base)
    return dest


__all__ = ["Seen", "changed_since", "corpus_identity", "last_calibrated", "load_seen",
           "mark_calibrated", "new_experiments", "save_seen", "scan", "state_url",
           "upload_experiment"]
