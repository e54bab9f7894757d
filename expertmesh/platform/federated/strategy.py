"""Federation strategies: what each client is told to do, and how their updates are merged.

The interface follows Flower's ``Strategy`` (``configure_train`` / ``aggregate_train``) so a
Flower adapter can wrap these later; everything here is pure (tensors and dataclasses in,
tensors and dataclasses out), with no Ray and no clock, so it is unit-tested without a cluster.

- :class:`FedAvg`: every client's update weighted by its data size ``|D_i|``.
- :class:`Flame`: FLAME's activation-aware aggregation (arXiv 2506.16600): expert ``e`` of
  layer ``l`` takes client ``i``'s update with weight ``f_ile^t * |D_i|``, ``f_ile`` the share
  of the client's tokens that activated that expert this round. ``t = 0`` is FedAvg; an expert
  no client activated keeps its adapter.

Shapes: E experts of a layer, R LoRA rank; adapters are ``(layer, name) -> (E, ...)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from expertmesh.platform.errors import ConfigError
from expertmesh.platform.federated.lora import Adapters


@dataclass(kw_only=True, slots=True, frozen=True)
class ClientSpec:
    """A client as the strategy sees it (who, its budget, how much data it holds)."""

    name: str
    k: int  # experts activated per token
    n_tokens: int  # |D_i|: tokens in its partition


@dataclass(kw_only=True, slots=True)
class TrainInstruction:
    """What one client trains in one round (Flower's ``Message`` to ``train``)."""

    client: str
    server_round: int
    adapters: Adapters  # the global adapters to start from
    scale: float  # the client's own output scale s_i (kept by the server between rounds)
    k: int
    local_steps: int
    lr: float
    batch_size: int
    seq_len: int
    seed: int


@dataclass(kw_only=True, slots=True)
class ClientUpdate:
    """What a client reports after local training (Flower's reply to ``train``)."""

    client: str
    server_round: int
    delta: Adapters  # local adapters minus the global ones it started from
    counts: dict[int, torch.Tensor]  # layer -> (E,) int64 activations (token-expert pairs)
    tokens_seen: int  # tokens routed this round (per MoE layer)
    n_tokens: int  # |D_i|
    loss: float  # mean local training cross-entropy
    scale: float  # its output scale after training
    k: int
    seconds: float = 0.0

    def frequencies(self, layer: int) -> torch.Tensor:
        """(E,) share of this round's tokens that activated each expert of ``layer``."""
        return self.counts[layer].double() / max(self.tokens_seen, 1)


@dataclass(kw_only=True, slots=True)
class Aggregate:
    """The new global adapters and what the strategy wants logged."""

    adapters: Adapters
    metrics: dict[str, float] = field(default_factory=dict)


class Strategy(Protocol):
    """Flower's strategy interface, as far as this federation uses it."""

    name: str

    def configure_train(
        self,
        server_round: int,
        global_adapters: Adapters,
        clients: Sequence[ClientSpec],
        scales: Mapping[str, float],
    ) -> list[TrainInstruction]: ...

    def aggregate_train(
        self, server_round: int, global_adapters: Adapters, results: Sequence[ClientUpdate]
    ) -> Aggregate: ...


def aggregate_deltas(
    global_adapters: Adapters,
    results: Sequence[ClientUpdate],
    weights: Mapping[str, Mapping[int, torch.Tensor]],
) -> Adapters:
    """``global + sum_i w_ile * delta_ile / sum_i w_ile`` per (layer, expert); an expert whose
    weights sum to 0 keeps its global adapter. ``weights[client][layer]`` is (E,)."""
    out: Adapters = {}
    for (layer, name), g in global_adapters.items():
        num = torch.zeros(g.shape, dtype=torch.float64)
        den_E = torch.zeros(g.shape[0], dtype=torch.float64)
        for r in results:
            w_E = weights[r.client][layer].double()
            num += w_E.view(-1, *[1] * (g.dim() - 1)) * r.delta[(layer, name)].double()
            den_E += w_E
        step = num / den_E.clamp(min=1e-300).view(-1, *[1] * (g.dim() - 1))
        step[den_E == 0] = 0  # NOTE: nobody trained this expert: leave it as it was
        out[(layer, name)] = g + step.to(g.dtype)
    return out


def _check_round(results: Sequence[ClientUpdate], global_adapters: Adapters) -> None:
    if not results:
        raise ValueError("aggregate_train needs at least one client update")
    for r in results:
        if set(r.delta) != set(global_adapters):
            raise ValueError(f"client {r.client!r} reported adapters of another shape")


@dataclass(kw_only=True, slots=True)
class FedAvg:
    """FedAvg on the LoRA adapters: each client's update weighted by its data size."""

    local_steps: int = 10
    lr: float = 2e-3
    batch_size: int = 8
    seq_len: int = 64
    seed: int = 0
    name: str = "fedavg"

    def __post_init__(self) -> None:
        for f in ("local_steps", "batch_size", "seq_len"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f, f"must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be positive, got {self.lr!r}")

    def configure_train(
        self,
        server_round: int,
        global_adapters: Adapters,
        clients: Sequence[ClientSpec],
        scales: Mapping[str, float],
    ) -> list[TrainInstruction]:
        """One instruction per client: start from the global adapters at its own budget."""
        return [
            TrainInstruction(
                client=c.name,
                server_round=server_round,
                adapters=global_adapters,
                scale=float(scales.get(c.name, 1.0)),
                k=c.k,
                local_steps=self.local_steps,
                lr=self.lr,
                batch_size=self.batch_size,
                seq_len=self.seq_len,
                # NOTE: a different stream per client and round, reproducible from the seed
                seed=self.seed * 1_000_003 + server_round * 1009 + i,
            )
            for i, c in enumerate(clients)
        ]

    def weights(self, results: Sequence[ClientUpdate]) -> dict[str, dict[int, torch.Tensor]]:
        """Per client and layer, the (E,) weight of each expert's update: ``|D_i|``."""
        return {
            r.client: {
                layer: torch.full(c.shape, float(r.n_tokens), dtype=torch.float64)
                for layer, c in r.counts.items()
            }
            for r in results
        }

    def aggregate_train(
        self, server_round: int, global_adapters: Adapters, results: Sequence[ClientUpdate]
    ) -> Aggregate:
        """The new global adapters from this round's updates."""
        _check_round(results, global_adapters)
        new = aggregate_deltas(global_adapters, results, self.weights(results))
        total = sum(r.n_tokens for r in results)
        loss = sum(r.loss * r.n_tokens for r in results) / max(total, 1)
        return Aggregate(adapters=new, metrics={"train_loss": loss})


@dataclass(kw_only=True, slots=True)
class Flame(FedAvg):
    """FLAME's activation-aware aggregation: per-expert weight ``f^t * |D_i|``."""

    t: float = 1.0
    name: str = "flame"

    def __post_init__(self) -> None:
        FedAvg.__post_init__(self)
        if isinstance(self.t, bool) or not isinstance(self.t, int | float) or self.t < 0:
            raise ConfigError("t", f"must be a number >= 0, got {self.t!r}")

    def weights(self, results: Sequence[ClientUpdate]) -> dict[str, dict[int, torch.Tensor]]:
        # NOTE: torch.pow(0, 0) == 1, so t = 0 weighs every expert by |D_i| alone: FedAvg
        return {
            r.client: {
                layer: r.frequencies(layer).pow(self.t) * float(r.n_tokens) for layer in r.counts
            }
            for r in results
        }


def make_strategy(name: str, *, t: float = 1.0, **common) -> FedAvg:
    """``fedavg`` or ``flame`` (with temperature ``t``), else a :class:`ConfigError`."""
    if name == "fedavg":
        return FedAvg(**common)
    if name == "flame":
        return Flame(t=t, **common)
    raise ConfigError("strategy", f"unknown strategy {name!r}; choose fedavg or flame")


def adapter_bytes(adapters: Adapters) -> int:
    """Bytes of the adapter tensors (what one transfer of them costs on the wire, payload only)."""
    return sum(t.numel() * t.element_size() for t in adapters.values())
