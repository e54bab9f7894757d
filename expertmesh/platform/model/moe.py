"""The MoE layer: gate -> router -> dispatcher -> combine, plus its losses and routing report."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from expertmesh.platform.config import ModelConfig
from expertmesh.platform.model.dispatch import Dispatcher, LocalDispatcher
from expertmesh.platform.model.experts import ExpertBank
from expertmesh.platform.model.gates import Routing, load_balancing_loss, route, z_loss


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
        self.n_experts = E = cfg.experts_in(layer)
        self.gate = nn.Linear(cfg.d_model, E, bias=False)
        self.experts = ExpertBank(E, cfg.d_model, cfg.d_ff) if with_experts else None
        self.expert_bias: torch.Tensor | None  # (E,) selection-only bias; see balance_bias_rate
        if cfg.balance_bias_rate > 0:
            # NOTE: a buffer, not a parameter: no gradient reaches it and the optimizer never
            # sees it; training moves it by balance_bias_step. It is in the state dict, so
            # checkpoints keep it and serving (the same forward) applies it. Keep it float32
            # (assemble_model casts parameters only): steps of ~1e-3 vanish in bfloat16 at ~1.
            self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
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
        """gate -> route -> experts (through ``dispatcher``, else this layer's own experts) ->
        combine, for the tokens of ``x_BTD``; ``valid_BT`` (bool) leaves padding out."""
        B, T, D = x_BTD.shape
        # the N tokens: all B*T, or the real ones in row-major order where valid_BT marks them
        x_ND = (x_BTD if valid_BT is None else x_BTD[valid_BT]).reshape(-1, D)
        ids_N = None
        if token_ids_BT is not None:
            ids_N = token_ids_BT.reshape(-1) if valid_BT is None else token_ids_BT[valid_BT]
        routing = route(
            self.cfg,
            self.gate(x_ND),
            training=self.training,
            token_ids_T=ids_N,
            select_bias_E=self.expert_bias,
        )
        if dispatcher is None:
            if self.experts is None:
                raise RuntimeError(f"MoE layer {self.layer} holds no experts; pass a dispatcher")
            dispatcher = LocalDispatcher({self.layer: self.experts})
        y_ND = dispatcher.dispatch(self.layer, x_ND, routing)  # experts backend + combine
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
