"""Warm spare shards: started ahead of need, holding no experts, taken first when shards are needed.

Starting a shard actor means a new Ray worker process importing torch: seconds. A spare is such a
process already running; scale-out and healing take spares first, so the new shard only has to
load its experts from the checkpoint store (milliseconds to a second), then refill the pool in
the background. ``DeploymentSpec.warm_shards`` sets the pool size (0 turns it off).
"""

from __future__ import annotations

import contextlib
import logging
import threading

import ray

from expertmesh.actors.shard_pool import ShardPool
from expertmesh.actors.state import ControllerState, ShardRecord
from expertmesh.platform import placement as pl

log = logging.getLogger(__name__)


class SparePool:
    """Keeps ``spec.warm_shards`` spare shard actors started and hands them out first.

    Args:
        state: the controller's shared state (its ``spares`` are this pool's members).
        shard_pool: starts the shard actors.
        heartbeat_timeout_s: a spare that does not answer within it is not taken.
    """

    def __init__(
        self, state: ControllerState, shard_pool: ShardPool, *, heartbeat_timeout_s: float
    ) -> None:
        self.state = state
        self.shard_pool = shard_pool
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.refilling = False

    def take_shards(self, count: int, nodes: list[str] | None = None) -> list[pl.ShardInfo]:
        """``count`` shards in service: spares first (on ``nodes`` where given), then new ones."""
        wanted = list(nodes) if nodes else None
        taken = self.take_spares(count, wanted)
        if len(taken) < count:
            taken += self.shard_pool.start(count - len(taken), wanted)
            self.state.save()
        return taken

    def take_spares(self, count: int, wanted: list[str] | None = None) -> list[pl.ShardInfo]:
        """Up to ``count`` spares put in service (only ones on ``wanted`` nodes, which it
        updates, where given); starts replacements for them in the background."""
        st = self.state
        taken: list[pl.ShardInfo] = []
        for sid in list(st.spares):
            if len(taken) == count:
                break
            handle = st.spares[sid]
            try:
                stats = ray.get(handle.stats.remote(), timeout=self.heartbeat_timeout_s)
            except Exception:  # a dead or hung spare is no use: fence it
                self.drop(sid)
                continue
            node = stats["node_id"]
            if wanted is not None:
                if node not in wanted:
                    continue
                wanted.remove(node)
            del st.spares[sid]
            st.handles[sid] = handle
            st.shards[sid] = ShardRecord(shard_id=sid, node_id=node)
            taken.append(pl.ShardInfo(shard_id=sid, node_id=node))
            st.event(
                "shard_started",
                f"spare shard {sid} on node {node[:8]} taken into service",
                shard=sid,
                spare=True,
            )
        if taken:
            st.save()
        self.refill_soon()
        return taken

    def drop(self, sid: str) -> None:
        handle = self.state.spares.pop(sid, None)
        if handle is not None:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)

    def check(self) -> None:
        """Drop spares that died (e.g. with their node); then top the pool up."""
        refs = {sid: h.ping.remote() for sid, h in list(self.state.spares.items())}
        if refs:
            ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.heartbeat_timeout_s)
            for sid, ref in refs.items():
                try:
                    ray.get(ref, timeout=0)
                except ray.exceptions.GetTimeoutError:
                    pass  # slow, not dead: checked again when taken
                except Exception:
                    with self.state.lock:
                        self.drop(sid)
        self.refill_soon()

    def refill_soon(self) -> None:
        """Start the missing spares in a background thread (never blocks the caller)."""
        st = self.state
        with st.lock:
            if st.spec is None or self.refilling:
                return
            want = st.spec.warm_shards - len(st.spares)
            if want <= 0:
                return
            # only what fits now: a spare Ray cannot place would wait, unnamed in the record,
            # for resources that a scale counted as free
            room = self.shard_pool.room()
            if room is not None:
                want = min(want, sum(room.values()))
                if want <= 0:
                    return
            self.refilling = True
            generation = st.generation
        threading.Thread(
            target=self._refill, args=(want, generation), daemon=True, name="spares"
        ).start()

    def _refill(self, want: int, generation: int) -> None:
        st = self.state
        try:
            spawned = self.shard_pool.spawn(want, None)
            with st.lock:
                if generation != st.generation:  # torn down or redeployed meanwhile
                    for _, handle, _ in spawned:
                        with contextlib.suppress(Exception):
                            ray.kill(handle, no_restart=True)
                    return
                for sid, handle, node in spawned:
                    st.spares[sid] = handle
                    st.event("spare_ready", f"spare shard {sid} warm on node {node[:8]}")
                st.save()
        except Exception:
            log.exception("starting spare shards failed; retried on the next load sample")
        finally:
            self.refilling = False
