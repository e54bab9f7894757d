"""`expertmesh up` / `down` on one machine: a serving process and the record that finds it.

``up --foreground`` starts local Ray, deploys the model, serves the API and writes
``$EXPERTMESH_HOME/cluster.json`` ({url, token, pid}); it shuts everything down on SIGTERM or
SIGINT. Plain ``up`` starts that as a detached process (logs in ``up.log``) and returns once the
API answers; ``down`` sends the SIGTERM and waits for the process to exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from expertmesh import envs
from expertmesh.api import info
from expertmesh.runtime import DASHBOARD_AGENT_PORT, port_error
from expertmesh.types import DEFAULT_MAX_QUEUED, ClusterError

if TYPE_CHECKING:
    from expertmesh.client import HttpCluster

NOTHING_UP = "nothing is up here (no {path}); start it with `expertmesh up --model NAME_OR_URI`"


@dataclass(kw_only=True, slots=True)
class UpOptions:
    model: str
    shards: int = 4
    replicas: int = 2
    warm_shards: int = 1
    max_shards: int | None = None  # most shards a scale may ask for; None: what fits
    max_queued: int = DEFAULT_MAX_QUEUED  # sequences waiting for a router slot; more: 429
    max_concurrent_per_token: int | None = None  # requests in flight per API token; more: 429
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    timeout_s: float = 180.0
    dashboard_port: int | None = None  # Ray dashboard (needed by `ray job submit`); None: off


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Fail fast (before Ray and the deployment start) when ``host:port`` is taken."""
    error = port_error(port, host)
    if error is not None:
        raise ClusterError(f"cannot serve on {host}:{port}: {error}; choose another port ({flag})")


def check_ports(opts: UpOptions) -> None:
    """Every port ``up`` will listen on, before anything starts: the API's, and with the
    dashboard its own port and its agent's. A local Ray always puts the dashboard agent (which
    runs submitted jobs) on Ray's default port, which ``ray.init`` cannot move; when another
    local Ray holds it, every `ray job submit` to this one would fail ("No available agent")."""
    check_port_free(opts.host, opts.port)
    if opts.dashboard_port is None:
        return
    check_port_free("127.0.0.1", opts.dashboard_port, "--dashboard-port")
    if port_error(DASHBOARD_AGENT_PORT) is not None:
        raise ClusterError(
            f"port {DASHBOARD_AGENT_PORT}, where a local Ray's dashboard agent runs submitted "
            "jobs, is taken (most likely by another local Ray with its dashboard): jobs could not "
            "run on this cluster. Stop that cluster, or start without --dashboard-port"
        )


def log_file() -> Path:
    return envs.home() / "up.log"


