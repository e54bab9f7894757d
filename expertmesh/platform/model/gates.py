"""Routers: which experts process which tokens, with what weight.

Every router turns gate logits into a flat list of (token, expert, weight) *assignments* sorted
by expert. That one form covers token choice (top-k, noisy top-k, Switch top-1, hash), expert
choice (a token may get 0..E experts) and capacity dropping, and it is what dispatchers consume.
Shapes: T tokens, E experts, A assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from expertmesh.platform.config import ModelConfig

_HASH_MULT = 2654435761  # Knuth's multiplicative hash


@dataclass(kw_only=True, slots=True)
class Routing:
    """Assignments of tokens to experts, sorted by expert (stable in token order)."""

    token_idx_A: torch.Tensor  # int64, which token
    expert_idx_A: torch.Tensor  # int64, which expert; non-decreasing
    weight_A: torch.Tensor  # gate weight the expert output is scaled by
    counts_E: torch.Tensor  # int64, assignments per expert (sum == A)
    n_tokens: int
    n_dropped: int  # assignments removed by the capacity limit
    logits_TE: torch.Tensor  # raw gate logits (float32), for the losses
    probs_cache: torch.Tensor | None = field(default=None, repr=False)  # see probs_TE

    @property
    def probs_TE(self) -> torch.Tensor:
        """Softmax over experts (float32), for the losses; computed on first use when the router
        did not need it (Mixtral's top-k weights come from the top-k logits alone)."""
        if self.probs_cache is None:
            self.probs_cache = self.logits_TE.softmax(dim=-1)
        return self.probs_cache

    @property
    def dropped_fraction(self) -> float:
        total = self.n_dropped + int(self.counts_E.sum())
        return self.n_dropped / total if total else 0.0


def _sorted_routing(
    token_TK: torch.Tensor,
    expert_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    n_experts: int,
    logits_TE: torch.Tensor,
    probs_TE: torch.Tensor | None,
    capacity: int | None,
) -> Routing:
    expert_A, weight_A, token_A = expert_TK.reshape(-1), weight_TK.reshape(-1), token_TK.reshape(-1)
    n_dropped = 0
    if capacity is not None:
        # keep, per expert, the `capacity` assignments with the highest gate weight
        order = torch.argsort(weight_A, descending=True, stable=True)
        order = order[torch.argsort(expert_A[order], stable=True)]
        expert_sorted = expert_A[order]
        counts = expert_counts(expert_sorted, n_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(expert_sorted.numel(), device=expert_A.device) - starts[expert_sorted]
        keep = order[rank < capacity]
        n_dropped = expert_A.numel() - keep.numel()
        expert_A, weight_A, token_A = expert_A[keep], weight_A[keep], token_A[keep]
    expert_A, order = torch.sort(expert_A, stable=True)
    return Routing(
        token_idx_A=token_A[order],
        expert_idx_A=expert_A,
        weight_A=weight_A[order],
        counts_E=expert_counts(expert_A, n_experts),
        n_tokens=logits_TE.shape[0],
        n_dropped=n_dropped,
        logits_TE=logits_TE,
        probs_cache=probs_TE,
    )


def expert_counts(expert_A: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert, (E,) int64. On the CPU ``bincount``; elsewhere a scatter-add,
    because CUDA's ``bincount`` reads the largest index back to the host to size its output:
    a sync per MoE layer that stalls the launch queue."""
    if expert_A.device.type == "cpu":
        return torch.bincount(expert_A, minlength=n_experts)
    ones_A = torch.ones_like(expert_A)
    return expert_A.new_zeros(n_experts).scatter_add_(0, expert_A, ones_A)


def capacity_for(
    cfg: ModelConfig, n_tokens: int, factor: float | None, n_experts: int | None = None
) -> int | None:
    """Assignments an expert may take: ``ceil(factor * T * k / E)``, E the layer's expert count
    (default ``cfg.n_experts``); None means dropless."""
    if factor is None:
        return None
    E = cfg.n_experts if n_experts is None else n_experts
    return max(1, math.ceil(factor * n_tokens * cfg.top_k / E))


def route(
    cfg: ModelConfig,
    logits_TE: torch.Tensor,
    *,
    training: bool = False,
    token_ids_T: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    select_bias_E: torch.Tensor | None = None,
) -> Routing:
    """Turn gate logits into sorted assignments according to ``cfg.router``.

    ``select_bias_E`` (``topk`` and ``noisy_topk`` only) is added to the logits to *choose* each
    token's experts; the gate weights still come from the unbiased logits (DeepSeek-V3's
    auxiliary-loss-free balancing: the bias steers load without entering the output).
    """
    T, E = logits_TE.shape
    k = cfg.top_k
    logits_TE = logits_TE.float()
    arange_T = torch.arange(T, device=logits_TE.device)
    capacity = capacity_for(cfg, T, cfg.capacity_factor, E)
    if select_bias_E is not None and cfg.router not in ("topk", "noisy_topk"):
        raise ValueError(f"the {cfg.router!r} router takes no selection bias")
    if cfg.router == "topk":
        expert_TK, weight_TK = topk_choice(logits_TE, k, select_bias_E)
        token_TK = arange_T[:, None].expand(T, k)
        return _sorted_routing(token_TK, expert_TK, weight_TK, E, logits_TE, None, capacity)
    probs_TE = logits_TE.softmax(dim=-1)

    if cfg.router == "expert_choice":
        # each expert takes its C highest-scoring tokens: exactly balanced by construction
        C = min(T, capacity_for(cfg, T, cfg.capacity_factor or 1.0, E) or T)
        weight_EC, token_EC = probs_TE.t().topk(C, dim=-1)
        expert_EC = torch.arange(E, device=logits_TE.device)[:, None].expand(E, C)
        return _sorted_routing(token_EC, expert_EC, weight_EC, E, logits_TE, probs_TE, None)

    if cfg.router == "hash":
        if token_ids_T is None:
            raise ValueError("the hash router needs the token ids of the tokens it routes")
        h_T = (token_ids_T.long() * _HASH_MULT) % (2**32)
        base_T = h_T % E
        expert_TK = (base_T[:, None] + torch.arange(k, device=base_T.device)[None, :]) % E
        weight_TK = torch.full((T, k), 1.0 / k, device=logits_TE.device)
        token_TK = arange_T[:, None].expand(T, k)
        return _sorted_routing(token_TK, expert_TK, weight_TK, E, logits_TE, probs_TE, capacity)

    select_TE = logits_TE
    if cfg.router == "noisy_topk" and training:
        noise = torch.randn(logits_TE.shape, generator=generator, device=logits_TE.device)
        select_TE = logits_TE + noise * cfg.router_noise_std
    top_TK, expert_TK = _top_k(select_TE, k, select_bias_E)
    # Switch scales by the raw router probability; noisy top-k (Shazeer et al.) takes the
    # softmax over the kept noisy logits
    switch = cfg.router == "switch"
    weight_TK = probs_TE.gather(1, expert_TK) if switch else top_TK.softmax(dim=-1)
    token_TK = arange_T[:, None].expand(T, k)
    return _sorted_routing(token_TK, expert_TK, weight_TK, E, logits_TE, probs_TE, capacity)


def topk_choice(
    logits_TE: torch.Tensor, k: int, select_bias_E: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's choice, (expert_TK, weight_TK) per token in slot order: softmax over all
    experts, top-k, renormalised, which is the softmax of the top-k float32 logits (a few ops
    fewer per layer; the full softmax is computed if a loss reads it). ``select_bias_E``: see
    :func:`route`. The ``topk`` router and the MoE layer's fused inference path both call it."""
    top_TK, expert_TK = _top_k(logits_TE.float(), k, select_bias_E)
    return expert_TK, top_TK.softmax(dim=-1)


def _top_k(
    logits_TE: torch.Tensor, k: int, select_bias_E: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the chosen experts' *unbiased* logits, their indices), chosen by ``logits + bias``."""
    if select_bias_E is None:
        return logits_TE.topk(k, dim=-1)
    expert_TK = (logits_TE + select_bias_E.float()).topk(k, dim=-1).indices
    return logits_TE.gather(1, expert_TK), expert_TK


def balance_bias_step(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> None:
    """One auxiliary-loss-free balancing update, in place (Wang et al. 2024, DeepSeek-V3):
    ``b_e += rate * sign(mean load - load_e)``: overloaded experts become less likely to be
    chosen, underloaded ones more, by a fixed step whatever the size of the imbalance."""
    load_E = counts_E.to(bias_E.device, torch.float32)
    bias_E.add_(torch.sign(load_E.mean() - load_E), alpha=rate)


def load_balancing_loss(routing: Routing) -> torch.Tensor:
    """Switch Transformer auxiliary loss: ``E * sum_e f_e * P_e`` (1.0 when perfectly balanced)."""
    E = routing.probs_TE.shape[1]
    total = routing.counts_E.sum().clamp(min=1)
    f_E = routing.counts_E.float() / total
    P_E = routing.probs_TE.mean(dim=0)
    return E * torch.sum(f_E * P_E)


def z_loss(routing: Routing) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition of the gate logits."""
    return torch.logsumexp(routing.logits_TE, dim=-1).pow(2).mean()


__all__ = [
    "Routing",
    "balance_bias_step",
    "capacity_for",
    "expert_counts",
    "load_balancing_loss",
    "route",
    "topk_choice",
    "z_loss",
]
