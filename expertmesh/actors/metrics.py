"""Prometheus metrics (``ray.util.metrics``): exported by each node's Ray metrics agent."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray.util.metrics import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from expertmesh.platform.placement import PlacementTable


class ShardMetrics:
    """Per-expert tokens served and per-call latency of one shard."""

    def __init__(self, shard_id: str) -> None:
        self.shard_id = shard_id
        self.tokens = Counter(
            "expertmesh_expert_tokens_total",
            description="Tokens an expert replica has processed.",
            tag_keys=("shard", "layer", "expert"),
        )
        self.latency = Histogram(
            "expertmesh_shard_call_seconds",
            description="Time an expert shard spends on one (layer, step) call.",
            boundaries=[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5],
            tag_keys=("shard",),
        )

    def record(self, layer: int, experts: list[int], counts: list[int], seconds: float) -> None:
        for e, n in zip(experts, counts, strict=True):
            self.tokens.inc(n, tags={"shard": self.shard_id, "layer": str(layer), "expert": str(e)})
        self.latency.observe(seconds, tags={"shard": self.shard_id})


class ControllerMetrics:
    """Replica count per expert and busy fraction per shard."""

    def __init__(self) -> None:
        self.replicas = Gauge(
            "expertmesh_expert_replicas",
            description="Live replicas of an expert in the placement table.",
            tag_keys=("layer", "expert"),
        )
        self.busy = Gauge(
            "expertmesh_shard_busy_fraction",
            description="Fraction of the last sample period a shard spent computing.",
            tag_keys=("shard",),
        )

    def record(self, table: PlacementTable, busy: dict[str, float]) -> None:
        for (layer, expert), ids in table.replicas.items():
            self.replicas.set(len(ids), tags={"layer": str(layer), "expert": str(expert)})
        for shard, frac in busy.items():
            self.busy.set(frac, tags={"shard": shard})
