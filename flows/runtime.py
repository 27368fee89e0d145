"""Where flows run: the Ray task runner and the Prefect API its workers report to.

Prefect: with ``PREFECT_API_URL`` set, runs report to that server. Without it, Prefect's
ephemeral mode starts a temporary local server (a subprocess on 127.0.0.1) the first
time a flow runs in a process; nothing has to be set up. Ray workers are separate
processes, so each would start its OWN temporary server (5-10 s apiece) unless told
where the API is: :func:`ray_task_runner` puts the flow's API URL into the workers'
``runtime_env``.

Ray: a local Ray on this machine's CPUs by default (no dashboard, token auth off, bound
to 127.0.0.1), or an existing cluster with ``address`` (``ray://host:10001`` or
``host:6379``). Cluster workers need this project installed and must reach the Prefect
API and the object store themselves: credentials (``AWS_*``, ``PREFECT_API_KEY``) come
from their own environment, never through Ray's ``runtime_env`` (which Ray records).
A local Ray's workers inherit this process's environment as it is at ``ray.init``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from blis_model.errors import BlisModelError
from blis_model.storage import StorageError, redact

if TYPE_CHECKING:
    from prefect_ray import RayTaskRunner

#: Environment every Ray worker gets: one BLAS thread per worker (Ray runs one task per
#: CPU, so threaded BLAS would oversubscribe).
WORKER_ENV: dict[str, str] = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                              "MKL_NUM_THREADS": "1"}

#: Driver environment a LOCAL Ray needs (Ray 2.60): no token auth for a private cluster
#: (else Ray writes ~/.ray/auth_token and enforces it), bound to 127.0.0.1 (else Ray
#: binds the host's first non-loopback address).
LOCAL_RAY_ENV: dict[str, str] = {"RAY_AUTH_MODE": "disabled",
                                 "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
#: Environment of the temporary Prefect server this process may start: no usage
#: telemetry (offline machines log an ERROR for every failed attempt).
PREFECT_SERVER_ENV: dict[str, str] = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
#: Set (by the CLI without --verbose): workers' log lines stay off the driver's terminal
#: and Ray itself logs warnings only; every line still reaches the Prefect API (the UI).
QUIET_WORKERS_ENV = "BLIS_QUIET_WORKERS"
#: Driver environment for any Ray: print every worker's log line (Ray's default folds
#: similar lines of different tasks into "[repeated 3x across cluster]").
DRIVER_ENV: dict[str, str] = {"RAY_DEDUP_LOGS": "0"}


def local_cpus() -> int:
    """CPUs this process may use (respects affinity / container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def set_driver_env(local: bool) -> None:
    """Set (unless already set) the driver environment Ray reads. Ray reads part of it
    when imported (``prefect_ray`` imports it), so call this before importing either."""
    for name, value in {**DRIVER_ENV, **(LOCAL_RAY_ENV if local else {})}.items():
        os.environ.setdefault(name, value)


def set_prefect_server_env() -> None:
    """Set (unless already set) the environment of a temporary Prefect server started
    later by this process (it inherits this process's environment)."""
    for name, value in PREFECT_SERVER_ENV.items():
        os.environ.setdefault(name, value)


class DomainErrorsWithoutTraceback(logging.Filter):
    """Log a domain error (``BlisModelError``: bad configuration, empty corpus, ...) or a
    storage error (missing bucket, wrong credentials, unreachable store) as its one-line
    message: its traceback says nothing the user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BlisModelError | StorageError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_domain_tracebacks(logger_name: str = "prefect.flow_runs") -> None:
    """Drop tracebacks of domain errors from Prefect's flow-run log (console and API)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, DomainErrorsWithoutTraceback) for f in logger.filters):
        logger.addFilter(DomainErrorsWithoutTraceback())


def ray_init_kwargs(api_url: str | None, address: str | None = None,
                    num_cpus: int | None = None) -> dict[str, Any]:
    """``ray.init`` keyword arguments: worker environment (BLAS threads, Prefect API URL)
    and, for a local Ray, its CPU count and no dashboard."""
    env = dict(WORKER_ENV)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}}
    if os.environ.get(QUIET_WORKERS_ENV):  # the CLI without --verbose
        kwargs.update(log_to_driver=False, logging_level=logging.WARNING)
    if address is None:
        # "local": a Ray of our own, even when another one runs on this machine (without
        # it ray.init joins the last cluster started here, e.g. someone else's).
        kwargs.update(address="local", num_cpus=num_cpus or local_cpus(),
                      include_dashboard=False)
    return kwargs


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ray_address_is_remote(address: str | None) -> bool:
    """True when ``address`` names a Ray cluster on another host (``ray://host:10001``
    or ``host:6379``); None (a local Ray), ``auto`` and loopback hosts are local."""
    if not address or address in ("auto", "local"):
        return False
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname or ""
    return not is_loopback(f"http://{host}")


def warn_unreachable_api(api_url: str, ray_address: str | None) -> None:
    """Warn when a REMOTE cluster's workers would report to this machine's loopback
    Prefect API (they cannot reach it); a cluster on this host can."""
    if ray_address_is_remote(ray_address) and is_loopback(api_url):
        from prefect import get_run_logger

        get_run_logger().warning(
            "the Ray cluster's workers cannot reach this machine's Prefect API %s: set "
            "PREFECT_API_URL to a Prefect server they can reach", redact(api_url))


def ray_task_runner(api_url: str | None, address: str | None = None,
                    num_cpus: int | None = None) -> RayTaskRunner:
    """A RayTaskRunner whose workers report to ``api_url``: a local Ray (started for the
    flow run and stopped after it, unless Ray is already initialised in this process) or
    the cluster at ``address``."""
    set_driver_env(local=address is None)
    from prefect_ray import RayTaskRunner  # imports ray: after set_driver_env

    return RayTaskRunner(address=address,
                         init_kwargs=ray_init_kwargs(api_url, address, num_cpus))
