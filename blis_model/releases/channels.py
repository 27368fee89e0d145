"""Release channels: named pointers (``candidate``, ``stable``) to release versions.

A channel is one small JSON object ``<store>/channels/<name>.json``::

    {"channel", "version", "previous", "seq", "action", "updated_at", "by", "reason", "gate",
     "gate_skipped", "run"}

``by`` is who decided (a reviewer's name, ``user@host``, or the flow run that moved
``candidate``); ``run`` links the move to the Prefect flow run and deployment that made it
(``flow_run_id``, ``flow_run_name``, ``deployment_id``, ``deployment_name``), when one did.

Every update is a compare-and-swap against the pointer the caller read first
(:func:`read_channel`): if another writer moved the channel in between, the update fails
with :class:`ChannelConflict` and nothing is written. On S3 the swap is one conditional
PUT (``If-Match: <etag>``, or ``If-None-Match: *`` when the channel does not exist yet),
so the store itself arbitrates; locally the swap happens under an exclusive ``flock`` on
``<store>/channels/.<name>.lock``, after re-reading and verifying the pointer.

History: each update is also written, after the swap, as its own object
``<store>/channels/<name>.history/<seq:08d>.json`` (created exclusively, so ``seq``
orders the events); :func:`history` lists them oldest first — who moved the channel,
when, why, from which version to which, and the gate's verdict. A promotion the gate
refused is recorded there too (``action`` ``refused``, the channel's ``seq`` unchanged,
``<seq:08d>.refused-<time>-<hex>.json``): who tried, what, and why it was refused.

Gated channels (``stable``): :func:`promote` moves them only through a gate, or with an
explicit, recorded ``skip_gate`` reason (:class:`GateRequired` otherwise).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import getpass
import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from blis_model.errors import ReleaseError
from blis_model.releases.read import Release, load_release, read_manifest
from blis_model.releases.versions import is_version
from blis_model.storage import (
    StorageError,
    error_code,
    filesystem,
    is_remote,
    join,
    layout,
    redact,
    storage_errors,
    write_bytes_atomic,
)

CHANNELS: tuple[str, ...] = ("candidate", "stable")
#: Channels that move only through the golden gate, or with a recorded reason to skip it.
GATED_CHANNELS: frozenset[str] = frozenset({"stable"})
LOCK_TIMEOUT_S = 30.0
REFUSED = "refused"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_SAFE_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ChannelConflict(ReleaseError):
    """Another writer moved the channel between our read and our write."""


class GateRefused(ReleaseError):
    """The golden gate refused a promotion; ``result`` holds its verdict
    (``calibration.gate.GateResult``)."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


class GateRequired(ReleaseError):
    """A gated channel (``stable``) was to be moved without a gate and without an explicit
    reason to skip it."""


#: A promotion gate: (candidate, baseline or None) → a verdict with ``passed``,
#: ``reasons`` and ``to_dict()`` (recorded in the channel's history). The golden gate
#: is ``calibration.gate.load_gate``; channels only call it.
Gate = Callable[[Release, Release | None], Any]


@dataclass(frozen=True)
class Pointer:
    """One state of a channel: which version it points to, and who set it, when, why."""

    channel: str
    version: str
    previous: str | None
    seq: int
    action: str  # "promote" | "rollback" | "refused" (history only: the channel did not move)
    updated_at: str  # ISO 8601 UTC
    by: str
    reason: str
    gate: dict[str, Any] | None = None
    gate_skipped: str | None = None  # why the gate was skipped (gated channels only)
    run: dict[str, Any] | None = None  # the Prefect flow run / deployment that acted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Pointer:
        try:
            return cls(channel=str(data["channel"]), version=str(data["version"]),
                       previous=data.get("previous"), seq=int(data.get("seq", 0)),
                       action=str(data.get("action", "promote")),
                       updated_at=str(data.get("updated_at", "")), by=str(data.get("by", "")),
                       reason=str(data.get("reason", "")), gate=data.get("gate"),
                       gate_skipped=data.get("gate_skipped") or None,
                       run=data.get("run") or None)
        except (KeyError, TypeError, ValueError) as exc:
            raise ReleaseError(f"channel pointer is malformed ({exc})") from None


@dataclass(frozen=True)
class Snapshot:
    """A channel as read: its pointer (None when unset) and the token to swap against
    (the object's ETag on S3, the SHA-256 of its bytes locally; None when unset)."""

    channel: str
    pointer: Pointer | None
    token: str | None = field(default=None, repr=False)


# ------------------------------------------------------------------------ locations


