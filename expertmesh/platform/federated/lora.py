"""LoRA adapters on every expert, a per-client expert budget and FLAME's output scale.

A client of the federation holds the whole frozen MoE and trains only low-rank deltas on each
expert's w1, w3 and w2 (``W' = W + (alpha / r) * B @ A``), plus one learned scalar ``s`` that
multiplies every MoE layer's output. The adapters never copy the base weights: the experts run
as ``x W^T + (alpha / r) (x A^T) B^T`` on the expert-sorted rows, through the same
``Dispatcher`` interface the model uses for its own experts.

Shapes: E experts, F expert FFN width, D model width, R LoRA rank, A assignments.

Why ``s`` (FLAME, arXiv 2506.16600, "rescaling"): a client that activates fewer experts per
token than the model was trained with gets an MoE output of a different magnitude; a learned
scalar per client absorbs that, so the shared adapters need not. It starts at 1 (the top-k
weights are renormalised, so at k = top_k the output is the base model's exactly) and is the
client's own: it is not aggregated. One scalar, not one per layer, so a client-budget
deployment is the merged checkpoint with ``top_k = k_i`` and ``routed_scale *= s_i``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.platform.errors import ConfigError
from expertmesh.platform.model import MoETransformer
from expertmesh.platform.model.dispatch import combine, permute
from expertmesh.platform.model.experts import ExpertBank
from expertmesh.platform.model.gates import Routing

# (layer, tensor name) -> stacked tensor over the layer's experts, e.g. (1, "a1") -> (E, R, D)
Adapters = dict[tuple[int, str], torch.Tensor]
ADAPTER_NAMES = ("a1", "b1", "a3", "b3", "a2", "b2")


@dataclass(kw_only=True, slots=True, frozen=True)
class LoRAConfig:
    """Rank and scaling of the expert adapters (``alpha / rank`` multiplies ``B @ A``)."""

    rank: int = 4
    alpha: float = 8.0
    init_seed: int = 0  # the A matrices' initialisation: the same on the server and every client

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError("lora.rank", f"must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise ConfigError("lora.alpha", f"must be a number, got {self.alpha!r}")
        if self.alpha <= 0:
            raise ConfigError("lora.alpha", f"must be positive, got {self.alpha!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRABank(nn.Module):
    """Low-rank deltas for the E experts of one layer; the base bank is read, never copied."""

    def __init__(self, bank: ExpertBank, cfg: LoRAConfig, generator: torch.Generator) -> None:
        super().__init__()
        E, D, F_, R = bank.n_experts, bank.d_model, bank.d_ff, cfg.rank
        self.base = [bank]  # NOTE: a list hides the frozen bank from parameters()/state_dict()
        self.scaling = cfg.scaling
        # NOTE: standard LoRA init: A random, B zero, so a fresh adapter is an exact no-op
        std = 1.0 / math.sqrt(D)
        self.a1 = nn.Parameter(torch.randn(E, R, D, generator=generator) * std)
        self.b1 = nn.Parameter(torch.zeros(E, F_, R))
        self.a3 = nn.Parameter(torch.randn(E, R, D, generator=generator) * std)
        self.b3 = nn.Parameter(torch.zeros(E, F_, R))
        self.a2 = nn.Parameter(torch.randn(E, R, F_, generator=generator) / math.sqrt(F_))
        self.b2 = nn.Parameter(torch.zeros(E, D, R))

    def _delta(self, x_nK: torch.Tensor, a_RK: torch.Tensor, b_OR: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x_nK, a_RK), b_OR) * self.scaling

    def run(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The adapted experts on expert-sorted rows, ``counts[e]`` rows each."""
        bank = self.base[0]
        w1_EFD, w3_EFD = bank.w13.split(bank.d_ff, dim=1)
        outs = []
        for e, x_nD in enumerate(torch.split(x_AD, counts)):
            if x_nD.shape[0] == 0:
                continue
            gate_nF = F.linear(x_nD, w1_EFD[e]) + self._delta(x_nD, self.a1[e], self.b1[e])
            up_nF = F.linear(x_nD, w3_EFD[e]) + self._delta(x_nD, self.a3[e], self.b3[e])
            h_nF = F.silu(gate_nF) * up_nF
            outs.append(F.linear(h_nF, bank.w2[e]) + self._delta(h_nF, self.a2[e], self.b2[e]))
        return torch.cat(outs) if outs else x_AD.new_zeros(x_AD.shape)

    @torch.no_grad()
    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w13_EFD, w2_EDF)`` with the deltas folded in (new tensors; the base is untouched)."""
        bank = self.base[0]
        delta1_EFD = torch.bmm(self.b1, self.a1) * self.scaling
        delta3_EFD = torch.bmm(self.b3, self.a3) * self.scaling
        delta2_EDF = torch.bmm(self.b2, self.a2) * self.scaling
        w13 = bank.w13 + torch.cat([delta1_EFD, delta3_EFD], dim=1).to(bank.w13.dtype)
        return w13, bank.w2 + delta2_EDF.to(bank.w2.dtype)


class LoRAMoE(nn.Module):
    """Adapters for every MoE layer of a frozen model, its budget ``k`` and output scale ``s``.

    Use :meth:`forward` (or pass ``self`` as the model's dispatcher inside :meth:`budget`).
    """

    def __init__(self, model: MoETransformer, cfg: LoRAConfig) -> None:
        super().__init__()
        self.model = [model]  # NOTE: not a submodule: only the adapters and s are this module's
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.init_seed)
        banks = {}
        for layer, moe in model.moe_layers().items():
            if moe.experts is None:
                raise ValueError(f"MoE layer {layer} holds no experts to adapt")
            banks[str(layer)] = LoRABank(moe.experts, cfg, gen)
        self.banks = nn.ModuleDict(banks)
        self.scale = nn.Parameter(torch.ones(()))
        for p in model.parameters():
            p.requires_grad_(False)

    # --- the Dispatcher interface ---
    def dispatch(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        y_AD = self.banks[str(layer)].run(permute(x_TD, routing), routing.counts_E.tolist())
        return combine(y_AD, routing, x_TD.shape[0]) * self.scale.to(y_AD.dtype)

    def forward(self, tokens_BT: torch.Tensor, **kwargs):  # -> ModelOutput
        return self.model[0](tokens_BT, dispatcher=self, **kwargs)

    # --- the adapters as plain tensors: what travels between server and clients ---
    def adapters(self) -> Adapters:
        """A detached copy of every adapter tensor, keyed ``(layer, name)``."""
        return {
            (int(layer), name): getattr(bank, name).detach().clone()
            for layer, bank in self.banks.items()
            for name in ADAPTER_NAMES
        }

    @torch.no_grad()
    def load_adapters(self, adapters: Mapping[tuple[int, str], torch.Tensor]) -> None:
        want = {(int(layer), n) for layer in self.banks for n in ADAPTER_NAMES}
        if set(adapters) != want:
            raise ValueError(f"adapters for {sorted(set(adapters) ^ want)[:4]} do not match")
        for (layer, name), t in adapters.items():
            getattr(self.banks[str(layer)], name).copy_(t)

    @torch.no_grad()
    def merge_into(self, model: MoETransformer) -> MoETransformer:
        """Write base + deltas into ``model``'s experts (a model of the same shape, e.g. a
        fresh copy of the base); returns it. ``s`` is not folded in (see the module doc)."""
        moe = model.moe_layers()
        for layer, bank in self.banks.items():
            w13, w2 = bank.merged()
            moe[int(layer)].experts.w13.copy_(w13)
            moe[int(layer)].experts.w2.copy_(w2)
        return model


def check_budget(model_cfg, k: object, *, field: str) -> int:
    """``k`` as an expert budget for a model with ``model_cfg`` (1 .. the smallest layer's
    expert count; more than ``top_k`` is allowed), else a :class:`ConfigError` naming ``field``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(field, f"budget k must be a positive integer, got {k!r}")
    fewest = min(model_cfg.experts_in(layer) for layer in model_cfg.moe_layers)
    if k > fewest:
        raise ConfigError(field, f"budget k={k} exceeds the model's {fewest} experts per MoE layer")
    return k


@contextlib.contextmanager
def budget(model: MoETransformer, k: int) -> Iterator[None]:
    """Route every MoE layer of ``model`` to ``k`` experts per token (renormalised top-k) while
    inside; only routing changes (``top_k`` is all :func:`~expertmesh.platform.model.gates.route`
    reads from it)."""
    moe = model.moe_layers()
    before = {layer: m.cfg for layer, m in moe.items()}
    for m in moe.values():
        m.cfg = dataclasses.replace(m.cfg, top_k=k)
    try:
        yield
    finally:
        for layer, m in moe.items():
            m.cfg = before[layer]
