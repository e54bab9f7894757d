"""The MoE model's math: routers, capacity, one-expert == dense, KV cache, gradients."""

from __future__ import annotations

import pytest
import torch

from expertmesh.platform.config import ModelConfig
from expertmesh.platform.model import KVCache, MoELayer, MoETransformer, SwiGLU, route
from expertmesh.platform.model.gates import capacity_for

BASE = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, n_experts=4)


def cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **overrides})


def moe_layer(c: ModelConfig, layer: int = 0) -> MoELayer:
    moe = MoELayer(c, layer)
    moe.experts.reset_parameters(0.1, 0.1)  # NOTE: ExpertBank starts uninitialised (torch.empty)
    return moe


def per_token_weight_sum(routing) -> torch.Tensor:
    return torch.zeros(routing.n_tokens).index_add(0, routing.token_idx_A, routing.weight_A)


def test_topk_weights_sum_to_one_and_pick_top_logits() -> None:
    torch.manual_seed(0)
    logits_TE = torch.randn(50, 4)
    r = route(cfg(top_k=2), logits_TE)
    assert torch.allclose(per_token_weight_sum(r), torch.ones(50), atol=1e-6)
    assert torch.equal(torch.bincount(r.token_idx_A, minlength=50), torch.full((50,), 2))
    assert torch.all(r.expert_idx_A[1:] >= r.expert_idx_A[:-1])  # sorted by expert
    top_TK = logits_TE.topk(2, dim=-1).indices
    for t, e in zip(r.token_idx_A.tolist(), r.expert_idx_A.tolist(), strict=True):
        assert e in top_TK[t].tolist()
    assert r.dropped_fraction == 0.0 and int(r.counts_E.sum()) == 100


def test_capacity_is_respected_and_drops_reported() -> None:
    c = cfg(top_k=1, capacity_factor=1.0)
    logits_TE = torch.zeros(40, 4)
    logits_TE[:30, 0] = 5.0  # 30 tokens want expert 0; capacity is ceil(40 * 1 / 4) = 10
    logits_TE[30:, 1] = 5.0  # 10 want expert 1: all fit
    r = route(c, logits_TE)
    capacity = capacity_for(c, 40, 1.0)
    assert capacity == 10
    assert int(r.counts_E.max()) <= capacity
    assert r.counts_E.tolist() == [10, 10, 0, 0]
    assert r.n_dropped == 20 and r.dropped_fraction == pytest.approx(20 / 40)
    layer = moe_layer(c)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0] = 1.0  # every token prefers expert 0
    _, stats = layer(torch.rand(1, 40, 32) + 0.1)
    assert stats.dropped_fraction == pytest.approx(30 / 40)
    assert stats.counts_E.tolist() == [10, 0, 0, 0]


def test_expert_choice_is_exactly_balanced() -> None:
    torch.manual_seed(0)
    logits_TE = torch.randn(32, 4)
    logits_TE[:, 0] += 3.0  # even a strongly preferred expert takes only its share
    r = route(cfg(router="expert_choice", top_k=2), logits_TE)
    assert r.counts_E.tolist() == [16, 16, 16, 16]  # ceil(32 * 2 / 4)


def test_hash_router_depends_only_on_token_id() -> None:
    c = cfg(router="hash", top_k=2)
    ids_T = torch.tensor([5, 9, 5, 77, 9, 5])
    a = route(c, torch.randn(6, 4), token_ids_T=ids_T)
    b = route(c, torch.randn(6, 4), token_ids_T=ids_T)  # other logits, same routing
    assert torch.equal(a.token_idx_A, b.token_idx_A) and torch.equal(a.expert_idx_A, b.expert_idx_A)
    pairs = list(zip(a.token_idx_A.tolist(), a.expert_idx_A.tolist(), strict=True))
    experts = [sorted(e for t, e in pairs if t == i) for i in range(6)]
    assert experts[0] == experts[2] == experts[5] and experts[1] == experts[4]
    assert torch.allclose(a.weight_A, torch.full_like(a.weight_A, 0.5))
    with pytest.raises(ValueError, match="token ids"):
        route(c, torch.randn(6, 4))


def test_switch_weight_is_router_probability() -> None:
    torch.manual_seed(0)
    logits_TE = torch.randn(20, 4)
    r = route(cfg(router="switch", top_k=1), logits_TE)
    probs_TE = logits_TE.softmax(-1)
    assert torch.allclose(r.weight_A, probs_TE[r.token_idx_A, r.expert_idx_A])
    assert torch.equal(r.expert_idx_A[r.token_idx_A.argsort()], probs_TE.argmax(-1))


