"""A live local cluster, the API on a free port, and Debian's Chromium driven by Playwright."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

TOKEN = "console-token-0123456789"
NAME = "console-tiny"


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Live:
    url: str
    http: httpx.Client  # with the token
    cluster: object
    shots: Path  # screenshots of every view land here


@pytest.fixture(scope="module")
def live(state_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Two registered versions (v2 fine-tuned from v1, each with an MLflow run), v1 deployed on
    2 shards x 1 replica, and the API with the console."""
    from expertmesh.platform.tracking import Tracker
    from tests.integration.helpers import api_cluster, tiny_checkpoint

    v1 = tiny_checkpoint(tmp_path_factory.mktemp("console-v1"))
    v2 = tiny_checkpoint(tmp_path_factory.mktemp("console-v2"), seed=1)
    tracker = Tracker()
    for uri, tags, loss in (
        (v1, {"pipeline": "train", "domains": "code,prose"}, 3.2),
        (v2, {"pipeline": "finetune", "parent": f"{NAME}/1", "trained_parts": "router"}, 2.9),
    ):
        with tracker.run("console-test", run_name=f"{tags['pipeline']}-tiny") as run_id:
            tracker.log_metrics({"loss": loss, "eval_loss": loss + 0.2}, step=10)
        tracker.register_version(NAME, source=uri, run_id=run_id, tags=tags)
    shots = Path(os.environ.get("EXPERTMESH_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    shots.mkdir(parents=True, exist_ok=True)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with (
        api_cluster(f"{NAME}/1", TOKEN, prefix="emui-", deploy={"warm_shards": 0}) as (
            cluster,
            url,
        ),
        httpx.Client(base_url=url, timeout=120.0, headers=auth) as http,
    ):
        yield Live(url=url, http=http, cluster=cluster, shots=shots)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One headless Chromium for the module (Debian's, never a downloaded one)."""
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium on PATH: `make test-deps` installs Debian's")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@dataclass
class Watched:
    """A page, and every console error and failed request it has seen."""

    page: object
    errors: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    allowed_status: set[int] = field(default_factory=set)

    def assert_clean(self) -> None:
        assert not self.errors, f"console errors: {self.errors}"
        assert not self.failed, f"failed requests: {self.failed}"


@pytest.fixture
def watched(browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    w = Watched(page=page)
    page.on("console", lambda m: m.type == "error" and w.errors.append(m.text))
    page.on("pageerror", lambda exc: w.errors.append(str(exc)))
    page.on("requestfailed", lambda r: w.failed.append(f"{r.url}: {r.failure}"))

    def on_response(r) -> None:
        if r.status >= 400 and r.status not in w.allowed_status:
            w.failed.append(f"{r.request.method} {r.url}: {r.status}")

    page.on("response", on_response)
    try:
        yield w
    finally:
        context.close()
