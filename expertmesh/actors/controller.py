"""Controller: a named, detached actor that owns the versioned placement table.

It starts expert shards (spread over nodes with Ray scheduling strategies) and the router,
and runs a reconcile loop: compare desired with actual state, act in numbered steps, write its
record down before acting, and rebuild from that record and the named actors after a restart.
Placement decisions come from the pure functions in :mod:`expertmesh.platform.placement`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from expertmesh.actors import names, nodes
from expertmesh.actors.elastic import ElasticOps
from expertmesh.actors.expert_shard import ExpertShard, ShardResources
from expertmesh.actors.health import HealthOps
from expertmesh.actors.metrics import ControllerMetrics
from expertmesh.actors.router import RouterService
from expertmesh.actors.spares import SpareOps
from expertmesh.actors.state import StateStore
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform import placement as pl
from expertmesh.platform.autoscale import AutoscaleConfig, AutoscaleState
from expertmesh.platform.placement import ExpertKey

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class DeploymentSpec:
    """What the user asked for; the reconcile loop works to keep the cluster like this."""

    model: str  # name clients use
    checkpoint_uri: str
    shards: int = 4
    min_replicas: int = 2
    shard_resources: ShardResources = field(default_factory=ShardResources)
    router_num_cpus: float = 0.25
    router_threads: int = 1  # torch intra-op threads for the router's dense part
    micro_batches: int = 1  # >1 splits a step's batch to overlap dense compute with shard calls
    max_batch: int = 64
    call_timeout_s: float = 2.0
    transport: str = "direct"  # shard calls: "direct" channel (Ray for control only) or "ray"
    warm_shards: int = 1  # spare shard actors kept started for fast scale-out and healing


@dataclass(kw_only=True, slots=True)
class ShardRecord:
    shard_id: str
    node_id: str
    draining: bool = False


class Controller(HealthOps, ElasticOps, SpareOps):
    """Wrapped with ``ray.remote`` (detached, named, restartable) by :func:`start_controller`."""

    def __init__(
        self,
        state_uri: str,
        session: str,
        *,
        reconcile_s: float = 0.25,
        heartbeat_timeout_s: float = 1.0,
    ) -> None:
        """``session`` identifies the Ray cluster: a record from another session is stale."""
        self.store = StateStore(state_uri)
        self.session = session
        self.lock = threading.RLock()
        self.events: deque[dict[str, Any]] = deque(maxlen=2000)
        self.spec: DeploymentSpec | None = None
        self.shards: dict[str, ShardRecord] = {}
        self.handles: dict[str, ray.actor.ActorHandle] = {}
        self.table = pl.PlacementTable(version=0, replicas={})
        self.router: ray.actor.ActorHandle | None = None
        self.spares: dict[str, ray.actor.ActorHandle] = {}
        self.refilling = False
        self.generation = 0  # bumped by every teardown: stale spare refills are discarded
        self.next_shard = 0
        self.reconcile_s = reconcile_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.missed: dict[str, int] = {}
        self.load_ema: dict[ExpertKey, float] = {}
        self.prev_tokens: dict[ExpertKey, float] = {}
        self.prev_busy: dict[str, float] = {}
        self.shard_busy: dict[str, float] = {}
        self.load_sampled_at = 0.0
        self.load_period_s = 1.0
        self.known_nodes: set[str] = set()
        self.autoscale_cfg: AutoscaleConfig | None = None
        self.autoscale_state = AutoscaleState()
        self.metrics = ControllerMetrics()
        self._stop = threading.Event()
        self._restore()
        self._loop = threading.Thread(target=self._reconcile_loop, daemon=True, name="reconcile")
        self._loop.start()

    # ------------------------------------------------------------------ record
    def _event(self, kind: str, message: str, **fields: Any) -> None:
        ev = {"ts": time.time(), "kind": kind, "message": message, **fields}
        self.events.append(ev)
        log.info("%s: %s", kind, message)

    def _save(self) -> None:
        record = {
            "session": self.session,
            "spec": None if self.spec is None else asdict(self.spec),
            "shards": [asdict(s) for s in list(self.shards.values())],
            "spares": list(self.spares),
            "table": json.loads(self.table.to_json()),
            "next_shard": self.next_shard,
            "events": list(self.events)[-200:],
        }
        self.store.write(record)

    def _restore(self) -> None:
        record = self.store.read()
        if not record or not record.get("spec") or record.get("session") != self.session:
            return
        spec = dict(record["spec"])
        spec["shard_resources"] = ShardResources(**spec["shard_resources"])
        self.spec = DeploymentSpec(**spec)
        self.table = pl.PlacementTable.from_json(json.dumps(record["table"]))
        self.next_shard = record["next_shard"]
        self.events.extend(record.get("events", []))
        for s in record["shards"]:
            rec = ShardRecord(**s)
            try:
                self.handles[rec.shard_id] = ray.get_actor(
                    names.shard_name(rec.shard_id), namespace=names.NAMESPACE
                )
                self.shards[rec.shard_id] = rec
            except ValueError:  # the shard died while we were down: the reconcile loop heals it
                self.shards[rec.shard_id] = rec
                self.missed[rec.shard_id] = 10**6
        for sid in record.get("spares", []):
            with contextlib.suppress(ValueError):  # a spare that died meanwhile is just gone
                self.spares[sid] = ray.get_actor(names.shard_name(sid), namespace=names.NAMESPACE)
        self._stop_orphans()
        try:
            self.router = ray.get_actor(names.ROUTER, namespace=names.NAMESPACE)
        except ValueError:
            self.router = None
        self._event(
            "controller_restarted",
            f"rebuilt state: {len(self.shards)} shards, table v{self.table.version}",
        )

    def _stop_orphans(self) -> None:
        """Stop the shard actors the restored record does not name, and never reuse their ids.

        A shard is started (a named, detached actor) before the record that names it is
        written; a controller that died in between left it running unrecorded, and its id,
        handed out again by the restored counter, failed the next start with
        ActorAlreadyExistsError."""
        known = set(self.shards) | set(self.spares)
        for entry in ray.util.list_named_actors(all_namespaces=True):
            sid = (
                names.shard_id_of(entry["name"]) if entry["namespace"] == names.NAMESPACE else None
            )
            if sid is None:
                continue
            self.next_shard = max(self.next_shard, int(sid[1:]) + 1)
            if sid in known:
                continue
            with contextlib.suppress(ValueError):  # gone meanwhile
                ray.kill(ray.get_actor(entry["name"], namespace=names.NAMESPACE), no_restart=True)
            self._event(
                "orphan_shard_stopped", f"stopped shard {sid}: started, never recorded", shard=sid
            )

    # ------------------------------------------------------------------ shard lifecycle
    def _alive_nodes(self) -> list[str]:
        return [
            n["NodeID"]
            for n in ray.nodes()
            if n["Alive"] and n.get("Resources", {}).get("CPU", 0) > 0
        ]

    def _choose_nodes(self, count: int) -> list[str]:
        """Nodes for ``count`` new shards: the ones holding fewest shards first (spread)."""
        nodes = self._alive_nodes()
        per_node = {n: 0 for n in nodes}
        for s in list(self.shards.values()):
            if s.node_id in per_node:
                per_node[s.node_id] += 1
        out = []
        for _ in range(count):
            node = min(nodes, key=lambda n: (per_node[n], nodes.index(n)))
            per_node[node] += 1
            out.append(node)
        return out

    def _spawn_shards(
        self, count: int, nodes: list[str] | None
    ) -> list[tuple[str, ray.actor.ActorHandle, str]]:
        """Start ``count`` empty shard actors and wait until they answer: (id, handle, node)."""
        assert self.spec is not None
        res = self.spec.shard_resources
        cls = ray.remote(ExpertShard)
        started = []
        with self.lock:
            targets = nodes or self._choose_nodes(count)
            ids = [f"s{self.next_shard + i}" for i in range(len(targets))]
            self.next_shard += len(targets)
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
                self.spec.checkpoint_uri,
                [],
                res.threads,
                res.batch_scheduling,
                "cuda" if res.num_gpus > 0 else "cpu",  # Ray shows the actor its GPU alone
            )
            started.append((sid, handle))
        ready = ray.get([h.stats.remote() for _, h in started], timeout=120)
        return [(sid, h, st["node_id"]) for (sid, h), st in zip(started, ready, strict=True)]

    def _start_shards(self, count: int, nodes: list[str] | None = None) -> list[pl.ShardInfo]:
        """Start ``count`` new shards and put them in service (prefer :meth:`_take_shards`)."""
        infos = []
        for sid, handle, node in self._spawn_shards(count, nodes):
            self.handles[sid] = handle
            self.shards[sid] = ShardRecord(shard_id=sid, node_id=node)
            infos.append(pl.ShardInfo(shard_id=sid, node_id=node))
            self._event("shard_started", f"shard {sid} started on node {node[:8]}", shard=sid)
        return infos

    def _infos(self, include_draining: bool = False) -> list[pl.ShardInfo]:
        return [
            pl.ShardInfo(shard_id=s.shard_id, node_id=s.node_id)
            for s in list(self.shards.values())
            if include_draining or not s.draining
        ]

    def _apply(self, plan: pl.PlacementPlan, reason: str) -> None:
        """1) load every add, 2) publish the table, 3) drop what moved away (after routers refresh)."""
        adds: dict[str, list[ExpertKey]] = {}
        drops: dict[str, list[ExpertKey]] = {}
        for m in plan.moves:
            (adds if m.kind == "add" else drops).setdefault(m.shard_id, []).append(m.expert)
        refs = [
            self.handles[s].add_experts.remote(keys)
            for s, keys in adds.items()
            if s in self.handles
        ]
        ray.get(refs, timeout=120)
        with self.lock:
            self.table = pl.PlacementTable(
                version=self.table.version + 1, replicas=plan.table.replicas
            )
            self._save()
        n_add = sum(map(len, adds.values()))
        self._event(
            "placement",
            f"table v{self.table.version}: +{n_add} replicas ({reason})",
            version=self.table.version,
        )
        if drops:
            time.sleep(2 * self.reconcile_s + 0.5)  # let routers pick up the new table first
            for s, keys in drops.items():
                if (
                    s in self.handles
                    and not self.shards.get(s, ShardRecord(shard_id=s, node_id="")).draining
                ):
                    with contextlib.suppress(Exception):
                        self.handles[s].drop_experts.remote(keys)

    # ------------------------------------------------------------------ public API
    def deploy(self, spec: DeploymentSpec) -> dict[str, Any]:
        """Start shards and the router for ``spec`` (replacing any current deployment)."""
        with self.lock:
            if self.spec is not None:
                self._teardown()
            manifest = ckpt.read_manifest(spec.checkpoint_uri)
            cfg = manifest.config
            self.spec = spec
            self._save()  # write down what we are about to do before doing it
            self.router = (
                ray.remote(RouterService)
                .options(
                    name=names.ROUTER,
                    namespace=names.NAMESPACE,
                    lifetime="detached",
                    num_cpus=spec.router_num_cpus,
                    max_concurrency=1000,
                    # the router sits with the controller on the head node, apart from the
                    # shards; it starts first so that the shards cannot take the head's capacity
                    scheduling_strategy=nodes.on_head(),
                    # with router_threads > 1, OpenMP workers sleep between the router's ops
                    # instead of spinning on the cores the shards need next
                    runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
                )
                .remote(
                    spec.checkpoint_uri,
                    ray.get_runtime_context().current_actor,
                    max_batch=spec.max_batch,
                    threads=spec.router_threads,
                    micro_batches=spec.micro_batches,
                    call_timeout_s=spec.call_timeout_s,
                    transport=spec.transport,
                )
            )
            infos = self._start_shards(spec.shards)
            experts = cfg.expert_keys()
            plan = pl.place(experts, infos, min_replicas=spec.min_replicas)
            for w in plan.warnings:
                self._event("warning", w)
            self._apply(plan, "deploy")
            # the router started before the table existed: make it fetch the table now
            ray.get(self.router.ready.remote(), timeout=120)
            self._event(
                "deployed",
                f"{spec.model}: {spec.shards} shards, {spec.min_replicas} replicas per expert",
            )
            self._save()
            self._refill_spares_soon()
            return self.status()

    def get_placement(self, known_version: int = -1) -> dict[str, Any] | None:
        """The table and shard handles, or None if the caller already has ``known_version``."""
        table = self.table
        if table.version == known_version:
            return None
        live = {s: h for s, h in list(self.handles.items()) if s in self.shards}
        replicas = [(list(k), [s for s in v if s in live]) for k, v in table.replicas.items()]
        return {"version": table.version, "replicas": replicas, "handles": live}

    def get_events(self, since: float = 0.0) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e["ts"] > since]

    def status(self) -> dict[str, Any]:
        records = dict(self.shards)  # snapshot: the reconcile loop may change shards meanwhile
        handles = dict(self.handles)
        refs = {s: handles[s].stats.remote() for s in records if s in handles}
        stats: dict[str, Any] = {}
        for s, ref in refs.items():
            try:
                stats[s] = ray.get(ref, timeout=self.heartbeat_timeout_s)
            except Exception as exc:
                stats[s] = {"shard_id": s, "error": type(exc).__name__}
        load: dict[str, int] = {}
        for st in stats.values():
            for k, v in st.get("tokens_served", {}).items():
                load[k] = load.get(k, 0) + v
        node_rows = [
            {
                "node_id": n["NodeID"],
                "alive": n["Alive"],
                "head": nodes.HEAD_RESOURCE in n.get("Resources", {}),
                "address": n.get("NodeManagerAddress"),
                "cpus": n.get("Resources", {}).get("CPU", 0),
            }
            for n in ray.nodes()
        ]
        router = None
        if self.router is not None:
            try:
                router = ray.get(self.router.stats.remote(), timeout=2.0)
            except Exception as exc:
                router = {"error": type(exc).__name__}
        return {
            "model": None if self.spec is None else self.spec.model,
            "checkpoint_uri": None if self.spec is None else self.spec.checkpoint_uri,
            "min_replicas": None if self.spec is None else self.spec.min_replicas,
            "placement_version": self.table.version,
            "placement": {
                f"{k[0]}:{k[1]}": list(v) for k, v in sorted(self.table.replicas.items())
            },
            "shards": [{**asdict(rec), **stats.get(s, {})} for s, rec in records.items()],
            "spares": sorted(self.spares),
            "warm_shards": 0 if self.spec is None else self.spec.warm_shards,  # spares wanted
            "nodes": node_rows,
            "controller_node_id": ray.get_runtime_context().get_node_id(),
            "expert_load": load,
            "router": router,
        }

    def shutdown(self) -> None:
        with self.lock:
            self._teardown()
            self.spec = None
            self._save()
        self._stop.set()

    def _teardown(self) -> None:
        self.generation += 1
        for h in [self.router, *self.handles.values(), *self.spares.values()]:
            if h is not None:
                with contextlib.suppress(Exception):
                    ray.kill(h, no_restart=True)
        self.router = None
        self.handles.clear()
        self.spares.clear()
        _wait_name_free(names.ROUTER)  # ray.kill is asynchronous; the next deploy reuses the name
        self.shards.clear()
        self.table = pl.PlacementTable(version=self.table.version + 1, replicas={})
        self._event("teardown", "stopped router and shards")


def _wait_name_free(name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=names.NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"actor {name!r} still registered {timeout:.0f}s after it was killed")
