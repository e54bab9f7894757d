"""Which expert shards the dispatcher leaves out after failed calls: a circuit breaker per shard.

A shard whose call failed is *open*: it gets no work (its experts' other replicas take it) for a
backoff. Then it is *half-open*: the next call that picks it is a probe, and every other call
keeps avoiding it until the probe is answered. An answer closes the breaker; a failure opens it
again, for longer.

The backoff depends on how the call failed. A timeout says the shard is slow, not that it is
dead: a shard just put in service by a scale-out pays for its first calls (the router's
connection, the experts' first matmuls) on a machine that is busy
starting more shards. Left out for the whole ``suspect_s`` it would take no work for as long as
a short test or a load spike lasts, so it is probed again after ``probe_s``, doubled with each
timeout in a row up to ``suspect_s``. An error (connection reset, actor dead, an error answer)
keeps it out for ``suspect_s`` at once: a dead shard leaves the placement within seconds (the
controller's heartbeats) and must not be hammered meanwhile; after that it gets one probe per
``suspect_s``, not its full share.

Times are ``time.monotonic()`` seconds passed in by the caller (tests pass a fake clock). This
module does not import Ray.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Set
from dataclasses import dataclass, field

# NOTE: how long a shard whose call failed with an error is left out. A dead one leaves the
# placement within seconds (the controller's heartbeats); one that was only slow (a starved
# machine, a call past its deadline) would otherwise lose its share of the work until the next
# placement change.
SUSPECT_S = 10.0
# first backoff after a timeout: about the floor of the call deadline, so a slow shard is asked
# again after roughly one more deadline's worth of steps
PROBE_S = 1.0


@dataclass(kw_only=True, slots=True)
class Suspect:
    """One shard's open or half-open breaker."""

    until: float  # left out until then; afterwards half-open (one probe call may go)
    failures: int  # failed calls in a row
    timed_out: bool  # the last failure was a timeout (slow), not an error
    probe_at: float | None = None  # when the probe call went out; None: none is out


@dataclass(kw_only=True, slots=True)
class Breakers:
    """Per-shard circuit breakers (shared by a dispatcher's micro-batch threads)."""

    probe_s: float = PROBE_S
    suspect_s: float = SUSPECT_S
    shards: dict[str, Suspect] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def failed(self, shard: str, now: float, *, timed_out: bool) -> float:
        """Note a failed call to ``shard``; returns how long it is now left out (seconds)."""
        with self.lock:
            prev = self.shards.get(shard)
            failures = 1 if prev is None else prev.failures + 1
            backoff = self.suspect_s
            if timed_out:
                backoff = min(self.suspect_s, self.probe_s * 2.0 ** (failures - 1))
            self.shards[shard] = Suspect(
                until=now + backoff, failures=failures, timed_out=timed_out
            )
            return backoff

    def succeeded(self, shard: str) -> bool:
        """Note an answer from ``shard``: its breaker closes. True if it was open or half-open."""
        if shard not in self.shards:  # the common case, without the lock
            return False
        with self.lock:
            return self.shards.pop(shard, None) is not None

    def avoided(self, now: float) -> set[str]:
        """Shards to give no work now: open ones, and half-open ones whose probe is out. A probe
        unanswered for ``suspect_s`` (its step abandoned) no longer holds the shard back."""
        if not self.shards:
            return set()
        with self.lock:
            return {s for s, b in self.shards.items() if now < b.until or self._probe_out(b, now)}

    def probing(self, picked: Iterable[str], now: float) -> None:
        """Note the shards a call round was just assigned: a half-open one carries the probe
        (one picked while open, because every replica of an expert was avoided, does not)."""
        if not self.shards:
            return
        with self.lock:
            for s in picked:
                b = self.shards.get(s)
                if b is not None and now >= b.until and not self._probe_out(b, now):
                    b.probe_at = now

    def snapshot(self, now: float) -> dict[str, dict[str, object]]:
        """Shard -> its breaker (``open`` or ``half-open``), for the console and status."""
        with self.lock:
            return {
                s: {
                    "state": "open" if now < b.until else "half-open",
                    "failures": b.failures,
                    "timed_out": b.timed_out,
                }
                for s, b in self.shards.items()
            }

    def _probe_out(self, b: Suspect, now: float) -> bool:
        return b.probe_at is not None and now - b.probe_at < self.suspect_s

    def keep(self, shards: Set[str]) -> None:
        """Forget the breakers of shards no longer in the placement."""
        with self.lock:
            self.shards = {s: b for s, b in self.shards.items() if s in shards}
