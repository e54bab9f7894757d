"""The packed oneDNN matmul of inference: the same numbers as F.linear, rebuilt when the
weight changes, and out of the way of training."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from expertmesh.platform.config import ModelConfig
from expertmesh.platform.model import MoETransformer, kernels, packed
from expertmesh.platform.model.packed import PackedWeight

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN"
)


def _count_packs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of every weight packed from now on, for oneDNN or in the native kernel's blocks (the
    one-time self-check runs first)."""
    packed.available()
    calls: list[int] = []
    real, real_blocks = packed._pack, kernels.block_weights

    def counting(w: torch.Tensor) -> torch.Tensor:
        calls.append(w.shape[0])
        return real(w)

    def counting_blocks(w: torch.Tensor) -> torch.Tensor:
        calls.append(w.shape[0])
        return real_blocks(w)

    monkeypatch.setattr(packed, "_pack", counting)
    monkeypatch.setattr(kernels, "block_weights", counting_blocks)
    return calls


@needs_onednn
def test_available_on_a_cpu_build_with_onednn() -> None:
    assert packed.available()


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 256), (7, 256), (64, 256), (300, 256), (16, 1, 256)])
def test_equals_f_linear(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_packs(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(512, 256, generator=gen)
    x = torch.randn(*shape, generator=gen)
    with torch.no_grad():
        got = PackedWeight().linear(x, w)
    assert calls == [512]  # the packed path ran, not the fallback
    want = F.linear(x.double(), w.double())
    assert got.shape == want.shape and got.dtype == torch.float32
    # float32 summation order only: |y| ~ 16 here, so a 1e-4 bound is ~6e-6 relative
    assert (got.double() - want).abs().max() < 1e-4


@needs_onednn
@pytest.mark.skipif(not packed.blocked_linear_available(), reason="no AVX-512F native kernel")
@pytest.mark.parametrize(
    ("rows", "blocked"), [(1, True), (64, True), (packed.BLOCKED_MAX_ROWS, True), (300, False)]
)
def test_few_rows_take_the_blocked_kernel(rows: int, blocked: bool) -> None:
    """Up to BLOCKED_MAX_ROWS rows the weight is read in the native kernel's blocks, above
    that packed for oneDNN; a weight whose rows are not a multiple of 16 stays on oneDNN."""
    w, x = torch.randn(48, 32), torch.randn(rows, 32)
    holder = PackedWeight()
    with torch.no_grad():
        got = holder.linear(x, w)
    assert (holder._blocks is not None) == blocked and (holder._packed is not None) != blocked
    assert (got.double() - F.linear(x.double(), w.double())).abs().max() < 1e-4
    odd = PackedWeight()
    with torch.no_grad():
        odd.linear(x, torch.randn(40, 32))
    assert odd._blocks is None and odd._packed is not None


@needs_onednn
def test_rows_that_are_not_contiguous() -> None:
    w = torch.randn(64, 32)
    x = torch.randn(10, 64)[:, :32]  # strided rows
    with torch.no_grad():
        got = PackedWeight().linear(x, w)
    assert torch.allclose(got, F.linear(x, w), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_repacked_when_the_weight_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_packs(monkeypatch)
    lin = torch.nn.Linear(32, 48, bias=False)
    holder, x = PackedWeight(), torch.randn(4, 32)
    with torch.no_grad():
        holder.linear(x, lin.weight)
        holder.linear(x, lin.weight)
        assert len(calls) == 1  # cached
        lin.weight.mul_(2.0)  # in place: a new version
        assert torch.allclose(holder.linear(x, lin.weight), F.linear(x, lin.weight), atol=1e-5)
        lin.load_state_dict({"weight": torch.randn(48, 32)})  # copy_ into the parameter
        assert torch.allclose(holder.linear(x, lin.weight), F.linear(x, lin.weight), atol=1e-5)
        lin.weight.data = torch.randn(48, 32)  # new storage, version unchanged
        assert torch.allclose(holder.linear(x, lin.weight), F.linear(x, lin.weight), atol=1e-5)
        other = torch.randn(48, 32)  # another tensor altogether
        assert torch.allclose(holder.linear(x, other), F.linear(x, other), atol=1e-5)
    assert len(calls) == 5


def test_training_and_other_dtypes_take_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_packs(monkeypatch)
    lin = torch.nn.Linear(32, 48, bias=False)
    x = torch.randn(4, 32)
    y = PackedWeight().linear(x, lin.weight)  # grad mode, a parameter: must stay differentiable
    assert y.requires_grad
    y.sum().backward()
    assert lin.weight.grad is not None
    assert torch.equal(y.detach(), F.linear(x, lin.weight).detach())
    with torch.no_grad():
        xb, wb = x.bfloat16(), lin.weight.bfloat16()
        assert torch.equal(PackedWeight().linear(xb, wb), F.linear(xb, wb))
        empty = torch.empty(0, 32)
        assert PackedWeight().linear(empty, lin.weight).shape == (0, 48)
    assert calls == []


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPERTMESH_ONEDNN_LINEAR", "0")
    packed.available.cache_clear()
    try:
        assert not packed.available()
        calls = _count_packs(monkeypatch)
        with torch.no_grad():
            PackedWeight().linear(torch.randn(3, 8), torch.randn(5, 8))
        assert calls == []
    finally:
        monkeypatch.undo()
        packed.available.cache_clear()


@needs_onednn
def test_model_inference_uses_it_and_matches_training_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The packed path in a whole model: every dense matmul packed (q|k|v, o, the dense FFN of
    a non-MoE layer, the LM head), logits equal to the unpacked (grad-mode) forward's, and a
    model that has used it can still be deep-copied and pickled."""
    calls = _count_packs(monkeypatch)
    torch.manual_seed(0)
    # d_ff 88: the experts' 2F rows are no whole pairs of 16-row blocks, so only the dense
    # layers' weights are counted here (test_kernels covers the experts' blocks)
    cfg = ModelConfig(
        vocab_size=300,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=88,
        n_experts=4,
        top_k=2,
        moe_every=2,
        max_seq_len=64,
    )  # fmt: skip
    model = MoETransformer(cfg).eval()
    tokens = torch.randint(0, 300, (3, 9))
    want = model(tokens).logits  # grad mode: F.linear everywhere
    assert calls == []
    with torch.no_grad():
        got = model(tokens).logits
    # per layer q|k|v and o; layer 0's dense FFN (w1, w3, w2); the LM head
    assert sorted(calls) == sorted([128, 64, 128, 64, 88, 88, 64, 300])
    assert torch.allclose(got, want.detach(), atol=1e-5, rtol=1e-5)
    clone = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.allclose(clone(tokens).logits, got, atol=1e-5, rtol=1e-5)
        assert torch.allclose(restored(tokens).logits, got, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_expert_bank_packs_each_large_slice_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices past the native kernel's rows run on weights packed once per expert, the same
    numbers as the MKL path; a change to the bank's weights is seen."""
    from expertmesh.platform.model.experts import KERNEL_MAX_ROWS, ExpertBank, run_experts

    calls = _count_packs(monkeypatch)
    torch.manual_seed(0)
    bank = ExpertBank(3, 32, 40)  # 2F = 80: the thin slice takes the row-major kernel
    bank.reset_parameters(0.1, 0.1)
    n = KERNEL_MAX_ROWS + 20  # past the thin-slice kernel: a GEMM slice
    counts = [n, 0, 5]  # expert 1 idle, expert 2 thin
    x = torch.randn(sum(counts), 32)
    with torch.no_grad():
        want = run_experts(x, counts, bank.w13, bank.w2)  # no holders: MKL
        got = bank(x, counts)
        again = bank(x, counts)
    assert calls == [80, 32]  # expert 0's w13 (2F rows) and w2 (D rows), once
    assert torch.allclose(got, want, atol=1e-5) and torch.equal(got, again)
    with torch.no_grad():
        bank.w13.mul_(0.5)  # in place, as an optimizer step: a new version
        assert torch.allclose(bank(x, counts), run_experts(x, counts, bank.w13, bank.w2), atol=1e-5)
    assert calls[2:] == [80]  # w13 again; w2 unchanged
    y = bank(x.requires_grad_(), counts)  # grad mode: the autograd path, nothing packed
    assert y.requires_grad and len(calls) == 3
