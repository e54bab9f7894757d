"""SwiGLU experts and the one function that runs tokens through a group of them.

The same :func:`run_experts` serves training (in-process dispatch) and expert shard actors
(Ray dispatch). Shapes: E experts, F expert FFN width, D model width, A assignments.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def run_experts(
    x_AD: torch.Tensor, counts: list[int], w13_EFD: torch.Tensor, w2_EDF: torch.Tensor
) -> torch.Tensor:
    """Run ``counts[e]`` consecutive rows of ``x_AD`` through expert ``e``; rows sorted by expert.

    ``w13_EFD`` stacks each expert's gate (w1) and up (w3) projections as (E, 2F, D) so one
    matmul per expert slice does both. One batched matmul pair per non-empty slice, no loop over
    tokens and no (tokens x experts x D) tensor.
    """
    out_AD = torch.empty_like(x_AD)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        x_nD = x_AD[start : start + n]
        gate_nF, up_nF = (x_nD @ w13_EFD[e].t()).chunk(2, dim=-1)
        torch.matmul(F.silu(gate_nF) * up_nF, w2_EDF[e].t(), out=out_AD[start : start + n])
        start += n
    return out_AD


def run_experts_autograd(
    x_AD: torch.Tensor, counts: list[int], w13_EFD: torch.Tensor, w2_EDF: torch.Tensor
) -> torch.Tensor:
    """:func:`run_experts` written without ``out=`` so autograd can differentiate it."""
    outs = []
    for e, x_nD in enumerate(torch.split(x_AD, counts)):
        if x_nD.shape[0] == 0:
            continue
        gate_nF, up_nF = (x_nD @ w13_EFD[e].t()).chunk(2, dim=-1)
        outs.append((F.silu(gate_nF) * up_nF) @ w2_EDF[e].t())
    return torch.cat(outs) if outs else x_AD.new_zeros(x_AD.shape)


class ExpertBank(nn.Module):
    """The E experts of one MoE layer, stacked: ``w13`` (E, 2F, D) and ``w2`` (E, D, F)."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, d_ff))

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w13, std=std)
        nn.init.normal_(self.w2, std=out_std)

    def forward(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if torch.is_grad_enabled() and (x_AD.requires_grad or self.w13.requires_grad):
            return run_experts_autograd(x_AD, counts, self.w13, self.w2)
        return run_experts(x_AD, counts, self.w13, self.w2)

    # --- per-expert views in the Hugging Face / checkpoint layout (w1 gate, w3 up, w2 down) ---
    def expert_tensors(self, e: int) -> dict[str, torch.Tensor]:
        w1, w3 = self.w13[e].detach().split(self.d_ff, dim=0)
        return {"w1": w1.contiguous(), "w3": w3.contiguous(), "w2": self.w2[e].detach().clone()}

    @torch.no_grad()
    def load_expert(self, e: int, tensors: dict[str, torch.Tensor]) -> None:
        self.w13[e].copy_(torch.cat([tensors["w1"], tensors["w3"]], dim=0))
        self.w2[e].copy_(tensors["w2"])


def init_std(d_model: int, n_layers: int, base: float) -> tuple[float, float]:
    """(std for input projections, std for output projections scaled by depth, GPT-2 style)."""
    return base, base / math.sqrt(2 * n_layers)
