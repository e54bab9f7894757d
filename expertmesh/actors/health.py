"""Health for the controller: detect dead shards, heal, sample load, watch nodes."""

from __future__ import annotations

import contextlib
import time

import ray

from expertmesh.actors.metrics import ControllerMetrics
from expertmesh.actors.shard_pool import ShardPool
from expertmesh.actors.spares import SparePool
from expertmesh.actors.state import ControllerState, LoadStats
from expertmesh.platform import placement as pl
from expertmesh.platform.placement import ExpertKey

LOST = 10**6  # missed heartbeats that mark a shard dead at once


class Health:
    """Finds shards that died or hang and restores replication; measures load.

    Args:
        state: the controller's shared state.
        shard_pool: starts shards and applies placement plans.
        spare_pool: warm shards that replace dead ones first.
        load: where the measured load goes (elasticity reads it).
        metrics: the controller's Prometheus metrics, recorded with each load sample.
        heartbeat_timeout_s: a shard that misses three pings of this timeout is dead.
        load_period_s: how often load is sampled (and nodes and spares are checked).
    """

    def __init__(
        self,
        state: ControllerState,
        shard_pool: ShardPool,
        spare_pool: SparePool,
        load: LoadStats,
        metrics: ControllerMetrics,
        *,
        heartbeat_timeout_s: float,
        load_period_s: float = 1.0,
    ) -> None:
        self.state = state
        self.shard_pool = shard_pool
        self.spare_pool = spare_pool
        self.load = load
        self.metrics = metrics
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.load_period_s = load_period_s
        self.missed: dict[str, int] = {}
        self.prev_tokens: dict[ExpertKey, float] = {}
        self.prev_busy: dict[str, float] = {}
        self.load_sampled_at = 0.0
        self.known_nodes: set[str] = set()

    def mark_lost(self, sid: str) -> None:
        """``sid`` is known to be gone (e.g. it died while the controller was down)."""
        self.missed[sid] = LOST

    def sample_due(self, now: float) -> bool:
        return now - self.load_sampled_at >= self.load_period_s

    def heal(self, dead: set[str]) -> None:
        st = self.state
        t0 = time.time()
        with st.lock:
            spec = st.require_spec()
            dead = {s for s in dead if s in st.shards and not st.shards[s].draining}
            if not dead:  # stopped on purpose (scale-in) while the health check ran
                return
            for sid in dead:
                st.event("shard_failed", f"shard {sid} is dead; dropping its replicas", shard=sid)
                handle = st.handles.pop(sid, None)
                if handle is not None:  # fence it: a hung shard must not come back half-alive
                    with contextlib.suppress(Exception):
                        ray.kill(handle, no_restart=True)
                st.shards.pop(sid, None)
                self.missed.pop(sid, None)
            # 1) restore min_replicas on the live shards at once (loads a few experts each)
            plan = pl.heal(
                st.table,
                st.infos(),
                dead,
                load=self.load.expert_ema,
                min_replicas=spec.min_replicas,
            )
            self.shard_pool.apply(plan, f"heal after losing {sorted(dead)}")
            short = [k for k, v in st.table.replicas.items() if len(v) < spec.min_replicas]
            st.event(
                "replication_restored",
                f"{len(st.table.replicas) - len(short)}/{len(st.table.replicas)} experts at "
                f"{spec.min_replicas}+ replicas, {time.time() - t0:.2f}s after detection",
                seconds=time.time() - t0,
                short=len(short),
            )
            # the other live version (an upgrade's old or new one) keeps its replicas too
            for number, table in list(st.other_tables.items()):
                plan = pl.heal(table, st.infos(), dead, min_replicas=spec.min_replicas)
                label = st.versions[number].label if number in st.versions else number
                self.shard_pool.apply(plan, f"heal {label} after losing {sorted(dead)}", number)
            # 2) bring the shard count back to what was asked for
            missing = spec.shards - len(st.infos())
            if missing > 0:
                new = self.spare_pool.take_shards(missing)
                plan = pl.rebalance(
                    st.table,
                    st.infos(),
                    self.load.expert_ema,
                    min_replicas=spec.min_replicas,
                    num_slots=st.table.total_replicas(),
                )
                self.shard_pool.apply(plan, f"replacement shards {[s.shard_id for s in new]}")

    def sample_load(self, now: float) -> None:
        """Per-expert tokens/s (EMA, for EPLB) and per-shard busy fraction (for autoscaling)."""
        st = self.state
        # NOTE: snapshots (list(...)) of the dicts that scale() and deploy() change from other
        # threads of the actor: iterating them live raised "dictionary changed size"
        refs = {s: h.stats.remote() for s, h in list(st.handles.items()) if s in st.shards}
        dt = max(1e-3, now - self.load_sampled_at) if self.load_sampled_at else None
        observed: dict[ExpertKey, float] = {}
        totals: dict[ExpertKey, float] = {}
        for sid, ref in refs.items():
            try:
                stats = ray.get(ref, timeout=self.heartbeat_timeout_s)
            except Exception:
                continue
            prev_busy = self.prev_busy.get(sid)
            if dt and prev_busy is not None:
                busy = (stats["busy_s"] - prev_busy) / dt
                self.load.shard_busy[sid] = min(1.0, max(0.0, busy))
            self.prev_busy[sid] = stats["busy_s"]
            for k, v in stats["tokens_served"].items():
                layer, expert = map(int, k.split(":"))
                totals[(layer, expert)] = totals.get((layer, expert), 0.0) + v
        if dt:
            for key, total in totals.items():
                observed[key] = max(0.0, total - self.prev_tokens.get(key, 0.0)) / dt
            self.load.expert_ema = pl.update_load_ema(self.load.expert_ema, observed, 0.3)
        self.prev_tokens = totals
        self.load_sampled_at = now
        self.metrics.record(st.table, self.load.shard_busy)

    def watch_nodes(self) -> set[str]:
        """Log nodes that joined or left since the last call; returns the ones that joined."""
        alive = set(self.shard_pool.alive_nodes())
        if not self.known_nodes:
            self.known_nodes = alive
            return set()
        joined, left = alive - self.known_nodes, self.known_nodes - alive
        self.known_nodes = alive
        for node in left:
            self.state.event("node_left", f"node {node[:8]} left the cluster", node=node)
        for node in joined:
            self.state.event("node_joined", f"node {node[:8]} joined the cluster", node=node)
        return joined

    def detect_dead(self) -> set[str]:
        """Shards that failed a ping, missed three, or sit on a node that left."""
        st = self.state
        live = {
            s: h
            for s, h in list(st.handles.items())
            if s in st.shards and not st.shards[s].draining
        }
        refs = {s: h.ping.remote() for s, h in live.items()}
        dead = {s for s, n in self.missed.items() if n >= LOST}
        alive_nodes = set(self.shard_pool.alive_nodes())
        dead |= {s for s, rec in list(st.shards.items()) if rec.node_id not in alive_nodes}
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
