"""The whole loop on this machine, bound to 127.0.0.1: ``python -m deploy.stack start|stop``
(``make serve`` / ``make stop``).

``start`` launches, each in its own process group, and records them in ``.run/stack.json``:

1. PostgreSQL for Prefect's database (``deploy.postgres_local``; data in ``.run/postgres``)
   when Debian's ``postgresql`` is installed — concurrent runs never hit SQLite's
   "database is locked" — else SQLite in ``.run/prefect`` (with a warning);
2. a Prefect server with its UI (``prefect server start``);
3. a real S3-compatible server (SeaweedFS ``weed mini``, ``deploy.s3_local``) with a
   bucket ``blis`` (``BLIS_BUCKET``): traces under ``s3://blis/traces``, releases under
   ``s3://blis/store``, and the golden corpus of the promotion gate under
   ``s3://blis/golden`` (the bundled real sample, uploaded once; ``BLIS_GOLDEN`` names
   another, ``BLIS_GOLDEN=none`` runs without a gate);
4. a Ray head (``ray start --head --block``, token auth off);
5. the deployments, served by ``python -m deploy.serve`` (no work pool or worker).

Ports and S3 keys are kept in ``.run/ports.json`` and ``.run/s3`` and reused by the next
start, so ``.run/env`` (mode 600) stays valid across restarts. It holds only ``BLIS_*``
names and ``PREFECT_API_URL``: sourcing it never redirects a shell's own AWS credentials.

Ready means: every deployment is registered with its current parameters, not paused, and
its runner is polling (status READY); the upload trigger is enabled; Ray's GCS answers
and its node is alive. ``stop`` pauses the deployments, lets runs in flight finish (up to
``BLIS_STOP_GRACE_S``, default 60 s), then stops exactly the process groups it recorded
(and Ray processes using this stack's own temporary folder), all at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy.deployments import DEPLOYMENTS, Settings, deployment_parameters
from deploy.s3_local import HOST, PORT_FLAGS, free_ports, start_s3_server

ROOT = Path(__file__).resolve().parent.parent
RUN = Path(os.environ.get("BLIS_RUN_DIR", ROOT / ".run"))
STATE = RUN / "stack.json"
PORTS = RUN / "ports.json"
BIN = Path(sys.executable).parent
GOLDEN_SAMPLE = ROOT / "corpus" / "h100-real-steps"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
RAY_STOP_TIMEOUT_S = 2.0
#: Settings passed through to the deployments when set in ``make serve``'s environment.
PASSED_SETTINGS = ("BLIS_NIGHTLY_CRON", "BLIS_TIMEZONE", "BLIS_WATCH_INTERVAL_S",
                   "BLIS_WATCH_SETTLE_S", "BLIS_FAMILY", "BLIS_DEFAULT_HARDWARE")
ACTIVE_STATES = ("RUNNING", "PENDING", "CANCELLING")


def _say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - a command-line tool


def _spawn(name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(RUN / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait(what: str, check: Callable[[], Any], proc: subprocess.Popen[bytes] | None,
          log: str, timeout: float = START_TIMEOUT_S) -> None:
    """Poll ``check`` until it returns something true; a string result is a progress
    note (not ready yet); RuntimeError when ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    note = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {RUN / log}")
        result: Any = None
        with contextlib.suppress(Exception):
            result = check()
        if result is True:
            return
        note = result if isinstance(result, str) else note
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s"
                       + (f" ({note})" if note else "") + f"; see {RUN / log}")


