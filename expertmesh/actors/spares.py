"""Warm spare shards: started ahead of need, holding no experts, taken first when shards are needed.

Starting a shard actor means a new Ray worker process importing torch: seconds. A spare is such a
process already running; scale-out and healing take spares first, so the new shard only has to
load its experts from the checkpoint store (milliseconds to a second), then refill the pool in
the background. ``DeploymentSpec.warm_shards`` sets the pool size (0 turns it off).

A mixin of :class:`expertmesh.actors.controller.Controller`.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import ray

from expertmesh.platform import placement as pl

log = logging.getLogger(__name__)


class SpareOps:
    def _take_shards(self, count: int, nodes: list[str] | None = None) -> list[pl.ShardInfo]:
        """``count`` shards in service: spares first (on ``nodes`` where given), then new ones."""
        wanted = list(nodes) if nodes else None
        taken = self._take_spares(count, wanted)
        if len(taken) < count:
            taken += self._start_shards(count - len(taken), wanted)
            self._save()
        return taken

    def _take_spares(self, count: int, wanted: list[str] | None = None) -> list[pl.ShardInfo]:
        """Up to ``count`` spares put in service (only ones on ``wanted`` nodes, which it
        updates, where given); starts replacements for them in the background."""
        from expertmesh.actors.controller import ShardRecord

        taken: list[pl.ShardInfo] = []
        for sid in list(self.spares):
            if len(taken) == count:
                break
            handle = self.spares[sid]
            try:
                st = ray.get(handle.stats.remote(), timeout=self.heartbeat_timeout_s)
            except Exception:  # a dead or hung spare is no use: fence it
                self._drop_spare(sid)
                continue
            if wanted is not None:
                if st["node_id"] not in wanted:
                    continue
                wanted.remove(st["node_id"])
            del self.spares[sid]
            self.handles[sid] = handle
            self.shards[sid] = ShardRecord(shard_id=sid, node_id=st["node_id"])
            taken.append(pl.ShardInfo(shard_id=sid, node_id=st["node_id"]))
            self._event(
                "shard_started",
                f"spare shard {sid} on node {st['node_id'][:8]} taken into service",
                shard=sid,
                spare=True,
            )
        if taken:
            self._save()
        self._refill_spares_soon()
        return taken

    def _drop_spare(self, sid: str) -> None:
        handle = self.spares.pop(sid, None)
        if handle is not None:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)

    def _check_spares(self) -> None:
        """Drop spares that died (e.g. with their node); then top the pool up."""
        refs = {sid: h.ping.remote() for sid, h in list(self.spares.items())}
        if refs:
            ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.heartbeat_timeout_s)
            for sid, ref in refs.items():
                try:
                    ray.get(ref, timeout=0)
                except ray.exceptions.GetTimeoutError:
                    pass  # slow, not dead: checked again when taken
                except Exception:
                    with self.lock:
                        self._drop_spare(sid)
        self._refill_spares_soon()

    def _refill_spares_soon(self) -> None:
        """Start the missing spares in a background thread (never blocks the caller)."""
        with self.lock:
            if self.spec is None or self.refilling:
                return
            want = self.spec.warm_shards - len(self.spares)
            if want <= 0:
                return
            self.refilling = True
            generation = self.generation
        threading.Thread(
            target=self._refill, args=(want, generation), daemon=True, name="spares"
        ).start()

    def _refill(self, want: int, generation: int) -> None:
        try:
            spawned = self._spawn_shards(want, None)
            with self.lock:
                if generation != self.generation:  # torn down or redeployed meanwhile
                    for _, handle, _ in spawned:
                        with contextlib.suppress(Exception):
                            ray.kill(handle, no_restart=True)
                    return
                for sid, handle, node in spawned:
                    self.spares[sid] = handle
                    self._event("spare_ready", f"spare shard {sid} warm on node {node[:8]}")
                self._save()
        except Exception:
            log.exception("starting spare shards failed; retried on the next load sample")
        finally:
            self.refilling = False
