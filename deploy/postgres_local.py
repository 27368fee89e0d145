"""A PostgreSQL server for the local stack's Prefect database (``make serve``).

Prefect's default SQLite database serialises writers: two runs starting together (two
on-upload recalibrations, a UI submit during a sensor run) can fail with "database is
locked". PostgreSQL does not, so ``deploy.stack`` runs one from Debian's ``postgresql``
package when it is installed (``make serve`` installs it as root), on 127.0.0.1 only:

* data in ``<root>/data`` (``initdb`` on first start), a Unix socket in ``<root>``
  (``deploy.stack``: ``.run/postgres``; as root, a folder in the ``postgres`` user's home,
  which that user can reach wherever the project is);
* one role ``prefect`` with a generated password (``<root>/password``, mode 600) and the
  database ``prefect`` it owns (Prefect's migrations create the ``pg_trgm`` extension);
* as root, the server runs as the ``postgres`` system user (PostgreSQL refuses root).

Production: run Prefect against your own PostgreSQL (>= 14.9) server instead, see
``deploy/README.md``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ROLE = "prefect"
DATABASE = "prefect"
START_TIMEOUT_S = 60.0


class PostgresUnavailable(RuntimeError):
    """No usable PostgreSQL installation (the stack falls back to SQLite)."""


def find_bindir() -> Path:
    """The folder of ``initdb``/``postgres``: on PATH, else Debian's
    ``/usr/lib/postgresql/<major>/bin`` (the newest)."""
    found = shutil.which("initdb")
    if found and os.path.exists(os.path.join(os.path.dirname(os.path.realpath(found)),
                                             "postgres")):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit()
                        else 0)
    if not candidates:
        raise PostgresUnavailable("PostgreSQL is not installed (apt-get install postgresql)")
    return Path(candidates[-1]).parent


def _run_as() -> dict[str, Any]:
    """Popen arguments to run the server as ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("running as root and there is no 'postgres' user to run "
                                  "PostgreSQL as") from None
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _chown_tree(path: Path, as_user: dict[str, Any]) -> None:
    if not as_user:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, as_user["user"], as_user["group"])
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(root, name), as_user["user"], as_user["group"])


@dataclass
class Postgres:
    """A running PostgreSQL server of the stack."""

    process: subprocess.Popen[bytes]
    port: int
    password: str
    root: Path

    @property
    def url(self) -> str:
        """SQLAlchemy URL for Prefect (``PREFECT_API_DATABASE_CONNECTION_URL``)."""
        return f"postgresql+asyncpg://{ROLE}:{self.password}@{HOST}:{self.port}/{DATABASE}"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def start_postgres(root: Path, port: int, log_path: Path,
                   timeout: float = START_TIMEOUT_S) -> Postgres:
    """Start (after ``initdb`` the first time) a PostgreSQL server with its data under
    ``root``, listening on 127.0.0.1:``port``, in its own process group; wait until the
    ``prefect`` database accepts connections. PostgresUnavailable when it cannot."""
    bindir = find_bindir()
    as_user = _run_as()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    if as_user:
        with contextlib.suppress(OSError):  # the parent it made (e.g. ~postgres/blis-model)
            os.chown(root.parent, as_user["user"], as_user["group"])
    data = root / "data"
    password_file = root / "password"
    if not (data / "PG_VERSION").exists() or not password_file.exists():
        shutil.rmtree(data, ignore_errors=True)
        password_file.write_text(secrets.token_urlsafe(24) + "\n")
        password_file.chmod(0o600)
        _chown_tree(root, as_user)
        proc = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", ROLE,
             f"--pwfile={password_file}", "--auth=scram-sha-256", "--encoding=UTF8",
             "--locale=C.UTF-8"],
            capture_output=True, text=True, **as_user)
        if proc.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {proc.stderr.strip()[-500:]}")
    _chown_tree(root, as_user)
    password = password_file.read_text().strip()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-h", HOST, "-p", str(port),
             "-k", str(root), "-c", "max_connections=200", "-c", "fsync=on"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, **as_user)
    server = Postgres(process=process, port=port, password=password, root=root)
    deadline = time.monotonic() + timeout
    env = {**os.environ, "PGPASSWORD": password}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PostgresUnavailable(f"postgres exited with code {process.returncode}: "
                                      f"{_tail(log_path)}")
        if _answers(port):
            made = subprocess.run([str(bindir / "psql"), "-h", HOST, "-p", str(port), "-U",
                                   ROLE, "-d", "postgres", "-tAc",
                                   f"SELECT 1 FROM pg_database WHERE datname='{DATABASE}'"],
                                  capture_output=True, text=True, env=env)
            if made.returncode == 0:
                if made.stdout.strip() != "1":
                    subprocess.run([str(bindir / "createdb"), "-h", HOST, "-p", str(port),
                                    "-U", ROLE, DATABASE], check=True, capture_output=True,
                                   env=env)
                return server
        time.sleep(0.2)
    stop_postgres(process.pid)
    raise PostgresUnavailable(f"PostgreSQL not ready after {timeout:.0f} s: {_tail(log_path)}")


def stop_postgres(pid: int, timeout: float = 15.0) -> None:
    """Fast shutdown (SIGINT: roll back open transactions, write a checkpoint)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
