"""Starting or joining Ray: the embedded local default, or an existing cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from expertmesh import envs

log = logging.getLogger(__name__)

# NOTE: Ray notices a crashed node after ~15 s by default; these bring it to ~2-3 s. The
# platform itself never waits for this: the dispatcher retries on a replica at once.
FAST_HEALTH_CHECKS: dict[str, int] = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
    "health_check_timeout_ms": 500,
    "health_check_initial_delay_ms": 1000,
}


# NOTE: Ray's DEFAULT_DASHBOARD_AGENT_LISTEN_PORT: a cluster started by ray.init always puts its
# dashboard agent (which runs submitted jobs) here; ray.init has no argument to move it
DASHBOARD_AGENT_PORT = 52365


@dataclass(kw_only=True, slots=True)
class LocalRayOptions:
    """How to start the embedded single-machine Ray cluster."""

    # NOTE: logical CPUs; shards and the router take fractions of one. Ray prestarts one Python
    # worker per logical CPU, so a large number costs seconds of start-up on a small machine.
    num_cpus: int = 4
    dashboard: bool = False  # the dashboard costs ~1 GB; `ray job submit` needs it
    dashboard_port: int | None = None  # None: a free port
    object_store_memory: int = 512 * 1024**2


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_error(port: int, host: str = "127.0.0.1") -> str | None:
    """Why ``host:port`` cannot be listened on now (e.g. "Address already in use"), or None."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
        return None


def temp_dir() -> str:
    path = envs.ray_temp_dir()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


@contextlib.contextmanager
def _this_python_first_on_path() -> Iterator[None]:
    """Put this interpreter's folder first on ``PATH`` while Ray starts.

    NOTE: the raylet inherits this process's environment and a job's driver inherits the
    raylet's, so `ray job submit -- python -m expertmesh.pipelines.train` then runs the Python
    (the venv) that started the cluster, even when that venv was never activated.
    """
    before = os.environ.get("PATH", "")
    bindir = os.path.dirname(sys.executable)
    os.environ["PATH"] = os.pathsep.join([bindir, before]) if before else bindir
    try:
        yield
    finally:
        os.environ["PATH"] = before


def init_ray(address: str | None = None, local: LocalRayOptions | None = None) -> bool:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local cluster on loopback.

    A local cluster this call starts publishes its tracking URI and checkpoint root (from the
    environment, else the embedded default; see :mod:`expertmesh.published`).

    Returns True when this call started a local cluster (the caller then owns it).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or envs.ray_address()
    if address:
        ray.init(address=address, namespace="expertmesh", log_to_driver=False)
        return False
    envs.apply_local_ray_env()
    opts = local or LocalRayOptions()
    port = opts.dashboard_port or free_port()
    if opts.dashboard and port_error(DASHBOARD_AGENT_PORT) is not None:
        # the dashboard still serves Ray's state API; only job submission is lost
        log.warning(
            "port %d, where a local Ray's dashboard agent runs submitted jobs, is taken (another "
            "local Ray with its dashboard?): jobs will not run on this cluster",
            DASHBOARD_AGENT_PORT,
        )
    with _this_python_first_on_path():
        _start_local(opts, port)
    from expertmesh import published

    published.ensure(job_server=f"http://127.0.0.1:{port}" if opts.dashboard else None)
    return True


def _start_local(opts: LocalRayOptions, port: int) -> None:
    import ray

    ray.init(
        address="local",  # always a new cluster: never join one found in Ray's temp folder
        num_cpus=opts.num_cpus,
        include_dashboard=opts.dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        object_store_memory=opts.object_store_memory,
        namespace="expertmesh",
        log_to_driver=False,
        _temp_dir=temp_dir(),
        _node_ip_address="127.0.0.1",
        _system_config=dict(FAST_HEALTH_CHECKS),
    )
