"""Get or start the controller actor (named, detached, restarted by Ray if it dies)."""

from __future__ import annotations

import uuid

import ray

from expertmesh import envs
from expertmesh.actors import names, nodes
from expertmesh.actors.controller import Controller


def get_controller(create: bool = True, state_uri: str | None = None) -> ray.actor.ActorHandle:
    """The cluster's controller; with ``create`` start one if there is none."""
    try:
        return ray.get_actor(names.CONTROLLER, namespace=names.NAMESPACE)
    except ValueError:
        if not create:
            raise LookupError(
                "no expertmesh controller in this Ray cluster; deploy a model first"
            ) from None
    uri = state_uri or str(envs.home() / "controller.json")
    handle = (
        ray.remote(Controller)
        .options(
            name=names.CONTROLLER,
            namespace=names.NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=0,
            max_concurrency=32,
            num_cpus=0,
            # the control plane lives on the head node, not beside the shards. NOTE: hard: Ray
            # ignores a soft node affinity for an actor that asks for no resources
            scheduling_strategy=nodes.on_head(soft=False),
        )
        .remote(uri, uuid.uuid4().hex)
    )
    ray.get(handle.get_placement.remote(), timeout=60)
    return handle
