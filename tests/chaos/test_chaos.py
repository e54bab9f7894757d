"""Chaos under steady load: shard kills, controller kill, scaling. Zero failed requests."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
import ray

import expertmesh
from expertmesh.actors import names
from tests.chaos.load import (
    MAX_TOKENS,
    SteadyLoad,
    greedy,
    wait_event,
    wait_replicated,
    wait_router_table,
    wait_shards,
)
from tests.integration.helpers import PROMPTS

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


@pytest.fixture(scope="module")
def cluster(checkpoint):
    c = expertmesh.connect()
    yield c
    c.shutdown()


def test_kill_shard_under_load(cluster, checkpoint, expected) -> None:
    cluster.deploy(checkpoint, shards=4, replicas=2)
    with SteadyLoad(greedy(cluster), expected, clients=4) as load:
        load.wait_for(20)
        victim = cluster.status()["shards"][0]["shard_id"]
        ray.kill(ray.get_actor(names.shard_name(victim), namespace=names.NAMESPACE))
        restored = wait_replicated(cluster.status, 2, timeout=15, gone=[victim])
        n = load.report.ok
        load.wait_for(n + 20)
    r = load.report
    assert r.failed == 0, r.errors[:3]
    assert r.wrong == 0
    assert r.ok >= 40
    assert restored < 15
    failed = [e for e in cluster.events() if e["kind"] == "shard_failed"]
    assert victim in [e["shard"] for e in failed]
    wait_event(cluster.events, "replication_restored")
    wait_shards(cluster.status, 4)  # a replacement shard was started


def test_hung_shard_is_bypassed_and_replaced(cluster, checkpoint, expected) -> None:
    cluster.deploy(checkpoint, shards=4, replicas=2)
    victim = cluster.status()["shards"][2]
    with SteadyLoad(greedy(cluster), expected, clients=4) as load:
        load.wait_for(10)
        # a real hang: the shard's process stops answering (not dead, so Ray sees nothing)
        os.kill(victim["pid"], signal.SIGSTOP)
        try:
            restored = wait_replicated(cluster.status, 2, timeout=20, gone=[victim["shard_id"]])
            load.wait_for(load.report.ok + 20)
        finally:
            with contextlib.suppress(ProcessLookupError):  # fenced already: ray.kill'ed
                os.kill(victim["pid"], signal.SIGCONT)
    assert load.report.failed == 0, load.report.errors[:3]
    assert load.report.wrong == 0
    assert restored < 20
    assert victim["shard_id"] not in {s["shard_id"] for s in cluster.status()["shards"]}


def test_kill_controller_serving_continues(cluster, checkpoint, expected) -> None:
    cluster.deploy(checkpoint, shards=4, replicas=2)
    before = cluster.status()
    # a shard the controller started but died before recording (its name, nothing else)
    orphan = (
        ray.remote(_Orphan)
        .options(name=names.shard_name("s90"), namespace=names.NAMESPACE, lifetime="detached")
        .remote()
    )
    assert ray.get(orphan.ping.remote()) == "s90"
    with SteadyLoad(greedy(cluster), expected, clients=3) as load:
        load.wait_for(10)
        ray.kill(cluster.controller, no_restart=False)  # Ray restarts it; it rebuilds its state
        n = load.report.ok
        load.wait_for(n + 20, timeout=60)
        after = cluster.status()  # answered by the restarted controller
        assert after["placement"] == before["placement"]
        assert {s["shard_id"] for s in after["shards"]} == {s["shard_id"] for s in before["shards"]}
        assert any(e["kind"] == "controller_restarted" for e in cluster.events())
        # s90, and any spare the old controller was still starting when it died (seen: s16)
        stopped = {e["shard"] for e in cluster.events() if e["kind"] == "orphan_shard_stopped"}
        assert "s90" in stopped
        assert not stopped & ({s["shard_id"] for s in before["shards"]} | set(before["spares"]))
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(orphan.ping.remote(), timeout=30)
        # the rebuilt controller still heals
        victim = after["shards"][1]["shard_id"]
        ray.kill(ray.get_actor(names.shard_name(victim), namespace=names.NAMESPACE))
        wait_replicated(cluster.status, 2, timeout=15, gone=[victim])
        n = load.report.ok
        load.wait_for(n + 10)
    assert load.report.failed == 0, load.report.errors[:3]
    assert load.report.wrong == 0
    # the spare started to replace the one the healing took is numbered past the orphan
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spares = cluster.status()["spares"]
        if spares and max(int(s[1:]) for s in spares) > 90:
            break
        time.sleep(0.2)
    assert spares and max(int(s[1:]) for s in spares) > 90, spares


class _Orphan:
    def ping(self) -> str:
        return "s90"


def wait_spares(cluster, count: int, timeout: float = 30.0) -> list[str]:
    """The warm spares once there are ``count`` (they start in the background)."""
    deadline = time.monotonic() + timeout
    while len(spares := cluster.status()["spares"]) != count and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(spares) == count, spares
    return spares


def test_scale_out_and_in_under_load(cluster, checkpoint, expected) -> None:
    st = cluster.deploy(checkpoint, shards=2, replicas=2)
    first = {s["shard_id"] for s in st["shards"]}
    [spare] = wait_spares(cluster, 1)  # a warm spare is started after the deployment
    with SteadyLoad(greedy(cluster), expected, clients=4) as load:
        load.wait_for(10)
        t0, since = time.monotonic(), time.time()
        st = cluster.scale(6)
        assert len(st["shards"]) == 6
        new = {s["shard_id"] for s in st["shards"]} - first
        assert spare in new  # the spare went into service first
        events = cluster.events(since=since)
        taken = [e for e in events if e["kind"] == "shard_started" and e.get("spare")]
        assert [e["shard"] for e in taken] == [spare]
        # new shards hold experts and serve dispatches: counted over 20 requests served once
        # the router has the new table (scale() returns as soon as it is published)
        wait_router_table(cluster.status, st["placement_version"])
        n = load.report.ok
        load.wait_for(n + 20)
        assert load.report.ok >= n + 20, f"only {load.report.ok - n} requests in 60s"
        served = {s["shard_id"]: s["calls"] for s in cluster.status()["shards"]}
        assert all(served[s] > 0 for s in new), served
        st = cluster.scale(2)
        assert len(st["shards"]) == 2
        n = load.report.ok
        load.wait_for(n + 20)
        elapsed = time.monotonic() - t0
    assert load.report.failed == 0, load.report.errors[:3]
    assert load.report.wrong == 0
    assert elapsed < 90
    placement = cluster.status()["placement"]
    assert all(len(v) == 2 for v in placement.values())  # 2 shards, 2 replicas each
    [refill] = wait_spares(cluster, 1)  # the pool was topped up again
    assert refill != spare and all(refill not in v for v in placement.values())


def test_no_warm_spares_when_turned_off(cluster, checkpoint, expected) -> None:
    cluster.deploy(checkpoint, shards=2, replicas=2, warm_shards=0)
    st = cluster.scale(3)  # starts a new shard process instead
    assert len(st["shards"]) == 3
    time.sleep(1.0)  # the reconcile loop would have started a spare by now
    assert cluster.status()["spares"] == []
    assert cluster.status()["warm_shards"] == 0
    outs = cluster.generate(PROMPTS[:2], max_tokens=MAX_TOKENS, ignore_eos=True)
    assert [o.token_ids for o in outs] == [expected[p] for p in PROMPTS[:2]]


def test_autoscaling_follows_load(cluster, checkpoint, expected) -> None:
    cluster.deploy(checkpoint, shards=2, replicas=2)
    # aggressive settings so the test is short: any sustained load wants more shards. The
    # test model's experts are tiny and run in microseconds, so the shards' busy fraction
    # under this load is small (0.05 did not trigger a scale-out).
    cluster.autoscale(
        min_shards=2,
        max_shards=4,
        target_utilisation=0.001,
        upscale_cooldown_s=0.0,
        downscale_cooldown_s=0.0,
        downscale_delay_s=3.0,
    )
    with SteadyLoad(greedy(cluster), expected, clients=6, max_seconds=90) as load:
        deadline = time.monotonic() + 60
        while len(cluster.status()["shards"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        grown = len(cluster.status()["shards"])
    assert grown >= 3
    assert load.report.failed == 0, load.report.errors[:3]
    assert load.report.wrong == 0
    # idle: back to the minimum
    deadline = time.monotonic() + 60
    while len(cluster.status()["shards"]) > 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(cluster.status()["shards"]) == 2
    assert any(e["kind"] == "autoscale" for e in cluster.events())
    cluster.autoscale(enabled=False)