def is_running(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _is_ours(pid: int) -> bool:
    """The pid still runs `expertmesh up` (not another program that reused the pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return is_running(pid)  # no /proc (macOS): trust the record
    return b"expertmesh.cli" in cmdline or any(arg.endswith(b"expertmesh") for arg in cmdline)


def running_info() -> info.ApiInfo | None:
    """The live `up` process's record; a stale record (its process gone) is removed."""
    path = info.cluster_file()
    rec = info.read_info(path)
    if rec is None:
        return None
    if rec.pid is not None and not (is_running(rec.pid) and _is_ours(rec.pid)):
        info.remove_info(path)
        return None
    return rec


def attach() -> HttpCluster:
    """An :class:`~expertmesh.client.HttpCluster` on the API that `expertmesh up` started."""
    from expertmesh.client import HttpCluster

    rec = running_info()
    if rec is None:
        raise ClusterError(NOTHING_UP.format(path=info.cluster_file()))
    return HttpCluster(rec.url, token=rec.token)


# ---------------------------------------------------------------------- foreground
def run_foreground(opts: UpOptions) -> int:
    """Serve until SIGTERM/SIGINT, then stop the deployment, the API and local Ray."""
    from expertmesh.sdk import connect

    if running_info() is not None:
        raise ClusterError(f"expertmesh is already up ({info.cluster_file()}); run `down` first")
    check_ports(opts)
    stop = threading.Event()
    url = None
    from expertmesh.runtime import LocalRayOptions

    dashboard = opts.dashboard_port is not None
    cluster = connect(
        local=LocalRayOptions(dashboard=dashboard, dashboard_port=opts.dashboard_port)
    )
    if dashboard:
        print(
            f"Ray dashboard (for `ray job submit`): http://127.0.0.1:{opts.dashboard_port}",
            flush=True,
        )
    # NOTE: after connect(): ray.init installs its own SIGTERM handler (sys.exit) in a driver
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        print(
            f"deploying {opts.model}: {opts.shards} shards x {opts.replicas} replicas", flush=True
        )
        cluster.deploy(
            opts.model,
            shards=opts.shards,
            replicas=opts.replicas,
            warm_shards=opts.warm_shards,
            max_shards=opts.max_shards,
            max_queued=opts.max_queued,
        )
        if not stop.is_set():
            url = cluster.serve(
                host=opts.host,
                port=opts.port,
                token=opts.token,
                max_concurrent_per_token=opts.max_concurrent_per_token,
            )
            token = cluster.api_token or ""  # serve() read back the token the API uses
            info.write_info(
                info.cluster_file(), info.ApiInfo(url=url, token=token, pid=os.getpid())
            )
            print(f"serving {opts.model} at {url} (pid {os.getpid()}); token {token}", flush=True)
            while not stop.wait(1.0):
                pass
        print("stopping", flush=True)
    finally:
        for path in (info.cluster_file(), info.api_file()):  # ours only; they hold the token
            rec = info.read_info(path)
            if rec is not None and rec.url == url:
                info.remove_info(path)
        cluster.shutdown()
    print("stopped", flush=True)
    return 0


# ---------------------------------------------------------------------- background
def start_background(opts: UpOptions) -> info.ApiInfo:
    """Start ``expertmesh up --foreground`` detached; return its record once it serves."""
    import httpx

    if (rec := running_info()) is not None:
        raise ClusterError(f"expertmesh is already up at {rec.url} (pid {rec.pid})")
    check_ports(opts)
    argv = ["up", "--model", opts.model, "--shards", str(opts.shards)]
    argv += ["--replicas", str(opts.replicas), "--warm-shards", str(opts.warm_shards)]
    argv += ["--host", opts.host, "--port", str(opts.port), "--max-queued", str(opts.max_queued)]
    if opts.max_shards is not None:
        argv += ["--max-shards", str(opts.max_shards)]
    if opts.max_concurrent_per_token is not None:
        argv += ["--max-concurrent-per-token", str(opts.max_concurrent_per_token)]
    if opts.dashboard_port is not None:
        argv += ["--dashboard-port", str(opts.dashboard_port)]
    env = dict(os.environ)
    if opts.token:  # through the environment: argv is visible to every user in `ps`
        env["EXPERTMESH_TOKEN"] = opts.token
    log_path = log_file()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # it shows the token
    with os.fdopen(fd, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "expertmesh.cli", *argv, "--foreground"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives this shell; `down` stops it
            env=env,
        )
    deadline = time.monotonic() + opts.timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(
                f"`expertmesh up` exited with code {proc.returncode} before serving; "
                f"the end of {log_path}:\n{_tail(log_path)}"
            )
        rec = info.read_info(info.cluster_file())
        if rec is not None and rec.pid == proc.pid:
            try:
                resp = httpx.get(f"{rec.url}/api/health", timeout=2.0, trust_env=False)
                if resp.status_code == 200:
                    return rec
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    proc.terminate()  # our own child: stop it rather than leave a half-started cluster
    raise ClusterError(
        f"`expertmesh up` did not serve within {opts.timeout_s:.0f}s (stopped it); the end of "
        f"{log_path}:\n{_tail(log_path)}"
    )


def stop_background(timeout_s: float = 120.0) -> int:
    """SIGTERM the `up` process in cluster.json, wait for it to exit; returns its pid."""
    path = info.cluster_file()
    rec = info.read_info(path)
    if rec is None:
        raise ClusterError(NOTHING_UP.format(path=path))
    if rec.pid is None or not is_running(rec.pid) or not _is_ours(rec.pid):
        info.remove_info(path)
        raise ClusterError(f"the process in {path} (pid {rec.pid}) is gone; removed the record")
    os.kill(rec.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while is_running(rec.pid):
        if time.monotonic() > deadline:
            raise ClusterError(
                f"pid {rec.pid} still runs {timeout_s:.0f}s after SIGTERM; see {log_file()}"
            )
        time.sleep(0.2)
    info.remove_info(path)
    return rec.pid


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
