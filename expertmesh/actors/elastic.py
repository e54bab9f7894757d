"""Elastic operations of the controller: scale out/in, spread over nodes, follow load.

A mixin of :class:`expertmesh.actors.controller.Controller`; it uses the controller's state
(``spec``, ``shards``, ``handles``, ``table``, ``load_ema``) and its ``_apply``/``_start_shards``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import ray

from expertmesh.platform import placement as pl
from expertmesh.platform.autoscale import AutoscaleConfig, AutoscaleState, LoadSnapshot, autoscale
from expertmesh.platform.placement import ExpertKey


class ElasticOps:
    def scale(self, shards: int) -> dict[str, Any]:
        """Grow or shrink the shard pool to ``shards``: new shards get the hottest experts first;
        removed shards are drained (no new dispatches, in-flight calls finish) before they stop."""
        if self.spec is None:
            raise RuntimeError("nothing is deployed; deploy a model before scaling")
        with self.lock:
            current = self._infos()
            self.spec.shards = shards
            self._save()
            t0 = time.time()
            if shards > len(current):
                load = self._expert_load()
                # warm spares serve at once; shards still to start join in a second step
                ready = self._take_spares(shards - len(current))
                if ready:
                    plan = pl.scale_out(
                        self.table, current, ready, load, min_replicas=self.spec.min_replicas
                    )
                    self._apply(plan, f"scale out to {shards} shards: {len(ready)} warm spares")
                started = []
                if len(current) + len(ready) < shards:
                    started = self._start_shards(shards - len(current) - len(ready))
                    plan = pl.scale_out(
                        self.table,
                        current + ready,
                        started,
                        load,
                        min_replicas=self.spec.min_replicas,
                    )
                    self._apply(plan, f"scale out to {shards} shards")
                self._save()
                self._event(
                    "scaled_out",
                    f"{len(current)} -> {shards} shards in {time.time() - t0:.2f}s",
                    shards=shards,
                    new=[s.shard_id for s in ready + started],
                )
            elif shards < len(current):
                plan = pl.scale_in(
                    self.table,
                    current,
                    self._expert_load(),
                    count=len(current) - shards,
                    min_replicas=self.spec.min_replicas,
                )
                for sid in plan.drain:
                    self.shards[sid].draining = True
                    self.handles[sid].set_draining.remote(True)
                self._save()
                self._apply(plan, f"scale in to {shards} shards")
                self._stop_drained(plan.drain)
                self._event(
                    "scaled_in",
                    f"{len(current)} -> {shards} shards in {time.time() - t0:.2f}s",
                    shards=shards,
                    drained=list(plan.drain),
                )
        return self.status()

    def _stop_drained(self, drained: tuple[str, ...]) -> None:
        """Wait for routers to stop sending (table refresh) and in-flight calls to end, then stop."""
        time.sleep(2 * self.reconcile_s + 0.5)
        deadline = time.time() + 10.0
        for sid in drained:
            h = self.handles[sid]
            while time.time() < deadline:
                try:
                    if ray.get(h.stats.remote(), timeout=1.0)["queue_depth"] == 0:
                        break
                except Exception:
                    break
                time.sleep(0.05)
            ray.kill(h, no_restart=True)
            self.handles.pop(sid, None)
            self.shards.pop(sid, None)
            self._event("shard_stopped", f"shard {sid} drained and stopped", shard=sid)
        self._save()

    def _expert_load(self) -> dict[ExpertKey, float]:
        """Tokens each expert has served, summed over replicas (from the shards' counters)."""
        refs = [h.stats.remote() for s, h in list(self.handles.items()) if s in self.shards]
        load: dict[ExpertKey, float] = {}
        for ref in refs:
            try:
                st = ray.get(ref, timeout=self.heartbeat_timeout_s)
            except Exception:
                continue
            for k, v in st["tokens_served"].items():
                layer, expert = map(int, k.split(":"))
                load[(layer, expert)] = load.get((layer, expert), 0.0) + v
        return load

    def rebalance_shards(self) -> None:
        """Move shards from crowded nodes to empty ones (make-before-break), then rebalance."""
        assert self.spec is not None
        with self.lock:
            per_node: dict[str, list[str]] = {n: [] for n in self._alive_nodes()}
            for s in self._infos():
                per_node.setdefault(s.node_id, []).append(s.shard_id)
            moves = 0
            while True:
                crowded = max(per_node, key=lambda n: len(per_node[n]))
                empty = min(per_node, key=lambda n: len(per_node[n]))
                if len(per_node[crowded]) - len(per_node[empty]) < 2:
                    break
                existing = self._infos()  # before the new shard joins self.shards
                new = self._take_shards(1, nodes=[empty])
                plan = pl.scale_out(
                    self.table,
                    existing,
                    new,
                    self.load_ema,
                    num_slots=self.table.total_replicas(),
                    min_replicas=self.spec.min_replicas,
                )
                self._apply(plan, f"spread to node {empty[:8]}")
                victim = per_node[crowded].pop()
                per_node[empty].append(new[0].shard_id)
                plan = pl.scale_in(
                    self.table,
                    self._infos(include_draining=True),
                    self.load_ema,
                    shard_ids=[victim],
                    min_replicas=self.spec.min_replicas,
                )
                self.shards[victim].draining = True
                self._apply(plan, f"move shard {victim} off node {crowded[:8]}")
                self._stop_drained((victim,))
                moves += 1
            if moves:
                self._event(
                    "rebalanced", f"moved {moves} shard(s) to spread over {len(per_node)} nodes"
                )

    def rebalance(self) -> dict[str, Any]:
        """Re-fit replica counts to the measured load (hot experts get more replicas)."""
        assert self.spec is not None
        with self.lock:
            plan = pl.rebalance(
                self.table, self._infos(), self.load_ema, min_replicas=self.spec.min_replicas
            )
            if plan.moves:
                self._apply(plan, "rebalance to measured load")
                self._event("rebalanced", f"{len(plan.moves)} replica moves to follow load")
        return {"moves": len(plan.moves), "version": self.table.version}

    def set_autoscaling(self, config: AutoscaleConfig | None) -> None:
        """Turn the autoscaling policy on (with ``config``) or off (None)."""
        self.autoscale_cfg = config
        self.autoscale_state = AutoscaleState()
        self._event("autoscaling", "enabled" if config else "disabled")

    def _autoscale_tick(self, now: float) -> None:
        cfg = self.autoscale_cfg
        if cfg is None or self.spec is None:
            return
        current = self._infos()
        snapshot = LoadSnapshot(
            num_shards=len(current),
            shard_load={s.shard_id: self.shard_busy.get(s.shard_id, 0.0) for s in current},
            num_experts=len(self.table.replicas),
        )
        target, self.autoscale_state = autoscale(snapshot, self.autoscale_state, cfg, now)
        if target == len(current):
            return
        self._event(
            "autoscale", f"{len(current)} -> {target} shards: {self.autoscale_state.reason}"
        )
        res = self.spec.shard_resources
        with contextlib.suppress(Exception):  # only meaningful where an autoscaler runs (KubeRay)
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[{"CPU": res.num_cpus, **(res.resources or {})}] * target)
        self.scale(target)