def check_channel(name: str) -> str:
    """The channel name, validated (lower-case letters, digits, ``-``/``_``)."""
    if not _NAME_RE.match(name or ""):
        raise ReleaseError(f"invalid channel name '{name}' (e.g. {', '.join(CHANNELS)})")
    return name


def channel_url(store_url: str, name: str) -> str:
    return layout.channel_url(store_url, check_channel(name))


def _history_url(store_url: str, name: str) -> str:
    return layout.channel_history_url(store_url, check_channel(name))


def default_actor() -> str:
    """``user@host`` of this process (who promoted, when nothing better is known)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _encode(pointer: Pointer) -> bytes:
    return (json.dumps(pointer.to_dict(), indent=2, ensure_ascii=False) + "\n").encode()


# ---------------------------------------------------------------------------- reads


def _decode(url: str, raw: bytes, name: str) -> Pointer:
    try:
        pointer = Pointer.from_dict(json.loads(raw))
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise ReleaseError(f"channel {name}: {redact(url)} is not valid JSON ({exc})") from None
    if pointer.channel != name:
        raise ReleaseError(f"channel {name}: {redact(url)} names channel '{pointer.channel}'")
    return pointer


def _read_local(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _s3_etag(fs: Any, path: str) -> str | None:
    bucket, _, key = path.partition("/")
    try:
        head = fs.call_s3("head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None
    return str(head["ETag"])


def _read_s3(fs: Any, path: str) -> tuple[bytes | None, str | None]:
    """Bytes and ETag of one object, consistent with each other (ETag read on both sides
    of the GET; retried if the object changed meanwhile)."""
    for _ in range(5):
        before = _s3_etag(fs, path)
        if before is None:
            return None, None
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            continue
        if _s3_etag(fs, path) == before:
            return raw, before
    raise ChannelConflict(f"{path}: the channel keeps changing while being read; try again")


def read_channel(store_url: str, name: str, options: dict[str, Any] | None = None
                 ) -> Snapshot:
    """The channel's current pointer (``pointer`` None when it was never set)."""
    url = channel_url(store_url, name)
    fs, path = filesystem(url, options)
    with storage_errors(url, options):
        if is_remote(url):
            fs.invalidate_cache(path)
            raw, token = _read_s3(fs, path)
        else:
            raw = _read_local(path)
            token = hashlib.sha256(raw).hexdigest() if raw is not None else None
    if raw is None:
        return Snapshot(name, None, None)
    return Snapshot(name, _decode(url, raw, name), token)


def list_channels(store_url: str, options: dict[str, Any] | None = None) -> dict[str, Pointer]:
    """Every set channel of a store (name → pointer), by name."""
    root = layout.channels_url(store_url)
    fs, path = filesystem(root, options)
    with storage_errors(root, options):
        fs.invalidate_cache(path)
        if not is_remote(root) and not os.path.isdir(path):
            return {}
        try:
            found = fs.glob(f"{path.rstrip('/')}/*.json")
        except FileNotFoundError:
            return {}
    out = {}
    for item in sorted(found):
        name = item.rstrip("/").rsplit("/", 1)[-1][: -len(".json")]
        if _NAME_RE.match(name):
            snap = read_channel(store_url, name, options)
            if snap.pointer is not None:
                out[name] = snap.pointer
    return out


def history(store_url: str, name: str, options: dict[str, Any] | None = None
            ) -> list[Pointer]:
    """Every recorded update of the channel, oldest first (the current pointer included,
    even if its history event could not be written), with the promotions the gate refused
    (``action`` ``refused``) in their place between the moves."""
    url = _history_url(store_url, name)
    fs, path = filesystem(url, options)
    events: dict[int, Pointer] = {}
    refused: list[Pointer] = []
    with storage_errors(url, options):
        fs.invalidate_cache(path)
        try:
            found = fs.glob(f"{path.rstrip('/')}/*.json")
        except FileNotFoundError:
            found = []
        for item in sorted(found):
            try:
                pointer = _decode(item, fs.cat_file(item), name)
            except (ReleaseError, FileNotFoundError):
                continue
            if pointer.action == REFUSED:
                refused.append(pointer)
            else:
                events[pointer.seq] = pointer
    current = read_channel(store_url, name, options).pointer
    if current is not None:
        events.setdefault(current.seq, current)
    # A refusal carries the seq of the move it followed: after that move, before the next.
    ordered = [(e.seq, 0, e.updated_at, e) for e in events.values()]
    ordered += [(e.seq, 1, e.updated_at, e) for e in refused]
    return [e for *_, e in sorted(ordered, key=lambda t: t[:3])]


# ---------------------------------------------------------------------------- writes


