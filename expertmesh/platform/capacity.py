"""How many shard actors a cluster can place: a pure function of per-node free resources.

The controller measures each node's free Ray resources (what is left after the router, the
controller, the API, the shards and spares and anything else took theirs) and asks
:func:`room_per_node` how many more shards fit on each. A node that lacks a resource the shard
asks for (a head node without the ``expert_shard`` resource that worker pods carry, a node
without GPUs) has room for none. :class:`Capacity` adds the shards already running: the most
shards a scale request may ask for now.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

# NOTE: Ray keeps resources in fixed point (1/10000); 0.75 free / 0.25 each must be 3, not 2
_EPS = 1e-6


def shard_demand(
    num_cpus: float, num_gpus: float, resources: Mapping[str, float] | None
) -> dict[str, float]:
    """The Ray resources one shard asks for, zero amounts left out."""
    need = {"CPU": num_cpus, "GPU": num_gpus, **(resources or {})}
    return {r: float(v) for r, v in need.items() if v > 0}


def room_per_node(
    available: Mapping[str, Mapping[str, float]], need: Mapping[str, float]
) -> dict[str, int] | None:
    """Node id -> how many more actors asking ``need`` fit in its ``available`` resources.

    None when ``need`` asks for nothing: Ray would place any number of them, and only a
    configured maximum bounds the pool.

    Example::

        room_per_node({"a": {"CPU": 1.0}, "b": {"CPU": 0.5, "GPU": 1}}, {"CPU": 0.25})
        # {"a": 4, "b": 2}
    """
    if not need:
        return None
    room = {}
    for node, free in available.items():
        room[node] = min(max(0, math.floor(free.get(r, 0.0) / v + _EPS)) for r, v in need.items())
    return room


@dataclass(frozen=True, kw_only=True, slots=True)
class Capacity:
    """The shard pool's limits now: what runs, what more fits, what is configured."""

    in_service: int  # shards holding experts
    spares: int  # warm spares: taken into service before new shards start
    room: Mapping[str, int] | None = field(default_factory=dict)  # per node; None: unbounded
    max_shards: int | None = None  # the deployment's configured maximum

    @property
    def placeable(self) -> int | None:
        """Most shards in service the cluster can hold now (None: no resource bounds it)."""
        if self.room is None:
            return None
        return self.in_service + self.spares + sum(self.room.values())

    @property
    def limit(self) -> int | None:
        """The smaller of :attr:`placeable` and ``max_shards`` (None: neither bounds it)."""
        bounds = [b for b in (self.placeable, self.max_shards) if b is not None]
        return min(bounds) if bounds else None
