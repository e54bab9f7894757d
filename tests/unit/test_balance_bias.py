"""Auxiliary-loss-free load balancing: a selection-only expert bias and its per-step update."""

from __future__ import annotations

import pytest
import torch

from expertmesh.platform.config import ModelConfig, TrainConfig
from expertmesh.platform.model import MoELayer, MoETransformer, route
from expertmesh.platform.model.gates import balance_bias_step
from expertmesh.platform.training import make_optimizer, train_step

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, n_experts=4)


def cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, "top_k": 2, **overrides})


def selected(routing) -> list[set[int]]:
    """Each token's chosen experts."""
    out: list[set[int]] = [set() for _ in range(routing.n_tokens)]
    for t, e in zip(routing.token_idx_A.tolist(), routing.expert_idx_A.tolist(), strict=True):
        out[t].add(e)
    return out


def weights_TE(routing) -> torch.Tensor:
    """Gate weights as a dense (T, E) table, 0 where an expert was not chosen."""
    out = torch.zeros(routing.n_tokens, routing.counts_E.numel())
    out[routing.token_idx_A, routing.expert_idx_A] = routing.weight_A
    return out


def test_bias_changes_selection_but_weights_come_from_unbiased_logits() -> None:
    torch.manual_seed(0)
    logits_TE = torch.randn(64, 4)
    bias_E = torch.tensor([0.0, 0.0, 0.0, 100.0])  # every token must take expert 3
    plain = route(cfg(), logits_TE)
    biased = route(cfg(balance_bias_rate=0.01), logits_TE, select_bias_E=bias_E)
    assert all(3 in s for s in selected(biased))
    assert selected(biased) != selected(plain)  # the bias did change the selection
    # the weights: softmax over the chosen experts' *unbiased* logits (no 100 anywhere)
    w_TE = weights_TE(biased)
    for t, chosen in enumerate(selected(biased)):
        idx = sorted(chosen)
        want = logits_TE[t, idx].softmax(-1)
        assert torch.allclose(w_TE[t, idx], want, atol=1e-6)
    # tokens whose own top-2 already held expert 3 are routed and weighted exactly as without it
    same = [t for t, s in enumerate(selected(plain)) if 3 in s]
    assert same and torch.allclose(weights_TE(plain)[same], w_TE[same], atol=1e-6)


def test_noisy_topk_bias_selects_but_weights_are_the_unbiased_noisy_logits() -> None:
    c = cfg(router="noisy_topk", router_noise_std=1.0, balance_bias_rate=0.01)
    logits_TE = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    bias_E = torch.tensor([50.0, 0.0, 0.0, 0.0])
    noise = torch.Generator().manual_seed(7)
    r = route(c, logits_TE, training=True, generator=noise, select_bias_E=bias_E)
    noisy_TE = logits_TE + torch.randn(32, 4, generator=torch.Generator().manual_seed(7))
    w_TE = weights_TE(r)
    for t, chosen in enumerate(selected(r)):
        idx = sorted(chosen)
        assert 0 in chosen
        assert torch.allclose(w_TE[t, idx], noisy_TE[t, idx].softmax(-1), atol=1e-6)


def test_moe_layer_applies_its_bias_buffer() -> None:
    torch.manual_seed(0)
    assert MoELayer(cfg(), 0).expert_bias is None  # off: no buffer, the state dict is unchanged
    assert "expert_bias" not in MoELayer(cfg(), 0).state_dict()
    layer = MoELayer(cfg(balance_bias_rate=0.01), 0)
    layer.experts.reset_parameters(0.1, 0.1)
    assert layer.expert_bias.tolist() == [0.0] * 4 and "expert_bias" in layer.state_dict()
    x_BTD = torch.randn(2, 16, 32)
    with torch.no_grad():
        layer.expert_bias[1] = 100.0
        _, stats = layer(x_BTD, return_routing=True)
    assert all(1 in experts for experts in stats.experts_per_token())
    assert stats.counts_E[1] == 32


def test_update_step_moves_bias_against_the_load() -> None:
    bias_E = torch.zeros(4)
    balance_bias_step(bias_E, torch.tensor([10, 2, 2, 2]), 0.1)  # mean 4
    assert torch.allclose(bias_E, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    balance_bias_step(bias_E, torch.tensor([4, 4, 8, 0]), 0.1)  # at the mean: no move
    assert torch.allclose(bias_E, torch.tensor([-0.1, 0.1, 0.0, 0.2]))


def skewed_model(rate: float) -> MoETransformer:
    """A model whose gates prefer expert 0 for most tokens: every token embedding shares a large
    component on dimension 0, and each gate reads that dimension for expert 0 only."""
    torch.manual_seed(0)
    model = MoETransformer(cfg(balance_bias_rate=rate, aux_loss_weight=0.0, z_loss_weight=0.0))
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0.0, 1.0)
        model.embed_tokens.weight[:, 0] = 3.0
        for moe in model.moe_layers().values():
            moe.gate.weight.normal_(0.0, 32**-0.5)
            moe.gate.weight[:, 0] = 0.0
            moe.gate.weight[0, 0] = 0.6
    return model


def busiest_share(model: MoETransformer, batches: list[torch.Tensor], rate: float) -> float:
    """Train on ``batches``; the largest share of a layer's assignments one expert took, averaged
    over the last 10 steps."""
    tc = TrainConfig(steps=len(batches), batch_size=8, seq_len=32, lr=1e-3, warmup_steps=0)
    optimizer = make_optimizer(model, tc)
    shares = []
    for step, batch in enumerate(batches):
        metrics, stats = train_step(model, optimizer, batch, step, tc)
        shares.append(max(max(s.load_fractions()) for s in stats))
        assert ("expert_bias_max_abs/L0" in metrics) is (rate > 0)
    return sum(shares[-10:]) / 10


def test_training_with_bias_rate_balances_a_skewed_router() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (8, 33), generator=gen) for _ in range(60)]
    skewed = busiest_share(skewed_model(0.0), batches, 0.0)
    model = skewed_model(0.05)
    balanced = busiest_share(model, batches, 0.05)
    assert skewed > 0.4  # the setup is skewed (uniform: 0.25) and stays so without the bias
    assert balanced < 0.32 and balanced < skewed - 0.1
    for moe in model.moe_layers().values():  # the busy expert was pushed down, the others up
        assert moe.expert_bias[0] < 0 and moe.expert_bias.requires_grad is False
    assert not any("expert_bias" in n for n, _ in model.named_parameters())


def test_route_refuses_a_bias_for_routers_that_would_ignore_it() -> None:
    with pytest.raises(ValueError, match="selection bias"):
        route(cfg(router="expert_choice"), torch.randn(4, 4), select_bias_E=torch.zeros(4))