def test_one_expert_moe_equals_the_dense_ffn_it_was_copied_from() -> None:
    torch.manual_seed(0)
    dense = SwiGLU(32, 48)
    layer = MoELayer(cfg(n_experts=1, top_k=1), 0)
    layer.experts.load_expert(
        0, {"w1": dense.w1.weight, "w3": dense.w3.weight, "w2": dense.w2.weight}
    )
    x_BTD = torch.randn(3, 5, 32)
    y_BTD, stats = layer(x_BTD)
    assert torch.allclose(y_BTD, dense(x_BTD), atol=1e-6)
    assert stats.counts_E.tolist() == [15]


def test_kv_cache_decoding_equals_full_forward() -> None:
    torch.manual_seed(0)
    model = MoETransformer(cfg()).eval()
    tokens_BT = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        full_BTV = model(tokens_BT).logits
        cache = KVCache(model.cfg, n_slots=3, max_len=16)
        slots_B = torch.tensor([2, 0])  # any slots, in any order
        pos_BT = torch.arange(4).expand(2, 4)
        out = model(tokens_BT[:, :4], positions_BT=pos_BT, cache=cache, slots_B=slots_B)
        assert torch.allclose(out.logits, full_BTV[:, :4], atol=1e-5)
        for t in range(4, 10):
            pos_BT = torch.full((2, 1), t)
            out = model(tokens_BT[:, t : t + 1], positions_BT=pos_BT, cache=cache, slots_B=slots_B)
            assert torch.allclose(out.logits[:, 0], full_BTV[:, t], atol=1e-5)


def test_kv_cache_sequences_at_different_positions_share_a_step() -> None:
    torch.manual_seed(0)
    model = MoETransformer(cfg()).eval()
    a_T, b_T = torch.randint(0, 128, (7,)), torch.randint(0, 128, (4,))
    with torch.no_grad():
        want_a, want_b = model(a_T[None]).logits[0, -1], model(b_T[None]).logits[0, -1]
        cache = KVCache(model.cfg, n_slots=2, max_len=16)
        model(
            a_T[None, :6],
            cache=cache,
            slots_B=torch.tensor([0]),
            positions_BT=torch.arange(6)[None],
        )
        model(
            b_T[None, :3],
            cache=cache,
            slots_B=torch.tensor([1]),
            positions_BT=torch.arange(3)[None],
        )
        step = model(
            torch.stack([a_T[6:], b_T[3:]]),
            positions_BT=torch.tensor([[6], [3]]),
            cache=cache,
            slots_B=torch.tensor([0, 1]),
        ).logits
    assert torch.allclose(step[0, 0], want_a, atol=1e-5)
    assert torch.allclose(step[1, 0], want_b, atol=1e-5)


def test_experts_per_token_reports_the_routing() -> None:
    torch.manual_seed(0)
    layer = moe_layer(cfg(top_k=2), 3)
    x_BTD = torch.randn(2, 6, 32)
    _, stats = layer(x_BTD, return_routing=True)
    served = stats.experts_per_token()
    want_NK = layer.gate(x_BTD.reshape(12, 32)).topk(2, dim=-1).indices
    assert [sorted(s) for s in served] == [sorted(w) for w in want_NK.tolist()]
    assert stats.layer == 3 and sum(stats.load_fractions()) == pytest.approx(1.0)
    _, stats = layer(x_BTD)
    with pytest.raises(ValueError, match="return_routing"):
        stats.experts_per_token()


def test_gradient_reaches_gate_and_experts() -> None:
    torch.manual_seed(0)
    model = MoETransformer(cfg()).train()
    tokens_BT = torch.randint(0, 128, (2, 8))
    total, _ = model.loss(model(tokens_BT), tokens_BT)
    total.backward()
    for moe in model.moe_layers().values():
        assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
        assert moe.experts.w13.grad.abs().sum() > 0 and moe.experts.w2.grad.abs().sum() > 0


def test_noisy_topk_is_deterministic_in_eval_and_noisy_in_training() -> None:
    torch.manual_seed(0)
    layer = moe_layer(cfg(router="noisy_topk", router_noise_std=5.0))
    x_BTD = torch.randn(2, 16, 32)
    layer.eval()
    a_BTD, _ = layer(x_BTD)
    b_BTD, _ = layer(x_BTD)
    assert torch.equal(a_BTD, b_BTD)
    topk = MoELayer(cfg(router="topk"), 0).eval()
    topk.load_state_dict(layer.state_dict())
    assert torch.allclose(topk(x_BTD)[0], a_BTD, atol=1e-6)  # eval noisy top-k == plain top-k
    layer.train()
    with torch.no_grad():
        c_BTD, _ = layer(x_BTD)
    assert not torch.allclose(c_BTD, a_BTD)


def test_casting_to_bfloat16_keeps_rope_frequencies_float32() -> None:
    model = MoETransformer(cfg())
    want = model.rotary.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary.inv_freq, want)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (8, 2)])
