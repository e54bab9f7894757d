"""The at-scale tracking path on one machine: PostgreSQL and `mlflow server` on 127.0.0.1.

PostgreSQL is Debian's (`make test` installs it); each instance gets a data folder, a Unix
socket folder and a port of its own and is stopped by its fixture, so no system-wide cluster is
touched. As root (CI), the server runs as the `postgres` user: PostgreSQL refuses root.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from expertmesh.runtime import free_port


def pg_bin(tool: str) -> str | None:
    """A PostgreSQL program: on PATH, else from Debian's versioned folder (not on PATH)."""
    found = shutil.which(tool)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    return candidates[-1] if candidates else None


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass(frozen=True)
class Postgres:
    port: int
    password: str
    database: str

    @property
    def uri(self) -> str:
        # NOTE: the driver named: SQLAlchemy 2.1 defaults to psycopg 3, the image ships psycopg2
        return (
            f"postgresql+psycopg2://postgres:{self.password}@127.0.0.1:{self.port}/{self.database}"
        )


@contextmanager
def postgres(database: str = "mlflow") -> Iterator[Postgres]:
    """A fresh PostgreSQL on 127.0.0.1 (password auth over TCP), removed afterwards."""
    import psycopg2

    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        raise RuntimeError(
            "PostgreSQL is not installed: run `make test-deps` (Debian's postgresql)"
        )
    # NOTE: under /tmp, not pytest's folder: that one is 0700 root, which `postgres` cannot enter
    root = Path(tempfile.mkdtemp(prefix="expertmesh-pg-"))
    data, sock, log = root / "data", root / "sock", root / "server.log"
    password = os.urandom(12).hex()
    (root / "pw").write_text(password)
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        shutil.chown(root / "pw", "postgres")
    port = free_port()
    started = False
    try:
        subprocess.run(
            _as_postgres(
                [
                    *(initdb, "-D", str(data), "-U", "postgres", f"--pwfile={root / 'pw'}"),
                    *("--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8"),
                ]
            ),
            check=True,
            capture_output=True,
        )
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off"
        subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-o", opts, "-l", str(log), "-w", "start"]),
            check=True,
            capture_output=True,
        )
        started = True
        conn = psycopg2.connect(
            host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres"
        )
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        conn.close()
        yield Postgres(port=port, password=password, database=database)
    finally:
        if started:
            subprocess.run(
                _as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]),
                check=False,
                capture_output=True,
            )
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path) -> Iterator[str]:
    """`mlflow server` on a free loopback port, artifacts served from ``artifacts``."""
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    log = artifacts.parent / "mlflow-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri),
                *("--artifacts-destination", str(artifacts), "--serve-artifacts"),
                *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
                *("--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: its workers stop with it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