@contextlib.contextmanager
def _local_lock(path: str, name: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive ``flock`` on the channel's lock file (released when the process dies)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise ChannelConflict(f"channel {name}: another update holds {path} for "
                                          f"more than {timeout:.0f} s; try again") from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _conflict(name: str, expected: Snapshot) -> ChannelConflict:
    was = expected.pointer.version if expected.pointer else "unset"
    return ChannelConflict(f"channel {name} was moved by someone else while this update was "
                           f"prepared (it was {was} when read); nothing was changed: re-read "
                           "the channel and try again")


def _swap_local(path: str, name: str, expected: Snapshot, body: bytes) -> None:
    lock = os.path.join(os.path.dirname(path), f".{name}.lock")
    with _local_lock(lock, name):
        raw = _read_local(path)
        token = hashlib.sha256(raw).hexdigest() if raw is not None else None
        if token != expected.token:
            raise _conflict(name, expected)
        write_bytes_atomic(path, body)


def _swap_s3(fs: Any, url: str, path: str, name: str, expected: Snapshot, body: bytes,
             options: dict[str, Any] | None) -> None:
    bucket, _, key = path.partition("/")
    condition = ({"IfMatch": expected.token} if expected.token is not None
                 else {"IfNoneMatch": "*"})
    try:
        with storage_errors(url, options):
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body,
                       ContentType="application/json", **condition)
    except (OSError, StorageError) as exc:
        code = error_code(exc)
        if isinstance(exc, FileExistsError) or code in ("PreconditionFailed", "412",
                                                        "ConditionalRequestConflict", "409"):
            raise _conflict(name, expected) from None
        if code in ("NotImplemented", "501"):
            raise StorageError(f"{url}: this object store does not support conditional "
                               "writes (If-Match/If-None-Match), which channels need") from exc
        raise
    finally:
        with contextlib.suppress(Exception):
            fs.invalidate_cache(path)


def _create(url: str, body: bytes, options: dict[str, Any] | None) -> None:
    """Create one history object (exclusively: an existing one is left alone)."""
    fs, path = filesystem(url, options)
    with storage_errors(url, options):
        if is_remote(url):
            bucket, _, key = path.partition("/")
            with contextlib.suppress(FileExistsError):
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body,
                           ContentType="application/json", IfNoneMatch="*")
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with contextlib.suppress(FileExistsError), open(path, "xb") as fh:
            fh.write(body)


def _record(store_url: str, pointer: Pointer, options: dict[str, Any] | None) -> None:
    """Write the update's history event (exclusive create: one event per ``seq``)."""
    url = join(_history_url(store_url, pointer.channel), f"{pointer.seq:08d}.json")
    _create(url, _encode(pointer), options)


def record_refusal(store_url: str, name: str, version: str, current: Pointer | None, *,
                   by: str | None = None, reason: str = "",
                   gate: Mapping[str, Any] | None = None, run: Mapping[str, Any] | None = None,
                   options: dict[str, Any] | None = None) -> Pointer:
    """Record in the channel's history that moving ``name`` to ``version`` was refused
    (the channel itself is unchanged); ``gate`` is the verdict. Returns the event."""
    event = Pointer(channel=check_channel(name), version=version,
                    previous=current.version if current else None,
                    seq=current.seq if current else 0, action=REFUSED, updated_at=_now(),
                    by=by or default_actor(), reason=reason,
                    gate=dict(gate) if gate is not None else None,
                    run=dict(run) if run else None)
    stamp = re.sub(r"[^0-9]", "", event.updated_at)
    url = join(_history_url(store_url, name),
               f"{event.seq:08d}.{REFUSED}-{stamp}-{secrets.token_hex(4)}.json")
    _create(url, _encode(event), options)
    return event


def write_channel(store_url: str, name: str, version: str, expected: Snapshot, *,
                  by: str | None = None, reason: str = "", action: str = "promote",
                  previous: str | None | bool = True, gate: Mapping[str, Any] | None = None,
                  gate_skipped: str | None = None, run: Mapping[str, Any] | None = None,
                  options: dict[str, Any] | None = None) -> Pointer:
    """Point channel ``name`` at ``version`` if it is still as ``expected`` (a snapshot
    from :func:`read_channel`), else raise :class:`ChannelConflict`. ``previous`` defaults
    (True) to the version the channel pointed to. Returns the new pointer."""
    if not _SAFE_VERSION_RE.match(version or ""):
        raise ReleaseError(f"invalid release version '{version}'")
    if expected.channel != name:
        raise ReleaseError(f"snapshot of channel {expected.channel} used for channel {name}")
    old = expected.pointer
    if previous is True:
        previous = old.version if old else None
    pointer = Pointer(channel=name, version=version, previous=previous or None,
                      seq=(old.seq + 1) if old else 1, action=action, updated_at=_now(),
                      by=by or default_actor(), reason=reason,
                      gate=dict(gate) if gate is not None else None,
                      gate_skipped=gate_skipped or None, run=dict(run) if run else None)
    url = channel_url(store_url, name)
    fs, path = filesystem(url, options)
    body = _encode(pointer)
    if is_remote(url):
        _swap_s3(fs, url, path, name, expected, body, options)
    else:
        _swap_local(path, name, expected, body)
    with contextlib.suppress(OSError, StorageError):  # the pointer carries the event too
        _record(store_url, pointer, options)
    return pointer


