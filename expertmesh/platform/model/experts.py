"""SwiGLU experts and the backends that run expert-sorted tokens through them.

The same backends serve training (in-process dispatch) and expert shard actors (Ray dispatch).
Shapes: E experts, F expert FFN width, D model width, A assignments (rows sorted by expert).

A backend is chosen once, when an :class:`ExpertBank` is built or moved to another device, or
when an expert shard loads its experts (:func:`select_backend`), never per call:

- ``torch``: one pair of matmuls per non-empty expert slice; any device, differentiable.
- ``grouped_mm``: two grouped GEMMs over all slices (``F.grouped_mm``), with the slice offsets
  computed on the device: no host sync, and the same few kernels whatever the expert count.
  CUDA devices of compute capability 8.0 or later, inference only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

# Either one stacked tensor per matrix, (E, 2F, D) and (E, D, F), or one tensor per expert.
ExpertWeights = torch.Tensor | Sequence[torch.Tensor]


class ExpertsBackend(Protocol):
    """Runs ``counts_E[e]`` consecutive rows of ``x_AD`` through expert ``e``."""

    name: str

    def __call__(
        self,
        x_AD: torch.Tensor,
        counts_E: torch.Tensor,
        w13_EFD: ExpertWeights,
        w2_EDF: ExpertWeights,
    ) -> torch.Tensor: ...


def run_experts(
    x_AD: torch.Tensor, counts: Sequence[int], w13_EFD: ExpertWeights, w2_EDF: ExpertWeights
) -> torch.Tensor:
    """Run ``counts[e]`` consecutive rows of ``x_AD`` through expert ``e``; rows sorted by expert.

    ``w13_EFD`` stacks each expert's gate (w1) and up (w3) projections as (2F, D) so one matmul
    per slice does both. One matmul pair per non-empty slice: no loop over tokens and no
    (tokens x experts x D) tensor. Written without ``out=`` so autograd differentiates it.
    """
    outs = []
    for e, x_nD in enumerate(torch.split(x_AD, list(counts))):
        if x_nD.shape[0] == 0:
            continue
        gate_nF, up_nF = F.linear(x_nD, w13_EFD[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate_nF) * up_nF, w2_EDF[e]))
    return torch.cat(outs) if outs else x_AD.new_zeros(x_AD.shape)


class TorchExperts:
    """The ``torch`` backend: :func:`run_experts` with the counts read once."""

    name = "torch"

    def __call__(
        self,
        x_AD: torch.Tensor,
        counts_E: torch.Tensor,
        w13_EFD: ExpertWeights,
        w2_EDF: ExpertWeights,
    ) -> torch.Tensor:
        return run_experts(x_AD, counts_E.tolist(), w13_EFD, w2_EDF)


class GroupedMMExperts:
    """The ``grouped_mm`` backend: two grouped GEMMs over the expert-sorted rows."""

    name = "grouped_mm"

    def __call__(
        self,
        x_AD: torch.Tensor,
        counts_E: torch.Tensor,
        w13_EFD: ExpertWeights,
        w2_EDF: ExpertWeights,
    ) -> torch.Tensor:
        if not isinstance(w13_EFD, torch.Tensor) or not isinstance(w2_EDF, torch.Tensor):
            raise TypeError("the grouped_mm backend takes stacked (E, ...) expert weights")
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        x_AD = x_AD.to(w13_EFD.dtype)
        h_A2F = F.grouped_mm(x_AD, w13_EFD.transpose(1, 2), offs=offs_E)
        gate_AF, up_AF = h_A2F.chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate_AF) * up_AF, w2_EDF.transpose(1, 2), offs=offs_E)


def select_backend(device: torch.device | str, *, stacked: bool = True) -> ExpertsBackend:
    """The experts backend for weights on ``device``: ``grouped_mm`` where PyTorch has a grouped
    GEMM for that device and the weights are stacked, else ``torch``."""
    device = torch.device(device)
    if (
        stacked
        and device.type == "cuda"
        and hasattr(F, "grouped_mm")
        and torch.cuda.get_device_capability(device) >= (8, 0)
    ):
        return GroupedMMExperts()
    return TorchExperts()


class ExpertBank(nn.Module):
    """The E experts of one MoE layer, stacked: ``w13`` (E, 2F, D) and ``w2`` (E, D, F)."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.backend = select_backend(self.w13.device)

    def _apply(self, fn, recurse=True):  # nn.Module hook behind .to() / .cuda() / .half()
        super()._apply(fn, recurse)
        self.backend = select_backend(self.w13.device)  # a device move picks the backend again
        return self

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w13, std=std)
        nn.init.normal_(self.w2, std=out_std)

    def run(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The experts on expert-sorted rows, ``counts_E[e]`` rows each (a tensor on the rows'
        device). Training (a gradient wanted) takes the differentiable :func:`run_experts`;
        inference the bank's backend."""
        if torch.is_grad_enabled() and (x_AD.requires_grad or self.w13.requires_grad):
            return run_experts(x_AD, counts_E.tolist(), self.w13, self.w2)
        return self.backend(x_AD, counts_E, self.w13, self.w2)

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
