"""Elasticity for the controller: scale out/in, spread over nodes, follow load, autoscale."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import ray

from expertmesh.actors.shard_pool import ShardPool
from expertmesh.actors.spares import SparePool
from expertmesh.actors.state import ControllerState, LoadStats
from expertmesh.platform import placement as pl
from expertmesh.platform.autoscale import AutoscaleConfig, AutoscaleState, LoadSnapshot, autoscale
from expertmesh.platform.placement import ExpertKey


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
        if cfg is None or spec is None:
            return
        current = self.state.infos()
        snapshot = LoadSnapshot(
            num_shards=len(current),
            shard_load={s.shard_id: self.load.shard_busy.get(s.shard_id, 0.0) for s in current},
            num_experts=len(self.state.table.replicas),
        )
        target, self.autoscale_state = autoscale(snapshot, self.autoscale_state, cfg, now)
        if target == len(current):
            return
        self.state.event(
            "autoscale", f"{len(current)} -> {target} shards: {self.autoscale_state.reason}"
        )
        res = spec.shard_resources
        with contextlib.suppress(Exception):  # only meaningful where an autoscaler runs (KubeRay)
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[{"CPU": res.num_cpus, **(res.resources or {})}] * target)
        self.scale(target)
