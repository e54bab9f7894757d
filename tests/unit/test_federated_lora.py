"""LoRA adapters on the experts, the per-client budget, the output scale and the merge, on a
small real MoE; and one client's local training step. No cluster.

Tolerances: float32 on the CPU. A fresh adapter adds exact zeros (B = 0), so it matches the
base model to rounding (1e-6); the merge reorders a low-rank product ((x A^T) B^T against
x (B A)^T), so 1e-5 relative.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from expertmesh.platform.config import ModelConfig
from expertmesh.platform.data import TokenData
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.federated.local import evaluate_at, local_train
from expertmesh.platform.federated.lora import LoRAConfig, LoRAMoE, budget, check_budget
from expertmesh.platform.federated.strategy import TrainInstruction
from expertmesh.platform.model import MoETransformer

CFG = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, n_experts=4,
    top_k=2, max_seq_len=64,
)  # fmt: skip


def model() -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(CFG).eval()


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def perturb(lora: LoRAMoE) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.parameters():
            if p.dim() == 3:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def test_fresh_adapters_are_the_base_model_and_the_base_is_frozen() -> None:
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    lora = LoRAMoE(m, LoRAConfig(rank=2))
    x = tokens()
    torch.testing.assert_close(lora(x).logits, m(x).logits, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in m.parameters())
    assert {n for n, _ in lora.named_parameters()} >= {"scale", "banks.0.a1", "banks.1.b2"}
    assert all("w13" not in n and "gate" not in n for n, _ in lora.named_parameters())
    perturb(lora)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_merged_experts_reproduce_the_adapted_model() -> None:
    m = model()
    lora = LoRAMoE(m, LoRAConfig(rank=3, alpha=6))
    perturb(lora)
    merged = lora.merge_into(copy.deepcopy(m))
    x = tokens(2)
    torch.testing.assert_close(merged(x).logits, lora(x).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.layers[0].ffn.gate.weight, m.layers[0].ffn.gate.weight)


def test_a_budget_changes_routing_only_and_is_restored() -> None:
    m = model()
    x = tokens()
    with budget(m, 1):
        out = m(x, return_routing=True)
        assert all(s.counts_E.sum() == x.numel() for s in out.layer_stats)
    with budget(m, 4):  # above the model's top-2: every expert for every token
        out4 = m(x, return_routing=True)
        assert all(s.counts_E.tolist() == [x.numel()] * 4 for s in out4.layer_stats)
    assert all(layer.cfg.top_k == 2 for layer in m.moe_layers().values())
    torch.testing.assert_close(m(x).logits, model()(x).logits, rtol=0, atol=0)


def test_the_output_scale_multiplies_every_moe_layer() -> None:
    m = model()
    lora = LoRAMoE(m, LoRAConfig())
    with torch.no_grad():
        lora.scale.fill_(0.0)
    for layer in m.moe_layers().values():  # s = 0: as if the MoE layers were not there
        layer.experts.w2.data.zero_()
    torch.testing.assert_close(lora(tokens()).logits, m(tokens()).logits, rtol=1e-6, atol=1e-6)


def test_budgets_above_the_expert_count_are_refused() -> None:
    assert check_budget(CFG, 4, field="clients[0].k") == 4
    with pytest.raises(ConfigError, match=r"^clients\[0\]\.k: budget k=5 exceeds the model's 4"):
        check_budget(CFG, 5, field="clients[0].k")
    with pytest.raises(ConfigError, match=r"^clients\[1\]\.k: "):
        check_budget(CFG, 0, field="clients[1].k")


def test_local_training_moves_only_what_it_routed() -> None:
    m = model()
    lora = LoRAMoE(m, LoRAConfig(rank=2))
    gen = np.random.default_rng(0)
    data = TokenData({"legal": gen.integers(2, 64, 4000).astype(np.int32)}, CFG.vocab_size)
    instr = TrainInstruction(
        client="a", server_round=1, adapters=lora.adapters(), scale=1.0, k=1,
        local_steps=3, lr=1e-2, batch_size=4, seq_len=16, seed=0,
    )  # fmt: skip
    before = evaluate_at(lora, data, [1], batches=2, batch_size=4, seq_len=16)
    up = local_train(lora, data, instr)
    assert up.tokens_seen == 3 * 4 * 16 and up.n_tokens == 4000 and up.k == 1
    for layer, counts in up.counts.items():
        assert int(counts.sum()) == up.tokens_seen  # one expert per token at k = 1
        for e, c in enumerate(counts.tolist()):
            moved = any(up.delta[(layer, n)][e].abs().sum() > 0 for n in ("b1", "b3", "b2"))
            assert moved == (c > 0), (layer, e, c)
    assert up.scale != 1.0
    after = evaluate_at(lora, data, [1], batches=2, batch_size=4, seq_len=16)
    assert after["val_loss/legal/k1"] < before["val_loss/legal/k1"]
