"""Where the control plane lives: the Ray head node (the one node a cluster never scales away)."""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

HEAD_RESOURCE = "node:__internal_head__"


def head_node_id() -> str:
    """The head node's id; the caller's node if the cluster reports no head (older Rays)."""
    for node in ray.nodes():
        if node["Alive"] and HEAD_RESOURCE in node.get("Resources", {}):
            return node["NodeID"]
    return ray.get_runtime_context().get_node_id()


def on_head(soft: bool = True) -> NodeAffinitySchedulingStrategy:
    """Schedule on the head node; ``soft`` lets Ray fall back elsewhere when the head is full.

    NOTE: not "the caller's node": with several raylets on one address (ray.cluster_utils, or a
    driver started on a worker pod) a driver can belong to a worker node that goes away.
    """
    return NodeAffinitySchedulingStrategy(head_node_id(), soft=soft)
