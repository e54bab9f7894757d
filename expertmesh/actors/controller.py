"""Controller: a named, detached actor that owns the versioned placement table.

It starts expert shards (spread over nodes with Ray scheduling strategies) and the router,
and runs a reconcile loop: compare desired with actual state, act in numbered steps, write its
record down before acting, and rebuild from that record and the named actors after a restart.
Placement decisions come from the pure functions in :mod:`expertmesh.platform.placement`.

The controller composes its parts, each built here with what it needs (as Ray Serve's
controller builds its state managers): the shared ``ControllerState`` (actors/state.py), a
``ShardPool`` that starts shards and applies plans (actors/shard_pool.py), the ``SparePool`` of
warm shards (actors/spares.py), ``Elasticity`` for scaling, spreading and autoscaling
(actors/elastic.py), ``Health`` for dead shards, healing, load and nodes (actors/health.py) and
``Upgrades`` for live upgrades to another model version (actors/upgrades.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import asdict
from typing import Any

import ray

from expertmesh.actors import names, nodes
from expertmesh.actors.elastic import Elasticity
from expertmesh.actors.events import MAX_PAGE
from expertmesh.actors.health import Health
from expertmesh.actors.metrics import ControllerMetrics
from expertmesh.actors.router import RouterService
from expertmesh.actors.shard_pool import ShardPool
from expertmesh.actors.spares import SparePool
from expertmesh.actors.state import (
    ControllerState,
    DeploymentSpec,
    LoadStats,
    ModelVersion,
    ShardRecord,
    StateStore,
    version_label,
)
from expertmesh.actors.upgrades import Upgrades
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform import placement as pl
from expertmesh.platform.autoscale import AutoscaleConfig
from expertmesh.types import ScaleInProgressError

log = logging.getLogger(__name__)


class Controller:
    """Wrapped with ``ray.remote`` (detached, named, restartable) by
    :func:`expertmesh.actors.launch.get_controller`."""

    def __init__(
        self,
        state_uri: str,
        session: str,
        *,
        reconcile_s: float = 0.25,
        heartbeat_timeout_s: float = 1.0,
    ) -> None:
        """``session`` identifies the Ray cluster: a record from another session is stale."""
        self.state = ControllerState(StateStore(state_uri), session)
        self.reconcile_s = reconcile_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        # routers refresh their table every reconcile_s; wait two of those (and some) before
        # taking experts away from a shard
        settle_s = 2 * reconcile_s + 0.5
        load = LoadStats()
        self.shard_pool = ShardPool(self.state, settle_s=settle_s)
        self.spare_pool = SparePool(
            self.state, self.shard_pool, heartbeat_timeout_s=heartbeat_timeout_s
        )
        self.elastic = Elasticity(
            self.state,
            self.shard_pool,
            self.spare_pool,
            load,
            settle_s=settle_s,
            heartbeat_timeout_s=heartbeat_timeout_s,
        )
        self.health = Health(
            self.state,
            self.shard_pool,
            self.spare_pool,
            load,
            ControllerMetrics(),
            heartbeat_timeout_s=heartbeat_timeout_s,
        )
        self.upgrades = Upgrades(self.state, self.shard_pool)
        self._stop = threading.Event()
        self._restore()
        self._loop = threading.Thread(target=self._reconcile_loop, daemon=True, name="reconcile")
        self._loop.start()

    # ------------------------------------------------------------------ reconcile loop
    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self.reconcile_s):
            try:
                self.reconcile()
            except Exception:  # the loop must survive anything
                log.exception("reconcile failed")

    def reconcile(self) -> None:
        """One pass: 1) dead shards, 2) load sample, 3) node changes, 4) autoscaling."""
        if self.state.spec is None:
            return
        dead = self.health.detect_dead()
        if dead:
            self.health.heal(dead)
        now = time.time()
        if self.health.sample_due(now):
            self.health.sample_load(now)
            self.spare_pool.check()
            # a node that joined gets a shard, moved from the most crowded node
            joined = self.health.watch_nodes()
            # NOTE: the shard pool holds still while an upgrade runs (one change at a time);
            # healing goes on, for every live version
            if self.state.upgrade is not None:
                return
            if joined and self.state.spec is not None:
                self.elastic.rebalance_shards()
            self.elastic.autoscale_tick(now)

    # ------------------------------------------------------------------ record
    def _restore(self) -> None:
        st = self.state
        record = st.store.read()
        if not record or not record.get("spec") or record.get("session") != st.session:
            return
        st.spec = DeploymentSpec.from_dict(record["spec"])
        st.table = pl.PlacementTable.from_json(json.dumps(record["table"]))
        st.next_shard = record["next_shard"]
        st.scale = record.get("scale")
        st.restore_versions(record)
        for s in record["shards"]:
            rec = ShardRecord(**s)
            try:
                st.handles[rec.shard_id] = ray.get_actor(
                    names.shard_name(rec.shard_id), namespace=names.NAMESPACE
                )
                st.shards[rec.shard_id] = rec
            except ValueError:  # the shard died while we were down: the reconcile loop heals it
                st.shards[rec.shard_id] = rec
                self.health.mark_lost(rec.shard_id)
        for sid in record.get("spares", []):
            with contextlib.suppress(ValueError):  # a spare that died meanwhile is just gone
                st.spares[sid] = ray.get_actor(names.shard_name(sid), namespace=names.NAMESPACE)
        self._stop_orphans()
        try:
            st.router = ray.get_actor(names.ROUTER, namespace=names.NAMESPACE)
        except ValueError:
            st.router = None
        st.event(
            "controller_restarted",
            f"rebuilt state: {len(st.shards)} shards, table v{st.table.version}",
        )
        self.elastic.resolve_interrupted()
        self.upgrades.resume()

    def _stop_orphans(self) -> None:
        """Stop the shard actors the restored record does not name, and never reuse their ids.

        A shard is started (a named, detached actor) before the record that names it is
        written; a controller that died in between left it running unrecorded, and its id,
        handed out again by the restored counter, failed the next start with
        ActorAlreadyExistsError."""
        st = self.state
        known = set(st.shards) | set(st.spares)
        for entry in ray.util.list_named_actors(all_namespaces=True):
            sid = (
                names.shard_id_of(entry["name"]) if entry["namespace"] == names.NAMESPACE else None
            )
            if sid is None:
                continue
            st.next_shard = max(st.next_shard, int(sid[1:]) + 1)
            if sid in known:
                continue
            with contextlib.suppress(ValueError):  # gone meanwhile
                ray.kill(ray.get_actor(entry["name"], namespace=names.NAMESPACE), no_restart=True)
            st.event(
                "orphan_shard_stopped", f"stopped shard {sid}: started, never recorded", shard=sid
            )

    # ------------------------------------------------------------------ public API
    def deploy(self, spec: DeploymentSpec) -> dict[str, Any]:
        """Start shards and the router for ``spec`` (replacing any current deployment)."""
        st = self.state
        with st.lock:
            if st.spec is not None:
                self._teardown()
            manifest = ckpt.read_manifest(spec.checkpoint_uri)
            cfg = manifest.config
            st.spec = spec
            number = st.next_version
            st.next_version += 1
            label = version_label(spec.model, spec.version)
            st.versions = {
                number: ModelVersion(
                    number=number,
                    label=label,
                    checkpoint_uri=spec.checkpoint_uri,
                    name=spec.model,
                    version=spec.version,
                )
            }
            st.serving = number
            st.save()  # write down what we are about to do before doing it
            router = (
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
                    max_queued=spec.max_queued,
                    threads=spec.router.threads,
                    micro_batches=spec.router.micro_batches,
                    call_timeout_s=spec.call_timeout_s,
                    transport=spec.router.transport,
                    model_version=number,
                    label=label,
                )
            )
            st.router = router
            infos = self.shard_pool.start(spec.shards)
            experts = cfg.expert_keys()
            plan = pl.place(experts, infos, min_replicas=spec.min_replicas)
            for w in plan.warnings:
                st.event("warning", w)
            self.shard_pool.apply(plan, "deploy")
            # the router started before the table existed: make it fetch the table now
            ray.get(router.ready.remote(), timeout=120)
            st.event(
                "deployed",
                f"{spec.model}: {spec.shards} shards, {spec.min_replicas} replicas per expert",
            )
            st.save()
            self.spare_pool.refill_soon()
            return self.status()

    def scale(self, shards: int) -> dict[str, Any]:
        """Start growing or shrinking the shard pool to ``shards``, live; returns at once
        ``{"scale_id", "from", "to", "seq"}`` (see :meth:`Elasticity.start_scale`); the events
        with that ``scale_id`` say how it goes and ``scale_finished``/``scale_failed`` ends it.

        Raises (before anything starts): ConfigError for a count against the deployment
        (below ``min_replicas``, above ``max_shards``), CapacityError beyond what the cluster
        can place now, ScaleInProgressError / UpgradeInProgressError while one runs."""
        self.state.require_spec()
        self.upgrades.refuse_if_running()
        return self.elastic.start_scale(shards, source="request")

    def upgrade(self, ref: str) -> dict[str, Any]:
        """Serve registered version ``ref`` live (see :meth:`Upgrades.upgrade`); returns the
        status after it with what the upgrade did under ``"upgraded"`` (the status's own
        ``"upgrade"`` is the upgrade in progress: None by then)."""
        running = self.state.scale
        if running is not None:  # the upgrade would wait for the scale's lock; say so at once
            raise ScaleInProgressError(
                f"scale {running['id']} is running; upgrade once its scale_finished event came"
            )
        summary = self.upgrades.upgrade(ref)
        return {**self.status(), "upgraded": summary}

    def rebalance(self) -> dict[str, Any]:
        """Re-fit replica counts to the measured load (hot experts get more replicas)."""
        return self.elastic.rebalance()

    def set_autoscaling(self, config: AutoscaleConfig | None) -> None:
        """Turn the autoscaling policy on (with ``config``) or off (None)."""
        self.elastic.set_autoscaling(config)

    def get_placement(self, known_version: int = -1) -> dict[str, Any] | None:
        """The table and shard handles, or None if the caller already has ``known_version``."""
        st = self.state
        table = st.table
        if table.version == known_version:
            return None
        live = {s: h for s, h in list(st.handles.items()) if s in st.shards}
        replicas = [(list(k), [s for s in v if s in live]) for k, v in table.replicas.items()]
        others = [
            (n, [(list(k), [s for s in v if s in live]) for k, v in t.replicas.items()])
            for n, t in list(st.other_tables.items())
        ]
        return {
            "version": table.version,
            "replicas": replicas,
            "handles": live,
            "serving": st.serving,
            "others": others,
        }

    def get_events(
        self, since: float = 0.0, after_seq: int = 0, limit: int = MAX_PAGE
    ) -> dict[str, Any]:
        """One page of the event log, oldest first (see :meth:`EventLog.page`)."""
        return self.state.log.page(after_seq=after_seq, limit=limit, since=since)

    def status(self) -> dict[str, Any]:
        st = self.state
        records = dict(st.shards)  # snapshot: the reconcile loop may change shards meanwhile
        handles = dict(st.handles)
        refs = {s: handles[s].stats.remote() for s in records if s in handles}
        stats: dict[str, Any] = {}
        for s, ref in refs.items():
            try:
                stats[s] = ray.get(ref, timeout=self.heartbeat_timeout_s)
            except Exception as exc:
                stats[s] = {"shard_id": s, "error": type(exc).__name__}
        load: dict[str, int] = {}
        for shard_stats in stats.values():
            for k, v in shard_stats.get("tokens_served", {}).items():
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
        if st.router is not None:
            try:
                router = ray.get(st.router.stats.remote(), timeout=2.0)
            except Exception as exc:
                router = {"error": type(exc).__name__}
        spec = st.spec
        labels = {n: v.label for n, v in list(st.versions.items())}
        running = (router or {}).get("versions") or {}
        for shard_stats in stats.values():  # model version number -> its label
            if "versions" in shard_stats:
                shard_stats["versions"] = {
                    labels.get(int(n), str(n)): k for n, k in shard_stats["versions"].items()
                }
        versions = [
            {
                "label": v.label,
                "number": n,
                "checkpoint_uri": v.checkpoint_uri,
                "state": "serving" if n == st.serving else _other_state(n, st.upgrade),
                "running": running.get(v.label, {}).get("running", 0),
                "waiting": running.get(v.label, {}).get("waiting", 0),
            }
            for n, v in sorted(st.versions.items())
        ]
        return {
            "model": None if spec is None else spec.model,
            "version": None if spec is None else spec.version,
            "versions": versions,  # live model versions (two while an upgrade drains)
            "upgrade": st.upgrade,  # the upgrade in progress, if any
            "scale": st.scale,  # the scale in progress, if any
            "max_shards": None if spec is None else spec.max_shards,
            "checkpoint_uri": None if spec is None else spec.checkpoint_uri,
            "min_replicas": None if spec is None else spec.min_replicas,
            "placement_version": st.table.version,
            "placement": {f"{k[0]}:{k[1]}": list(v) for k, v in sorted(st.table.replicas.items())},
            "shards": [{**asdict(rec), **stats.get(s, {})} for s, rec in records.items()],
            "spares": sorted(st.spares),
            "warm_shards": 0 if spec is None else spec.warm_shards,  # spares wanted
            "nodes": node_rows,
            "controller_node_id": ray.get_runtime_context().get_node_id(),
            "expert_load": load,
            "router": router,
        }

    def shutdown(self) -> None:
        with self.state.lock:
            self._teardown()
            self.state.spec = None
            self.state.save()
        self._stop.set()

    def _teardown(self) -> None:
        st = self.state
        st.generation += 1
        for h in [st.router, *st.handles.values(), *st.spares.values()]:
            if h is not None:
                with contextlib.suppress(Exception):
                    ray.kill(h, no_restart=True)
        st.router = None
        st.handles.clear()
        st.spares.clear()
        _wait_name_free(names.ROUTER)  # ray.kill is asynchronous; the next deploy reuses the name
        st.shards.clear()
        st.table = pl.PlacementTable(version=st.table.version + 1, replicas={})
        st.versions.clear()
        st.other_tables.clear()
        st.upgrade = None
        st.event("teardown", "stopped router and shards")


def _other_state(number: int, upgrade: dict[str, Any] | None) -> str:
    """A live version that is not serving: one an upgrade loads, or one it drains."""
    return "loading" if upgrade is not None and upgrade.get("to") == number else "draining"


def _wait_name_free(name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=names.NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"actor {name!r} still registered {timeout:.0f}s after it was killed")
