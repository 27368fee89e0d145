"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` on 127.0.0.1.

The launcher lives in ``deploy/s3_local.py`` (``make serve`` uses it too).

Fixtures (registered in ``conftest.py``):

* ``s3_server`` (session): a running :class:`S3Server`.
* ``s3_env`` (function): sets the server's ``AWS_*``/``BLIS_S3_ENDPOINT_URL`` variables.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deploy.s3_local import (  # noqa: F401  (re-exported for tests)
    HOST,
    S3Server,
    find_weed,
    free_ports,
    start_s3_server,
)

# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS) for the whole test session."""
    server = start_s3_server(tmp_path_factory.mktemp("s3server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point the AWS environment variables of this test at the session's S3 server."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server.env
