"""Release identity: version ids and the code that built a release."""

from __future__ import annotations

import datetime as dt
import re
import secrets
import subprocess
from importlib import metadata
from pathlib import Path

_VERSION_RE = r"^\d{8}T\d{6}Z-[0-9a-f]{8}$"


def new_version(now: dt.datetime | None = None) -> str:
    """A release version id ``YYYYMMDDTHHMMSSZ-<8 hex>``: sortable by time, unique even
    for concurrent runs (32 random bits)."""
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def is_version(text: str) -> bool:
    """True when ``text`` has the shape of a release version id."""
    return bool(re.match(_VERSION_RE, text))


def code_version() -> dict[str, str | None]:
    """Installed package version and the git commit of the source tree (if any)."""
    try:
        version = metadata.version("blis-model")
    except metadata.PackageNotFoundError:
        version = None
    commit = None
    source = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=source,
                             capture_output=True, text=True, timeout=5, check=False)
        lines = out.stdout.split()
        if out.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == source:
            commit = lines[1]  # only when this package IS the checkout's source tree
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": "blis-model", "version": version, "git_commit": commit}


__all__ = ["code_version", "is_version", "new_version"]
