"""Where data lives: fsspec filesystems for local paths, ``file://`` and ``s3://`` URLs.

Everything that talks to a store goes through :func:`filesystem`, so S3 options (endpoint,
credentials, retries) come from one place: explicit options, else the usual AWS
environment variables plus ``BLIS_S3_ENDPOINT_URL``.

Errors a user can fix (missing bucket, wrong credentials, unreachable endpoint) are
raised as :class:`StorageError` with a one-line message from which credentials have been
removed by :func:`redact`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import fsspec

log = logging.getLogger(__name__)

__all__ = [
    "StorageError",
    "check_reachable",
    "error_code",
    "filesystem",
    "is_permanent",
    "is_remote",
    "join",
    "redact",
    "storage_errors",
    "storage_options_for",
    "translate_error",
]

#: botocore client settings applied to every S3 filesystem unless overridden.
DEFAULT_S3_CONFIG: dict[str, Any] = {
    "retries": {"max_attempts": 5, "mode": "standard"},
    "connect_timeout": 5,
    "read_timeout": 60,
}

_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "403",
    "Forbidden",
}
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "BLIS_S3_ACCESS_KEY_ID", "BLIS_S3_SECRET_ACCESS_KEY")
# Secrets seen by storage_options_for(); redact() removes them wherever they appear.
_KNOWN_SECRETS: set[str] = set()


class StorageError(Exception):
    """A storage problem the user can act on; the message is one redacted line."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(" ".join(str(message).split())))


# --------------------------------------------------------------------------- URLs


