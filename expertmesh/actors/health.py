"""Health side of the controller's reconcile loop: detect deaths, heal, sample load, watch nodes.

A mixin of :class:`expertmesh.actors.controller.Controller`.
"""

from __future__ import annotations

import contextlib
import logging
import time

import ray

from expertmesh.platform import placement as pl
from expertmesh.platform.placement import ExpertKey

log = logging.getLogger(__name__)


class HealthOps:
    # ------------------------------------------------------------------ reconcile loop
    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self.reconcile_s):
            try:
                self.reconcile()
            except Exception:  # the loop must survive anything
                log.exception("reconcile failed")

    def reconcile(self) -> None:
        """One pass: 1) dead shards, 2) load sample, 3) node changes, 4) autoscaling."""
        if self.spec is None:
            return
        dead = self._detect_dead()
        if dead:
            self._heal(dead)
        now = time.time()
        if now - self.load_sampled_at >= self.load_period_s:
            self._sample_load(now)
            self._check_spares()
            self._watch_nodes()
            self._autoscale_tick(now)

    def _heal(self, dead: set[str]) -> None:
        assert self.spec is not None
        t0 = time.time()
        with self.lock:
            dead = {s for s in dead if s in self.shards and not self.shards[s].draining}
            if not dead:  # stopped on purpose (scale-in) while the health check ran
                return
            for sid in dead:
                self._event(
                    "shard_failed", f"shard {sid} is dead; dropping its replicas", shard=sid
                )
                handle = self.handles.pop(sid, None)
                if handle is not None:  # fence it: a hung shard must not come back half-alive
                    with contextlib.suppress(Exception):
                        ray.kill(handle, no_restart=True)
                self.shards.pop(sid, None)
                self.missed.pop(sid, None)
            # 1) restore min_replicas on the live shards at once (loads a few experts each)
            plan = pl.heal(
                self.table,
                self._infos(),
                dead,
                load=self.load_ema,
                min_replicas=self.spec.min_replicas,
            )
            self._apply(plan, f"heal after losing {sorted(dead)}")
            short = [k for k, v in self.table.replicas.items() if len(v) < self.spec.min_replicas]
            self._event(
                "replication_restored",
                f"{len(self.table.replicas) - len(short)}/{len(self.table.replicas)} experts at "
                f"{self.spec.min_replicas}+ replicas, {time.time() - t0:.2f}s after detection",
                seconds=time.time() - t0,
                short=len(short),
            )
            # 2) bring the shard count back to what was asked for
            missing = self.spec.shards - len(self._infos())
            if missing > 0:
                new = self._take_shards(missing)
                plan = pl.rebalance(
                    self.table,
                    self._infos(),
                    self.load_ema,
                    min_replicas=self.spec.min_replicas,
                    num_slots=self.table.total_replicas(),
                )
                self._apply(plan, f"replacement shards {[s.shard_id for s in new]}")

    def _sample_load(self, now: float) -> None:
        """Per-expert tokens/s (EMA, for EPLB) and per-shard busy fraction (for autoscaling)."""
        # NOTE: snapshots (list(...)) of the dicts that scale() and deploy() change from other
        # threads of the actor: iterating them live raised "dictionary changed size"
        refs = {s: h.stats.remote() for s, h in list(self.handles.items()) if s in self.shards}
        dt = max(1e-3, now - self.load_sampled_at) if self.load_sampled_at else None
        observed: dict[ExpertKey, float] = {}
        totals: dict[ExpertKey, float] = {}
        for sid, ref in refs.items():
            try:
                st = ray.get(ref, timeout=self.heartbeat_timeout_s)
            except Exception:
                continue
            prev_busy = self.prev_busy.get(sid)
            if dt and prev_busy is not None:
                self.shard_busy[sid] = min(1.0, max(0.0, (st["busy_s"] - prev_busy) / dt))
            self.prev_busy[sid] = st["busy_s"]
            for k, v in st["tokens_served"].items():
                layer, expert = map(int, k.split(":"))
                totals[(layer, expert)] = totals.get((layer, expert), 0.0) + v
        if dt:
            for key, total in totals.items():
                observed[key] = max(0.0, total - self.prev_tokens.get(key, 0.0)) / dt
            self.load_ema = pl.update_load_ema(self.load_ema, observed, 0.3)
        self.prev_tokens = totals
        self.load_sampled_at = now
        self.metrics.record(self.table, self.shard_busy)

    def _watch_nodes(self) -> None:
        """A node joining gets a shard (moved from the most crowded node); leaving is logged."""
        alive = set(self._alive_nodes())
        if not self.known_nodes:
            self.known_nodes = alive
            return
        joined, left = alive - self.known_nodes, self.known_nodes - alive
        self.known_nodes = alive
        for node in left:
            self._event("node_left", f"node {node[:8]} left the cluster", node=node)
        for node in joined:
            self._event("node_joined", f"node {node[:8]} joined the cluster", node=node)
        if joined and self.spec is not None:
            self.rebalance_shards()

    def _detect_dead(self) -> set[str]:
        live = {
            s: h
            for s, h in list(self.handles.items())
            if s in self.shards and not self.shards[s].draining
        }
        refs = {s: h.ping.remote() for s, h in live.items()}
        dead = {s for s, n in self.missed.items() if n >= 10**6}
        alive_nodes = set(self._alive_nodes())
        dead |= {s for s, rec in list(self.shards.items()) if rec.node_id not in alive_nodes}
        if refs:
            ready, _ = ray.wait(
                list(refs.values()), num_returns=len(refs), timeout=self.heartbeat_timeout_s
            )
            ready_set = set(ready)
            for s, ref in refs.items():
                if ref in ready_set:
                    try:
                        ray.get(ref)
                        self.missed[s] = 0
                        continue
                    except Exception:
                        dead.add(s)
                        continue
                self.missed[s] = self.missed.get(s, 0) + 1
                if self.missed[s] >= 3:
                    dead.add(s)
        return dead
