"""blis_model.storage against a local directory and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
from s3_server import S3Server

from blis_model import storage
from blis_model.storage import StorageError


@dataclass
class Store:
    """A place to write to: a base URL plus the options a user would pass."""

    kind: str
    base: str
    options: dict[str, Any] | None

    def url(self, *parts: str) -> str:
        return storage.join(self.base, *parts)

    def fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        return storage.filesystem(url, self.options)

    def read(self, url: str) -> bytes:
        fs, path = self.fs(url)
        fs.invalidate_cache()
        return fs.cat_file(path)

    def listing(self, url: str) -> list[str]:
        """All files below ``url``, relative to it (hidden local temp dirs excluded)."""
        fs, path = self.fs(url)
        fs.invalidate_cache()
        if not fs.exists(path):
            return []
        found = fs.find(path, detail=True)
        files = [name for name, info in found.items() if info["type"] == "file"]
        return sorted(name[len(path.rstrip("/")) + 1 :] for name in files)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Parametrised over a local tmp dir and a fresh bucket on the real S3 server."""
    if request.param == "local":
        return Store("local", str(tmp_path / "store"), None)
    server: S3Server = request.getfixturevalue("s3_server")
    bucket = server.make_bucket()
    return Store("s3", f"s3://{bucket}/store", server.storage_options)


def make_release(root: Path, marker: str = "manifest.json") -> Path:
    """A finished local release folder: data files, a nested file and the commit marker."""
    root.mkdir(parents=True)
    (root / "coefficients.json").write_text('{"alpha": [1.0, 2.0]}')
    (root / "plots").mkdir()
    (root / "plots" / "fit.txt").write_text("fit")
    (root / "metrics.parquet").write_bytes(os.urandom(2048))
    (root / marker).write_text('{"version": 1}')
    return root


RELEASE_FILES = ["coefficients.json", "manifest.json", "metrics.parquet", "plots/fit.txt"]


def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ URLs & options


def test_join_keeps_scheme_and_strips_slashes() -> None:
    assert storage.join("s3://bucket", "a", "b.json") == "s3://bucket/a/b.json"
    assert storage.join("s3://bucket/pre/", "/a/", "b") == "s3://bucket/pre/a/b"
    assert storage.join("file:///tmp/x", "y") == "file:///tmp/x/y"
    assert storage.join("/tmp/x/", "y", "", "z") == "/tmp/x/y/z"
    assert storage.join("relative", "y") == "relative/y"
    assert storage.join("/", "y") == "/y"
    assert storage.join("s3://bucket") == "s3://bucket"


def test_storage_options_local_is_empty(tmp_path: Path) -> None:
    assert storage.storage_options_for(str(tmp_path)) == {}
    assert storage.storage_options_for(f"file://{tmp_path}", {"key": "x"}) == {}


def test_storage_options_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIS_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://ignored:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVKEY0000000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    opts = storage.storage_options_for("s3://b/k")
    assert opts["client_kwargs"] == {
        "endpoint_url": "http://127.0.0.1:9",
        "region_name": "eu-west-3",
    }
    assert (opts["key"], opts["secret"]) == ("AKIAENVKEY0000000000", "envsecret")
    assert opts["config_kwargs"] == {
        "retries": {"max_attempts": 5, "mode": "standard"},
        "connect_timeout": 5,
        "read_timeout": 60,
    }
    monkeypatch.delenv("BLIS_S3_ENDPOINT_URL")
    assert storage.storage_options_for("s3://b/k")["client_kwargs"]["endpoint_url"] == (
        "http://ignored:1"
    )


def test_storage_options_explicit_win_and_are_not_mutated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVKEY0000000000")
    given = {"key": "k", "secret": "s", "config_kwargs": {"connect_timeout": 1}}
    opts = storage.storage_options_for("s3://b/k", given)
    assert opts["key"] == "k" and "client_kwargs" not in opts
    assert opts["config_kwargs"]["connect_timeout"] == 1
    assert opts["config_kwargs"]["retries"] == {"max_attempts": 5, "mode": "standard"}
    assert given == {"key": "k", "secret": "s", "config_kwargs": {"connect_timeout": 1}}


