"""The MoE layer: gate -> router -> dispatcher -> combine, plus its losses and routing report."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from expertmesh import envs
from expertmesh.platform.config import ModelConfig
from expertmesh.platform.model import kernels
from expertmesh.platform.model.dispatch import Dispatcher, LocalDispatcher
from expertmesh.platform.model.experts import KERNEL_MAX_ROWS_BLOCKED, ExpertBank
from expertmesh.platform.model.gates import (
    Routing,
    load_balancing_loss,
    route,
    topk_choice,
    z_loss,
)

# The fused inference path (MoELayer._fused) takes a layer's tokens when every expert slice
# stays within the blocked kernel's range whatever the routing: a decode step of up to 128
# tokens at top-2.
FUSED_MAX_ASSIGNMENTS = KERNEL_MAX_ROWS_BLOCKED
# the most tokens a native gate takes (MoELayer._native_gate): decode steps, where PyTorch's
# GEMM costs more in dispatch than in work; the float32 probe compares up to this many
NATIVE_GATE_MAX_TOKENS = 256


@dataclass(kw_only=True, slots=True)
class LayerStats:
    """What one MoE layer did in one forward pass.

    The router losses are computed on first use (training reads them; inference at a few tokens
    per step would pay ~10 small ops per layer for numbers nobody reads).
    """

    layer: int
    counts_E: torch.Tensor  # assignments per expert
    router: Routing = field(repr=False)  # the losses are computed from it
    recorded: bool = False  # the caller asked for the routing (routing reports)
    _aux_loss: torch.Tensor | None = field(default=None, init=False, repr=False)
    _z_loss: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def routing(self) -> Routing | None:
        """The routing, when the caller asked for it (``return_routing=True``)."""
        return self.router if self.recorded else None

    @property
    def dropped_fraction(self) -> float:
        """Share of assignments the capacity limit dropped (reading it syncs a tensor)."""
        return self.router.dropped_fraction

    @property
    def aux_loss(self) -> torch.Tensor:
        """Switch load-balancing loss (unweighted)."""
        if self._aux_loss is None:
            self._aux_loss = load_balancing_loss(self.router)
        return self._aux_loss

    @property
    def z_loss(self) -> torch.Tensor:
        """Router z-loss (unweighted)."""
        if self._z_loss is None:
            self._z_loss = z_loss(self.router)
        return self._z_loss

    def load_fractions(self) -> list[float]:
        total = max(int(self.counts_E.sum()), 1)
        return [int(c) / total for c in self.counts_E]

    def experts_per_token(self) -> list[list[int]]:
        """For each token (flattened B*T order), the experts that served it."""
        if self.routing is None:
            raise ValueError("routing was not recorded; call the model with return_routing=True")
        out: list[list[int]] = [[] for _ in range(self.routing.n_tokens)]
        for t, e in zip(
            self.routing.token_idx_A.tolist(), self.routing.expert_idx_A.tolist(), strict=True
        ):
            out[t].append(e)
        return out


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, with_experts: bool = True) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.gate = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = ExpertBank(cfg.n_experts, cfg.d_model, cfg.d_ff) if with_experts else None
        self.expert_bias: torch.Tensor | None  # (E,) selection-only bias; see balance_bias_rate
        if cfg.balance_bias_rate > 0:
            # NOTE: a buffer, not a parameter: no gradient reaches it and the optimizer never
            # sees it; training moves it by balance_bias_step. It is in the state dict, so
            # checkpoints keep it and serving (the same forward) applies it. Keep it float32
            # (assemble_model casts parameters only): steps of ~1e-3 vanish in bfloat16 at ~1.
            self.register_buffer("expert_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        token_ids_BT: torch.Tensor | None = None,
        dispatcher: Dispatcher | None = None,
        return_routing: bool = False,
        valid_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LayerStats]:
        """Route and run the tokens of ``x_BTD``; ``valid_BT`` (bool) leaves padding out."""
        B, T, D = x_BTD.shape
        # the N tokens: all B*T, or the real ones in row-major order where valid_BT marks them
        x_in = x_BTD if valid_BT is None else x_BTD[valid_BT]
        fused = self._fused(x_in) if dispatcher is None else None
        if isinstance(fused, tuple):
            y, routing = fused  # in x_in's shape
        else:  # the fused path may have computed the logits before it declined
            x_ND = x_in.reshape(-1, D)
            ids_N = None
            if token_ids_BT is not None:
                ids_N = token_ids_BT.reshape(-1) if valid_BT is None else token_ids_BT[valid_BT]
            logits_ND = self._gate_logits(x_ND) if fused is None else fused
            routing = route(
                self.cfg,
                logits_ND.to(self.gate.weight.dtype),
                training=self.training,
                token_ids_T=ids_N,
                select_bias_E=self.expert_bias,
            )
            y = self._dispatch(x_ND, routing, dispatcher)
        if self.cfg.routed_scale != 1.0:
            y = y * self.cfg.routed_scale
        stats = LayerStats(
            layer=self.layer,
            counts_E=routing.counts_E,
            router=routing,
            recorded=return_routing,
        )
        if valid_BT is None:
            return (y if isinstance(fused, tuple) else y.view(B, T, D)), stats
        y_BTD = x_BTD.new_zeros(B, T, D)
        y_BTD[valid_BT] = y.reshape(-1, D).to(y_BTD.dtype)
        return y_BTD, stats

    def _gate_logits(self, x_ND: torch.Tensor) -> torch.Tensor:
        """The gate's logits: ``self.gate(x_ND)``, or where :meth:`_native_gate` finds one,
        the native gate with the same bits (float32 holding them)."""
        block = self._native_gate(x_ND)
        if block is None:
            return self.gate(x_ND)
        w = self.gate.weight
        return kernels.gate_logits(x_ND, w, block) if block else kernels.gate_logits_f32(x_ND, w)

    def _native_gate(self, x_ND: torch.Tensor) -> int | None:
        """In CPU inference, where a native gate gives ``F.linear``'s bits for this gate: the
        bfloat16 one's piece (:func:`kernels.native_gate_block`), or 0 for the float32 one
        (:func:`kernels.native_gate_f32_ok`); else None (PyTorch's gate). Why: right after a
        decode step's expert weights went through the caches PyTorch's gate costs ~60-77 us
        of a cold 16-token layer (dispatch and the GEMM's code cold), these a few us. Up to
        :data:`NATIVE_GATE_MAX_TOKENS` tokens: the native gates run on one core, PyTorch's
        GEMM on all, and a prefill's gate is a small part of its layer anyway."""
        w = self.gate.weight
        if (
            x_ND.dtype != w.dtype
            or x_ND.device.type != "cpu"
            or self.training
            or torch.is_grad_enabled()
            or x_ND.numel() > NATIVE_GATE_MAX_TOKENS * w.shape[1]
        ):
            return None
        D, E = w.shape[1], w.shape[0]
        if w.dtype == torch.bfloat16:
            return kernels.native_gate_block(D, E)
        if w.dtype == torch.float32 and kernels.native_gate_f32_ok(D, E):
            return 0
        return None

    def _dispatch(
        self, x_ND: torch.Tensor, routing: Routing, dispatcher: Dispatcher | None
    ) -> torch.Tensor:
        if dispatcher is None:
            if self.experts is None:
                raise RuntimeError(f"MoE layer {self.layer} holds no experts; pass a dispatcher")
            dispatcher = LocalDispatcher({self.layer: self.experts})
        return dispatcher.dispatch(self.layer, x_ND, routing)

    def _fused(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing] | torch.Tensor | None:
        """Inference on this layer's own experts for few tokens ``x`` (..., D) in one native call
        (:func:`kernels.moe_layer_topk`): the gate (natively where :meth:`_native_gate` finds
        one with ``F.linear``'s bits, else PyTorch's), the top-k choice
        (:func:`kernels.route_topk` where :func:`kernels.native_route_ok` found
        ``topk_choice``'s bits, else PyTorch's), then sort, gather, experts and combine: bit for
        bit the numbers of the general path without its ~15 small tensor ops (the caller
        passes no dispatcher). Returns ``(y, routing)``, ``y`` in ``x``'s shape; the logits
        (N, E) where it computed them and then declined (a slice larger than
        :func:`run_experts` gives the kernel, found before the experts run); None where it does
        not apply: training or autograd, another router or a capacity limit, activations of
        another dtype than the experts', weights the native kernel does not take, or more than
        :data:`FUSED_MAX_ASSIGNMENTS` assignments."""
        cfg, experts = self.cfg, self.experts
        D = x.shape[-1]
        N = x.numel() // D if D else 0
        if (
            experts is None
            or self.training
            or torch.is_grad_enabled()
            or cfg.router != "topk"
            or cfg.capacity_factor is not None
            or N * cfg.top_k > FUSED_MAX_ASSIGNMENTS
            or x.device.type != "cpu"
            or not envs.fused_moe()
        ):
            return None
        ptrs = experts.fused_pointers(x.dtype)
        if ptrs is None:
            return None
        k, w = cfg.top_k, self.gate.weight
        bias = None if self.expert_bias is None else self.expert_bias.float()
        done = None
        if kernels.native_route_ok(cfg.n_experts, k):
            block = self._native_gate(x)
            logits_NE, done = kernels.moe_layer_topk(
                x,
                k,
                *ptrs,
                gate_w=None if block is None else w,
                gate_block=block or 0,
                logits_TE=None if block is not None else self.gate(x).reshape(N, -1).float(),
                bias_E=bias,
            )
        else:
            logits_NE = self._gate_logits(x.reshape(N, D)).float()
        if done is None:  # PyTorch's choice (no native routing here, or a tie it leaves)
            expert_NK, weight_NK = topk_choice(logits_NE, k, self.expert_bias)
            done = kernels.moe_topk_experts(x.reshape(N, D), expert_NK, weight_NK, *ptrs)
            if done is None:
                return logits_NE
            done = (done[0].view(x.shape), *done[1:])
        y, token_A, expert_A, weight_A, counts_E = done
        routing = Routing(
            token_idx_A=token_A,
            expert_idx_A=expert_A,
            weight_A=weight_A,
            counts_E=counts_E,
            n_tokens=N,
            n_dropped=0,
            logits_TE=logits_NE,
        )
        return y, routing