def _http_json(url: str, body: Any = None, method: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - 127.0.0.1 only
        raw = resp.read()
        return json.loads(raw) if raw else None


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _record(services: dict[str, Any], urls: dict[str, str]) -> None:
    STATE.write_text(json.dumps({"services": services, "urls": urls}, indent=2) + "\n")


# ---------------------------------------------------------------------------- ports


def _ports() -> dict[str, Any]:
    """The ports of the last start when they are still free, else new free ones (a moved
    port is reported: ``.run/env`` changes with it)."""
    try:
        old = json.loads(PORTS.read_text())
    except (OSError, ValueError):
        old = {}
    ports: dict[str, Any] = {}
    s3 = old.get("s3") or {}
    if set(s3) == set(PORT_FLAGS) and not any(_port_open(p) for p in s3.values()):
        ports["s3"] = s3
    else:
        if s3:
            _say("note: the S3 server's ports of the last start are taken: new ports (source "
                 f"{RUN / 'env'} again)")
        ports["s3"] = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    wanted = {"prefect": int(os.environ.get("BLIS_PREFECT_PORT") or 0) or 4200}
    for name in ("prefect", "ray", "ray_dashboard", "postgres"):
        port = old.get(name) or wanted.get(name)
        if not port or _port_open(int(port)):
            if old.get(name):
                _say(f"note: port {port} ({name}) of the last start is taken: using another")
            port = free_ports(1)[0]
        ports[name] = int(port)
    if len({ports["prefect"], ports["ray"], ports["ray_dashboard"], ports["postgres"],
            *ports["s3"].values()}) < 4 + len(PORT_FLAGS):
        raise RuntimeError(f"port clash in {PORTS}: remove it and start again")
    PORTS.write_text(json.dumps(ports, indent=2) + "\n")
    return ports


# ------------------------------------------------------------------------- services


def _short_dir(name: str, limit: int) -> Path:
    """``RUN/name``, or, when that path is longer than ``limit`` characters, a folder of
    this stack's own under the system's temporary folder (named after ``RUN``)."""
    import hashlib
    import tempfile

    path = RUN / name
    if len(str(path)) <= limit:
        return path
    digest = hashlib.sha256(str(RUN.resolve()).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"blis-{name}-{digest}"


def _postgres_root() -> Path:
    """Where PostgreSQL keeps its data: ``RUN/postgres``; as root, a folder of the
    ``postgres`` user's own home (it runs as that user, who may not reach ``RUN``, e.g.
    under root's 0700 home)."""
    import hashlib
    import pwd

    if os.geteuid() != 0:
        return RUN / "postgres"
    try:
        home = Path(pwd.getpwnam("postgres").pw_dir)
    except KeyError:
        return RUN / "postgres"
    digest = hashlib.sha256(str(RUN.resolve()).encode()).hexdigest()[:12]
    return home / "blis-model" / digest


def _database(port: int, services: dict[str, Any]) -> tuple[str | None, str]:
    """Start PostgreSQL for Prefect when it is installed (``BLIS_PREFECT_DATABASE``:
    ``auto`` (default), ``postgres`` or ``sqlite``); (connection URL or None, what)."""
    from deploy.postgres_local import PostgresUnavailable, start_postgres

    choice = (os.environ.get("BLIS_PREFECT_DATABASE") or "auto").lower()
    sqlite = f"SQLite in {RUN / 'prefect'}"
    if choice == "sqlite":
        return None, sqlite
    root = _postgres_root()
    try:
        pg = start_postgres(root, port, RUN / "postgres.log")
    except PostgresUnavailable as exc:
        if choice == "postgres":
            raise RuntimeError(f"PostgreSQL for Prefect: {exc}") from None
        _say(f"warning: Prefect's database is {sqlite}: concurrent runs may fail with "
             f"'database is locked' ({exc}; `make serve` installs it as root)")
        return None, sqlite
    services["postgres"] = {"pid": pg.process.pid, "port": port}
    return pg.url, f"PostgreSQL on {HOST}:{port} (data in {root})"


def _golden(bucket: str, options: dict[str, Any]) -> str:
    """The golden corpus for the promotion gate: ``BLIS_GOLDEN`` when set (``none``: no
    gate), else ``s3://<bucket>/golden``, filled once with the bundled real sample."""
    from blis_model.ingest.uploads import scan, upload_experiment

    chosen = os.environ.get("BLIS_GOLDEN", "")
    if chosen:
        return "" if chosen.lower() == "none" else chosen
    url = f"s3://{bucket}/golden"
    present = set(scan(url, options))
    for folder in sorted(p for p in GOLDEN_SAMPLE.iterdir() if p.is_dir()):
        if folder.name not in present:
            upload_experiment(str(folder), url, options)
    return url


def _ray_ready(dashboard: str) -> bool | str:
    """Ray answers: its GCS is healthy and the head node is alive."""
    with urllib.request.urlopen(f"{dashboard}/api/gcs_healthz", timeout=2) as resp:  # noqa: S310
        if resp.status != 200:
            return "GCS not healthy yet"
    nodes = _http_json(f"{dashboard}/api/v0/nodes?limit=10")
    alive = [n for n in ((nodes or {}).get("data") or {}).get("result", {}).get("result", [])
             if n.get("state") == "ALIVE"]
    return True if alive else "no Ray node alive yet"


def _deployment(api: str, name: str) -> dict[str, Any] | None:
    try:
        return _http_json(f"{api}/deployments/name/{name}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value))


def deployments_ready(api: str, expected: dict[str, dict[str, Any]]) -> bool | str:
    """True when every deployment is registered with ``expected`` parameters, not paused,
    READY (its runner polls), its schedules active, and the upload trigger enabled; else
    what is still missing."""
    ids = {}
    for name in DEPLOYMENTS:
        d = _deployment(api, name)
        if d is None:
            return f"{name} not registered yet"
        if _normal(d.get("parameters")) != _normal(expected[name]):
            return f"{name} still has the parameters of an earlier start"
        if d.get("paused"):
            return f"{name} is paused"
        if d.get("status") != "READY":
            return f"{name} has no runner polling yet"
        if any(not s.get("active", True) for s in d.get("schedules") or []):
            return f"{name} has an inactive schedule"
        ids[name] = d["id"]
    automations = _http_json(f"{api}/automations/filter", {}) or []
    trigger = [a for a in automations if a.get("enabled") and any(
        x.get("deployment_id") == ids["recalibrate/on-upload"] for x in a.get("actions", []))]
    return True if trigger else "the upload trigger is not enabled yet"


# ---------------------------------------------------------------------------- start


def start() -> int:
    started = time.monotonic()
    RUN.mkdir(parents=True, exist_ok=True)
    if STATE.exists():
        old = json.loads(STATE.read_text())
        if any(_alive(s["pid"]) for s in old.get("services", {}).values()):
            _say(f"already running (see {STATE}); `make stop` first")
            return 1
        STATE.unlink()
    ports = _ports()
    base_env = {**os.environ, "RAY_AUTH_MODE": "disabled",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OPENBLAS_NUM_THREADS": "1",
                "AWS_EC2_METADATA_DISABLED": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_HOME": str(RUN / "prefect"), "NO_PROXY": f"{HOST},localhost",
                "no_proxy": f"{HOST},localhost"}
    services: dict[str, Any] = {}
    urls: dict[str, str] = {}
    try:
        # 1. Prefect's database, then the Prefect server (it migrates while S3 starts)
        db_url, database = _database(ports["postgres"], services)
        _record(services, urls)
        port = ports["prefect"]
        api = f"http://{HOST}:{port}/api"
        # The UI asks /ui-settings where the API is: derived from these settings, not from
        # `--port` (without them a stack on another port than 4200 has a UI talking to 4200).
        server_env = {**base_env, "PREFECT_UI_API_URL": api, "PREFECT_SERVER_API_HOST": HOST,
                      "PREFECT_SERVER_API_PORT": str(port),
                      "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false"}
        if db_url:
            server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = db_url
        prefect = _spawn("prefect", [str(BIN / "prefect"), "server", "start", "--host", HOST,
                                     "--port", str(port)], server_env)
        services["prefect"] = {"pid": prefect.pid, "port": port, "database": database}
        _record(services, urls)
        # 2. S3, and the golden corpus
        s3 = start_s3_server(RUN / "s3", ports=ports["s3"], reuse_credentials=True)
        services["s3"] = {"pid": s3.process.pid, "ports": s3.ports}
        _record(services, urls)
        bucket = s3.make_bucket(os.environ.get("BLIS_BUCKET", "blis"))
        env = {**base_env, **s3.env, **s3.blis_env}
        store, corpus = f"s3://{bucket}/store", f"s3://{bucket}/traces"
        urls["s3"] = s3.endpoint_url
        # 3. Ray head (its workers inherit the S3 settings)
        ray_port, dash_port = ports["ray"], ports["ray_dashboard"]
        # Ray's Unix sockets live under its temp folder + ~63 characters (limit 107).
        ray_dir = _short_dir("ray", 40)
        ray = _spawn("ray", [str(BIN / "ray"), "start", "--head", "--block",
                             f"--node-ip-address={HOST}", f"--port={ray_port}",
                             f"--dashboard-host={HOST}", f"--dashboard-port={dash_port}",
                             f"--temp-dir={ray_dir}", "--disable-usage-stats"], env)
        services["ray"] = {"pid": ray.pid, "port": ray_port, "temp_dir": str(ray_dir)}
        _record(services, urls)
        urls["ray"], urls["ray_dashboard"] = f"{HOST}:{ray_port}", f"http://{HOST}:{dash_port}"
        golden = _golden(bucket, s3.storage_options)
        _wait("the Prefect server", lambda: _http_json(f"{api}/health") is True, prefect,
              "prefect.log")
        urls["prefect_ui"], urls["prefect_api"] = f"http://{HOST}:{port}", api
        _wait("the Ray head", lambda: _ray_ready(urls["ray_dashboard"]), ray, "ray.log")
        # 4. The deployments
        blis = {"PREFECT_API_URL": api, "BLIS_STORE": store, "BLIS_CORPUS": corpus,
                "BLIS_GOLDEN": golden, "BLIS_RAY_ADDRESS": urls["ray"]}
        blis.update({k: os.environ[k] for k in PASSED_SETTINGS if os.environ.get(k)})
        settings = Settings.from_env(blis)
        serve = _spawn("serve", [sys.executable, "-m", "deploy.serve"],
                       {**env, **blis, "PREFECT_RUNNER_POLL_FREQUENCY": "5"})
        services["serve"] = {"pid": serve.pid}
        _record(services, urls)
        expected = deployment_parameters(settings)
        _wait("the deployments", lambda: deployments_ready(api, expected), serve, "serve.log")
    except BaseException:
        _say("start failed; stopping what was started")
        _record(services, urls)
        stop(grace_s=0)
        raise
    exported = {**s3.blis_env, "BLIS_STORE": store, "BLIS_CORPUS": corpus,
                "BLIS_GOLDEN": golden, "PREFECT_API_URL": api}
    env_file = RUN / "env"
    env_file.write_text(
        "# The local blis-model stack (make serve): `source` this file to use blis-model and\n"
        "# prefect against it. Only BLIS_* and PREFECT_API_URL: AWS_* stay yours.\n"
        + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(exported.items())))
    env_file.chmod(0o600)
    _record(services, urls)
    gate = (f"golden gate on {golden}" if golden
            else "NO golden gate (BLIS_GOLDEN=none): stable moves only with skip_gate")
    _say(f"Prefect UI      {urls['prefect_ui']}  (deployments: recalibrate/nightly, "
         "recalibrate/on-upload, watch-uploads/sensor, promote/promote)")
    _say(f"Prefect DB      {database}")
    _say(f"S3 endpoint     {urls['s3']}  (traces: {corpus}, releases: {store})")
    _say(f"promotion       {gate}")
    _say(f"Ray             {urls['ray']}  (dashboard {urls['ray_dashboard']})")
    _say(f"environment     source {env_file}   (BLIS_S3_* keys, BLIS_*, PREFECT_API_URL)")
    _say(f"upload          blis-model upload EXPERIMENT_DIR   (after sourcing it; a new "
         f"experiment is seen within {settings.watch_interval_s + settings.settle_s:.0f} s)")
    _say(f"logs            {RUN}/*.log; stop with `make stop`")
    _say(f"ready in {time.monotonic() - started:.0f} s")
    return 0


# ----------------------------------------------------------------------------- stop


def _active_runs(api: str, deployment_ids: list[str]) -> list[dict[str, Any]]:
    body = {"deployments": {"id": {"any_": deployment_ids}},
            "flow_runs": {"state": {"type": {"any_": list(ACTIVE_STATES)}}}}
    return _http_json(f"{api}/flow_runs/filter", body) or []


def _unschedule(api: str, deployment_ids: list[str]) -> None:
    """Delete the runs Prefect's scheduler created ahead for these deployments (pausing
    does not: the runner would still start them); the next start schedules them again.
    Runs created otherwise (a trigger's queued recalibration, a UI submit) are kept."""
    body = {"deployments": {"id": {"any_": deployment_ids}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}
    for run in _http_json(f"{api}/flow_runs/filter", body) or []:
        if run.get("auto_scheduled"):
            with contextlib.suppress(urllib.error.HTTPError):
                _http_json(f"{api}/flow_runs/{run['id']}", method="DELETE")


def _drain(api: str, grace_s: float) -> None:
    """Pause every deployment and drop its scheduled runs (no new runs), then wait up to
    ``grace_s`` for the runs in flight to finish (a sensor scan takes seconds; a
    recalibration may take minutes): done when none has been active for 2 s."""
    ids = []
    for name in DEPLOYMENTS:
        with contextlib.suppress(Exception):
            d = _deployment(api, name)
            if d:
                ids.append(d["id"])
                _http_json(f"{api}/deployments/{d['id']}/pause_deployment", {}, "POST")
    if not ids:
        return
    deadline = time.monotonic() + max(grace_s, 0.0)
    shown: set[str] = set()
    quiet_since: float | None = None
    while True:
        try:
            _unschedule(api, ids)
            runs = _active_runs(api, ids)
        except Exception:
            return
        now = time.monotonic()
        if runs:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= 2.0:
            return
        if now >= deadline:
            if runs:
                _say("grace period over: runs still in flight are cancelled")
            return
        for run in runs:
            if run["id"] not in shown:
                shown.add(run["id"])
                _say(f"waiting for flow run {run['name']} to finish (up to {grace_s:.0f} s; "
                     "BLIS_STOP_GRACE_S=0 cancels it)")
        time.sleep(0.5)


def _group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` (from /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    found.append(int(proc.name))
    return found


def _wait_runs_exit(serve: int, timeout: float) -> None:
    """Wait until the runner has no child left (a finished run's process exits a moment
    after its final state is reported)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(_group_members(serve)) > 1:
        time.sleep(0.2)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _stop_groups(groups: dict[str, int], sig: int = signal.SIGTERM) -> None:
    """Signal every process group at once, wait for all (SIGKILL after the timeout;
    after :data:`RAY_STOP_TIMEOUT_S` for Ray, which keeps no data and whose raylet
    outlives a SIGTERM for long)."""
    live = {name: pid for name, pid in groups.items() if _alive(pid)}
    for pid in live.values():
        _signal_group(pid, sig)
    started = time.monotonic()
    deadline = started + STOP_TIMEOUT_S
    while live and time.monotonic() < deadline:
        if "ray" in live and time.monotonic() - started > RAY_STOP_TIMEOUT_S:
            _signal_group(live["ray"], signal.SIGKILL)
        for name, pid in list(live.items()):
            if not _alive(pid):
                _say(f"stopped {name} (process group {pid}) in {time.monotonic() - started:.1f} s")
                del live[name]
        time.sleep(0.1)
    for name, pid in live.items():
        _signal_group(pid, signal.SIGKILL)
        _say(f"killed {name} (process group {pid}): it did not stop in {STOP_TIMEOUT_S:.0f} s")


def _own_ray_leftovers(temp_dir: str) -> list[int]:
    """Ray processes still running with THIS stack's temp folder on their command line."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if temp_dir in cmdline and int(proc.name) != os.getpid():
            found.append(int(proc.name))
    return found


def stop(grace_s: float | None = None) -> int:
    if not STATE.exists():
        _say("nothing to stop")
        return 0
    started = time.monotonic()
    if grace_s is None:
        grace_s = float(os.environ.get("BLIS_STOP_GRACE_S") or 60)
    state = json.loads(STATE.read_text())
    services, urls = state.get("services", {}), state.get("urls", {})
    serve = (services.get("serve") or {}).get("pid")
    if serve and _alive(int(serve)) and urls.get("prefect_api"):
        _drain(urls["prefect_api"], grace_s)
        _wait_runs_exit(int(serve), 5.0 if grace_s > 0 else 0.0)
    # The runner needs the Prefect server to shut down cleanly; nothing needs Ray or S3.
    _stop_groups({n: int(services[n]["pid"]) for n in ("serve", "ray", "s3") if n in services})
    if "prefect" in services:
        _stop_groups({"prefect": int(services["prefect"]["pid"])})
    if "postgres" in services:  # after Prefect: its fast shutdown (SIGINT) is clean
        _stop_groups({"postgres": int(services["postgres"]["pid"])}, signal.SIGINT)
    temp_dir = (services.get("ray") or {}).get("temp_dir")
    if temp_dir:
        for pid in _own_ray_leftovers(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for port in ((services.get("s3") or {}).get("ports") or {}).values():
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                sock.unlink()
    STATE.unlink()
    _say(f"stopped in {time.monotonic() - started:.0f} s (data stays in {RUN})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["start"]:
        return start()
    if args == ["stop"]:
        return stop()
    _say("usage: python -m deploy.stack start|stop")
    return 2


if __name__ == "__main__":
    sys.exit(main())
