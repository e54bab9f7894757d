"""`expertmesh up | status | generate | scale | down` as a user runs them: real subprocesses, a real local
Ray cluster started in the background, answers checked against the in-process engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from expertmesh.cli import format_status
from expertmesh.platform.engine import Engine
from expertmesh.platform.loader import load_for_inference
from expertmesh.platform.sampling import SamplingParams
from expertmesh.runtime import free_port
from expertmesh.service import is_running
from tests.integration.helpers import PROMPTS, tiny_checkpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home() -> Iterator[Path]:
    # NOTE: a short path: Ray nests its Unix sockets under <home>/ray (107-byte limit)
    with tempfile.TemporaryDirectory(prefix="emcli-") as d:
        yield Path(d)


def cli(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EXPERTMESH_HOME": str(home)}
    for key in ("EXPERTMESH_TOKEN", "RAY_ADDRESS", "EXPERTMESH_RAY_TMP"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "expertmesh.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_up_status_generate_down(home: Path) -> None:
    uri = tiny_checkpoint(home / "ckpt", seed=1)
    engine = Engine(*load_for_inference(uri))
    prompt = PROMPTS[1]
    (expected,) = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))

    nothing = cli(home, "status")
    assert nothing.returncode == 2 and "expertmesh up" in nothing.stderr

    up_args = ["--model", uri, "--shards", "2", "--replicas", "1", "--max-shards", "3"]
    up_args += ["--port", str(free_port())]
    up = cli(home, "up", *up_args, timeout=240)
    record_path = home / "cluster.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    try:
        log = (home / "up.log").read_text() if (home / "up.log").exists() else ""
        assert up.returncode == 0, up.stderr + log
        assert record is not None and record["url"] in up.stdout and record["token"] in up.stdout
        assert record["url"].startswith("http://127.0.0.1:")
        assert record_path.stat().st_mode & 0o077 == 0  # it holds the token: owner only

        resp = httpx.get(f"{record['url']}/v1/models", headers={"Authorization": "Bearer x"})
        assert resp.status_code == 401

        status = cli(home, "status", "--json")
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)
        assert state["model"] == "v1" and len(state["shards"]) == 2
        table = format_status(state)
        assert "s0" in table and "s1" in table and "layer 1" in table

        gen = cli(home, "generate", prompt, "--max-tokens", "8", "--ignore-eos", "--json")
        assert gen.returncode == 0, gen.stderr
        out = json.loads(gen.stdout)
        assert out["text"] == expected.text and out["token_ids"] == expected.output_ids

        streamed = cli(home, "generate", prompt, "--max-tokens", "8", "--ignore-eos", "--stream")
        assert streamed.returncode == 0, streamed.stderr
        assert streamed.stdout == expected.text + "\n"

        grown = cli(home, "scale", "3", timeout=150)  # waits for the scale to finish
        assert grown.returncode == 0, grown.stderr
        assert grown.stdout.startswith("scale-") and "2 -> 3 shards" in grown.stdout
        refused = cli(home, "scale", "4")
        assert refused.returncode == 2
        assert "HTTP 400: shards: 4 asked, above this deployment's max_shards=3" in refused.stderr
        started = cli(home, "scale", "2", "--no-wait")
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith("scale-") and "3 -> 2 shards started" in started.stdout

        down = cli(home, "down", timeout=150)
        assert down.returncode == 0, down.stderr
        assert not is_running(record["pid"])
        assert not record_path.exists()
    finally:
        if record is not None and is_running(record["pid"]):  # the `up` process we started
            os.kill(record["pid"], signal.SIGTERM)
            deadline = time.monotonic() + 60
            while is_running(record["pid"]) and time.monotonic() < deadline:
                time.sleep(0.5)
