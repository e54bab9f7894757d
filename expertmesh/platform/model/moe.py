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
from expertmesh.platform.model.routers import (
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
        if valid_BT is None:
            x_ND = x_BTD.reshape(B * T, D)  # N = B*T tokens
            ids_N = None if token_ids_BT is None else token_ids_BT.reshape(-1)
        else:
            x_ND = x_BTD[valid_BT]  # N = number of real tokens, row-major order
            ids_N = None if token_ids_BT is None else token_ids_BT[valid_BT]
        fused = self._fused(x_ND) if dispatcher is None else None
        if isinstance(fused, tuple):
            y_ND, routing = fused
        else:  # the fused path may have computed the logits before it declined
            logits_ND = self._gate_logits(x_ND) if fused is None else fused
            routing = route(
                self.cfg,
                logits_ND.to(self.gate.weight.dtype),
                training=self.training,
                token_ids_T=ids_N,
                select_bias_E=self.expert_bias,
            )
            y_ND = self._dispatch(x_ND, routing, dispatcher)
        if self.cfg.routed_scale != 1.0:
            y_ND = y_ND * self.cfg.routed_scale
        stats = LayerStats(
            layer=self.layer,
            counts_E=routing.counts_E,
            router=routing,
            recorded=return_routing,
        )
        if valid_BT is None:
            return y_ND.view(B, T, D), stats
        y_BTD = x_BTD.new_zeros(B, T, D)
        y_BTD[valid_BT] = y_ND.to(y_BTD.dtype)
        return y_BTD, stats

    def _gate_logits(self, x_ND: torch.Tensor) -> torch.Tensor:
        """The gate's logits: ``self.gate(x_ND)``, or in bfloat16 inference on the CPU the
        native gate with the same bits (float32 holding them; see
        :func:`kernels.native_gate_block`): ~32 us instead of PyTorch's ~77 us right after a
        decode step's expert weights went through the caches (6.6 against 17.5 us warm)."""
        w = self.gate.weight
        if (
            x_ND.dtype == w.dtype == torch.bfloat16
            and x_ND.device.type == "cpu"
            and not self.training
            and not torch.is_grad_enabled()
        ):
            block = kernels.native_gate_block(w.shape[1], w.shape[0])
            if block is not None:
                return kernels.gate_logits(x_ND, w, block)
        return self.gate(x_ND)

    def _dispatch(
        self, x_ND: torch.Tensor, routing: Routing, dispatcher: Dispatcher | None
    ) -> torch.Tensor:
        if dispatcher is None:
            if self.experts is None:
                raise RuntimeError(f"MoE layer {self.layer} holds no experts; pass a dispatcher")
            dispatcher = LocalDispatcher({self.layer: self.experts})
        return dispatcher.dispatch(self.layer, x_ND, routing)

    def _fused(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, Routing] | torch.Tensor | None:
        """Inference on this layer's own experts for few tokens in one native call
        (:func:`kernels.moe_layer_topk`): the gate (natively in bfloat16 where
        :func:`kernels.native_gate_block` found ``F.linear``'s bits, else PyTorch's), the top-k
        choice (:func:`kernels.route_topk` where :func:`kernels.native_route_ok` found
        ``topk_choice``'s bits, else PyTorch's), then sort, gather, experts and combine: bit for
        bit the numbers of the general path without its ~15 small tensor ops (the caller
        passes no dispatcher). Returns ``(y_ND, routing)``; the logits where it computed them
        and then declined (a slice larger than :func:`run_experts` gives the kernel, found
        before the experts run); None where it does not apply: training or autograd, another
        router or a capacity limit, activations of another dtype than the experts', weights
        the native kernel does not take, or more than :data:`FUSED_MAX_ASSIGNMENTS`
        assignments."""
        cfg, experts = self.cfg, self.experts
        if (
            experts is None
            or self.training
            or torch.is_grad_enabled()
            or cfg.router != "topk"
            or cfg.capacity_factor is not None
            or x_ND.shape[0] * cfg.top_k > FUSED_MAX_ASSIGNMENTS
            or x_ND.device.type != "cpu"
            or not envs.fused_moe()
        ):
            return None
        ptrs = experts.fused_pointers(x_ND.dtype)
        if ptrs is None:
            return None
        k, w = cfg.top_k, self.gate.weight
        done = None
        if kernels.native_route_ok(cfg.n_experts, k):
            block = (
                kernels.native_gate_block(w.shape[1], w.shape[0])
                if x_ND.dtype == w.dtype == torch.bfloat16
                else None
            )
            logits_NE, done = kernels.moe_layer_topk(
                x_ND,
                k,
                *ptrs,
                gate_w=None if block is None else w,
                gate_block=block or 0,
                logits_TE=None if block is not None else self._gate_logits(x_ND).float(),
                bias_E=None if self.expert_bias is None else self.expert_bias.float(),
            )
        else:
            logits_NE = self._gate_logits(x_ND).float()
        if done is None:  # PyTorch's choice (no native routing here, or a tie or NaN)
            expert_NK, weight_NK = topk_choice(logits_NE, k, self.expert_bias)
            done = kernels.moe_topk_experts(x_ND, expert_NK, weight_NK, *ptrs)
            if done is None:
                return logits_NE
        y_ND, token_A, expert_A, weight_A, counts_E = done
        routing = Routing(
            token_idx_A=token_A,
            expert_idx_A=expert_A,
            weight_A=weight_A,
            counts_E=counts_E,
            n_tokens=x_ND.shape[0],
            n_dropped=0,
            logits_TE=logits_NE,
        )
        return y_ND, routing