# ----------------------------------------------------------------- promote / rollback


def promote(store_url: str, version: str, channel: str = "stable", *, by: str | None = None,
            reason: str = "", gate: Gate | None = None, skip_gate: str | None = None,
            run: Mapping[str, Any] | None = None,
            options: dict[str, Any] | None = None) -> Pointer:
    """Move ``channel`` to release ``version`` of the store.

    With a ``gate`` (``calibration.gate.load_gate``), the gate runs first — the
    candidate against the channel's current release — and :class:`GateRefused` is
    raised when it fails (the refusal is recorded in the channel's history). A gated
    channel (:data:`GATED_CHANNELS`: ``stable``) moves without a gate only with
    ``skip_gate``, the reason to skip it (recorded in the pointer); else
    :class:`GateRequired`. ``skip_gate`` also skips a given gate. The pointer is then
    swapped only if nobody moved the channel since it was read (:class:`ChannelConflict`
    otherwise). ``run`` (the flow run and deployment acting) is recorded with ``by``.
    Returns the new pointer.
    """
    check_channel(channel)
    if not is_version(version):
        raise ReleaseError(f"invalid release version '{version}'")
    skip_gate = (skip_gate or "").strip() or None
    if skip_gate:
        gate = None
    elif gate is None and channel in GATED_CHANNELS:
        raise GateRequired(f"promotion to {channel} needs the golden gate: configure a golden "
                           "corpus, or skip the gate explicitly with a reason (recorded in "
                           "the history)")
    snap = read_channel(store_url, channel, options)
    if snap.pointer is not None and snap.pointer.version == version:
        raise ReleaseError(f"channel {channel} already points to {version}")
    url = layout.release_url(store_url, version)
    verdict = None
    if gate is not None:
        candidate = load_release(url, options)
        baseline = (load_release(layout.release_url(store_url, snap.pointer.version), options)
                    if snap.pointer is not None else None)
        result = gate(candidate, baseline)
        if not result.passed:
            with contextlib.suppress(OSError, StorageError):  # the refusal stands regardless
                record_refusal(store_url, channel, version, snap.pointer, by=by, reason=reason,
                               gate=result.to_dict(), run=run, options=options)
            raise GateRefused(f"promotion of {version} to {channel} refused by the golden "
                              f"gate: {'; '.join(result.reasons)}", result)
        verdict = result.to_dict()
    else:
        read_manifest(url, options)  # the release must exist
    return write_channel(store_url, channel, version, snap, by=by, reason=reason,
                         gate=verdict, gate_skipped=skip_gate, run=run, options=options)


def rollback(store_url: str, channel: str = "stable", *, by: str | None = None,
             reason: str = "", run: Mapping[str, Any] | None = None,
             options: dict[str, Any] | None = None) -> Pointer:
    """Point ``channel`` back at its previous version (the one before the current)."""
    snap = read_channel(store_url, channel, options)
    current = snap.pointer
    if current is None:
        raise ReleaseError(f"channel {channel} is not set: nothing to roll back")
    if not current.previous:
        raise ReleaseError(f"channel {channel} has no previous version to roll back to")
    target = current.previous
    read_manifest(layout.release_url(store_url, target), options)
    # The target's own predecessor, so that repeated rollbacks keep stepping back.
    before = [e for e in history(store_url, channel, options)
              if e.version == target and e.seq < current.seq]
    previous = before[-1].previous if before else None
    return write_channel(store_url, channel, target, snap, by=by,
                         reason=reason or f"rollback from {current.version}", action="rollback",
                         previous=previous, run=run, options=options)


__all__ = ["CHANNELS", "GATED_CHANNELS", "REFUSED", "ChannelConflict", "Gate", "GateRefused",
           "GateRequired", "Pointer", "Snapshot", "channel_url", "check_channel",
           "default_actor", "history", "list_channels", "promote", "read_channel",
           "record_refusal", "rollback", "write_channel"]
