"""The soak benchmark (bench/soak.py), short: a request mix over HTTP with hung-up clients
while shards are killed. Zero failed requests, hung-up requests stop, memory stays flat."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.integration.helpers import api_cluster

# the bench's own load, killer and sampler, run for half a minute here
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import soak

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

TOKEN = "soak-token-0123456789"
MiB = 1024 * 1024
# NOTE: generous on purpose. Over a short run a healthy process still grows: lazy imports,
# allocator arenas, Ray's first object transfers and a Serve replica's first routes; on this
# machine those were tens of MiB, not per request. What it catches is memory that scales
# with requests: at the few hundred requests of this run, ~200 KiB kept per request (a
# request's sequences and KV rows, or a per-request entry never deleted) crosses it.
RSS_GROWTH_LIMIT = 64 * MiB
LONG_LIVED = ("router", "controller", "api replica", "serve controller", "raylet", "gcs")


def test_soak_short(state_home, checkpoint) -> None:
    cfg = soak.SoakConfig(
        seconds=20,
        warmup_s=6,
        clients=4,
        kill_every=7,
        sample_every=2,
        long_tokens=64,
        hang_up_tokens=180,  # the test model's context is 256 tokens
    )
    with api_cluster(checkpoint, TOKEN, prefix="emsoak-", deploy={"shards": 4, "replicas": 2}) as (
        cluster,
        url,
    ):
        report = soak.run_soak(cluster, url, TOKEN, cfg)
    soak.print_report(report, cfg)  # shown when an assertion fails
    assert report.failures == [], report.failures[:3]
    assert report.wrong == 0
    assert report.heal_times, "no shard was killed"
    assert set(report.latencies) == {"short", "stream", "long"}
    # hung-up clients: their requests stopped, each within one step of its cancel
    assert report.hung_up > 0
    router = report.router
    assert router["in_flight"] == 0 and router["running"] == 0
    assert router["cancelled"] >= 1 and router["cancel_overrun_tokens"] <= 1
    start, end = report.rss_after_warmup(cfg.warmup_s)
    for label in LONG_LIVED:
        assert label in start and label in end, (label, sorted(end))
        growth = end[label] - start[label]
        assert growth <= RSS_GROWTH_LIMIT, f"{label} grew {growth / MiB:.1f} MiB"
