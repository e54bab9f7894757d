"""The web console in a real browser (Debian's Chromium via Playwright) against a live local
cluster: real API, real shard actors, real MLflow store. Every test fails on a console error or
a failed request, and saves a screenshot of its view."""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import urlsplit

import pytest

from tests.browser.conftest import NAME, TOKEN, Live, Watched
from tests.integration.helpers import PROMPTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WAIT_MS = 60_000
# an upgrade loads a whole version's experts; on a shared 2-core machine under load that has
# taken most of a minute
UPGRADE_MS = 180_000


def sign_in(w: Watched, live: Live, view: str = "cluster", token: str = TOKEN) -> None:
    page = w.page
    page.goto(f"{live.url}/console/#/{view}")
    page.get_by_test_id("token").fill(token)
    page.get_by_test_id("signin-submit").click()


def shot(w: Watched, live: Live, name: str) -> None:
    w.page.screenshot(path=str(live.shots / f"{name}.png"), full_page=True)


def load(live: Live, seconds: float) -> threading.Thread:
    """Completions from another thread for ``seconds`` (tokens for the heatmap and charts)."""

    def run() -> None:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 12, "ignore_eos": True}
            live.http.post("/v1/completions", json=body)
            i += 1

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_wrong_token_shows_the_sign_in_error(live: Live, watched: Watched) -> None:
    watched.allowed_status = {401}
    sign_in(watched, live, token="not-the-token")
    err = watched.page.get_by_test_id("signin-error")
    err.wait_for(timeout=WAIT_MS)
    assert "invalid API token" in err.inner_text()
    assert watched.page.evaluate("sessionStorage.getItem('expertmesh.token')") is None
    shot(watched, live, "signin-error")
    watched.errors = [e for e in watched.errors if "401" not in e]  # the deliberate one
    watched.assert_clean()


def test_cluster_view_shows_nodes_shards_and_their_experts(live: Live, watched: Watched) -> None:
    sign_in(watched, live)
    page = watched.page
    page.get_by_test_id("shard").first.wait_for(timeout=WAIT_MS)
    status = live.http.get("/api/cluster").json()
    shards = page.get_by_test_id("shard")
    assert shards.count() == len(status["shards"]) == 2
    for s in status["shards"]:
        card = page.locator(f'[data-shard="{s["shard_id"]}"]')
        chips = card.locator(".chip").all_inner_texts()
        assert sorted(chips) == sorted(f"L{layer}:E{e}" for layer, e in s["experts"])
        assert "healthy" in card.inner_text()
    assert page.get_by_test_id("node").count() == len(status["nodes"])
    assert f"serving {NAME}/1" in page.get_by_test_id("serving").inner_text()
    shot(watched, live, "cluster")
    watched.assert_clean()


def test_load_heatmap_has_a_cell_per_expert_and_goes_live(live: Live, watched: Watched) -> None:
    sign_in(watched, live, "load")
    page = watched.page
    cells = page.get_by_test_id("heat-cell")
    cells.first.wait_for(timeout=WAIT_MS)
    cfg = live.http.get("/api/cluster").json()["router"]["model"]
    assert cells.count() == cfg["n_layers"] * cfg["n_experts"]
    worker = load(live, 8.0)
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=heat-cell]')]"
        ".some(c => c.firstChild.textContent !== '0')",
        timeout=WAIT_MS,
    )
    assert page.get_by_test_id("imbalance").inner_text() != "–"
    worker.join()
    page.locator('[data-key="0:1"]').click()
    detail = page.get_by_test_id("expert-detail")
    replicas = live.http.get("/api/cluster").json()["placement"]["0:1"]
    assert all(r in detail.inner_text() for r in replicas)
    shot(watched, live, "load")
    watched.assert_clean()


def test_playground_streams_and_its_trace_is_the_apis(live: Live, watched: Watched) -> None:
    sign_in(watched, live, "playground")
    page = watched.page
    completions: list[dict] = []  # every completion request the page makes
    page.on(
        "request",
        lambda r: r.url.endswith("/v1/completions") and completions.append(json.loads(r.post_data)),
    )
    panels = [page.get_by_test_id("panel-a"), page.get_by_test_id("panel-b")]
    for panel in panels:
        panel.get_by_test_id("max-tokens").fill("8")
        with page.expect_response(
            lambda r: r.url.endswith("/v1/completions") and "stream" in (r.request.post_data or "")
        ) as streamed:
            panel.get_by_test_id("run").click()
        assert streamed.value.headers["content-type"].startswith("text/event-stream")
    for panel in panels:
        panel.locator('[data-testid=output][data-state="done"]').wait_for(timeout=WAIT_MS)
        shown = json.loads(panel.get_by_test_id("trace-json").text_content())
        assert json.loads(streamed.value.request.post_data)["stream"] is True
        api = live.http.post(
            "/v1/completions", json={**shown["request"], "expertmesh_routing": True}
        ).json()
        routing = api["choices"][0]["expertmesh_routing"]
        assert shown["routing"] == routing
        assert panel.get_by_test_id("output").inner_text().endswith(api["choices"][0]["text"])
        n_fed = len(routing["token_experts"])
        assert panel.get_by_test_id("trace-cell").count() == n_fed * len(routing["expert_counts"])
    # one streamed request per panel, the trace its own: none asked again
    assert len(completions) == 2
    assert all(c["stream"] and c["expertmesh_routing"] for c in completions)
    shot(watched, live, "playground")
    watched.assert_clean()


