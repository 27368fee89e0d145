"""Shared pytest fixtures; the S3 server fixtures live in ``tests/s3_server.py``.

Any test that needs a real service (the S3 server, Prefect's server, Ray) is marked
``services`` here, from its fixtures, so ``pytest -m "not services"`` (``make
test-fast``) never starts one, whether or not the test carries the mark itself.
"""

import pytest
from flow_services import local_ray, prefect_api  # noqa: F401  (Prefect + Ray fixtures)
from s3_server import s3_env, s3_server  # noqa: F401  (registers the fixtures)

SERVICE_FIXTURES = frozenset({"s3_server", "s3_env", "prefect_api", "local_ray"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)
