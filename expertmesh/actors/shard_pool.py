"""Shard lifecycle for the controller: start shard actors on chosen nodes, apply placement plans."""

from __future__ import annotations

import contextlib
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from expertmesh.actors import names
from expertmesh.actors.expert_shard import ExpertShard
from expertmesh.actors.state import ControllerState, ShardRecord
from expertmesh.platform import capacity
from expertmesh.platform import placement as pl
from expertmesh.platform.placement import ExpertKey


class ShardPool:
    """Starts shard actors and moves experts between them as placement plans say.

    Args:
        state: the controller's shared state (the spec, shards, handles and table it changes).
        settle_s: how long routers take to pick up a new table; experts that moved away are
            dropped only after it, so no router sends them to a shard that let them go.
    """

    def __init__(self, state: ControllerState, *, settle_s: float) -> None:
        self.state = state
        self.settle_s = settle_s

    def alive_nodes(self) -> list[str]:
        return [
            n["NodeID"]
            for n in ray.nodes()
            if n["Alive"] and n.get("Resources", {}).get("CPU", 0) > 0
        ]

    def room(self) -> dict[str, int] | None:
        """Node id -> how many more shards fit there now (None: shards ask for no resources)."""
        # NOTE: a Ray DeveloperAPI: the one call that reports free (not total) resources per
        # node, i.e. after the router, controller, API, shards and spares took theirs
        from ray._private.state import available_resources_per_node

        res = self.state.require_spec().shard_resources
        need = capacity.shard_demand(res.num_cpus, res.num_gpus, res.resources)
        alive = set(self.alive_nodes())
        free = {n: r for n, r in available_resources_per_node().items() if n in alive}
        return capacity.room_per_node(free, need)

    def choose_nodes(self, count: int) -> list[str]:
        """Nodes for ``count`` new shards: the ones holding fewest shards first (spread), among
        those with room for one (all of them when none has)."""
        nodes = self.alive_nodes()
        room = self.room()
        per_node = {n: 0 for n in nodes}
        for s in list(self.state.shards.values()):
            if s.node_id in per_node:
                per_node[s.node_id] += 1
        out = []
        for _ in range(count):
            fits = [n for n in nodes if room is None or room.get(n, 0) > 0] or nodes
            node = min(fits, key=lambda n: (per_node[n], nodes.index(n)))
            per_node[node] += 1
            if room is not None and room.get(node, 0) > 0:
                room[node] -= 1
            out.append(node)
        return out

    def spawn(
        self, count: int, nodes: list[str] | None
    ) -> list[tuple[str, ray.actor.ActorHandle, str]]:
        """Start ``count`` empty shard actors and wait until they answer: (id, handle, node)."""
        st = self.state
        spec = st.require_spec()
        res = spec.shard_resources
        cls = ray.remote(ExpertShard)
        started = []
        with st.lock:
            targets = nodes or self.choose_nodes(count)
            ids = [f"s{st.next_shard + i}" for i in range(len(targets))]
            st.next_shard += len(targets)
        for sid, node in zip(ids, targets, strict=True):
            handle = cls.options(
                name=names.shard_name(sid),
                namespace=names.NAMESPACE,
                lifetime="detached",
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus,
                resources=res.resources or {},
                max_concurrency=4,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
            ).remote(
                sid,
                spec.checkpoint_uri,
                [],
                res.threads,
                res.batch_scheduling,
                "cuda" if res.num_gpus > 0 else "cpu",  # Ray shows the actor its GPU alone
            )
            started.append((sid, handle))
        try:
            ready = ray.get([h.stats.remote() for _, h in started], timeout=120)
        except Exception:
            # NOTE: a shard Ray could not place (or that failed to start) would otherwise wait
            # on, a named detached actor no record names, until a controller restart stops it
            for _, handle in started:
                with contextlib.suppress(Exception):
                    ray.kill(handle, no_restart=True)
            raise
        return [(sid, h, s["node_id"]) for (sid, h), s in zip(started, ready, strict=True)]

    def start(self, count: int, nodes: list[str] | None = None) -> list[pl.ShardInfo]:
        """Start ``count`` new shards and put them in service (prefer ``SparePool.take_shards``)."""
        infos = []
        for sid, handle, node in self.spawn(count, nodes):
            self.state.handles[sid] = handle
            self.state.shards[sid] = ShardRecord(shard_id=sid, node_id=node)
            infos.append(pl.ShardInfo(shard_id=sid, node_id=node))
            self.state.event("shard_started", f"shard {sid} started on node {node[:8]}", shard=sid)
        return infos

    def apply(
        self, plan: pl.PlacementPlan, reason: str, model_version: int | None = None
    ) -> dict[str, int]:
        """1) load every add, 2) publish the table, 3) drop what moved away (after routers refresh).

        ``model_version``: whose placement the plan changes (default: the serving version's).
        Returns what the shards read: ``{"loaded": files, "bytes": bytes}``."""
        st = self.state
        number = st.serving if model_version is None else model_version
        uri = st.versions[number].checkpoint_uri
        adds: dict[str, list[ExpertKey]] = {}
        drops: dict[str, list[ExpertKey]] = {}
        for m in plan.moves:
            (adds if m.kind == "add" else drops).setdefault(m.shard_id, []).append(m.expert)
        refs = [
            st.handles[s].add_experts.remote(keys, uri, number)
            for s, keys in adds.items()
            if s in st.handles
        ]
        loaded = ray.get(refs, timeout=120)
        with st.lock:
            st.publish(number, plan.table.replicas)
            st.save()
        n_add = sum(map(len, adds.values()))
        st.event(
            "placement",
            f"table v{st.table.version}: +{n_add} replicas ({reason})",
            version=st.table.version,
        )
        if drops:
            time.sleep(self.settle_s)  # let routers pick up the new table first
            for s, keys in drops.items():
                rec = st.shards.get(s)
                if s in st.handles and not (rec is not None and rec.draining):
                    with contextlib.suppress(Exception):
                        st.handles[s].drop_experts.remote(keys, number)
        return {
            "loaded": sum(r["loaded"] for r in loaded),
            "bytes": sum(r["bytes"] for r in loaded),
        }