def _scheme(url: str) -> str:
    """Return the lower-case URL scheme, or ``""`` for a plain path."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", url)
    return match.group(1).lower() if match else ""


def is_remote(url: str) -> bool:
    """True for URLs that are not on the local filesystem (anything but paths/file://)."""
    return _scheme(url) not in ("", "file", "local")


def _is_s3(url: str) -> bool:
    return _scheme(url) in ("s3", "s3a")


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or path, keeping its scheme (``s3://b`` + ``k`` -> ``s3://b/k``).

    Parts are always treated as relative: leading/trailing slashes are stripped.
    """
    scheme = _scheme(url)
    if scheme:
        prefix = url[: len(scheme) + 3]
        rest = url[len(scheme) + 3 :]
        root = "/" if rest.startswith("/") else ""  # file:///abs keeps its root
        base = root + rest.strip("/")
    else:
        prefix = ""
        base = url.rstrip("/") or ("/" if url.startswith("/") else "")
    for part in parts:
        piece = str(part).strip("/")
        if not piece:
            continue
        if not base:
            base = piece
        elif base.endswith("/"):
            base = base + piece
        else:
            base = f"{base}/{piece}"
    return prefix + base


# ------------------------------------------------------------------------ options


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _remember_secrets(options: dict[str, Any]) -> None:
    for name in ("key", "secret", "token", "password"):
        value = options.get(name)
        if isinstance(value, str) and len(value) >= 4:
            _KNOWN_SECRETS.add(value)


def storage_options_for(url: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return fsspec storage options for ``url``.

    For ``s3://`` URLs: a copy of ``options`` when given, else options built from the
    environment (``BLIS_S3_ENDPOINT_URL``/``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``).
    ``BLIS_S3_ACCESS_KEY_ID`` + ``BLIS_S3_SECRET_ACCESS_KEY`` (and ``BLIS_S3_REGION``), when
    set, take precedence over the ``AWS_*`` ones: credentials for blis-model only, which
    leave the shell's own AWS credentials alone (the local stack's ``.run/env``).
    In both cases ``config_kwargs`` gets the default retries and timeouts for any setting
    not given explicitly (``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` override the default
    retries). Local paths and ``file://`` URLs get ``{}``.
    """
    if not _is_s3(url):
        return {}
    if options:
        opts = copy.deepcopy(dict(options))
    else:
        opts = {}
        endpoint = _env("BLIS_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
        region = _env("BLIS_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION")
        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if region:
            client_kwargs["region_name"] = region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        key, secret = _env("BLIS_S3_ACCESS_KEY_ID"), _env("BLIS_S3_SECRET_ACCESS_KEY")
        if key and secret:
            opts["key"], opts["secret"] = key, secret
            key = secret = None  # blis-model's own credentials: no AWS session token
        else:
            key, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            opts["key"], opts["secret"] = key, secret
            token = _env("AWS_SESSION_TOKEN")
            if token:
                opts["token"] = token
    config = dict(opts.get("config_kwargs") or {})
    attempts = _env("AWS_MAX_ATTEMPTS")  # the AWS SDKs' own knob, honoured if set
    if attempts and attempts.isdigit() and "retries" not in config:
        config["retries"] = {"max_attempts": max(1, int(attempts)),
                             "mode": _env("AWS_RETRY_MODE") or "standard"}
    for name, value in DEFAULT_S3_CONFIG.items():
        config.setdefault(name, copy.deepcopy(value))
    opts["config_kwargs"] = config
    _remember_secrets(opts)
    return opts


def _endpoint(options: dict[str, Any]) -> str:
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get(
        "endpoint_url"
    )
    return str(endpoint) if endpoint else "the default AWS S3 endpoint"


def filesystem(
    url: str, options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for ``url``: ``bucket/key`` for S3, an absolute path locally."""
    if not is_remote(url):
        path = url[len("file://") :] if url.startswith("file://") else url
        path = os.path.abspath(os.path.expanduser(path))
        return fsspec.filesystem("file"), path
    opts = storage_options_for(url, options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
    except ImportError as exc:  # e.g. an unknown protocol
        raise StorageError(f"{url}: cannot open storage: {exc}") from exc
    return fs, path


# ---------------------------------------------------------------------- redaction

_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|AGPA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b")
# 40-char base64 tokens with both cases (AWS secret keys); lower-case hex digests are spared.
_AWS_SECRET = re.compile(
    r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+=]*[a-z])(?=[A-Za-z0-9/+=]*[A-Z])"
    r"[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"
)
_ASSIGNMENT = re.compile(
    r"(?i)(?P<name>\b(?:aws_secret_access_key|aws_access_key_id|aws_session_token"
    r"|secret_access_key|access_key_id|secret_key|access_key|session_token|x-amz-credential"
    r"|x-amz-signature|x-amz-security-token|signature|password|passwd|secret|token|key))"
    r"(?P<sep>['\"]?\s*[:=]\s*['\"]?)(?P<value>[^\s'\",;&})\]]+)"
)
REDACTED = "***"


def redact(text: str) -> str:
    """Remove credentials from ``text`` (for logs and error messages)."""
    if not text:
        return text
    out = str(text)
    secrets = set(_KNOWN_SECRETS)
    secrets.update(v for v in (os.environ.get(n) for n in _CREDENTIAL_ENV) if v and len(v) >= 4)
    for secret in sorted(secrets, key=len, reverse=True):
        out = out.replace(secret, REDACTED)
    out = _URL_USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", out)
    out = _ASSIGNMENT.sub(lambda m: m.group("name") + m.group("sep") + REDACTED, out)
    out = _AWS_KEY_ID.sub(REDACTED, out)
    out = _AWS_SECRET.sub(REDACTED, out)
    return out


# ------------------------------------------------------------------------- errors


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        item = todo.pop(0)
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        for nxt in (item.__cause__, item.__context__):
            if nxt is not None:
                todo.append(nxt)


def error_code(exc: BaseException) -> str | None:
    """The the S3 error code (e.g. ``NoSuchBucket``) found in an exception chain."""
    for item in _chain(exc):
        response = getattr(item, "response", None)
        if isinstance(response, dict):
            error = response.get("Error") or {}
            code = error.get("Code")
            if code:
                return str(code)
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if status:
                return str(status)
    return None


def is_permanent(exc: BaseException) -> bool:
    """True for a storage failure that retrying cannot fix: a missing bucket, denied
    access (wrong credentials) or no credentials at all."""
    code = error_code(exc)
    if code == "NoSuchBucket" or code in _DENIED_CODES:
        return True
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        return False
    return any(isinstance(e, NoCredentialsError | PartialCredentialsError) for e in _chain(exc))


def _connection_problem(exc: BaseException) -> BaseException | None:
    try:
        from botocore import exceptions as bexc
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        return None
    kinds: tuple[type[BaseException], ...] = (
        bexc.EndpointConnectionError,
        bexc.ConnectTimeoutError,
        bexc.ConnectionClosedError,
        bexc.ReadTimeoutError,
    )
    for item in _chain(exc):
        if isinstance(item, kinds):
            return item
    return None


def _bucket(path: str) -> str:
    return path.split("/", 1)[0]


def translate_error(
    url: str, exc: BaseException, options: dict[str, Any] | None = None
) -> StorageError | None:
    """Map a botocore/s3fs exception to a :class:`StorageError`, or ``None`` if unknown."""
    if isinstance(exc, StorageError):
        return exc
    bucket = _bucket(urlsplit(url).netloc + urlsplit(url).path) if _is_s3(url) else ""
    bucket = bucket.rsplit("@", 1)[-1]
    code = error_code(exc)
    if code == "NoSuchBucket":
        return StorageError(f"{url}: bucket '{bucket}' does not exist")
    if code in _DENIED_CODES:
        return StorageError(
            f"{url}: access denied: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY ({code})"
        )
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:  # pragma: no cover
        pass
    else:
        if any(isinstance(e, NoCredentialsError | PartialCredentialsError) for e in _chain(exc)):
            return StorageError(
                f"{url}: no S3 credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            )
    conn = _connection_problem(exc)
    if conn is not None:
        endpoint = _endpoint(storage_options_for(url, options))
        reason = str(conn).split(" when calling", 1)[0] or type(conn).__name__
        return StorageError(f"{url}: cannot reach endpoint {endpoint}: {reason}")
    return None


@contextlib.contextmanager
def storage_errors(url: str, options: dict[str, Any] | None = None) -> Iterator[None]:
    """Context manager turning recognised S3 failures into :class:`StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        mapped = translate_error(url, exc, options)
        if mapped is None:
            raise
        raise mapped from exc


def check_reachable(url: str, options: dict[str, Any] | None = None) -> None:
    """List ``url``'s prefix once; raise :class:`StorageError` if the store is unusable.

    A prefix that does not exist yet in an existing bucket is fine. Locally, the nearest
    existing ancestor of the path must be a directory.
    """
    fs, path = filesystem(url, options)
    if not is_remote(url):
        probe = path
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        if probe != path and not os.path.isdir(probe):
            raise StorageError(f"{url}: '{probe}' is not a directory")
        return
    if not _is_s3(url):
        try:
            fs.ls(path, detail=False)
        except Exception as exc:
            raise StorageError(f"{url}: {type(exc).__name__}: {exc}") from exc
        return
    bucket, _, key = path.partition("/")
    if not bucket:
        raise StorageError(f"{url}: no bucket in URL")
    try:
        with storage_errors(url, options):
            fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
    except StorageError:
        raise
    except Exception as exc:  # anything else still gets a one-line, redacted message
        code = error_code(exc)
        detail = f"S3 error {code}: {exc}" if code else f"{type(exc).__name__}: {exc}"
        raise StorageError(f"{url}: {detail}") from exc
