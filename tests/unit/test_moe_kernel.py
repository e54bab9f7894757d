"""The inference expert kernel and the MoE layer against oracles written without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expertmesh.platform.config import ModelConfig
from expertmesh.platform.model import MoELayer, run_experts
from expertmesh.platform.model import experts as experts_module

E, D, FF = 6, 32, 48


def reference_experts(
    x_AD: torch.Tensor, expert_A: torch.Tensor, w13_EFD: torch.Tensor, w2_EDF: torch.Tensor
) -> torch.Tensor:
    """Row ``a`` through expert ``expert_A[a]``, rows in any order, in float32 plain torch."""
    x_AD, w13_EFD, w2_EDF = x_AD.float(), w13_EFD.float(), w2_EDF.float()
    out_AD = torch.zeros_like(x_AD)
    for e in range(w13_EFD.shape[0]):
        rows = expert_A == e
        w1_FD, w3_FD = w13_EFD[e].chunk(2, dim=0)
        hidden = F.silu(x_AD[rows] @ w1_FD.t()) * (x_AD[rows] @ w3_FD.t())
        out_AD[rows] = hidden @ w2_EDF[e].t()
    return out_AD


def sorted_run(
    x_AD: torch.Tensor, expert_A: torch.Tensor, w13: torch.Tensor | list, w2: torch.Tensor | list
) -> torch.Tensor:
    """Sort rows by expert, call :func:`run_experts`, and put the rows back in their order."""
    order_A = torch.argsort(expert_A, stable=True)
    counts = torch.bincount(expert_A, minlength=E).tolist()
    y_AD = run_experts(x_AD[order_A], counts, w13, w2)
    return torch.empty_like(y_AD).index_copy_(0, order_A, y_AD)


def random_case(counts: list[int], dtype: torch.dtype, seed: int) -> tuple:
    """Rows in random order, ``counts[e]`` of them for expert ``e``, and random weights."""
    g = torch.Generator().manual_seed(seed)
    n_rows = sum(counts)
    x_AD = torch.randn(n_rows, D, generator=g).to(dtype)
    expert_A = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    expert_A = expert_A[torch.randperm(n_rows, generator=g)]
    w13 = (torch.randn(E, 2 * FF, D, generator=g) * D**-0.5).to(dtype)
    w2 = (torch.randn(E, D, FF, generator=g) * FF**-0.5).to(dtype)
    return x_AD, expert_A, w13, w2


THIN, NATIVE = experts_module._THIN_SLICE_ROWS, experts_module._NATIVE_LOW_PRECISION_ROWS
CAP = experts_module.KERNEL_MAX_ROWS_NATIVE_BF16
# zero-row experts first, in the middle and last; one-row slices; slices either side of the
# switches (bf16 kept native up to NATIVE rows; W @ x^T up to THIN rows; the native kernel up
# to CAP rows for bf16 where PyTorch has bf16 GEMMs); thick slices
CASES = [
    [0, 1, NATIVE, 0, NATIVE + 1, 2],
    [7, THIN, THIN + 1, 5, 10, 0],
    [CAP, CAP + 1, 1, 40, 0, 3],
    [0, 0, 0, 0, 0, 1],
    [1, 1, 0, 1, 0, 0],
    [0, 150, 0, 0, 0, 150],
]


@pytest.mark.parametrize("counts", CASES)
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"]
)
def test_run_experts_matches_per_expert_loop(
    counts: list[int], dtype: torch.dtype, tol: float
) -> None:
    x_AD, expert_A, w13, w2 = random_case(counts, dtype, seed=sum(counts))
    want = reference_experts(x_AD, expert_A, w13, w2)
    got = sorted_run(x_AD, expert_A, w13, w2)
    assert got.dtype == dtype and got.shape == x_AD.shape
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    # expert shards pass per-expert weight lists instead of stacked tensors
    got_lists = sorted_run(x_AD, expert_A, list(w13.unbind()), list(w2.unbind()))
    torch.testing.assert_close(got_lists, got, rtol=tol, atol=tol)


@pytest.mark.parametrize("counts", CASES[:4])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"]
)
def test_grouped_experts_match_per_expert_loop(
    counts: list[int], dtype: torch.dtype, tol: float
) -> None:
    """The GPU's inference path (two grouped GEMMs, offsets from a counts tensor), run here on
    the CPU, where PyTorch's grouped GEMM also runs (tests/gpu runs it on CUDA)."""
    x_AD, expert_A, w13, w2 = random_case(counts, dtype, seed=sum(counts) + 1)
    want = reference_experts(x_AD, expert_A, w13, w2)
    order_A = torch.argsort(expert_A, stable=True)
    counts_E = torch.bincount(expert_A, minlength=E)
    y_AD = experts_module.run_experts_grouped(x_AD[order_A], counts_E, w13, w2)
    got = torch.empty_like(y_AD).index_copy_(0, order_A, y_AD)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    assert not experts_module.grouped_applies(x_AD, w13)  # the CPU keeps run_experts


def test_run_experts_with_no_rows() -> None:
    x_AD, _, w13, w2 = random_case([0] * E, torch.float32, seed=0)
    assert run_experts(x_AD, [0] * E, w13, w2).shape == (0, D)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_moe_layer_matches_transformers_mixtral_block(impl: str) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=D, d_ff=FF, n_experts=E, top_k=2, n_heads=4, n_kv_heads=2)
    ours = MoELayer(cfg, layer=0).eval()
    assert ours.experts is not None
    ours.experts.reset_parameters(D**-0.5, FF**-0.5)
    hf_cfg = transformers.MixtralConfig(
        hidden_size=D, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=2
    )
    hf_cfg._experts_implementation = impl
    hf = MixtralSparseMoeBlock(hf_cfg).eval()
    with torch.no_grad():
        hf.gate.weight.copy_(ours.gate.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.w13)  # (E, 2F, D) = cat(w1, w3), like ours
        hf.experts.down_proj.copy_(ours.experts.w2)
        x_BTD = torch.randn(3, 20, D)
        got, stats = ours(x_BTD)
        want = hf(x_BTD)
    assert int((stats.counts_E > 0).sum()) == E  # every expert took part
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layer_losses_are_computed_on_first_use_and_train() -> None:
    """The router losses are no longer computed in forward; read from the stats they equal the
    router's functions, are computed once, and carry gradients to the gate in training."""
    from expertmesh.platform.model.gates import load_balancing_loss, route, z_loss

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=D, d_ff=FF, n_experts=E, top_k=2, n_heads=4, n_kv_heads=2)
    layer = MoELayer(cfg, layer=0).train()
    x_BTD = torch.randn(2, 5, D)
    _, stats = layer(x_BTD)
    routing = route(cfg, layer.gate(x_BTD.reshape(10, D)), training=True)
    torch.testing.assert_close(stats.aux_loss, load_balancing_loss(routing))
    torch.testing.assert_close(stats.z_loss, z_loss(routing))
    assert stats.aux_loss is stats.aux_loss and stats.z_loss is stats.z_loss
    (stats.aux_loss + stats.z_loss).backward()
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