def test_storage_imports_no_orchestration() -> None:
    code = (
        "import sys, blis_model.storage; "
        "bad = [m for m in ('prefect', 'ray') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------- local + S3 tests


def test_filesystem_round_trip(store: Store, tmp_path: Path) -> None:
    url = store.url("dir", "hello.txt")
    fs, path = store.fs(url)
    if store.kind == "s3":
        assert not path.startswith("s3://") and path.endswith("/store/dir/hello.txt")
        assert path.split("/", 1)[0] == store.base[len("s3://") :].split("/", 1)[0]
    else:
        assert os.path.isabs(path)
        assert storage.filesystem(f"file://{path}")[1] == path
        rel = os.path.relpath(path)
        assert storage.filesystem(rel)[1] == path
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, b"hi there")
    # A user reading the URL with plain fsspec and our options sees the same bytes.
    with fsspec.open(url, "rb", **storage.storage_options_for(url, store.options)) as fh:
        assert fh.read() == b"hi there"
    storage.check_reachable(store.url("dir"), store.options)
    storage.check_reachable(store.url("not-yet-created"), store.options)


def test_write_bytes_atomic(store: Store) -> None:
    url = store.url("state", "latest.json")
    storage.write_bytes_atomic(url, b'{"v": 1}', store.options)
    assert store.read(url) == b'{"v": 1}'
    storage.write_bytes_atomic(url, b'{"v": 2}', store.options)
    assert store.read(url) == b'{"v": 2}'
    # No temporary files are left next to the target.
    assert store.listing(store.url("state")) == ["latest.json"]
    if store.kind == "local":
        assert os.listdir(os.path.dirname(store.fs(url)[1])) == ["latest.json"]


def test_publish_directory_commits_once(store: Store, tmp_path: Path) -> None:
    release = make_release(tmp_path / "release")
    dest = store.url("releases", "v1")
    assert not storage.is_committed(dest, store.options)

    storage.publish_directory(str(release), dest, store.options)

    assert storage.is_committed(dest, store.options)
    assert store.listing(dest) == RELEASE_FILES
    for rel in RELEASE_FILES:
        assert store.read(storage.join(dest, rel)) == (release / rel).read_bytes()
    if store.kind == "local":  # no hidden temp sibling is left behind
        assert os.listdir(os.path.dirname(store.fs(dest)[1])) == ["v1"]

    # Releases are immutable: a second publish is refused and changes nothing.
    (release / "coefficients.json").write_text("changed")
    with pytest.raises(StorageError, match="already exists"):
        storage.publish_directory(str(release), dest, store.options)
    assert store.read(storage.join(dest, "coefficients.json")) == b'{"alpha": [1.0, 2.0]}'


def test_publish_directory_needs_commit_marker(store: Store, tmp_path: Path) -> None:
    release = make_release(tmp_path / "release", marker="other.json")
    dest = store.url("releases", "v1")
    with pytest.raises(StorageError, match="commit marker 'manifest.json' is missing"):
        storage.publish_directory(str(release), dest, store.options)
    assert store.listing(dest) == []
    storage.publish_directory(str(release), dest, store.options, commit_marker="other.json")
    assert storage.is_committed(dest, store.options, commit_marker="other.json")


def _fail_after_first(real: Callable[..., Any], calls: list[tuple[Any, ...]]) -> Callable[..., Any]:
    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) > 1:
            raise ConnectionResetError("injected failure mid-upload")
        return real(*args, **kwargs)

    return flaky


