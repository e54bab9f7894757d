"""Pure autoscaling policy for the expert-shard pool.

``autoscale(snapshot, state, cfg, now) -> (target_shards, new_state)`` in the style of Ray Serve's
``replica_queue_length_autoscaling_policy``: the controller passes measured load and the state
the previous call returned, and gets back a shard count. Time comes in as ``now`` so tests drive
it with a fake clock.

How the target is chosen:

* demand (in shards) = total load / (``shard_capacity`` × ``target_utilisation``), or queued
  work / ``target_queue_per_shard`` when that is larger;
* a change is wanted only outside a ``tolerance`` band around the current count (hysteresis);
* the wish must hold for ``upscale_delay_s`` / ``downscale_delay_s`` without interruption, and
  ``upscale_cooldown_s`` / ``downscale_cooldown_s`` must have passed since the last change
  (downscaling is the slower of the two by default);
* the target stays within [``min_shards``, ``max_shards``] and never below the shards needed to
  hold ``min_replicas`` of every expert (that floor beats ``max_shards``, and a pool below it
  or above ``max_shards`` is corrected at once, cooldowns or not);
* the target never grows past ``LoadSnapshot.capacity``, the shards the cluster can place now
  (the deployment's own ``max_shards`` included): the unclamped wish is kept in
  ``AutoscaleState.wanted``, which the controller asks Ray's autoscaler (KubeRay) for, so that
  the cluster grows and a later call can scale further.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from expertmesh.platform.errors import ConfigError, ExpertmeshError


class AutoscaleError(ExpertmeshError, ValueError):
    """A load snapshot is malformed (negative counts, non-finite load)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AutoscaleConfig:
    """Knobs of :func:`autoscale`; the module docstring says how they combine."""

    min_shards: int = 1
    max_shards: int = 64
    target_utilisation: float = 0.7
    shard_capacity: float = 1.0  # load one shard serves when 100 % busy (1.0 for busy fractions)
    target_queue_per_shard: float | None = None  # None: ignore queue depth
    tolerance: float = 0.1  # relative dead band around the current shard count
    upscale_delay_s: float = 0.0
    downscale_delay_s: float = 120.0
    upscale_cooldown_s: float = 30.0
    downscale_cooldown_s: float = 300.0
    min_replicas: int = 2
    experts_per_shard: int | None = None  # shard capacity in expert replicas; None: unbounded

    def __post_init__(self) -> None:
        if self.min_shards < 0:
            raise ConfigError("min_shards", f"must be >= 0, got {self.min_shards}")
        if self.max_shards < max(1, self.min_shards):
            raise ConfigError(
                "max_shards",
                f"must be >= max(1, min_shards={self.min_shards}), got {self.max_shards}",
            )
        if not 0.0 < self.target_utilisation <= 1.0:
            raise ConfigError(
                "target_utilisation", f"must be in (0, 1], got {self.target_utilisation}"
            )
        for name in ("shard_capacity", "target_queue_per_shard"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(name, f"must be > 0, got {value}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ConfigError("tolerance", f"must be in [0, 1), got {self.tolerance}")
        for name in (
            "upscale_delay_s",
            "downscale_delay_s",
            "upscale_cooldown_s",
            "downscale_cooldown_s",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.min_replicas < 1:
            raise ConfigError("min_replicas", f"must be >= 1, got {self.min_replicas}")
        if self.experts_per_shard is not None and self.experts_per_shard < 1:
            raise ConfigError("experts_per_shard", f"must be >= 1, got {self.experts_per_shard}")


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadSnapshot:
    """What the controller measured: shard count, per-shard load, queued work, expert count.

    Shards missing from ``shard_load`` (not reporting yet) count as idle.
    """

    num_shards: int
    shard_load: Mapping[str, float] = field(default_factory=dict)  # busy fraction or tokens/s
    queue_depth: float = 0.0  # work waiting for any shard, in the unit of target_queue_per_shard
    num_experts: int = 0
    capacity: int | None = None  # most shards the cluster can place now; None: unbounded

    def __post_init__(self) -> None:
        if self.capacity is not None and self.capacity < 0:
            raise AutoscaleError(f"LoadSnapshot.capacity must be >= 0, got {self.capacity}")
        for name in ("num_shards", "num_experts", "queue_depth"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise AutoscaleError(f"LoadSnapshot.{name} must be finite and >= 0, got {value}")
        bad = {k: v for k, v in self.shard_load.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise AutoscaleError(
                f"shard load must be finite and >= 0; bad: {dict(list(bad.items())[:5])}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class AutoscaleState:
    """Carried from one ``autoscale`` call to the next; start with ``AutoscaleState()``."""

    last_scaled_at: float | None = None
    up_since: float | None = None  # start of the current uninterrupted wish to scale up
    down_since: float | None = None
    reason: str = ""  # why the last decision was taken, for logs and the console
    wanted: int | None = None  # the target before the capacity clamp (what to ask Ray for)


def required_shards(num_experts: int, min_replicas: int, experts_per_shard: int | None) -> int:
    """Fewest shards that hold ``min_replicas`` replicas of every expert, one per shard each."""
    if num_experts == 0:
        return 0
    if experts_per_shard is None:
        return min_replicas
    return max(min_replicas, math.ceil(num_experts * min_replicas / experts_per_shard))


def autoscale(
    snapshot: LoadSnapshot, state: AutoscaleState, cfg: AutoscaleConfig, now: float
) -> tuple[int, AutoscaleState]:
    """Target shard count for ``snapshot``, and the state to pass to the next call.

    Example::

        state = AutoscaleState()
        target, state = autoscale(LoadSnapshot(num_shards=4, shard_load=busy), state, cfg, time())
    """
    n, cap = snapshot.num_shards, snapshot.capacity
    target, new = _decide(snapshot, state, cfg, now)
    if cap is None or target <= max(n, cap):
        return target, replace(new, wanted=target)
    clamped = max(n, cap)
    why = f"{new.reason}; held at {clamped}: the cluster can place {cap} shards now"
    if clamped == n:  # nothing changes: no cooldown starts, the wish to grow goes on
        up_since = now if state.up_since is None else state.up_since
        kept = AutoscaleState(last_scaled_at=state.last_scaled_at, up_since=up_since)
        return n, replace(kept, wanted=target, reason=why)
    return clamped, replace(new, wanted=target, reason=why)


def _decide(
    snapshot: LoadSnapshot, state: AutoscaleState, cfg: AutoscaleConfig, now: float
) -> tuple[int, AutoscaleState]:
    """:func:`autoscale` before the capacity clamp."""
    n = snapshot.num_shards
    floor = required_shards(snapshot.num_experts, cfg.min_replicas, cfg.experts_per_shard)
    lo, hi = max(cfg.min_shards, floor), max(cfg.max_shards, floor)
    idle = AutoscaleState(last_scaled_at=state.last_scaled_at)
    if n < lo or n > hi:
        target = min(max(n, lo), hi)
        why = f"{n} shards outside [{lo}, {hi}] (replica floor {floor})"
        return target, replace(idle, last_scaled_at=now, reason=why)

    demand = sum(snapshot.shard_load.values()) / (cfg.shard_capacity * cfg.target_utilisation)
    if cfg.target_queue_per_shard is not None:
        demand = max(demand, snapshot.queue_depth / cfg.target_queue_per_shard)
    wanted = min(max(math.ceil(demand - 1e-9), lo), hi)
    since_change = math.inf if state.last_scaled_at is None else now - state.last_scaled_at

    if wanted > n and demand > n * (1.0 + cfg.tolerance):
        up_since = now if state.up_since is None else state.up_since
        if now - up_since >= cfg.upscale_delay_s and since_change >= cfg.upscale_cooldown_s:
            why = f"demand {demand:.2f} shards > {n}: scale up to {wanted}"
            return wanted, replace(idle, last_scaled_at=now, reason=why)
        return n, replace(
            idle, up_since=up_since, reason=f"demand {demand:.2f}: waiting to scale up"
        )
    if wanted < n and demand < n * (1.0 - cfg.tolerance):
        down_since = now if state.down_since is None else state.down_since
        if now - down_since >= cfg.downscale_delay_s and since_change >= cfg.downscale_cooldown_s:
            why = f"demand {demand:.2f} shards < {n}: scale down to {wanted}"
            return wanted, replace(idle, last_scaled_at=now, reason=why)
        why = f"demand {demand:.2f}: waiting to scale down"
        return n, replace(idle, down_since=down_since, reason=why)
    return n, replace(idle, reason=f"demand {demand:.2f} shards within tolerance of {n}")
