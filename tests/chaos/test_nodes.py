"""Several raylets on one machine (ray.cluster_utils.Cluster): spread, then lose nodes under load."""

from __future__ import annotations

import time

import pytest
import ray
from ray.cluster_utils import Cluster as RayTestCluster

import expertmesh
from expertmesh.runtime import FAST_HEALTH_CHECKS
from tests.chaos.load import MAX_TOKENS, SteadyLoad, greedy, wait_replicated, wait_shards
from tests.integration.helpers import PROMPTS

pytestmark = [pytest.mark.chaos, pytest.mark.integration]
LOOPBACK = {"node_ip_address": "127.0.0.1"}


def _node_args() -> dict:
    from expertmesh.runtime import temp_dir

    return {**LOOPBACK, "temp_dir": temp_dir()}


@pytest.fixture(scope="module")
def ray_nodes():
    rc = RayTestCluster(
        initialize_head=True,
        head_node_args={
            **_node_args(),
            # room for the router beside head-node shards even while a torn-down deployment's
            # actors are still releasing their CPUs (else the router's soft affinity falls back
            # to a worker node, which these tests then remove)
            "num_cpus": 2,
            "include_dashboard": False,
            "_system_config": dict(FAST_HEALTH_CHECKS),
        },
    )
    workers = [rc.add_node(**_node_args(), num_cpus=2) for _ in range(2)]
    rc.wait_for_nodes()
    ray.init(address=rc.address, _node_ip_address="127.0.0.1", namespace="expertmesh")
    yield rc, workers
    ray.shutdown()
    rc.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_nodes):
    c = expertmesh.connect()  # joins the Ray cluster this process already belongs to
    yield c
    c.shutdown()


def test_shards_spread_over_nodes_and_generate(cluster, checkpoint, expected) -> None:
    st = cluster.deploy(checkpoint, shards=3, replicas=2)
    assert len({s["node_id"] for s in st["shards"]}) == 3
    outs = cluster.generate(PROMPTS, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert [o.token_ids for o in outs] == [expected[p] for p in PROMPTS]
    st = cluster.status()
    head = [n["node_id"] for n in st["nodes"] if n["head"]]
    # the control plane sits on the head node, which these tests never remove
    assert head == [st["router"]["node_id"]] == [st["controller_node_id"]]
    node_of = {s["shard_id"]: s["node_id"] for s in st["shards"]}
    for replicas in cluster.status()["placement"].values():  # anti-affinity across nodes
        assert len({node_of[s] for s in replicas}) == len(replicas)


@pytest.mark.parametrize("graceful", [True, False], ids=["graceful", "crash"])
def test_remove_node_under_load(ray_nodes, cluster, checkpoint, expected, graceful) -> None:
    rc, workers = ray_nodes
    cluster.deploy(checkpoint, shards=4, replicas=2)
    victim = workers.pop(0)
    victim_id = victim.node_id
    with SteadyLoad(greedy(cluster), expected, clients=4) as load:
        load.wait_for(15)
        lost = [s["shard_id"] for s in cluster.status()["shards"] if s["node_id"] == victim_id]
        rc.remove_node(victim, allow_graceful=graceful)
        restored = wait_replicated(cluster.status, 2, timeout=20, gone=lost)
        load.wait_for(load.report.ok + 20)
    r = load.report
    assert r.failed == 0, r.errors[:3]
    assert r.wrong == 0
    assert restored < 20
    st = wait_shards(cluster.status, 4, timeout=90)  # replacements start on the nodes left
    assert victim_id not in {s["node_id"] for s in st["shards"]}
    joined = rc.add_node(**_node_args(), num_cpus=2)  # back to 3 nodes for the next case
    workers.append(joined)
    rc.wait_for_nodes()
    # a node joining triggers rebalancing: a shard moves onto it (make-before-break)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if joined.node_id in {s["node_id"] for s in cluster.status()["shards"]}:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("no shard moved to the node that joined")
    assert any(e["kind"] == "node_joined" for e in cluster.events())
