"""The console's routes without a cluster: static files, auth, and the placement preview (a
pure function of the controller's status)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from expertmesh.actors.breaker import Breakers
from expertmesh.api.app import create_app
from expertmesh.api.deps import ApiSettings, token_digest
from expertmesh.api.routes.console import preview, ui_dir
from expertmesh.platform.placement import PlacementError


def status(n_shards: int, layers: int = 2, experts: int = 4) -> dict:
    """A controller status: experts dealt round-robin, 1 replica each, one node."""
    ids = [f"s{i}" for i in range(n_shards)]
    placement = {
        f"{layer}:{e}": [ids[(layer * experts + e) % n_shards]]
        for layer in range(layers)
        for e in range(experts)
    }
    return {
        "placement_version": 3,
        "placement": placement,
        "shards": [{"shard_id": s, "node_id": "n0"} for s in ids],
        "nodes": [{"node_id": "n0", "alive": True}],
        "expert_load": {k: 10 * (i + 1) for i, k in enumerate(placement)},
        "min_replicas": 1,
    }


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app(ApiSettings(token_sha256=token_digest("tok"))))


def test_console_files_are_served_without_a_token(client: TestClient) -> None:
    assert ui_dir() is not None
    page = client.get("/console/")
    assert page.status_code == 200 and '<div id="app">' in page.text
    js = client.get("/console/vendor/preact.mjs")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]


def test_swagger_ui_comes_from_the_vendored_copy(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text
    # every script and stylesheet the page names is this server's: nothing from a CDN
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/console/vendor/swagger-ui-bundle.js" in assets
    for url in assets:
        assert not url.startswith(("http:", "https:", "//")), url
        if not url.startswith("data:"):
            assert client.get(url).status_code == 200, url
    # behind a path prefix (a proxy's root_path) the links follow it
    prefixed = TestClient(client.app, root_path="/em").get("/docs")
    assert 'src="/em/console/vendor/swagger-ui-bundle.js"' in prefixed.text
    assert "'/em/openapi.json'" in prefixed.text


@pytest.mark.parametrize("path", ["/api/runs", "/api/jobs", "/api/console/config"])
def test_console_data_needs_the_token(client: TestClient, path: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 401
    assert resp.json()["error"]["type"] == "authentication_error"


def test_job_submit_refuses_other_pipelines(client: TestClient) -> None:
    resp = client.post(
        "/api/jobs", json={"pipeline": "serve"}, headers={"Authorization": "Bearer tok"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "pipeline"


def test_preview_of_scale_out_loads_experts_on_the_new_shard() -> None:
    before = status(2)
    out = preview(before, 3)
    assert out["new_shards"] == ["new-1"] and out["drain"] == []
    assert out["replicas_before"] == before["placement"]
    adds = [m for m in out["moves"] if m["kind"] == "add"]
    assert adds and any(m["shard_id"] == "new-1" for m in adds)
    after = out["replicas_after"]
    assert all(set(v) <= {"s0", "s1", "new-1"} for v in after.values())
    assert before == status(2)  # pure: the status it was given is unchanged


def test_preview_of_scale_in_drains_and_keeps_every_expert() -> None:
    out = preview(status(3), 2)
    assert len(out["drain"]) == 1
    gone = out["drain"][0]
    assert all(v and gone not in v for v in out["replicas_after"].values())


def test_preview_at_the_current_size_changes_nothing() -> None:
    out = preview(status(2), 2)
    assert out["moves"] == [] and out["replicas_after"] == out["replicas_before"]


def test_preview_refuses_draining_every_shard() -> None:
    with pytest.raises(PlacementError):
        preview(status(2), 0)


def test_breaker_snapshot_says_open_then_half_open() -> None:
    b = Breakers(probe_s=1.0, suspect_s=5.0)
    b.failed("s1", now=100.0, timed_out=False)
    assert b.snapshot(101.0) == {"s1": {"state": "open", "failures": 1, "timed_out": False}}
    assert b.snapshot(106.0)["s1"]["state"] == "half-open"
    b.succeeded("s1")
    assert b.snapshot(106.0) == {}
