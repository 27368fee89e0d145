"""Session fixtures for flow tests: a real temporary Prefect server and a local Ray.

Both are started once per test session (Prefect's server costs ~5 s, Ray ~5 s) and only
when a test asks for them. Flows reuse the session's Ray (a RayTaskRunner joins an
initialised Ray instead of starting its own), and its workers report to the session's
Prefect server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real temporary Prefect server with its own SQLite database; yields its API URL."""
    from flows.runtime import set_prefect_server_env

    set_prefect_server_env()
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def local_ray(prefect_api: str) -> Iterator[None]:
    """A local Ray (2 CPUs, 127.0.0.1) whose workers report to ``prefect_api``."""
    from flows.runtime import ray_init_kwargs, set_driver_env

    set_driver_env(local=True)  # before ray is imported: it reads part of it on import
    import ray

    ray.init(**ray_init_kwargs(prefect_api, num_cpus=2))
    try:
        yield
    finally:
        ray.shutdown()


def task_runs_of_last(flow_name: str) -> list[Any]:
    """Task runs of the most recent run of ``flow_name`` on the session's Prefect server."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter
    from prefect.client.schemas.filters import FlowRunFilterId as RunId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)
        assert runs, f"no run of {flow_name}"
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=RunId(any_=[runs[0].id])))
