"""SwiGLU experts and the one function that runs tokens through a group of them.

The same :func:`run_experts` serves training (in-process dispatch) and expert shard actors
(Ray dispatch). Shapes: E experts, F expert FFN width, D model width, A assignments.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.platform.model import hugepages, kernels
from expertmesh.platform.model.packed import PackedWeight, applies, weight_identity

# NOTE: measured on a 2-core AVX2 EPYC with 2 threads (MKL): for slices of a few rows MKL runs
# ``x @ W^T`` on one core but ``W @ x^T`` (``x^T`` a transposed view) on both: 2.2x faster at 2-4
# rows, 1.4x at 9, transposing copy included. From ~14 rows on, ``x @ W^T`` is as fast or faster.
_THIN_SLICE_ROWS = 12
# PyTorch's generic bf16/fp16 matmul costs about one vectorised matrix-vector product per row;
# up to 3 rows that is cheaper than converting the expert's weights to float32 first.
_NATIVE_LOW_PRECISION_ROWS = 3
# Slices of up to this many rows go to the native kernel (kernels/thin_experts.c) when it is
# available: it reads each weight once where MKL packs it first. Measured on the 2-core EPYC
# (8 experts, d=512, f=1408, float32): 1.8x MKL at 16 rows per expert, 1.3x at 64 and 128,
# 1.08x at 256; MKL keeps the large slices.
KERNEL_MAX_ROWS = 128
# Where PyTorch multiplies bfloat16 natively (AVX512-BF16/AMX: matmul_dtype keeps bfloat16),
# oneDNN's GEMM overtakes the kernel sooner: measured on a 2-core EPYC with AVX512-BF16 (8
# experts, bfloat16): kernel 3.3x at 4 rows per expert, 1.3x at 16, 0.8x at 24, 0.46x at 64.
KERNEL_MAX_ROWS_NATIVE_BF16 = 16
# With the weights in blocks (float32 on AVX-512F, caller-kept holders) the kernel takes slices
# up to this many rows: against oneDNN on weights packed once (2 experts, 1 and 2 threads,
# D=256/F=704 and D=512/F=1408) 1.06-1.34x at 128 rows, 0.98-1.17x at 256, 0.97-1.08x at 1024,
# but a whole 4096-token layer (1024 rows per expert, D=512) ran 0.90x; larger slices (prefill)
# stay on oneDNN.
KERNEL_MAX_ROWS_BLOCKED = 256
# bfloat16 weights in the kernel's groups (AVX512-BF16) against oneDNN's native bfloat16 GEMM
# (8 experts of D=512, F=1408, two threads, the same rows in every expert): 3.8x at 8 rows,
# 1.75x at 32, 1.42x at 64, 1.21x at 128, 1.10x at 256, 1.08x at 512 (the row-major kernel:
# 0.95x the groups at 8 rows, 0.36x at 256). Prefill-sized slices stay on oneDNN, as float32's.
KERNEL_MAX_ROWS_BLOCKED_BF16 = 256


def kernel_max_rows(w13_FD: torch.Tensor, blocked: bool) -> int:
    """The most rows per expert slice :func:`run_experts` gives the native kernel for weights
    like ``w13_FD`` (in blocks or not); the MoE layer's fused path keeps to the same limit."""
    if blocked:
        if w13_FD.dtype == torch.bfloat16:
            return KERNEL_MAX_ROWS_BLOCKED_BF16
        return KERNEL_MAX_ROWS_BLOCKED
    if matmul_dtype(w13_FD.dtype, w13_FD.device) == torch.bfloat16:
        return KERNEL_MAX_ROWS_NATIVE_BF16
    return KERNEL_MAX_ROWS


