"""Mixtral-style decoder-only MoE language model (single device, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.platform.config import ModelConfig
from expertmesh.platform.model.dispatch import Dispatcher
from expertmesh.platform.model.experts import init_std
from expertmesh.platform.model.layers import (
    Attention,
    CacheStep,
    KVCache,
    RMSNorm,
    Rotary,
    SwiGLU,
)
from expertmesh.platform.model.moe import LayerStats, MoELayer


@dataclass(kw_only=True, slots=True)
class ModelOutput:
    """Logits and per-layer routing stats; the router losses are computed when read (training
    reads them; a serving step would pay a dozen small ops per MoE layer for nothing)."""

    logits: torch.Tensor  # (B, T, V)
    layer_stats: list[LayerStats] = field(default_factory=list)

    @property
    def aux_loss(self) -> torch.Tensor:
        """Switch load-balancing loss, mean over MoE layers, unweighted (0 with none)."""
        return self._mean([s.aux_loss for s in self.layer_stats])

    @property
    def z_loss(self) -> torch.Tensor:
        """Router z-loss, mean over MoE layers, unweighted (0 with none)."""
        return self._mean([s.z_loss for s in self.layer_stats])

    def _mean(self, losses: list[torch.Tensor]) -> torch.Tensor:
        if not losses:
            return self.logits.new_zeros((), dtype=torch.float32)
        return torch.stack(losses).mean()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, with_experts: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn: MoELayer | SwiGLU = (
            MoELayer(cfg, layer, with_experts)
            if self.is_moe
            else SwiGLU(cfg.d_model, cfg.d_ff_dense or cfg.d_ff)
        )


class MoETransformer(nn.Module):
    """Decoder LM whose MoE layers hand routed tokens to a :class:`Dispatcher`.

    ``with_experts=False`` builds the dense part only (the serving router's copy): its MoE
    layers then need a dispatcher that reaches experts held elsewhere.
    """

    def __init__(self, cfg: ModelConfig, *, with_experts: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i, with_experts) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std, out_std = init_std(self.cfg.d_model, self.cfg.n_layers, self.cfg.init_std)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            is_out = name.endswith(("o_proj.weight", "w2.weight", "experts.w2"))
            nn.init.normal_(p, std=out_std if is_out else std)

    def moe_layers(self) -> dict[int, MoELayer]:
        return {i: b.ffn for i, b in enumerate(self.layers) if isinstance(b.ffn, MoELayer)}

    def forward(
        self,
        tokens_BT: torch.Tensor,
        *,
        positions_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots_B: torch.Tensor | None = None,
        dispatcher: Dispatcher | None = None,
        return_routing: bool = False,
        last_only: bool = False,
        valid_BT: torch.Tensor | None = None,
        write_pos_BT: torch.Tensor | None = None,
        gather_B: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Run the decoder.

        Training passes ``tokens_BT`` alone. Generation passes a ``cache`` with ``slots_B``
        (one cache slot per row), ``positions_BT``, and for ragged batches ``valid_BT`` (real
        tokens), ``write_pos_BT`` (padding goes to the cache's scratch position) and
        ``gather_B`` (which position's logits each row needs; logits are then (B, 1, V)).
        """
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = torch.arange(T, device=tokens_BT.device).expand(B, T)
        h_BTD = self.embed_tokens(tokens_BT)
        rope = self.rotary(positions_BT, h_BTD.dtype)
        step = None
        if cache is not None:
            if slots_B is None:
                raise ValueError("generation with a cache needs slots_B (a cache slot per row)")
            step = CacheStep.build(positions_BT, slots_B, write_pos_BT)
        stats: list[LayerStats] = []
        for i, block in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            h_BTD = h_BTD + block.self_attn(
                block.input_layernorm(h_BTD), rope, positions_BT, kv, step=step
            )
            x_BTD = block.post_attention_layernorm(h_BTD)
            if isinstance(block.ffn, MoELayer):
                y_BTD, st = block.ffn(
                    x_BTD,
                    token_ids_BT=tokens_BT,
                    dispatcher=dispatcher,
                    return_routing=return_routing,
                    valid_BT=valid_BT,
                )
                stats.append(st)
            else:
                y_BTD = block.ffn(x_BTD)
            h_BTD = h_BTD + y_BTD
        if gather_B is not None:
            h_BTD = h_BTD[torch.arange(B, device=h_BTD.device), gather_B][:, None]
        elif last_only:
            h_BTD = h_BTD[:, -1:]
        logits = self.lm_head(self.norm(h_BTD))
        return ModelOutput(logits=logits, layer_stats=stats)

    def loss(self, out: ModelOutput, targets_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss to optimise, cross-entropy alone)."""
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), targets_BT.reshape(-1))
        total = ce + self.cfg.aux_loss_weight * out.aux_loss + self.cfg.z_loss_weight * out.z_loss
        return total, ce

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count; ``active=True`` counts only top-k experts per MoE layer."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            per_expert = 3 * self.cfg.d_model * self.cfg.d_ff
            for layer in self.moe_layers().values():
                total -= (layer.n_experts - self.cfg.top_k) * per_expert
        return total