def test_decode_attention_equals_masked_sdpa(n_heads: int, n_kv_heads: int) -> None:
    from expertmesh.platform.model.layers import decode_attention

    torch.manual_seed(0)
    B, K, L = 5, 8, 11
    q_BHK = torch.randn(B, n_heads, K)
    k_BGLK, v_BGLK = torch.randn(2, B, n_kv_heads, L, K)
    pos_B = torch.tensor([10, 0, 3, 7, 10])  # keys past a row's position must not count
    mask_B11L = (torch.arange(L)[None, :] <= pos_B[:, None])[:, None, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q_BHK[:, :, None], k_BGLK, v_BGLK, attn_mask=mask_B11L, enable_gqa=True
    )[:, :, 0]
    future_B1L = ~mask_B11L[:, 0]
    got = decode_attention(q_BHK, k_BGLK, v_BGLK, future_B1L)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    v_BGLK[1, :, 1:] = 1e6  # row 1 sits at position 0: later values must not leak in
    got = decode_attention(q_BHK, k_BGLK, v_BGLK, future_B1L)[1]
    torch.testing.assert_close(got, want[1], atol=1e-6, rtol=1e-5)


def test_fused_qkv_follows_weight_updates() -> None:
    """Inference multiplies by a cached q|k|v matrix; it must never serve stale weights."""
    torch.manual_seed(0)
    model = MoETransformer(cfg()).eval()
    tokens_BT = torch.randint(0, 128, (2, 6))

    def reference() -> torch.Tensor:  # grad mode: the separate projections, no cache
        with torch.enable_grad():
            return model(tokens_BT).logits.detach()

    with torch.no_grad():
        assert torch.allclose(model(tokens_BT).logits, reference(), atol=1e-5)
        model.layers[0].self_attn.k_proj.weight.mul_(3.0)  # in place, as an optimizer step is
        after_inplace = model(tokens_BT).logits
    assert torch.allclose(after_inplace, reference(), atol=1e-5)
    other = MoETransformer(cfg())
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(tokens_BT).logits, reference(), atol=1e-5)
        assert not torch.allclose(model(tokens_BT).logits, after_inplace, atol=1e-3)


def test_moe_layer_equals_a_per_token_loop_over_its_experts() -> None:
    """gate -> route -> experts -> combine against the definition: for every token, the sum of
    its top-k experts' SwiGLU outputs weighted by the renormalised top-k softmax. Inference
    (the bank's backend) and training (the differentiable path) both."""
    torch.manual_seed(0)
    layer = MoELayer(cfg(), 0)
    layer.experts.reset_parameters(0.1, 0.1)
    x_BTD = torch.randn(2, 7, 32)
    x_ND = x_BTD.reshape(-1, 32)
    top_NK, idx_NK = layer.gate(x_ND).softmax(-1).topk(2, dim=-1)
    weight_NK = top_NK / top_NK.sum(-1, keepdim=True)
    want = torch.zeros_like(x_ND)
    for n in range(x_ND.shape[0]):
        for w, e in zip(weight_NK[n], idx_NK[n], strict=True):
            t = layer.experts.expert_tensors(int(e))
            h = torch.nn.functional.silu(x_ND[n] @ t["w1"].T) * (x_ND[n] @ t["w3"].T)
            want[n] += w * (h @ t["w2"].T)
    with torch.no_grad():
        got_inference, _ = layer(x_BTD)
    got_training, _ = layer(x_BTD)
    assert layer.experts.backend.name == "torch"  # the CPU's backend, chosen at build
    torch.testing.assert_close(got_inference.reshape(-1, 32), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_training.detach().reshape(-1, 32), want, atol=1e-5, rtol=1e-4)


def test_experts_backend_is_chosen_once_per_device() -> None:
    from expertmesh.platform.model.experts import TorchExperts, select_backend

    bank = MoELayer(cfg(), 0).experts
    chosen = bank.backend
    bank.to(torch.float64)  # a move that keeps the device keeps the kind of backend
    assert isinstance(chosen, TorchExperts) and isinstance(bank.backend, TorchExperts)
    assert select_backend("cpu").name == "torch"
    assert select_backend("cpu", stacked=False).name == "torch"


def test_model_package_is_plain_pytorch() -> None:
    """The model code imports no native code, no Ray and nothing outside torch and the
    project's config: it must run the same on every CPU and GPU."""
    import ast
    from pathlib import Path

    import expertmesh.platform.model as pkg

    allowed = ("torch", "expertmesh.platform.config", "expertmesh.platform.model", "__future__")
    allowed += ("dataclasses", "collections", "typing", "math")
    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.startswith(allowed), f"{path.name} imports {name}"
    assert not list(Path(pkg.__file__).parent.glob("**/*.c"))