def run_experts(
    x_AD: torch.Tensor,
    counts: list[int],
    w13_EFD: torch.Tensor | Sequence[torch.Tensor],
    w2_EDF: torch.Tensor | Sequence[torch.Tensor],
    packed: Sequence[tuple[PackedWeight, PackedWeight]] | None = None,
) -> torch.Tensor:
    """Run ``counts[e]`` consecutive rows of ``x_AD`` through expert ``e``; rows sorted by expert.

    ``w13_EFD`` stacks each expert's gate (w1) and up (w3) projections as (E, 2F, D) so one
    matmul per expert slice does both; the weights may also come as per-expert lists (expert
    shards). One matmul pair per non-empty slice, no loop over tokens, no (tokens x experts x D)
    tensor, and only one slice's hidden activations (n, 2F) alive at a time.

    Where :func:`matmul_dtype` says so (bfloat16 on CPUs without a native kernel), the matmuls
    run in float32 on one expert's weights converted at a time, and the result is rounded back.
    Slices of up to :data:`KERNEL_MAX_ROWS` rows (:data:`KERNEL_MAX_ROWS_NATIVE_BF16` for
    bfloat16 weights where PyTorch has native bfloat16 GEMMs) run in the native kernel when it
    is available (float32 or bfloat16 activations; float32 or bfloat16 weights read as stored),
    all in one call. It sums in float32; with bfloat16 weights and activations on CPUs with
    AVX512-BF16 it rounds the SwiGLU activations to bfloat16 before the down projection, as
    PyTorch's bfloat16 path does, and keeps them float32 otherwise (see
    :func:`kernels.thin_experts`).

    ``packed`` (one (w13, w2) pair of :class:`PackedWeight` holders per expert, kept by the
    caller with the weights) lets the larger float32 slices run on oneDNN with the weights
    packed once instead of MKL re-packing them every call: 1.24-1.41x at 256-1024 rows per
    expert (d=512, f=1408, two threads). On AVX-512F CPUs float32 slices of up to
    :data:`KERNEL_MAX_ROWS_BLOCKED` rows read each expert's weights in the kernel's blocked
    layout instead (:func:`kernels.block_weights`, made once per expert touched and kept in the
    holder beside the weights, so those experts' memory doubles): 1.24-1.71x the kernel's
    row-major path at 4-64 rows, 1.06-1.34x oneDNN at 128, and 1.14x the tokens/s of
    distributed serving at 64 clients (the shards). bfloat16 weights and activations take the
    kernel's bfloat16 groups the same way on AVX512-BF16 CPUs (widths multiples of 64), up to
    :data:`KERNEL_MAX_ROWS_BLOCKED_BF16` rows per slice.
    """
    if x_AD.shape[0] == 0:
        return torch.empty_like(x_AD)
    F2, D = w13_EFD[0].shape
    thin = [0] * len(counts)
    out_AD_32 = None
    if kernels.supports(w13_EFD[0], x_AD.dtype):
        blocked = packed is not None and kernels.supports_blocked(w13_EFD[0], x_AD.dtype)
        limit = kernel_max_rows(w13_EFD[0], blocked)
        thin = [n if n <= limit else 0 for n in counts]
        if any(thin):
            out_AD_32 = torch.empty(x_AD.shape, dtype=torch.float32)
            starts = [0, *itertools.accumulate(counts)][:-1]
            if blocked:
                assert packed is not None
                b13 = [packed[e][0].blocks(w13_EFD[e]) if n else None for e, n in enumerate(thin)]
                b2 = [packed[e][1].blocks(w2_EDF[e]) if n else None for e, n in enumerate(thin)]
                kernels.thin_experts(x_AD, starts, thin, b13, b2, out_AD_32, blocked=True)
            else:
                kernels.thin_experts(x_AD, starts, thin, w13_EFD, w2_EDF, out_AD_32)
            if all(n == 0 or t for n, t in zip(counts, thin, strict=True)):
                return out_AD_32.to(x_AD.dtype)
    dtype = matmul_dtype(x_AD.dtype, x_AD.device)
    x_AD_m = x_AD.to(dtype)
    out_AD = torch.empty_like(x_AD_m) if out_AD_32 is None else out_AD_32.to(dtype)
    h_N2F = x_AD_m.new_empty(max(counts), F2)  # N: rows of the largest slice
    upcast = w13_EFD[0].dtype != dtype
    w13_buf = x_AD_m.new_empty(F2, D) if upcast else None
    w2_buf = x_AD_m.new_empty(D, F2 // 2) if upcast else None
    start = 0
    for e, n in enumerate(counts):
        if n == 0 or thin[e]:
            start += n
            continue
        x_nD = x_AD_m[start : start + n]
        pair = packed[e] if packed is not None and applies(x_nD, w13_EFD[e]) else None
        if pair is not None:
            h_n2F = pair[0].linear(x_nD, w13_EFD[e])
        else:
            h_n2F = _linear(x_nD, w13_EFD[e], out=h_N2F[:n], w_buf=w13_buf)
        gate_nF, up_nF = h_n2F.chunk(2, dim=-1)
        act_nF = F.silu(gate_nF, inplace=True).mul_(up_nF)
        if pair is not None:
            out_AD[start : start + n] = pair[1].linear(act_nF, w2_EDF[e])
        else:
            _linear(act_nF, w2_EDF[e], out=out_AD[start : start + n], w_buf=w2_buf)
        start += n
    return out_AD.to(x_AD.dtype)


def _linear(
    x_nK: torch.Tensor, w_MK: torch.Tensor, *, out: torch.Tensor, w_buf: torch.Tensor | None
) -> torch.Tensor:
    """``out = x @ w.T`` for one expert slice; ``w`` as stored, ``x`` and ``out`` in matmul dtype.

    ``w_buf`` (in the matmul dtype) receives ``w`` when the two dtypes differ.
    """
    n = x_nK.shape[0]
    if w_MK.dtype != out.dtype:
        if n <= _NATIVE_LOW_PRECISION_ROWS:
            return out.copy_(torch.mm(x_nK.to(w_MK.dtype), w_MK.t()))
        assert w_buf is not None
        w_MK = w_buf.copy_(w_MK)
    if n <= _THIN_SLICE_ROWS:
        return out.copy_(torch.mm(w_MK, x_nK.t()).t())
    return torch.mm(x_nK, w_MK.t(), out=out)


@functools.cache
def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype :func:`run_experts` multiplies in: ``dtype``, or float32 where it would be slow.

    On x86 CPUs without AVX512-BF16/AMX (oneDNN's test), PyTorch's bfloat16 and float16 matmuls
    fall back to a generic kernel (measured on an AVX2 EPYC: ~18 GFLOP/s against ~160 for float32
    MKL on 2 cores); for slices of more than a few rows, converting the expert's weights to
    float32 first is cheaper.
    """
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return dtype
    if dtype == torch.bfloat16:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    else:
        native = torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return dtype if native else torch.float32


def run_experts_grouped(
    x_AD: torch.Tensor, counts_E: torch.Tensor, w13_EFD: torch.Tensor, w2_EDF: torch.Tensor
) -> torch.Tensor:
    """:func:`run_experts` for accelerators: two grouped GEMMs (``F.grouped_mm``) over the
    expert-sorted rows, with the slices' offsets computed on the device from ``counts_E``: no
    host sync, and five kernels whatever the number of experts (a loop over slices launches
    ~5 per expert and must read the counts back first). Inference only: PyTorch's grouped
    GEMM has no CPU backward."""
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    x_AD = x_AD.to(w13_EFD.dtype)
    gate_AF, up_AF = F.grouped_mm(x_AD, w13_EFD.transpose(1, 2), offs=offs_E).chunk(2, dim=-1)
    act_AF = F.silu(gate_AF).mul_(up_AF)
    return F.grouped_mm(act_AF, w2_EDF.transpose(1, 2), offs=offs_E)


def grouped_applies(x_AD: torch.Tensor, w13_EFD: torch.Tensor) -> bool:
    """Whether :meth:`ExpertBank.run` takes :func:`run_experts_grouped`: a CUDA device of
    compute capability 8.0 or later (PyTorch's grouped GEMM), no gradient wanted, floating
    weights. The CPU keeps :func:`run_experts` (native kernel, packed oneDNN weights)."""
    return (
        x_AD.device.type == "cuda"
        and w13_EFD.device == x_AD.device
        and hasattr(F, "grouped_mm")
        and w13_EFD.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not (torch.is_grad_enabled() and (x_AD.requires_grad or w13_EFD.requires_grad))
        and torch.cuda.get_device_capability(x_AD.device) >= (8, 0)
    )


def run_experts_autograd(
    x_AD: torch.Tensor, counts: list[int], w13_EFD: torch.Tensor, w2_EDF: torch.Tensor
) -> torch.Tensor:
    """:func:`run_experts` written without ``out=`` so autograd can differentiate it."""
    outs = []
    for e, x_nD in enumerate(torch.split(x_AD, counts)):
        if x_nD.shape[0] == 0:
            continue
        gate_nF, up_nF = (x_nD @ w13_EFD[e].t()).chunk(2, dim=-1)
        outs.append((F.silu(gate_nF) * up_nF) @ w2_EDF[e].t())
    return torch.cat(outs) if outs else x_AD.new_zeros(x_AD.shape)


class _FusedCache:
    """An :class:`ExpertBank`'s :class:`kernels.ExpertPointers`, made on first use; empty again
    in a copy or after pickling (addresses are per process, the blocks are made again)."""

    __slots__ = ("fast", "key", "ptrs", "result")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.ptrs: kernels.ExpertPointers | None = None
        self.fast: tuple | None = None  # fused_pointers' cheap check, and its answer
        self.result: tuple[kernels.ExpertPointers, int] | None = None

    def __deepcopy__(self, memo: dict) -> _FusedCache:
        return _FusedCache()

    def __reduce__(self) -> tuple:
        return (_FusedCache, ())


class ExpertBank(nn.Module):
    """The E experts of one MoE layer, stacked: ``w13`` (E, 2F, D) and ``w2`` (E, D, F)."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        # inference: each expert's weights packed for oneDNN (large slices), see run_experts
        self._packed = [(PackedWeight(), PackedWeight()) for _ in range(n_experts)]
        self._fused = _FusedCache()  # see fused_pointers

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w13, std=std)
        nn.init.normal_(self.w2, std=out_std)

    def forward(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if torch.is_grad_enabled() and (x_AD.requires_grad or self.w13.requires_grad):
            return run_experts_autograd(x_AD, counts, self.w13, self.w2)
        return run_experts(x_AD, counts, self.w13, self.w2, self._packed)

    def run(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The experts on expert-sorted rows, ``counts_E[e]`` rows each (a tensor on the rows'
        device). On a GPU, for inference, two grouped GEMMs whose offsets never leave the
        device (:func:`run_experts_grouped`); otherwise :meth:`forward` with the counts read
        once (the CPU's native kernel and per-slice GEMMs, or autograd)."""
        if grouped_applies(x_AD, self.w13):
            return run_experts_grouped(x_AD, counts_E, self.w13, self.w2)
        return self(x_AD, counts_E.tolist())

    def fused_pointers(self, x_dtype: torch.dtype) -> tuple[kernels.ExpertPointers, int] | None:
        """Every expert's weights as the address arrays :func:`kernels.moe_topk_experts` takes
        for activations of ``x_dtype``, with the most rows per expert it may give the kernel
        (as :func:`run_experts` would); None where that path does not apply. In blocks where
        :func:`kernels.supports_blocked` (float32 on AVX-512F, bfloat16 on AVX512-BF16): all
        experts at once (a decode step soon touches them all), stacked in one buffer per matrix
        on huge pages (:mod:`.hugepages`), which :func:`run_experts` then shares through the
        experts' holders; otherwise the stacked weights as they are, where
        :func:`kernels.supports` takes them with ``x_dtype`` equal to theirs. Made on first use
        and again after the weights change."""
        w13p, w2p = self.w13, self.w2
        # NOTE: checked on every decode step of every layer, right after the experts' weights
        # streamed through the caches: only a few attribute reads before the cached answer
        # (the full check below took ~33 us cold, 3 % of a 16-token bfloat16 layer)
        fast = (x_dtype, w13p.dtype, w13p.data_ptr(), w13p._version, w2p.data_ptr(), w2p._version)
        cache = self._fused
        if cache.fast == fast:
            return cache.result
        w13, w2 = w13p.detach(), w2p.detach()
        result = None
        if w13.dtype == x_dtype and kernels.supports(w13[0], x_dtype):
            blocked = kernels.supports_blocked(w13[0], x_dtype)
            key = (weight_identity(w13), weight_identity(w2), blocked)
            if cache.ptrs is None or cache.key != key:
                if blocked:
                    m13, m2 = self._stacked_blocks(w13, w2)
                else:
                    m13, m2 = list(w13.contiguous()), list(w2.contiguous())
                cache.ptrs, cache.key = kernels.ExpertPointers(m13, m2, blocked=blocked), key
            result = (cache.ptrs, kernel_max_rows(w13[0], blocked))
        # the weights stay alive while the result holds them (blocks' holders, ExpertPointers),
        # so their addresses cannot be reused by other tensors with the same version
        cache.fast, cache.result = fast, result
        return result

    def _stacked_blocks(
        self, w13: torch.Tensor, w2: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every expert's blocks, in one huge-page buffer per matrix, handed to the holders."""
        E, F2, D = w13.shape
        b13 = hugepages.empty((E, *kernels.block_shape(F2, D, w13.dtype)), w13.dtype)
        b2 = hugepages.empty((E, *kernels.block_shape(D, F2 // 2, w2.dtype)), w2.dtype)
        for e, (h13, h2) in enumerate(self._packed):
            h13.adopt_blocks(w13[e], kernels.block_weights(w13[e], out=b13[e]))
            h2.adopt_blocks(w2[e], kernels.block_weights(w2[e], out=b2[e]))
        return list(b13), list(b2)

    # --- per-expert views in the Hugging Face / checkpoint layout (w1 gate, w3 up, w2 down) ---
    def expert_tensors(self, e: int) -> dict[str, torch.Tensor]:
        w1, w3 = self.w13[e].detach().split(self.d_ff, dim=0)
        return {"w1": w1.contiguous(), "w3": w3.contiguous(), "w2": self.w2[e].detach().clone()}

    @torch.no_grad()
    def load_expert(self, e: int, tensors: dict[str, torch.Tensor]) -> None:
        self.w13[e].copy_(torch.cat([tensors["w1"], tensors["w3"]], dim=0))
        self.w2[e].copy_(tensors["w2"])


def init_std(d_model: int, n_layers: int, base: float) -> tuple[float, float]:
    """(std for input projections, std for output projections scaled by depth, GPT-2 style)."""
    return base, base / math.sqrt(2 * n_layers)
