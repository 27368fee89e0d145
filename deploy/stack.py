"""The whole loop on this machine, bound to 127.0.0.1: ``python -m deploy.stack start|stop``
(``make serve`` / ``make stop``).

``start`` launches, each in its own process group, and records them in ``.run/stack.json``:

1. a real S3-compatible server (SeaweedFS ``weed mini``, ``deploy.s3_local``) with a
   bucket ``blis`` (``BLIS_BUCKET``): traces under ``s3://blis/traces``, releases under
   ``s3://blis/store``;
2. a Prefect server with its UI (``prefect server start``; its database in
   ``.run/prefect``);
3. a Ray head (``ray start --head --block``, token auth off);
4. the deployments, served by ``python -m deploy.serve`` (no work pool or worker).

It writes the services' environment to ``.run/env`` (mode 600: it holds the generated S3
keys) and prints the URLs. ``stop`` stops exactly the process groups it recorded (and Ray
processes using this stack's own temporary folder), nothing else.
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
import urllib.request
from pathlib import Path
from typing import Any

from deploy.s3_local import HOST, free_ports, start_s3_server

ROOT = Path(__file__).resolve().parent.parent
RUN = Path(os.environ.get("BLIS_RUN_DIR", ROOT / ".run"))
STATE = RUN / "stack.json"
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90.0


def _say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - a command-line tool


def _spawn(name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(RUN / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait(what: str, check: Any, proc: subprocess.Popen[bytes] | None, log: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {RUN / log}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready after {START_TIMEOUT_S:.0f} s; see {RUN / log}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - 127.0.0.1 only
        return resp.status == 200


def _port_open(port: int) -> bool:
    import socket

    with socket.create_connection((HOST, port), timeout=0.5):
        return True


def _port_or_free(port: int) -> int:
    """``port`` when nothing listens on it, else a free port."""
    try:
        _port_open(port)
    except OSError:
        return port
    return free_ports(1)[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _record(services: dict[str, Any], urls: dict[str, str]) -> None:
    STATE.write_text(json.dumps({"services": services, "urls": urls}, indent=2) + "\n")


def start() -> int:
    RUN.mkdir(parents=True, exist_ok=True)
    if STATE.exists():
        old = json.loads(STATE.read_text())
        if any(_alive(s["pid"]) for s in old.get("services", {}).values()):
            _say(f"already running (see {STATE}); `make stop` first")
            return 1
        STATE.unlink()
    base_env = {**os.environ, "RAY_AUTH_MODE": "disabled",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OPENBLAS_NUM_THREADS": "1",
                "AWS_EC2_METADATA_DISABLED": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_HOME": str(RUN / "prefect"), "NO_PROXY": f"{HOST},localhost",
                "no_proxy": f"{HOST},localhost"}
    services: dict[str, Any] = {}
    urls: dict[str, str] = {}
    try:
        # 1. S3
        s3 = start_s3_server(RUN / "s3")
        services["s3"] = {"pid": s3.process.pid, "ports": s3.ports}
        _record(services, urls)
        bucket = s3.make_bucket(os.environ.get("BLIS_BUCKET", "blis"))
        env = {**base_env, **s3.env}
        store, corpus = f"s3://{bucket}/store", f"s3://{bucket}/traces"
        urls["s3"] = s3.endpoint_url
        # 2. Prefect server with its UI
        port = int(os.environ.get("BLIS_PREFECT_PORT") or 0) or _port_or_free(4200)
        api = f"http://{HOST}:{port}/api"
        proc = _spawn("prefect", [str(BIN / "prefect"), "server", "start", "--host", HOST,
                                  "--port", str(port)], env)
        services["prefect"] = {"pid": proc.pid, "port": port}
        _record(services, urls)
        _wait("the Prefect server", lambda: _http_ok(f"{api}/health"), proc, "prefect.log")
        urls["prefect_ui"], urls["prefect_api"] = f"http://{HOST}:{port}", api
        # 3. Ray head
        ray_port, dash_port = free_ports(2)
        proc = _spawn("ray", [str(BIN / "ray"), "start", "--head", "--block",
                              f"--node-ip-address={HOST}", f"--port={ray_port}",
                              f"--dashboard-host={HOST}", f"--dashboard-port={dash_port}",
                              f"--temp-dir={RUN / 'ray'}", "--disable-usage-stats"], env)
        services["ray"] = {"pid": proc.pid, "port": ray_port, "temp_dir": str(RUN / "ray")}
        _record(services, urls)
        _wait("the Ray head", lambda: _port_open(ray_port), proc, "ray.log")
        urls["ray"], urls["ray_dashboard"] = f"{HOST}:{ray_port}", f"http://{HOST}:{dash_port}"
        # 4. The deployments
        blis = {"PREFECT_API_URL": api, "BLIS_STORE": store, "BLIS_CORPUS": corpus,
                "BLIS_RAY_ADDRESS": urls["ray"]}
        for name in ("BLIS_GOLDEN", "BLIS_NIGHTLY_CRON", "BLIS_WATCH_INTERVAL_S",
                     "BLIS_FAMILY", "BLIS_DEFAULT_HARDWARE"):
            if os.environ.get(name):
                blis[name] = os.environ[name]
        proc = _spawn("serve", [sys.executable, "-m", "deploy.serve"], {**env, **blis})
        services["serve"] = {"pid": proc.pid}
        _record(services, urls)
        _wait("the deployments", lambda: _deployments_registered(api), proc, "serve.log")
    except BaseException:
        _say("start failed; stopping what was started")
        stop()
        raise
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted({**s3.env, **blis}.items())]
    env_file = RUN / "env"
    env_file.write_text("\n".join(lines) + "\n")
    env_file.chmod(0o600)
    _record(services, urls)
    _say(f"Prefect UI      {urls['prefect_ui']}  (deployments: recalibrate/nightly, "
         "recalibrate/on-upload, watch-uploads/sensor, promote/promote)")
    _say(f"S3 endpoint     {urls['s3']}  (traces: {corpus}, releases: {store})")
    _say(f"Ray             {urls['ray']}  (dashboard {urls['ray_dashboard']})")
    _say(f"environment     source {env_file}   (S3 keys, PREFECT_API_URL, BLIS_*)")
    _say(f"logs            {RUN}/*.log; stop with `make stop`")
    return 0


def _deployments_registered(api: str) -> bool:
    req = urllib.request.Request(f"{api}/deployments/filter", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=2) as resp:  # noqa: S310 - 127.0.0.1 only
        return len(json.loads(resp.read())) >= 4


def _stop_group(name: str, pid: int) -> None:
    if not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    _say(f"stopped {name} (process group {pid})")


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


def stop() -> int:
    if not STATE.exists():
        _say("nothing to stop")
        return 0
    state = json.loads(STATE.read_text())
    services = state.get("services", {})
    for name in ("serve", "ray", "prefect", "s3"):
        if name in services:
            _stop_group(name, int(services[name]["pid"]))
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
