"""add_expert's core: growing layers, the new experts' initialisation, training only them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertmesh.platform.config import ModelConfig
from expertmesh.platform.data import TokenData
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.grow import (
    GrowConfig,
    domain_stats,
    grow,
    leak,
    new_expert_share,
    train_new_experts,
    verify_unchanged,
)
from expertmesh.platform.model import MoETransformer

CFG = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, n_experts=4
)


def parent_model(seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(CFG).eval()


def domains(seed: int = 0) -> tuple[TokenData, TokenData]:
    """A 'new' domain on tokens 40-63 and two base domains on 0-19 and 20-39."""
    rng = np.random.default_rng(seed)
    new = TokenData({"legal": rng.integers(40, 64, 4000, dtype=np.int32)}, 64)
    base = TokenData(
        {
            "shakespeare": rng.integers(0, 20, 4000, dtype=np.int32),
            "python": rng.integers(20, 40, 1000, dtype=np.int32),
        },
        64,
    )
    return new, base


def grown(per_layer: int = 1, layers=(0, 1)):
    parent = parent_model()
    new, base = domains()
    gen = torch.Generator().manual_seed(0)
    new_b = [new.sample(4, 16, gen)[:, :-1] for _ in range(2)]
    base_b = [base.sample(4, 16, gen)[:, :-1] for _ in range(2)]
    stats = domain_stats(parent, new_b, base_b, layers)
    child, added = grow(parent, layers, per_layer, stats)
    return parent, child, added, stats


def test_grown_layers_keep_the_old_and_start_the_new_from_the_domain() -> None:
    parent, child, added, stats = grown()
    assert added == {0: [4], 1: [4]}
    assert child.cfg.layer_experts == {0: 5, 1: 5}
    verify_unchanged(parent, child, added)
    for layer in (0, 1):
        src = int(torch.argmax(stats.picks_E[layer]))  # the expert the domain picks most
        p, c = parent.moe_layers()[layer], child.moe_layers()[layer]
        assert torch.equal(c.experts.w13[4], p.experts.w13[src])
        assert torch.equal(c.experts.w2[4], p.experts.w2[src])
        row, old = c.gate.weight[4].double(), p.gate.weight.double()
        proto = stats.mean_new_D[layer] - stats.mean_base_D[layer]
        torch.testing.assert_close(row.norm(), old.norm(dim=1).mean(), rtol=1e-6, atol=0)
        cos = torch.nn.functional.cosine_similarity(row, proto, dim=0)
        assert cos > 0.9999


def test_several_new_experts_start_apart() -> None:
    _, child, added, _ = grown(per_layer=2, layers=(1,))
    assert added == {1: [4, 5]} and child.cfg.experts_in(0) == 4
    gate = child.moe_layers()[1].gate.weight
    assert not torch.equal(gate[4], gate[5])


def test_a_token_that_picks_no_new_expert_gets_its_parents_output() -> None:
    """Renormalised top-k: the weights come from the chosen logits alone, so a token whose
    top-k is all old experts is computed as in the parent. Tolerance: float32 rounding only
    (the gate's matrix has one more row, so its GEMM may sum in another order)."""
    parent, child, added, _ = grown()
    p, c = parent.moe_layers()[0], child.moe_layers()[0]
    torch.manual_seed(5)
    x_BTD = torch.randn(4, 16, 32)
    with torch.no_grad():
        y_parent, _ = p(x_BTD)
        y_child, st = c(x_BTD, return_routing=True)
    picked_new = torch.zeros(64, dtype=torch.bool)
    new_A = torch.isin(st.routing.expert_idx_A, torch.tensor(added[0]))
    picked_new[st.routing.token_idx_A[new_A]] = True
    assert 0 < int(picked_new.sum()) < 64  # both kinds of token are in the batch
    keep = ~picked_new
    torch.testing.assert_close(
        y_child.reshape(64, 32)[keep], y_parent.reshape(64, 32)[keep], rtol=1e-6, atol=1e-6
    )
    assert not torch.allclose(
        y_child.reshape(64, 32)[picked_new], y_parent.reshape(64, 32)[picked_new]
    )


def test_training_moves_only_the_new_experts_and_gate_rows() -> None:
    parent, child, added, _ = grown()
    before = {k: v.clone() for k, v in child.state_dict().items()}
    new, base = domains(1)
    cfg = GrowConfig(steps=4, batch_size=4, replay_rows=4, seq_len=16, lr=1e-2, warmup_steps=0)
    history = train_new_experts(child, added, new, base, cfg)
    assert len(history) == 4 and all(np.isfinite(h["loss"]) for h in history)
    verify_unchanged(parent, child, added)  # bit for bit, raises otherwise
    after = child.state_dict()
    for layer in added:
        for name in ("gate.weight", "experts.w13", "experts.w2"):
            key = f"layers.{layer}.ffn.{name}"
            assert not torch.equal(after[key][4], before[key][4]), key
    assert all(p.requires_grad for p in child.parameters())  # hooks and freezing undone


def test_verify_unchanged_names_a_changed_tensor() -> None:
    parent, child, added, _ = grown()
    with torch.no_grad():
        child.moe_layers()[1].gate.weight[2, 0] += 1e-3  # an old row
    with pytest.raises(RuntimeError, match=r"layers\.1\.ffn\.gate\.weight changed"):
        verify_unchanged(parent, child, added)


def test_the_leak_penalty_keeps_base_tokens_off_the_new_experts() -> None:
    """Trained with a strong leak penalty, base-domain tokens pick the new experts less than
    trained without one, from the same start and data."""
    new, base = domains(2)
    gen = torch.Generator().manual_seed(9)
    base_eval = [base.sample(8, 16, gen)[:, :-1] for _ in range(2)]
    shares = {}
    for weight in (0.0, 20.0):
        _, child, added, _ = grown()
        cfg = GrowConfig(
            steps=25, batch_size=4, replay_rows=4, seq_len=16, lr=3e-2, warmup_steps=0,
            leak_weight=weight,
        )  # fmt: skip
        train_new_experts(child, added, new, base, cfg)
        shares[weight] = sum(new_expert_share(child, base_eval, added).values())
    assert shares[20.0] < shares[0.0]


def test_leak_is_the_new_experts_probability_on_base_rows() -> None:
    _, child, added, _ = grown()
    tokens_BT = torch.randint(0, 64, (3, 8))
    out = child(tokens_BT, return_routing=True)
    base_B = torch.tensor([False, True, True])
    got = leak(out, added, base_B)
    want = torch.stack(
        [st.router.probs_TE.view(3, 8, -1)[1:, :, 4].mean() for st in out.layer_stats]
    ).mean()
    torch.testing.assert_close(got, want)
    assert float(leak(out, added, torch.zeros(3, dtype=torch.bool))) == 0.0


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"per_layer": 0}, "per_layer"),
        ({"leak_weight": -1.0}, "leak_weight"),
        ({"lr": 0}, "lr"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_grow_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        GrowConfig(**kwargs)
    assert err.value.field == field


def test_layers_outside_the_model_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"\[7\] are not MoE layers"):
        GrowConfig(layers=(0, 7)).grown_layers(CFG)