def test_publish_failure_mid_upload_leaves_nothing(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = make_release(tmp_path / "release")
    dest = store.url("releases", "v1")
    calls: list[tuple[Any, ...]] = []
    if store.kind == "s3":
        real_filesystem = storage.filesystem

        def patched(url: str, options: dict[str, Any] | None = None) -> Any:
            fs, path = real_filesystem(url, options)
            monkeypatch.setattr(fs, "put_file", _fail_after_first(fs.put_file, calls))
            return fs, path

        monkeypatch.setattr(storage.publish, "filesystem", patched)
    else:
        monkeypatch.setattr(shutil, "copy2", _fail_after_first(shutil.copy2, calls))

    with pytest.raises(OSError, match="injected failure mid-upload"):
        storage.publish_directory(str(release), dest, store.options)
    monkeypatch.undo()

    assert len(calls) >= 2  # the first file went through before the failure
    assert not storage.is_committed(dest, store.options)
    assert store.listing(dest) == []
    if store.kind == "local":
        parent = os.path.dirname(store.fs(dest)[1])
        assert os.listdir(parent) == []  # the hidden temp copy is gone too

    # After the failure, a retry publishes a complete release.
    storage.publish_directory(str(release), dest, store.options)
    assert store.listing(dest) == RELEASE_FILES


@pytest.mark.services
def test_publish_s3_hides_folder_until_commit(s3_server: S3Server, tmp_path: Path) -> None:
    """A reader polling during the upload sees no marker until every file is there."""
    bucket = s3_server.make_bucket()
    dest = f"s3://{bucket}/releases/v1"
    opts = s3_server.storage_options
    release = make_release(tmp_path / "release")
    client = s3_server.client()
    seen: list[tuple[bool, int]] = []

    def look() -> None:
        keys = client.list_objects_v2(Bucket=bucket, Prefix="releases/v1/").get("Contents", [])
        names = [k["Key"] for k in keys]
        seen.append(("releases/v1/manifest.json" in names, len(names)))

    real_filesystem = storage.filesystem
    with pytest.MonkeyPatch.context() as mp:

        def observing(url: str, options: dict[str, Any] | None = None) -> Any:
            fs, path = real_filesystem(url, options)
            real_put = fs.put_file

            def put_and_look(*args: Any, **kwargs: Any) -> Any:
                out = real_put(*args, **kwargs)
                look()
                return out

            mp.setattr(fs, "put_file", put_and_look)
            return fs, path

        mp.setattr(storage.publish, "filesystem", observing)
        storage.publish_directory(str(release), dest, opts)
    assert seen == [(False, 1), (False, 2), (False, 3)]
    assert storage.is_committed(dest, opts)


@pytest.mark.services
def test_publish_s3_commit_is_exclusive(s3_server: S3Server, tmp_path: Path) -> None:
    """If another writer commits while we upload, our commit (If-None-Match) is refused."""
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    release = make_release(tmp_path / "release")
    real_filesystem = storage.filesystem
    with pytest.MonkeyPatch.context() as mp:

        def racing(url: str, options: dict[str, Any] | None = None) -> Any:
            fs, path = real_filesystem(url, options)
            real_put = fs.put_file

            def put_then_other_commits(*args: Any, **kwargs: Any) -> Any:
                out = real_put(*args, **kwargs)
                client.put_object(Bucket=bucket, Key="v1/manifest.json", Body=b"other")
                return out

            mp.setattr(fs, "put_file", put_then_other_commits)
            return fs, path

        mp.setattr(storage.publish, "filesystem", racing)
        with pytest.raises(StorageError, match="published concurrently"):
            storage.publish_directory(str(release), f"s3://{bucket}/v1", s3_server.storage_options)
    body = client.get_object(Bucket=bucket, Key="v1/manifest.json")["Body"].read()
    assert body == b"other"  # the winner's commit is untouched


@pytest.mark.services
def test_publish_s3_removes_leftovers_of_a_dead_publish(
    s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="releases/v1/stale.bin", Body=b"old")
    release = make_release(tmp_path / "release")
    storage.publish_directory(str(release), f"s3://{bucket}/releases/v1", s3_server.storage_options)
    keys = client.list_objects_v2(Bucket=bucket, Prefix="releases/v1/")["Contents"]
    assert sorted(k["Key"].split("releases/v1/")[1] for k in keys) == RELEASE_FILES


# ------------------------------------------------------------------------ redaction


def test_redact_removes_credentials(s3_server: S3Server) -> None:
    key, secret = s3_server.access_key, s3_server.secret_key
    texts = [
        f"s3://{key}:{secret}@bucket/path failed",
        f"https://user:{secret}@example.invalid/x",
        f"key={key} secret={secret}",
        f"AWS_ACCESS_KEY_ID={key}\nAWS_SECRET_ACCESS_KEY={secret}",
        f"options: {s3_server.storage_options!r}",
        f'{{"aws_secret_access_key": "{secret}", "token": "tok-123456"}}',
        f"Credential={key}/20260101/us-east-1/s3 Signature=abcdef0123456789",
        # Not seen by storage_options_for() and not in the environment: found by shape.
        "AKIAABCDEFGHIJKLMNOP and wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ]
    for text in texts:
        out = storage.redact(text)
        for needle in (key, secret, "tok-123456", "abcdef0123456789", "AKIAABCDEFGHIJKLMNOP"):
            assert needle not in out, (text, out)
        assert "wJalrXUtnFEMI" not in out
    # Ordinary text survives.
    plain = "s3://bucket/releases/v1/manifest.json sha1 0123456789abcdef0123456789abcdef01234567"
    assert storage.redact(plain) == plain
    assert secret not in str(StorageError(f"boom with {s3_server.storage_options}"))


# --------------------------------------------------------------------- StorageError


@pytest.mark.services
def test_missing_bucket_is_a_clear_error(s3_server: S3Server) -> None:
    name = f"nobucket-{uuid.uuid4().hex[:8]}"
    url = f"s3://{name}/x"
    with pytest.raises(StorageError) as info:
        storage.check_reachable(url, s3_server.storage_options)
    assert str(info.value) == f"{url}: bucket '{name}' does not exist"
    with pytest.raises(StorageError, match="does not exist"):
        storage.write_bytes_atomic(f"{url}/f.json", b"{}", s3_server.storage_options)


@pytest.mark.services
@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_wrong_credentials_are_a_clear_error(s3_server: S3Server, wrong: str) -> None:
    bucket = s3_server.make_bucket()
    opts = s3_server.storage_options
    bad = (
        "WrongSecretValue0000000000000000000000xy" if wrong == "secret" else "AKIAWRONGKEY00000000"
    )
    opts[wrong] = bad
    url = f"s3://{bucket}/x"
    with pytest.raises(StorageError) as info:
        storage.check_reachable(url, opts)
    message = str(info.value)
    assert message.startswith(
        f"{url}: access denied: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    )
    assert "\n" not in message
    for secret in (bad, s3_server.secret_key):
        assert secret not in message


def test_unreachable_endpoint_is_a_quick_clear_error() -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    opts = {
        "key": "AKIAUNREACHABLE00000",
        "secret": "UnreachableSecret000000000000000000000xy",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.check_reachable("s3://b/x", opts)
    assert time.monotonic() - started < 10
    assert str(info.value).startswith(f"s3://b/x: cannot reach endpoint {endpoint}: ")
    assert "Unreachable" not in str(info.value)


@pytest.mark.services
def test_env_configuration_reaches_the_server(s3_server: S3Server, s3_env: dict[str, str]) -> None:
    bucket = s3_server.make_bucket()
    storage.check_reachable(f"s3://{bucket}/prefix")  # everything from the environment
    storage.write_bytes_atomic(f"s3://{bucket}/prefix/a.txt", b"env")
    obj = s3_server.client().get_object(Bucket=bucket, Key="prefix/a.txt")
    assert obj["Body"].read() == b"env"
    # A subprocess given the server's env sees the same store.
    code = (
        "import sys; from blis_model import storage; "
        "fs, p = storage.filesystem(sys.argv[1]); print(fs.cat_file(p).decode())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, f"s3://{bucket}/prefix/a.txt"],
        env={**os.environ, **s3_server.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "env"