def test_models_lineage_upgrade_and_roll_back(live: Live, watched: Watched) -> None:
    sign_in(watched, live, "models")
    page = watched.page
    versions = page.get_by_test_id("version")
    versions.first.wait_for(timeout=WAIT_MS)
    assert versions.count() == 2
    v1, v2 = (page.locator(f'[data-ref="{NAME}/{n}"]') for n in (1, 2))
    assert "loss 3.200" in v1.inner_text()
    assert "@serving" in v1.inner_text()  # MLflow's alias, set by the deployment
    assert "finetune" in v2.inner_text() and "loss 2.900" in v2.inner_text()
    # v2 is drawn as v1's child
    assert page.locator(f'li:has([data-ref="{NAME}/1"]) ul.tree [data-ref="{NAME}/2"]').count()
    shot(watched, live, "models")
    v2.get_by_test_id("upgrade").click()
    page.get_by_test_id("confirm-yes").click()
    v2.get_by_test_id("serving-badge").wait_for(timeout=UPGRADE_MS)
    assert live.http.get("/api/cluster").json()["version"] == "2"
    page.get_by_test_id("rollback").click()
    page.get_by_test_id("confirm-yes").click()
    v1.get_by_test_id("serving-badge").wait_for(timeout=UPGRADE_MS)
    assert live.http.get("/api/cluster").json()["version"] == "1"
    watched.assert_clean()


def test_runs_and_jobs(live: Live, watched: Watched) -> None:
    sign_in(watched, live, "jobs")
    page = watched.page
    page.get_by_test_id("run").first.wait_for(timeout=WAIT_MS)
    runs = page.get_by_test_id("runs").inner_text()
    assert "train-tiny" in runs and "finetune-tiny" in runs and "FINISHED" in runs
    # this cluster runs without a dashboard: the view says how to get a job server
    assert "dashboard" in page.get_by_test_id("no-job-server").inner_text()
    assert page.get_by_test_id("job-form").is_visible()
    shot(watched, live, "jobs")
    watched.assert_clean()


def test_a_killed_shard_appears_in_the_timeline(live: Live, watched: Watched) -> None:
    import ray

    from expertmesh.actors import names

    sign_in(watched, live, "metrics")
    page = watched.page
    page.get_by_test_id("throughput-chart").wait_for(timeout=WAIT_MS)
    worker = load(live, 6.0)
    victim = live.http.get("/api/cluster").json()["shards"][0]["shard_id"]
    ray.kill(ray.get_actor(names.shard_name(victim), namespace=names.NAMESPACE), no_restart=True)
    row = page.locator('[data-testid=event][data-kind="shard_failed"]')
    row.first.wait_for(timeout=WAIT_MS)
    assert victim in row.first.inner_text()
    worker.join()
    time.sleep(2.5)  # one more poll: the chart has the event and the load after it
    shot(watched, live, "metrics")
    watched.assert_clean()


def test_scaling_from_the_console_changes_the_shard_count(live: Live, watched: Watched) -> None:
    sign_in(watched, live, "scale")
    page = watched.page
    before = len(live.http.get("/api/cluster").json()["shards"])
    page.wait_for_function(
        f"() => document.querySelector('[data-testid=scale-current]')?.textContent === '{before}'",
        timeout=WAIT_MS,
    )
    page.get_by_test_id("scale-target").fill(str(before + 1))
    page.get_by_test_id("scale-preview").click()
    page.get_by_test_id("scale-plan").wait_for(timeout=WAIT_MS)
    assert page.get_by_test_id("plan-add").count() > 0
    shot(watched, live, "scale-preview")
    page.get_by_test_id("scale-apply").click()
    page.get_by_test_id("confirm-yes").click()
    state = page.get_by_test_id("scale-state")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=scale-state]')?.textContent.startsWith('done')",
        timeout=WAIT_MS,
    )
    assert state.inner_text() == f"done: {before + 1} shards"
    assert page.get_by_test_id("scale-id").inner_text().startswith("scale-")
    assert len(live.http.get("/api/cluster").json()["shards"]) == before + 1
    page.locator('[data-testid=scale-progress] li:has-text("scaled_out")').wait_for(timeout=WAIT_MS)
    shot(watched, live, "scale")
    watched.assert_clean()


def test_api_docs_render_without_the_internet(live: Live, watched: Watched) -> None:
    """/docs (Swagger UI) loads only from the API server: a cluster's network often has no
    route to a CDN."""
    page = watched.page
    outside: list[str] = []

    def loopback_only(route) -> None:
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", loopback_only)
    page.goto(f"{live.url}/docs")
    page.locator("[data-path='/v1/completions']").first.wait_for(timeout=WAIT_MS)
    assert page.locator(".opblock").count() >= 10  # one per documented operation
    assert not outside, outside
    shot(watched, live, "api-docs")
    watched.assert_clean()
