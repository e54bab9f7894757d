"""Runs and jobs in the console on a cluster with a Ray job server (its dashboard): a pipeline
submitted from the form runs as a real Ray job, shows its status and its log; the header and
shard cards link to the Ray dashboard."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from expertmesh.runtime import free_port
from tests.browser.conftest import TOKEN, Live, Watched
from tests.browser.test_console import WAIT_MS, shot, sign_in

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def live(state_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A head with its dashboard (the job server), a 1-shard deployment and the API."""
    import expertmesh
    from expertmesh import published
    from tests.integration.helpers import job_server_head, tiny_checkpoint

    uri = tiny_checkpoint(tmp_path_factory.mktemp("console-jobs"))
    shots = Path(os.environ.get("EXPERTMESH_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    with job_server_head(prefix="emuij-") as dashboard:
        cluster = expertmesh.connect()
        published.ensure(job_server=dashboard)
        cluster.deploy(uri, shards=1, replicas=1, warm_shards=0)
        url = cluster.serve(port=free_port(), token=TOKEN)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, timeout=120.0, headers=auth) as http:
            yield Live(url=url, http=http, cluster=cluster, shots=shots)
        cluster.shutdown()


def test_a_pipeline_submitted_from_the_console_runs_as_a_ray_job(
    live: Live, watched: Watched
) -> None:
    sign_in(watched, live, "jobs")
    page = watched.page
    form = page.get_by_test_id("job-form")
    form.wait_for(timeout=WAIT_MS)
    form.locator("select").select_option("train")
    # --help: a real job of the train pipeline that ends at once, printing its usage
    form.locator("textarea").fill("help")
    form.locator("button[type=submit]").click()
    form.locator("p:has-text('submitted')").wait_for(timeout=WAIT_MS)
    job_id = form.locator("p").inner_text().removeprefix("submitted ").strip()
    row = page.locator(f'[data-testid=job]:has-text("{job_id}")')
    row.locator("text=SUCCEEDED").wait_for(timeout=180_000)
    row.locator("button").click()
    logs = page.get_by_test_id("job-logs")
    logs.wait_for(timeout=WAIT_MS)
    assert "usage: expertmesh.pipelines.train" in logs.inner_text()
    api = live.http.get(f"/api/jobs/{job_id}/logs").json()
    assert api["logs"] == logs.inner_text()
    shot(watched, live, "jobs-submitted")
    watched.assert_clean()


def test_links_out_to_the_ray_dashboard(live: Live, watched: Watched) -> None:
    sign_in(watched, live, "cluster")
    page = watched.page
    page.get_by_test_id("shard").first.wait_for(timeout=WAIT_MS)
    dash = live.http.get("/api/console/config").json()["ray_dashboard_url"]
    assert dash and page.locator(f'header a[href="{dash}"]').count() == 1
    pid = live.http.get("/api/cluster").json()["shards"][0]["pid"]
    flame = page.get_by_test_id("shard").first.locator("a:has-text('flame graph')")
    assert flame.get_attribute("href").startswith(f"{dash}/worker/cpu_profile?pid={pid}&")
    assert httpx.get(dash, timeout=30).status_code == 200
    watched.assert_clean()
