"""Elasticity for the controller: scale out/in, spread over nodes, follow load, autoscale.

A scale runs in a thread of the controller, one at a time: :meth:`Elasticity.start_scale`
checks the request against the limits (refusing it before anything starts), records it and
returns its id at once; the events ``scale_started``, the shards' own events carrying its
``scale_id``, then ``scale_finished`` or ``scale_failed`` say how it goes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from typing import Any

import ray

from expertmesh.actors.shard_pool import ShardPool
from expertmesh.actors.spares import SparePool
from expertmesh.actors.state import ControllerState, LoadStats
from expertmesh.platform import placement as pl
from expertmesh.platform.autoscale import AutoscaleConfig, AutoscaleState, LoadSnapshot, autoscale
from expertmesh.platform.capacity import Capacity
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.placement import ExpertKey
from expertmesh.types import CapacityError, ScaleInProgressError

log = logging.getLogger(__name__)


class Elasticity:
    """Grows, shrinks and reshapes the shard pool; the decisions come from pure policies.

    Args:
        state: the controller's shared state.
        shard_pool: starts shards and applies placement plans.
        spare_pool: warm shards, taken before new ones are started.
        load: measured load (the health part samples it).
        settle_s: how long routers take to pick up a new table (drained shards wait for it).
        heartbeat_timeout_s: how long to wait for a shard's counters.
    """

    def __init__(
        self,
        state: ControllerState,
        shard_pool: ShardPool,
        spare_pool: SparePool,
        load: LoadStats,
        *,
        settle_s: float,
        heartbeat_timeout_s: float,
    ) -> None:
        self.state = state
        self.shard_pool = shard_pool
        self.spare_pool = spare_pool
        self.load = load
        self.settle_s = settle_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.autoscale_cfg: AutoscaleConfig | None = None
        self.autoscale_state = AutoscaleState()
        # NOTE: apart from state.lock, which a running scale holds throughout: a second request
        # must be answered (refused) at once, not wait for the first to end
        self.scale_lock = threading.Lock()

    # ------------------------------------------------------------------ limits
    def capacity(self) -> Capacity:
        """The pool's limits now: shards in service, spares, room per node, configured max."""
        st = self.state
        spec = st.require_spec()
        return Capacity(
            in_service=len(st.infos()),
            spares=len(st.spares),
            room=self.shard_pool.room(),
            max_shards=spec.max_shards,
        )

    def check(self, shards: int, cap: Capacity) -> None:
        """Refuse a shard count outside the limits: ConfigError (HTTP 400) against the
        deployment's configuration, CapacityError (409) beyond what the cluster can place."""
        spec = self.state.require_spec()
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ConfigError("shards", f"must be an integer >= 1, got {shards!r}")
        if shards < spec.min_replicas:
            raise ConfigError(
                "shards",
                f"{shards} asked, but min_replicas={spec.min_replicas} needs at least "
                f"{spec.min_replicas} shards (an expert's replicas sit on different shards)",
            )
        if spec.max_shards is not None and shards > spec.max_shards:
            raise ConfigError(
                "shards", f"{shards} asked, above this deployment's max_shards={spec.max_shards}"
            )
        placeable = cap.placeable
        if placeable is not None and shards > max(placeable, cap.in_service):
            res = spec.shard_resources
            each = {"CPU": res.num_cpus, "GPU": res.num_gpus, **(res.resources or {})}
            room = sum((cap.room or {}).values())
            raise CapacityError(
                f"shards: {shards} asked, but the cluster can place at most {placeable} shards "
                f"now ({cap.in_service} in service, {cap.spares} warm spare(s), room for "
                f"{room} more, each asking {each}); add nodes or ask for fewer"
            )

    # ------------------------------------------------------------------ asynchronous scale
    def start_scale(self, shards: int, *, source: str) -> dict[str, Any]:
        """Check ``shards`` against the limits, record the scale and run it in a thread.

        Returns ``{"scale_id", "from", "to", "seq"}`` (``seq``: its ``scale_started`` event's).
        Raises ScaleInProgressError while another scale runs, and what :meth:`check` raises."""
        st = self.state
        with self.scale_lock:
            running = st.scale
            if running is not None:
                raise ScaleInProgressError(
                    f"scale {running['id']} ({running['from']} -> {running['to']} shards) is "
                    "running; wait for its scale_finished event, then ask again"
                )
            self.check(shards, self.capacity())
            current = len(st.infos())
            ticket = {"id": f"scale-{uuid.uuid4().hex[:12]}", "from": current, "to": shards}
            st.scale = {**ticket, "source": source}
            st.save()  # written down before acting: a restarted controller reports it
            ev = st.event(
                "scale_started",
                f"{current} -> {shards} shards ({source})",
                scale_id=ticket["id"],
                **{"from": current, "to": shards},
            )
        threading.Thread(target=self._run_scale, args=(ticket,), daemon=True, name="scale").start()
        return {"scale_id": ticket["id"], "from": current, "to": shards, "seq": ev["seq"]}

    def _run_scale(self, ticket: dict[str, Any]) -> None:
        st = self.state
        t0 = time.time()
        kind, message = "scale_finished", ""
        try:
            with st.tagged(scale_id=ticket["id"]):
                self.scale(ticket["to"])
            message = f"{ticket['from']} -> {len(st.infos())} shards in {time.time() - t0:.2f}s"
        except Exception as exc:
            log.exception("scale %s failed", ticket["id"])
            kind, message = "scale_failed", f"{type(exc).__name__}: {exc}"
        # NOTE: under scale_lock: whoever sees the end event and asks again finds no scale
        # running (start_scale waits for the lock instead of refusing)
        with self.scale_lock:
            st.event(kind, message, scale_id=ticket["id"], shards=len(st.infos()))
            st.scale = None
            st.save()

    def resolve_interrupted(self) -> None:
        """After a restart: the scale the record names ran in the controller that died; end it
        with ``scale_failed`` (unless it ended just before) so that no one waits for it."""
        st = self.state
        running = st.scale
        if running is None:
            return
        st.scale = None
        ended = any(
            e.get("scale_id") == running["id"] and e["kind"] in ("scale_finished", "scale_failed")
            for e in st.log.page(after_seq=st.log.next_seq - 1000)["events"]
        )
        if not ended:
            st.event(
                "scale_failed",
                f"the controller restarted during scale {running['id']} ({running['from']} -> "
                f"{running['to']}); {len(st.infos())} shards in service now: ask again",
                scale_id=running["id"],
                shards=len(st.infos()),
            )
        st.save()

    def scale(self, shards: int) -> None:
        """Grow or shrink the shard pool to ``shards``: new shards get the hottest experts first;
        removed shards are drained (no new dispatches, in-flight calls finish) before they stop."""
        st = self.state
        if st.spec is None:
            raise RuntimeError("nothing is deployed; deploy a model before scaling")
        with st.lock:
            spec = st.require_spec()  # a teardown may have run while this waited for the lock
            current = st.infos()
            spec.shards = shards
            st.save()
            t0 = time.time()
            if shards > len(current):
                load = self._expert_load()
                # warm spares serve at once; shards still to start join in a second step
                ready = self.spare_pool.take_spares(shards - len(current))
                if ready:
                    plan = pl.scale_out(
                        st.table, current, ready, load, min_replicas=spec.min_replicas
                    )
                    self.shard_pool.apply(
                        plan, f"scale out to {shards} shards: {len(ready)} warm spares"
                    )
                started = []
                if len(current) + len(ready) < shards:
                    started = self.shard_pool.start(shards - len(current) - len(ready))
                    plan = pl.scale_out(
                        st.table, current + ready, started, load, min_replicas=spec.min_replicas
                    )
                    self.shard_pool.apply(plan, f"scale out to {shards} shards")
                st.save()
                st.event(
                    "scaled_out",
                    f"{len(current)} -> {shards} shards in {time.time() - t0:.2f}s",
                    shards=shards,
                    new=[s.shard_id for s in ready + started],
                )
            elif shards < len(current):
                plan = pl.scale_in(
                    st.table,
                    current,
                    self._expert_load(),
                    count=len(current) - shards,
                    min_replicas=spec.min_replicas,
                )
                for sid in plan.drain:
                    st.shards[sid].draining = True
                    st.handles[sid].set_draining.remote(True)
                st.save()
                self.shard_pool.apply(plan, f"scale in to {shards} shards")
                self._stop_drained(plan.drain)
                st.event(
                    "scaled_in",
                    f"{len(current)} -> {shards} shards in {time.time() - t0:.2f}s",
                    shards=shards,
                    drained=list(plan.drain),
                )

    def _stop_drained(self, drained: tuple[str, ...]) -> None:
        """Wait for routers to stop sending (table refresh) and in-flight calls to end, then stop."""
        st = self.state
        time.sleep(self.settle_s)
        deadline = time.time() + 10.0
        for sid in drained:
            h = st.handles[sid]
            while time.time() < deadline:
                try:
                    if ray.get(h.stats.remote(), timeout=1.0)["queue_depth"] == 0:
                        break
                except Exception:
                    break
                time.sleep(0.05)
            ray.kill(h, no_restart=True)
            st.handles.pop(sid, None)
            st.shards.pop(sid, None)
            st.event("shard_stopped", f"shard {sid} drained and stopped", shard=sid)
        st.save()

    def _expert_load(self) -> dict[ExpertKey, float]:
        """Tokens each expert has served, summed over replicas (from the shards' counters)."""
        st = self.state
        refs = [h.stats.remote() for s, h in list(st.handles.items()) if s in st.shards]
        load: dict[ExpertKey, float] = {}
        for ref in refs:
            try:
                stats = ray.get(ref, timeout=self.heartbeat_timeout_s)
            except Exception:
                continue
            for k, v in stats["tokens_served"].items():
                layer, expert = map(int, k.split(":"))
                load[(layer, expert)] = load.get((layer, expert), 0.0) + v
        return load

    def rebalance_shards(self) -> None:
        """Move shards from crowded nodes to empty ones (make-before-break), then rebalance."""
        st = self.state
        with st.lock:
            spec = st.require_spec()
            per_node: dict[str, list[str]] = {n: [] for n in self.shard_pool.alive_nodes()}
            for s in st.infos():
                per_node.setdefault(s.node_id, []).append(s.shard_id)
            moves = 0
            while True:
                crowded = max(per_node, key=lambda n: len(per_node[n]))
                empty = min(per_node, key=lambda n: len(per_node[n]))
                if len(per_node[crowded]) - len(per_node[empty]) < 2:
                    break
                existing = st.infos()  # before the new shard joins st.shards
                new = self.spare_pool.take_shards(1, nodes=[empty])
                plan = pl.scale_out(
                    st.table,
                    existing,
                    new,
                    self.load.expert_ema,
                    num_slots=st.table.total_replicas(),
                    min_replicas=spec.min_replicas,
                )
                self.shard_pool.apply(plan, f"spread to node {empty[:8]}")
                victim = per_node[crowded].pop()
                per_node[empty].append(new[0].shard_id)
                plan = pl.scale_in(
                    st.table,
                    st.infos(include_draining=True),
                    self.load.expert_ema,
                    shard_ids=[victim],
                    min_replicas=spec.min_replicas,
                )
                st.shards[victim].draining = True
                self.shard_pool.apply(plan, f"move shard {victim} off node {crowded[:8]}")
                self._stop_drained((victim,))
                moves += 1
            if moves:
                st.event(
                    "rebalanced", f"moved {moves} shard(s) to spread over {len(per_node)} nodes"
                )

    def rebalance(self) -> dict[str, Any]:
        """Re-fit replica counts to the measured load (hot experts get more replicas)."""
        st = self.state
        with st.lock:
            spec = st.require_spec()
            plan = pl.rebalance(
                st.table, st.infos(), self.load.expert_ema, min_replicas=spec.min_replicas
            )
            if plan.moves:
                self.shard_pool.apply(plan, "rebalance to measured load")
                st.event("rebalanced", f"{len(plan.moves)} replica moves to follow load")
        return {"moves": len(plan.moves), "version": st.table.version}

    def set_autoscaling(self, config: AutoscaleConfig | None) -> None:
        """Turn the autoscaling policy on (with ``config``) or off (None)."""
        self.autoscale_cfg = config
        self.autoscale_state = AutoscaleState()
        self.state.event("autoscaling", "enabled" if config else "disabled")

    def autoscale_tick(self, now: float) -> None:
        """Ask the autoscaling policy for a shard count and scale to it."""
        cfg = self.autoscale_cfg
        spec = self.state.spec
        if cfg is None or spec is None or self.state.scale is not None:
            return
        current = self.state.infos()
        snapshot = LoadSnapshot(
            num_shards=len(current),
            shard_load={s.shard_id: self.load.shard_busy.get(s.shard_id, 0.0) for s in current},
            num_experts=len(self.state.table.replicas),
            capacity=self.capacity().limit,
        )
        target, self.autoscale_state = autoscale(snapshot, self.autoscale_state, cfg, now)
        wanted = self.autoscale_state.wanted or target
        if wanted != len(current):
            res = spec.shard_resources
            # the unclamped wish: Ray's autoscaler (KubeRay) adds nodes, and a later tick
            # scales onto them; only meaningful where an autoscaler runs
            with contextlib.suppress(Exception):
                from ray.autoscaler.sdk import request_resources

                bundle = {"CPU": res.num_cpus, **(res.resources or {})}
                request_resources(bundles=[bundle] * wanted)
        if target == len(current):
            return
        self.state.event(
            "autoscale", f"{len(current)} -> {target} shards: {self.autoscale_state.reason}"
        )
        try:
            self.start_scale(target, source="autoscale")
        except (CapacityError, ConfigError, ScaleInProgressError) as exc:
            self.state.event("autoscale", f"not scaled to {target}: {exc}")
