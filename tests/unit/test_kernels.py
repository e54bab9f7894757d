"""The native thin-slice expert kernel against the PyTorch path it replaces (no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from expertmesh.platform.model import kernels
from expertmesh.platform.model.experts import (
    KERNEL_MAX_ROWS,
    KERNEL_MAX_ROWS_BLOCKED_BF16,
    run_experts,
)

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason="native kernel needs Linux x86-64 with AVX2/FMA and a C compiler",
)
E, D, F = 8, 64, 176
# the AVX512-BF16 path (bfloat16 weights and activations, skipped on CPUs without it) and AVX2
BOTH_PATHS = pytest.mark.parametrize(
    "avx512",
    [
        pytest.param(
            True,
            marks=pytest.mark.skipif(not kernels.has_avx512_bf16(), reason="no AVX512-BF16"),
        ),
        False,
    ],
    ids=["avx512-bf16", "avx2"],
)


def weights(
    dtype: torch.dtype, seed: int = 0, d: int = D, f: int = F
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * f, d, generator=g) / d**0.5
    w2 = torch.randn(E, d, f, generator=g) / f**0.5
    return w13.to(dtype), w2.to(dtype)


def reference(
    x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor, *, round_act=False
) -> torch.Tensor:
    """Plain float32 PyTorch, one expert slice at a time. ``round_act``: the SwiGLU activations
    rounded to bfloat16 before the down projection, as PyTorch's bfloat16 FFN does (and the
    kernel's AVX512-BF16 path)."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        gate, up = (x[start : start + n] @ w13[e].float().t()).chunk(2, dim=-1)
        act = torch.nn.functional.silu(gate) * up
        if round_act:
            act = act.to(torch.bfloat16).float()
        outs.append(act @ w2[e].float().t())
        start += n
    return torch.cat(outs)


def rounding_slack(
    x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """How far from ``reference(..., round_act=True)`` an output may lie because an activation
    rounded to the other neighbouring bfloat16: the kernel's float32 activations differ from
    PyTorch's by float32 rounding (other sum order, its own exp, ~1e-7), so one lying that close
    to a midpoint between two bfloat16 may round the other way (~1 in 10^5 elements; each
    moves its row's outputs by 1 bfloat16 ulp times w2, up to ~2e-4 here). Activations within
    2^-16 (relative) of a midpoint count."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        gate, up = (x[start : start + n] @ w13[e].float().t()).chunk(2, dim=-1)
        act = torch.nn.functional.silu(gate) * up
        lo, hi = (act * (1 - 2**-16)).to(torch.bfloat16), (act * (1 + 2**-16)).to(torch.bfloat16)
        outs.append((hi.float() - lo.float()).abs() @ w2[e].float().abs().t())
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "counts",
    [[4] * E, [0, 1, 2, 3, 5, 7, 9, 13], [KERNEL_MAX_ROWS, 0, 0, 0, 0, 0, 0, 1], [0] * 7 + [3]],
)
def test_kernel_equals_pytorch(dtype: torch.dtype, counts: list[int]) -> None:
    w13, w2 = weights(dtype)
    x = torch.randn(sum(counts), D)
    out = torch.full_like(x, float("nan"))
    starts = [sum(counts[:e]) for e in range(E)]
    kernels.thin_experts(x, starts, counts, w13, w2, out)
    torch.testing.assert_close(out, reference(x, counts, w13, w2), rtol=1e-5, atol=1e-5)


# Every row count from 1 to 16 (the kernel picks its tile shape by count; above 12 rows a slice
# takes several passes), a few larger ones, uneven mixes; widths that are multiples of 16 and
# ones that are not (bfloat16 rows are widened 16 at a time, with an 8-wide tail).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("d", "f"), [(64, 176), (72, 184), (8, 8), (24, 40)])
@pytest.mark.parametrize(
    "counts",
    [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16], [6, 0, 25, 1, 40, 4, 3, 2]],
)
def test_kernel_every_row_count_and_width(
    dtype: torch.dtype, d: int, f: int, counts: list[int]
) -> None:
    w13, w2 = weights(dtype, seed=d + f, d=d, f=f)
    x = torch.randn(sum(counts), d)
    out = torch.full_like(x, float("nan"))
    starts = [sum(counts[:e]) for e in range(E)]
    kernels.thin_experts(x, starts, counts, w13, w2, out)
    torch.testing.assert_close(out, reference(x, counts, w13, w2), rtol=1e-5, atol=1e-5)


@BOTH_PATHS
@pytest.mark.parametrize(("d", "f"), [(64, 176), (72, 184), (8, 8), (40, 48)])
@pytest.mark.parametrize(
    "counts",
    [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16], [21, 0, 45, 1, 20, 4, 3, 2]],
)
def test_kernel_bf16_activations(avx512: bool, d: int, f: int, counts: list[int]) -> None:
    """bfloat16 activations and weights. The AVX512-BF16 path (pair dot products, every row
    count up to and past its one-pass limit of 20, widths with 8/16/24-element tails) equals
    float32 PyTorch with the SwiGLU activations rounded to bfloat16 before the down projection
    (and so differs from float32 PyTorch); the AVX2 path equals float32 PyTorch."""
    w13, w2 = weights(torch.bfloat16, seed=d + f, d=d, f=f)
    g = torch.Generator().manual_seed(d * f + sum(counts))
    x = torch.randn(sum(counts), d, generator=g).to(torch.bfloat16)
    out = torch.full(x.shape, float("nan"))
    starts = [sum(counts[:e]) for e in range(E)]
    kernels.thin_experts(x, starts, counts, w13, w2, out, avx512=avx512)
    exact = reference(x.float(), counts, w13, w2)
    if not avx512:
        torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
        return
    want = reference(x.float(), counts, w13, w2, round_act=True)
    slack = rounding_slack(x.float(), counts, w13, w2)
    excess = (out - want).abs() - (1e-5 + 1e-5 * want.abs() + slack)
    assert excess.max() <= 0, f"off the rounded reference by {excess.max():.3g} beyond tolerance"
    assert (out - exact).abs().max() > 1e-6  # it does round: float32 activations give another sum


@BOTH_PATHS
def test_avx512_path_rounds_activations_to_nearest_even(avx512: bool) -> None:
    """Activations exactly on and either side of the midpoints between bfloat16 values: the
    AVX512-BF16 path rounds them as PyTorch's float32 -> bfloat16 does (ties to even), the AVX2
    path keeps them in float32; a NaN stays NaN. Every sum here is exact: gate = 128 (silu(128)
    is 128 in float32), up = a + b for bfloat16 a, b, and w2 the identity picks act out."""
    n = 40  # D = F = n: 2 blocks of 16 and a tail of 8 in the conversion
    j = torch.arange(n)
    a = torch.where(j % 2 == 0, 1.0, -1.0) * 2.0 ** (j // 8 - 2)
    b = a * (j % 8) * 2.0**-9  # a + b: 1 + k/4 bfloat16 ulps of a, k = 0..7 (k = 2, 6: ties)
    w13 = torch.zeros(1, 2 * n, n)
    w13[0, :n, 2] = 128.0
    w13[0, n:, 0], w13[0, n:, 1] = a, b
    w2 = torch.eye(n).unsqueeze(0)
    x = torch.zeros(2, n)
    x[0, :3] = 1.0
    x[1, 0] = float("nan")
    out = torch.full((2, n), 7.0)
    kernels.thin_experts(x.bfloat16(), [0], [2], w13.bfloat16(), w2.bfloat16(), out, avx512=avx512)
    act = 128.0 * (a + b)
    rounded = act.to(torch.bfloat16).float()
    assert not torch.equal(rounded, act)
    assert torch.equal(out[0], rounded if avx512 else act)
    assert out[1].isnan().all()


def test_kernel_silu_at_extremes() -> None:
    """Gate values far out on both sides (the kernel's exp is clamped there) and at zero."""
    w13, w2 = weights(torch.float32)
    x = torch.zeros(5, D)
    x[1, 0], x[2, 0], x[3, 0], x[4, 0] = 1e3, -1e3, 30.0, -30.0
    w13[0, :F, 0] = torch.linspace(-1, 1, F)
    out = torch.full_like(x, float("nan"))
    kernels.thin_experts(x, [0], [5], w13[:1], w2[:1], out)
    # outputs reach ~100 here: float32 sums in another order differ by ~1e-5 relative
    torch.testing.assert_close(out, reference(x, [5], w13, w2), rtol=1e-4, atol=1e-5)


def test_experts_with_count_zero_leave_their_rows_alone() -> None:
    """Only the experts given a count are run: the caller runs the rest (large slices) itself."""
    w13, w2 = weights(torch.float32)
    counts = [3, 2]
    x = torch.randn(5, D)
    out = torch.full_like(x, 7.0)
    kernels.thin_experts(x, [0, 3], [0, 2], w13[:2], w2[:2], out)
    assert torch.equal(out[:3], torch.full((3, D), 7.0))
    torch.testing.assert_close(out[3:], reference(x, counts, w13[:2], w2[:2])[3:])


def test_run_experts_mixes_kernel_and_gemm_slices() -> None:
    """Slices above KERNEL_MAX_ROWS go to the GEMM path in the same call; lists of per-expert
    weights (as expert shards hold them) work like the stacked bank."""
    w13, w2 = weights(torch.float32)
    counts = [KERNEL_MAX_ROWS + 9, 1, 0, 30, 2, KERNEL_MAX_ROWS + 1, 5, 0]
    x = torch.randn(sum(counts), D)
    want = reference(x, counts, w13, w2)
    torch.testing.assert_close(run_experts(x, counts, w13, w2), want, rtol=1e-5, atol=1e-5)
    got = run_experts(x, counts, list(w13.unbind(0)), list(w2.unbind(0)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "x_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16,) * 2],
    ids=["fp32", "bf16-weights", "bf16"],
)
@pytest.mark.parametrize("n", [2, 4, 6, 9, 13, 25, 40])
def test_rows_do_not_depend_on_batch_or_thread_count(
    dtype: torch.dtype, x_dtype: torch.dtype, n: int
) -> None:
    """A token's output is the same alone or in a batch of any size (each size runs its own
    tile shape), on 1 or 2 threads: distributed and in-process serving must agree token for
    token."""
    w13, w2 = weights(dtype, d=72, f=184)
    x = torch.randn(n, 72).to(x_dtype)
    full = torch.empty(n, 72)
    kernels.thin_experts(x, [0], [n], w13[:1], w2[:1], full)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for i in sorted({0, n // 2, n - 1}):
            alone = torch.empty(1, 72)
            kernels.thin_experts(x[i : i + 1], [0], [1], w13[:1], w2[:1], alone)
            assert torch.equal(alone[0], full[i])
    finally:
        torch.set_num_threads(threads)


def test_bad_arguments_are_named() -> None:
    w13, w2 = weights(torch.float32)
    x = torch.randn(kernels.MAX_ROWS + 1, D)
    with pytest.raises(kernels.KernelError, match=f"more than {kernels.MAX_ROWS} rows"):
        kernels.thin_experts(x, [0], [len(x)], w13[:1], w2[:1], torch.empty_like(x))
    with pytest.raises(kernels.KernelError, match="expert 1"):
        kernels.thin_experts(
            x, [0, 1], [1, 1], [w13[0], w13[1][:, :8]], w2[:2], torch.empty_like(x)
        )
    with pytest.raises(kernels.KernelError, match="float32 or bfloat16"):
        kernels.thin_experts(x.double(), [0], [1], w13[:1], w2[:1], torch.empty_like(x))
    assert not kernels.supports(torch.empty(2 * F, D + 4), torch.float32)  # D not a multiple of 8


def test_build_digest_covers_every_included_header() -> None:
    """A header the sources include but the digest leaves out would keep a stale library."""
    import re

    included = {
        name for src in kernels.SOURCES for name in re.findall(r'#include "(.+?)"', src.read_text())
    }
    assert included and included == {h.name for h in kernels.HEADERS}
    assert all(h.is_file() for h in kernels.HEADERS)


def test_build_is_cached_and_atomic(tmp_path) -> None:
    lib = kernels.build(tmp_path)
    mtime = lib.stat().st_mtime_ns
    assert kernels.build(tmp_path) == lib and lib.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no temporary files left


@pytest.mark.parametrize(
    ("dtype", "tol"), [("float32", 1e-5), ("bfloat16", 2e-2)], ids=["fp32", "bf16"]
)
def test_switch_off_falls_back_to_the_same_numbers(dtype: str, tol: float) -> None:
    """EXPERTMESH_NATIVE_KERNELS=0: no kernel, the PyTorch path, the same outputs (bfloat16
    activations and weights: each side sums in float32 or rounds to bfloat16 at its own
    points)."""
    counts = [3, 0, 6, 1, 13, 2, 5, 4]
    code = (
        "import torch; from expertmesh.platform.model import kernels;"
        "from expertmesh.platform.model.experts import run_experts;"
        "assert not kernels.available();"
        "g = torch.Generator().manual_seed(0);"
        f"w13 = (torch.randn({E}, {2 * F}, {D}, generator=g) / {D**0.5}).to(torch.{dtype});"
        f"w2 = (torch.randn({E}, {D}, {F}, generator=g) / {F**0.5}).to(torch.{dtype});"
        f"x = torch.randn({sum(counts)}, {D}, generator=g).to(torch.{dtype});"
        f"torch.save(run_experts(x, {counts}, w13, w2), __import__('sys').argv[1])"
    )
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"kernel-off-{os.getpid()}.pt")
    env = dict(os.environ, EXPERTMESH_NATIVE_KERNELS="0")
    subprocess.run([sys.executable, "-c", code, path], env=env, check=True)
    try:
        off = torch.load(path)
    finally:
        os.unlink(path)
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, 2 * F, D, generator=g) / D**0.5).to(getattr(torch, dtype))
    w2 = (torch.randn(E, D, F, generator=g) / F**0.5).to(getattr(torch, dtype))
    x = torch.randn(sum(counts), D, generator=g).to(getattr(torch, dtype))
    on = run_experts(x, counts, w13, w2)
    assert on.dtype == off.dtype == getattr(torch, dtype)
    torch.testing.assert_close(on.float(), off.float(), rtol=tol, atol=tol)
    want = reference(x.float(), counts, w13, w2)
    torch.testing.assert_close(on.float(), want, rtol=tol, atol=tol)


# ---------------------------------------------------------------------- decode attention
def masked_attention(
    q_BHK: torch.Tensor, k_BGLK: torch.Tensor, v_BGLK: torch.Tensor, n_keys_B: torch.Tensor
) -> torch.Tensor:
    """The reference: PyTorch's SDPA in float64, row b seeing its first n_keys_B[b] keys."""
    L = k_BGLK.shape[2]
    mask = (torch.arange(L)[None, :] < n_keys_B[:, None])[:, None, None]
    return torch.nn.functional.scaled_dot_product_attention(
        q_BHK.double()[:, :, None],
        k_BGLK.double(),
        v_BGLK.double(),
        attn_mask=mask,
        enable_gqa=True,
    )[:, :, 0].float()


@pytest.mark.parametrize(
    "H,G,K,L",
    [(8, 4, 32, 96), (4, 4, 8, 1), (8, 2, 16, 9), (16, 2, 64, 33), (2, 1, 24, 8), (32, 2, 8, 17)],
)
def test_decode_attention_matches_sdpa(H: int, G: int, K: int, L: int) -> None:
    g = torch.Generator().manual_seed(H * 1000 + L)
    B, M = 6, L + 5  # the cache holds more positions than the step reads
    k_buf, v_buf = torch.randn(2, B + 2, G, M, K, generator=g)
    q = torch.randn(B, H, K, generator=g) * 2
    n_keys = torch.randint(1, L + 1, (B,), generator=g)
    n_keys[0], n_keys[-1] = 1, L  # a row at position 0 and one at the step's last position
    # read in place: a slice of the cache (row strides of the whole buffer), and gathered
    k_view, v_view = k_buf[1 : B + 1, :, :L], v_buf[1 : B + 1, :, :L]
    rows = torch.tensor([3, 0, 7, 5, 2, 1])
    for k, v in ((k_view, v_view), (k_buf[rows, :, :L], v_buf[rows, :, :L])):
        assert kernels.supports_decode_attention(q, k, v)
        got = kernels.decode_attention(q, k, v, n_keys)
        assert torch.allclose(got, masked_attention(q, k, v, n_keys), atol=2e-6, rtol=1e-5)


def test_decode_attention_ignores_what_a_row_must_not_see() -> None:
    g = torch.Generator().manual_seed(1)
    B, H, G, K, L = 3, 4, 2, 16, 12
    k, v = torch.randn(2, B, G, L, K, generator=g)
    q = torch.randn(B, H, K, generator=g)
    n_keys = torch.tensor([1, 5, 12])
    want = kernels.decode_attention(q, k, v, n_keys)
    k[0, :, 1:], v[0, :, 1:] = 1e4, float("nan")  # past row 0's position: must not leak in
    k[1, :, 5:], v[1, :, 5:] = -1e4, float("inf")
    assert torch.equal(kernels.decode_attention(q, k, v, n_keys), want)
    # a single visible key: its value, whatever the score
    assert torch.allclose(want[0], v[0, :, :1].repeat_interleave(H // G, 0)[:, 0], atol=1e-6)


def test_decode_attention_peaked_and_flat_softmax() -> None:
    """Scores far apart (exp underflows to 0 for all but the top key) and all equal."""
    B, H, G, K, L = 2, 2, 1, 8, 40
    k = torch.zeros(B, G, L, K)
    v = torch.randn(B, G, L, K, generator=torch.Generator().manual_seed(2))
    q = torch.zeros(B, H, K)
    k[0, 0, 17, 0] = 1.0
    q[0, :, 0] = 1e3  # row 0: key 17 scores 1e3 / sqrt(8), the rest 0
    n_keys = torch.tensor([L, 23])
    got = kernels.decode_attention(q, k, v, n_keys)
    assert torch.allclose(got[0], v[0, 0, 17].expand(H, K), atol=1e-6)
    assert torch.allclose(got[1], v[1, 0, :23].mean(0).expand(H, K), atol=1e-6)  # uniform
    assert torch.isfinite(got).all()


def test_decode_attention_refuses_what_it_cannot_read() -> None:
    q, k = torch.randn(2, 4, 16), torch.randn(2, 2, 5, 16)
    assert not kernels.supports_decode_attention(q[..., :12], k[..., :12], k[..., :12])  # K % 8
    assert not kernels.supports_decode_attention(q.double(), k.double(), k.double())
    assert not kernels.supports_decode_attention(q, k, k.transpose(2, 3).contiguous().mT)
    assert not kernels.supports_decode_attention(q[:, :3], k, k)  # 3 query heads over 2
    with pytest.raises(kernels.KernelError, match="float32 CPU tensors"):
        kernels.decode_attention(q.double(), k.double(), k.double(), torch.tensor([1, 2]))
    with pytest.raises(kernels.KernelError, match=r"n_keys must have shape \(2,\)"):
        kernels.decode_attention(q, k, k, torch.tensor([1, 2, 3]))


# ---------------------------------------------------------------------- decode step (rotary + append)
def torch_decode_step(
    qkv_BRK: torch.Tensor,
    pos_B: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    first: int,
    H: int,
) -> torch.Tensor:
    """The PyTorch path the kernel replaces: layers.apply_rotary, index_put into the cache,
    then the float64 reference attention over positions 0..pos."""
    from expertmesh.platform.model.layers import Rotary, apply_rotary

    B, _, K = qkv_BRK.shape
    G = k_buf.shape[1]
    cos, sin = Rotary(K, 10000.0)(pos_B[:, None], torch.float32)
    qk = apply_rotary(qkv_BRK[:, None, : H + G], cos, sin)[:, 0]
    slots = torch.arange(first, first + B)
    k_buf[slots, :, pos_B] = qk[:, H:]
    v_buf[slots, :, pos_B] = qkv_BRK[:, H + G :]
    L = int(pos_B.max()) + 1
    k, v = k_buf[slots, :, :L].nan_to_num(0.0), v_buf[slots, :, :L].nan_to_num(0.0)  # masked
    return masked_attention(qk[:, :H], k, v, pos_B + 1)


@pytest.mark.parametrize("H,G,K", [(8, 4, 32), (4, 4, 8), (16, 2, 64), (2, 1, 24)])
def test_decode_rope_attention_equals_rotary_append_attention(H: int, G: int, K: int) -> None:
    from expertmesh.platform.model.layers import Rotary

    g = torch.Generator().manual_seed(H + K)
    S, M, B, first = 9, 40, 5, 3  # slots 3..7 of 9: the others must stay untouched
    k_buf, v_buf = torch.randn(2, S, G, M, K, generator=g)
    pos = torch.tensor([0, 17, 39, 4, 22])  # position 0, and the cache's last
    for b, p in enumerate(pos.tolist()):  # positions past a row's own: must not leak in
        k_buf[first + b, :, p + 1 :], v_buf[first + b, :, p + 1 :] = 1e4, float("nan")
    qkv = torch.randn(B, H + 2 * G, K, generator=g) * 2
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    want = torch_decode_step(qkv, pos, k_ref, v_ref, first, H)
    cos, sin = (t[:, 0] for t in Rotary(K, 10000.0)(pos[:, None], torch.float32))
    assert kernels.supports_decode_rope_attention(qkv, cos, k_buf, v_buf)
    got = kernels.decode_rope_attention(qkv, cos, sin, k_buf, v_buf, first, pos, H)
    # the cache, written entries and all others, bitwise as the PyTorch path leaves it
    assert torch.equal(k_buf.nan_to_num(7.0), k_ref.nan_to_num(7.0))
    assert torch.equal(v_buf.nan_to_num(7.0), v_ref.nan_to_num(7.0))
    assert torch.allclose(got, want, atol=2e-6, rtol=1e-5)


def test_decode_rope_attention_refuses_before_writing() -> None:
    from expertmesh.platform.model.layers import Rotary

    H, G, K, S, M = 4, 2, 16, 4, 10
    k_buf, v_buf = torch.randn(2, S, G, M, K)
    before = (k_buf.clone(), v_buf.clone())
    qkv = torch.randn(2, H + 2 * G, K)
    cos, sin = (t[:, 0] for t in Rotary(K, 10000.0)(torch.tensor([[3], [9]]), torch.float32))
    with pytest.raises(kernels.KernelError, match="outside the cache's 10"):
        kernels.decode_rope_attention(qkv, cos, sin, k_buf, v_buf, 0, torch.tensor([3, 10]), H)
    with pytest.raises(kernels.KernelError, match=r"slots 3\.\.4 outside the cache's 4"):
        kernels.decode_rope_attention(qkv, cos, sin, k_buf, v_buf, 3, torch.tensor([3, 9]), H)
    with pytest.raises(kernels.KernelError, match=r"expected 6 \+ 2 x 2"):
        kernels.decode_rope_attention(qkv, cos, sin, k_buf, v_buf, 0, torch.tensor([3, 9]), 6)
    with pytest.raises(kernels.KernelError, match="float32 CPU tensors"):
        kernels.decode_rope_attention(
            qkv, cos, sin, k_buf.double(), v_buf, 0, torch.tensor([3, 9]), H
        )
    assert not kernels.supports_decode_rope_attention(qkv[:, :, :12], cos[:, :12], k_buf, v_buf)
    assert torch.equal(k_buf, before[0]) and torch.equal(v_buf, before[1])


# ---------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("shape", [(64, 1, 256), (3, 8), (5, 7, 40), (0, 16)])
def test_rms_norm_equals_pytorch(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    assert kernels.supports_rms_norm(x, w)
    got = kernels.rms_norm(x, w, 1e-5)
    want = torch.nn.functional.rms_norm(x.double(), (shape[-1],), w.double(), 1e-5)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-6, rtol=1e-6)
    z = torch.zeros(2, shape[-1])  # eps keeps an all-zero row finite
    assert torch.equal(kernels.rms_norm(z, w, 1e-5), torch.zeros_like(z))


def test_rms_norm_refuses_what_it_cannot_read() -> None:
    x, w = torch.randn(4, 16), torch.randn(16)
    assert not kernels.supports_rms_norm(x[:, :12], w[:12])  # not a multiple of 8
    assert not kernels.supports_rms_norm(x.t(), w)  # not contiguous (and the wrong width)
    assert not kernels.supports_rms_norm(x, torch.randn(8))
    assert not kernels.supports_rms_norm(x.double(), w.double())
    with pytest.raises(kernels.KernelError, match="multiple of 8"):
        kernels.rms_norm(x[:, :12], w[:12], 1e-5)


def test_rms_norm_module_takes_the_kernel_in_inference_only(monkeypatch) -> None:
    from expertmesh.platform.model.layers import RMSNorm

    norm = RMSNorm(32, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(6, 32)
    calls: list[int] = []
    real = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda *a: calls.append(1) or real(*a))
    y = norm(x)  # grad mode: PyTorch's, differentiable
    assert y.requires_grad and calls == []
    with torch.no_grad():
        assert torch.allclose(norm(x), y.detach(), atol=1e-6)
    assert calls == [1]


# --- float32 weights in blocks (AVX-512F): the path ExpertBank and the shards take ---
needs_avx512f = pytest.mark.skipif(not kernels.has_avx512f(), reason="no AVX-512F")


def blocked(w: torch.Tensor) -> list[torch.Tensor]:
    return [kernels.block_weights(m) for m in w]


def test_block_weights_layout() -> None:
    w = torch.arange(32 * 5, dtype=torch.float32).reshape(32, 5)
    b = kernels.block_weights(w)
    assert b.shape == (2, 5, 16) and b.is_contiguous()
    for blk in range(2):
        for k in range(5):
            for r in range(16):
                assert b[blk, k, r] == w[16 * blk + r, k]
    with pytest.raises(kernels.KernelError, match="multiples of 16"):
        kernels.block_weights(torch.zeros(24, 8))
    with pytest.raises(kernels.KernelError, match="float32 rows"):
        kernels.block_weights(torch.zeros(32, 8, dtype=torch.float16))
    with pytest.raises(kernels.KernelError, match="even row length"):
        kernels.block_weights(torch.zeros(64, 7, dtype=torch.bfloat16))


def test_block_weights_layout_bf16() -> None:
    """bfloat16: groups of (K/2, 4, 16, 2): per pair of columns, four blocks of 16 rows, each
    row's two weights side by side."""
    w = torch.arange(128 * 6, dtype=torch.float32).reshape(128, 6).to(torch.bfloat16)
    b = kernels.block_weights(w)
    assert b.shape == (2, 3, 4, 16, 2) and b.is_contiguous() and b.dtype == torch.bfloat16
    assert kernels.block_shape(128, 6, torch.bfloat16) == tuple(b.shape)
    for g in range(2):
        for p in range(3):
            for blk in range(4):
                for r in range(16):
                    for j in range(2):
                        assert b[g, p, blk, r, j] == w[64 * g + 16 * blk + r, 2 * p + j]
    with pytest.raises(kernels.KernelError, match="multiples of 64"):
        kernels.block_weights(torch.zeros(48, 8, dtype=torch.bfloat16))


@needs_avx512f
@pytest.mark.parametrize(("d", "f"), [(64, 176), (32, 16), (256, 704), (48, 208)])
@pytest.mark.parametrize(
    "counts",
    [[1, 0, 2, 3, 4, 5, 6, 7], [12, 13, 24, 25, 0, 0, 40, 1], [128] + [0] * 7, [0] * 7 + [9]],
)
def test_blocked_equals_pytorch(d: int, f: int, counts: list[int]) -> None:
    """Every row group shape (1-12 rows, even groups above), an odd number of 16-row blocks
    per thread (f=16, 208), and experts without rows."""
    w13, w2 = weights(torch.float32, d=d, f=f)
    x = torch.randn(sum(counts), d)
    out = torch.full_like(x, float("nan"))
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()][:-1]
    b13 = [kernels.block_weights(w13[e]) if n else None for e, n in enumerate(counts)]
    b2 = [kernels.block_weights(w2[e]) if n else None for e, n in enumerate(counts)]
    kernels.thin_experts(x, starts, counts, b13, b2, out, blocked=True)
    torch.testing.assert_close(out, reference(x, counts, w13, w2), rtol=1e-5, atol=2e-5)


needs_avx512_bf16 = pytest.mark.skipif(not kernels.has_avx512_bf16(), reason="no AVX512-BF16")


@needs_avx512_bf16
@pytest.mark.parametrize(("d", "f"), [(64, 192), (64, 64), (256, 704), (128, 320)])
@pytest.mark.parametrize(
    "counts",
    [[1, 0, 2, 3, 4, 5, 6, 7], [12, 13, 24, 25, 0, 0, 40, 1], [128] + [0] * 7, [0] * 7 + [9]],
)
def test_blocked_bf16_equals_rounded_reference(d: int, f: int, counts: list[int]) -> None:
    """bfloat16 weights and activations in groups: float32 PyTorch with the SwiGLU
    activations rounded to bfloat16, as on the row-major AVX512-BF16 path, for every pass shape
    (1-6 rows, even passes above), odd group counts per thread (f=320), a thread with no group
    (d=64 in the down projection) and experts without rows; and the row-major path's numbers
    up to float32 summation order."""
    w13, w2 = weights(torch.bfloat16, seed=d + f, d=d, f=f)
    g = torch.Generator().manual_seed(d * f + sum(counts))
    x = torch.randn(sum(counts), d, generator=g).to(torch.bfloat16)
    out = torch.full(x.shape, float("nan"))
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()][:-1]
    b13 = [kernels.block_weights(w13[e]) if n else None for e, n in enumerate(counts)]
    b2 = [kernels.block_weights(w2[e]) if n else None for e, n in enumerate(counts)]
    kernels.thin_experts(x, starts, counts, b13, b2, out, blocked=True)
    want = reference(x.float(), counts, w13, w2, round_act=True)
    slack = rounding_slack(x.float(), counts, w13, w2)
    excess = (out - want).abs() - (2e-5 + 1e-5 * want.abs() + slack)
    assert excess.max() <= 0, f"off the rounded reference by {excess.max():.3g} beyond tolerance"
    if max(counts) <= kernels.MAX_ROWS:
        row_major = torch.empty_like(out)
        kernels.thin_experts(x, starts, counts, w13, w2, row_major)
        excess = (out - row_major).abs() - (2e-5 + 1e-5 * row_major.abs() + 2 * slack)
        assert excess.max() <= 0


@pytest.mark.parametrize(
    ("dtype", "f"),
    [
        pytest.param(torch.float32, 176, marks=needs_avx512f, id="fp32"),
        pytest.param(torch.bfloat16, 192, marks=needs_avx512_bf16, id="bf16"),
    ],
)
@pytest.mark.parametrize("n", [2, 9, 13, 25, 40])
def test_blocked_rows_do_not_depend_on_batch_or_thread_count(
    dtype: torch.dtype, f: int, n: int
) -> None:
    """As for the row-major path: one chain of multiply-adds per output element, whatever the
    batch (float32 blocks, bfloat16 groups)."""
    w13, w2 = weights(dtype, d=64, f=f)
    b13, b2 = blocked(w13[:1]), blocked(w2[:1])
    x = torch.randn(n, 64).to(dtype)
    full = torch.empty(n, 64)
    kernels.thin_experts(x, [0], [n], b13, b2, full, blocked=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for i in sorted({0, n // 2, n - 1}):
            alone = torch.empty(1, 64)
            kernels.thin_experts(x[i : i + 1], [0], [1], b13, b2, alone, blocked=True)
            assert torch.equal(alone[0], full[i])
    finally:
        torch.set_num_threads(threads)


@needs_avx512f
def test_blocked_refuses_what_it_cannot_read() -> None:
    w13, w2 = weights(torch.float32)
    x = torch.randn(3, D)
    with pytest.raises(kernels.KernelError, match="float32 weights and activations"):
        kernels.thin_experts(
            x.bfloat16(),
            [0],
            [3],
            blocked(w13[:1]),
            blocked(w2[:1]),
            torch.empty(3, D),
            blocked=True,
        )
    with pytest.raises(kernels.KernelError, match="expert 0"):  # row-major weights as blocks
        kernels.thin_experts(x, [0], [3], w13[:1], w2[:1], torch.empty(3, D), blocked=True)
    w13_64, w2_64 = weights(torch.bfloat16, d=D, f=192)
    b13_bf, b2_bf = blocked(w13_64[:1]), blocked(w2_64[:1])
    with pytest.raises(kernels.KernelError, match="bfloat16 ones on AVX512-BF16"):
        kernels.thin_experts(x, [0], [3], b13_bf, b2_bf, torch.empty(3, D), blocked=True)
    with pytest.raises(kernels.KernelError, match=r"expert 1: weights \(24, 64, 16\)"):
        mixed = [b13_bf[0], blocked(w13_64[1:2].float())[0]]  # float32 blocks beside bfloat16
        kernels.thin_experts(
            x.bfloat16(), [0, 2], [2, 1], mixed, [b2_bf[0]] * 2, torch.empty(3, D), blocked=True
        )
    assert not kernels.supports_blocked(torch.empty(2 * 24, D), torch.float32)  # F = 24
    assert not kernels.supports_blocked(torch.empty(2 * F, D), torch.bfloat16)  # weights fp32
    assert not kernels.supports_blocked(torch.empty(2 * F, D, dtype=torch.bfloat16), torch.float32)
    assert not kernels.supports_blocked(  # F = 176: not a multiple of 64
        torch.empty(2 * F, D, dtype=torch.bfloat16), torch.bfloat16
    )
    assert (
        kernels.supports_blocked(torch.empty(2 * 192, D, dtype=torch.bfloat16), torch.bfloat16)
        == kernels.has_avx512_bf16()
    )


@needs_avx512f
def test_run_experts_takes_blocks_from_the_holders_and_follows_weight_changes() -> None:
    """With holders (ExpertBank, shards) the kernel reads cached blocks; an in-place weight
    update is seen on the next call."""
    from expertmesh.platform.model.packed import PackedWeight

    w13, w2 = weights(torch.float32)
    holders = [(PackedWeight(), PackedWeight()) for _ in range(E)]
    counts = [3, 0, 5, 1, 0, 0, 2, 4]
    x = torch.randn(sum(counts), D)
    got = run_experts(x, counts, w13, w2, holders)
    torch.testing.assert_close(got, reference(x, counts, w13, w2), rtol=1e-5, atol=2e-5)
    assert holders[1][0]._blocks is None and holders[0][0]._blocks is not None  # no rows, no copy
    first = holders[0][0]._blocks
    run_experts(x, counts, w13, w2, holders)
    assert holders[0][0]._blocks is first  # made once
    with torch.no_grad():
        w13[0].mul_(2.0)
    got = run_experts(x, counts, w13, w2, holders)
    torch.testing.assert_close(got, reference(x, counts, w13, w2), rtol=1e-5, atol=2e-5)
    assert holders[0][0]._blocks is not first
    # a slice past the row-major kernel's limit (a prefill) takes the blocks too: no oneDNN copy
    counts = [KERNEL_MAX_ROWS + 72, 0, 0, 0, 0, 0, 0, 3]
    x = torch.randn(sum(counts), D)
    got = run_experts(x, counts, w13, w2, holders)
    torch.testing.assert_close(got, reference(x, counts, w13, w2), rtol=1e-5, atol=2e-5)
    assert all(h._packed is None for pair in holders for h in pair)


@needs_avx512f
@pytest.mark.parametrize("shape", [(1, 64), (13, 64), (64, 256), (3, 5, 64), (0, 64)])
@pytest.mark.parametrize("n_out", [16, 48, 512])
def test_blocked_linear_equals_f_linear(shape: tuple[int, ...], n_out: int) -> None:
    w = torch.randn(n_out, shape[-1])
    x = torch.randn(*shape)
    got = kernels.blocked_linear(x, kernels.block_weights(w))
    assert got.shape == (*shape[:-1], n_out)
    want = torch.nn.functional.linear(x.double(), w.double())
    assert got.numel() == 0 or (got.double() - want).abs().max() < 1e-4


@needs_avx512f
def test_blocked_linear_refuses_what_it_cannot_read() -> None:
    blocks = kernels.block_weights(torch.randn(32, 64))
    with pytest.raises(kernels.KernelError, match="float32 x"):
        kernels.blocked_linear(torch.randn(4, 64).bfloat16(), blocks)
    with pytest.raises(kernels.KernelError, match=r"x \(4, 48\)"):
        kernels.blocked_linear(torch.randn(4, 48), blocks)
    with pytest.raises(kernels.KernelError, match="blocks"):
        kernels.blocked_linear(torch.randn(4, 64), torch.randn(32, 64))


@needs_avx512f
def test_large_op_threads_change_no_result() -> None:
    """The router runs its large calls on 2 threads and everything else on 1; the in-process
    engine runs all on torch's count. Outputs must be the same bits either way."""
    from expertmesh.platform.model.layers import Rotary

    g = torch.Generator().manual_seed(3)
    rows = 64
    w = kernels.block_weights(torch.randn(512, 256, generator=g))
    x = torch.randn(rows, 256, generator=g)
    assert rows * 512 * 256 >= kernels.LARGE_LINEAR_MACS  # a large call
    S, M, B, G, H, K = 70, 48, 64, 4, 8, 32
    assert B >= kernels.LARGE_ATTENTION_ROWS
    pos = torch.randint(0, M, (B,), generator=g)
    qkv = torch.randn(B, H + 2 * G, K, generator=g)
    cos, sin = (t[:, 0] for t in Rotary(K, 10000.0)(pos[:, None], torch.float32))
    cache = torch.randn(2, S, G, M, K, generator=g)
    threads, before = torch.get_num_threads(), kernels.large_op_threads()
    results = []
    try:
        torch.set_num_threads(1)
        for large in (0, 2):
            kernels.set_large_op_threads(large)
            k_buf, v_buf = cache.clone()
            att = kernels.decode_rope_attention(qkv, cos, sin, k_buf, v_buf, 2, pos, H)
            results.append((kernels.blocked_linear(x, w), att, k_buf, v_buf))
    finally:
        torch.set_num_threads(threads)
        kernels.set_large_op_threads(before)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)
    with pytest.raises(ValueError, match="large-op threads"):
        kernels.set_large_op_threads(-1)


# --- the MoE layer's fused inference path: sort, gather, experts and combine in one call ---
def _moe_layer(d: int, f: int, dtype: torch.dtype = torch.float32, **overrides: object):
    from expertmesh.platform.config import ModelConfig
    from expertmesh.platform.model.moe import MoELayer

    cfg = ModelConfig(d_model=d, d_ff=f, n_experts=E, top_k=2, n_heads=2, n_kv_heads=1, **overrides)
    layer = MoELayer(cfg, layer=0).eval()
    assert layer.experts is not None
    layer.experts.reset_parameters(std=d**-0.5, out_std=f**-0.5)
    return layer.to(dtype)


def _both_paths(layer, x: torch.Tensor, monkeypatch, *, taken: bool = True, **kw: object):
    """The layer's output and stats with the fused path off, then on (``taken``: it must have
    answered; else it must have handed the call back to the general path)."""
    answers = []  # per native call: whether it ran the experts
    real_experts, real_layer = kernels.moe_topk_experts, kernels.moe_layer_topk

    def experts(*args: object) -> object:
        done = real_experts(*args)
        answers.append(done is not None)
        return done

    def whole_layer(*args: object, **kwargs: object) -> object:
        logits, done = real_layer(*args, **kwargs)
        answers.append(done is not None)
        return logits, done

    monkeypatch.setattr(kernels, "moe_topk_experts", experts)
    monkeypatch.setattr(kernels, "moe_layer_topk", whole_layer)
    with torch.no_grad():
        monkeypatch.setenv("EXPERTMESH_FUSED_MOE", "0")
        general = layer(x, return_routing=True, **kw)
        assert answers == []
        monkeypatch.setenv("EXPERTMESH_FUSED_MOE", "1")
        fused = layer(x, return_routing=True, **kw)
    # one call that ran the layer, or (declined) the whole layer's call and then the experts'
    assert answers == ([True] if taken else [False, False])
    return general, fused


def _assert_same(general, fused) -> None:
    (y0, s0), (y1, s1) = general, fused
    assert y1.dtype == y0.dtype and torch.equal(y0, y1)
    for name in ("token_idx_A", "expert_idx_A", "weight_A", "counts_E"):
        assert torch.equal(getattr(s0.routing, name), getattr(s1.routing, name)), name
    assert s1.routing.n_tokens == s0.routing.n_tokens


@needs_avx512f
@pytest.mark.parametrize(("d", "f"), [(64, 176), (256, 704), (48, 208)])
@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (1, 16), (2, 37), (128, 1)])
def test_fused_moe_layer_is_bitwise_the_general_path(d, f, shape, monkeypatch) -> None:
    """Same output bits and the same sorted routing: the weight product and the per-token sum
    happen in the same order and roundings as ``y * w`` and ``index_add_``."""
    layer = _moe_layer(d, f)
    general, fused = _both_paths(layer, torch.randn(*shape, d), monkeypatch)
    _assert_same(general, fused)
    (_, s0), (_, s1) = general, fused
    # the losses still read from the fused path's routing (a caller may ask in eval)
    torch.testing.assert_close(s1.aux_loss, s0.aux_loss)
    torch.testing.assert_close(s1.z_loss, s0.z_loss)
    assert s1.experts_per_token() == s0.experts_per_token()


@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (1, 5), (3, 2)])
def test_fused_moe_layer_bfloat16_is_bitwise_the_general_path(shape, monkeypatch) -> None:
    """bfloat16 weights and activations (row-major weights, the AVX512-BF16 or AVX2 kernel):
    the expert outputs, weights, products and sums rounded to bfloat16 where PyTorch rounds."""
    layer = _moe_layer(64, 176, torch.bfloat16)
    general, fused = _both_paths(layer, torch.randn(*shape, 64).bfloat16(), monkeypatch)
    _assert_same(general, fused)


@needs_avx512_bf16
@pytest.mark.parametrize(("d", "f"), [(64, 192), (256, 704)])
@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (1, 16), (2, 37), (128, 1)])
def test_fused_moe_layer_bfloat16_groups_are_bitwise_the_general_path(
    d, f, shape, monkeypatch
) -> None:
    """Widths that are multiples of 64: both paths read the experts' bfloat16 groups, stacked
    on huge pages by the fused path and shared with the general one through the holders."""
    layer = _moe_layer(d, f, torch.bfloat16)
    general, fused = _both_paths(layer, torch.randn(*shape, d).bfloat16(), monkeypatch)
    _assert_same(general, fused)
    ptrs, limit = layer.experts.fused_pointers(torch.bfloat16)
    assert ptrs.blocked and limit == KERNEL_MAX_ROWS_BLOCKED_BF16
    h13 = layer.experts._packed[3][0]
    assert h13._blocks.data_ptr() == ptrs.tensors[0][3].data_ptr()  # one copy, shared
    # and the groups are the general path's numbers: float32 reference, activations rounded
    x = torch.randn(5, d).bfloat16()
    counts = [5, 0, 0, 0, 0, 0, 0, 0]
    want = reference(
        x.float(), counts, layer.experts.w13.detach(), layer.experts.w2.detach(), round_act=True
    )
    got = run_experts(
        x, counts, layer.experts.w13.detach(), layer.experts.w2.detach(), layer.experts._packed
    )
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_fused_moe_layer_hands_large_slices_back(monkeypatch) -> None:
    """A slice larger than run_experts gives the kernel (bfloat16 where PyTorch multiplies it
    natively: 16 rows) is found before anything is written, and the general path answers."""
    from expertmesh.platform.model.experts import KERNEL_MAX_ROWS_NATIVE_BF16

    layer = _moe_layer(64, 176, torch.bfloat16)
    _, limit = layer.experts.fused_pointers(torch.bfloat16)
    if limit != KERNEL_MAX_ROWS_NATIVE_BF16:
        pytest.skip("PyTorch does not multiply bfloat16 natively here: no slice limit below 128")
    with torch.no_grad():
        layer.gate.weight.zero_()  # every token picks the same two experts
    general, fused = _both_paths(
        layer, torch.randn(1, limit + 1, 64).bfloat16(), monkeypatch, taken=False
    )
    _assert_same(general, fused)


@needs_avx512f
def test_fused_moe_layer_with_padding_bias_and_scale(monkeypatch) -> None:
    """valid_BT, a selection bias and a routed scale go around the fused call unchanged."""
    layer = _moe_layer(64, 176, balance_bias_rate=0.01, routed_scale=2.0)
    assert layer.expert_bias is not None
    layer.expert_bias.copy_(torch.linspace(-1, 1, E))
    x = torch.randn(3, 5, 64)
    valid = torch.rand(3, 5) > 0.3
    general, fused = _both_paths(layer, x, monkeypatch, valid_BT=valid)
    _assert_same(general, fused)
    assert (fused[0][~valid] == 0).all()


@needs_avx512f
def test_fused_moe_layer_follows_weight_changes_and_stays_out_of_training(monkeypatch) -> None:
    layer = _moe_layer(64, 176)
    x = torch.randn(2, 3, 64)
    _both_paths(layer, x, monkeypatch)
    with torch.no_grad():
        layer.experts.w13[3].mul_(-1.5)  # an in-place update: the cached blocks must follow
    general, fused = _both_paths(layer, x, monkeypatch)
    _assert_same(general, fused)
    # a layer that has used it can still be copied and pickled (Ray ships models)
    import copy
    import pickle

    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        with torch.no_grad():
            assert torch.equal(twin(x)[0], fused[0])
    # training, autograd, or more assignments than the blocked kernel takes: the general path
    calls = []
    monkeypatch.setattr(kernels, "moe_topk_experts", lambda *a: calls.append(1))
    layer.train()
    layer(x)
    layer.eval()
    layer(x)  # grad mode on
    with torch.no_grad():
        layer(torch.randn(1, 129, 64))  # 258 assignments
    assert calls == []
    assert layer.experts.fused_pointers(torch.bfloat16) is None  # not the experts' dtype


@needs_avx512f
def test_fused_moe_refuses_what_it_cannot_read() -> None:
    w13, w2 = weights(torch.float32)
    ptrs = kernels.ExpertPointers(blocked(w13), blocked(w2), blocked=True)
    x = torch.randn(4, D)
    weight = torch.full((4, 2), 0.5)
    with pytest.raises(kernels.KernelError, match="out of range"):
        kernels.moe_topk_experts(
            x, torch.tensor([[0, 1], [2, 8], [0, 1], [0, 1]]), weight, ptrs, 256
        )
    with pytest.raises(kernels.KernelError, match=r"must be \(T, k\)"):
        kernels.moe_topk_experts(x, torch.zeros(3, 2, dtype=torch.int64), weight[:3], ptrs, 256)
    with pytest.raises(kernels.KernelError, match="like the experts"):
        kernels.moe_topk_experts(
            x.bfloat16(), torch.zeros(4, 2, dtype=torch.int64), weight, ptrs, 256
        )
    with pytest.raises(kernels.KernelError, match="max_rows"):
        kernels.moe_topk_experts(x, torch.zeros(4, 2, dtype=torch.int64), weight, ptrs, 0)
    with pytest.raises(kernels.KernelError, match="expert 1"):
        kernels.ExpertPointers(
            [*blocked(w13)[:1], blocked(w13)[1][:1]], blocked(w2)[:2], blocked=True
        )
    with pytest.raises(kernels.KernelError, match=r"expert 0: .* want blocks"):  # fp32's shape
        kernels.ExpertPointers(
            [b.bfloat16() for b in blocked(w13)], [b.bfloat16() for b in blocked(w2)], blocked=True
        )
    w13_64, w2_64 = weights(torch.float32, d=D, f=192)
    with pytest.raises(kernels.KernelError, match="expert 1: weights"):  # fp32 beside bf16
        kernels.ExpertPointers(
            [*blocked(w13_64[:1].bfloat16()), *blocked(w13_64[1:2])],
            [*blocked(w2_64[:1].bfloat16()), *blocked(w2_64[1:2])],
            blocked=True,
        )
    out, token, expert, w, counts = kernels.moe_topk_experts(
        x[:0], torch.zeros(0, 2, dtype=torch.int64), weight[:0], ptrs, 256
    )
    assert out.shape == (0, D) and counts.tolist() == [0] * E
    assert token.numel() == expert.numel() == w.numel() == 0


# --- the MoE gate's logits in bfloat16 (moe_gate.c) ---


@needs_avx512_bf16
@pytest.mark.parametrize(("T", "D", "E"), [(1, 64, 8), (16, 512, 8), (37, 256, 8), (5, 1024, 20)])
def test_native_gate_gives_f_linear_bits(T: int, D: int, E: int) -> None:
    """Where the probe found the piece oneDNN sums in, fresh tokens get F.linear's bits (the
    fused and general paths, and transformers' Mixtral, then route alike)."""
    block = kernels.native_gate_block(D, E)
    assert block is not None, f"no piece matched F.linear at D={D}, E={E} on this CPU"
    g = torch.Generator().manual_seed(T * D + E)
    x = torch.randn(T, D, generator=g).bfloat16()
    w = (torch.randn(E, D, generator=g) * D**-0.5).bfloat16()
    got = kernels.gate_logits(x, w, block)
    assert got.dtype == torch.float32 and got.shape == (T, E)
    assert torch.equal(got, torch.nn.functional.linear(x, w).float())
    if D > 512:  # a single chain over the row is not how oneDNN sums here: the probe matters
        x = torch.randn(4096, D, generator=g).bfloat16()
        assert not torch.equal(
            kernels.gate_logits(x, w, D), torch.nn.functional.linear(x, w).float()
        )


@needs_avx512f
@pytest.mark.parametrize(("D", "E"), [(64, 8), (512, 8), (1024, 4), (4096, 8)])
@pytest.mark.parametrize("T", [1, 2, 5, 16, 37])
def test_native_float32_gate_gives_f_linear_bits(T: int, D: int, E: int) -> None:
    """MKL's float32 GEMM sums a gate's logits in 4 lanes without FMA (a GEMV: its first 4
    products in order first); the native gate repeats that, fresh tokens included."""
    assert kernels.native_gate_f32_ok(D, E), f"not F.linear's bits at D={D}, E={E} here"
    g = torch.Generator().manual_seed(T * D + E)
    x = torch.randn(T, D, generator=g)
    w = torch.randn(E, D, generator=g) * D**-0.5
    got = kernels.gate_logits_f32(x, w)
    assert got.shape == (T, E)
    assert torch.equal(got, torch.nn.functional.linear(x, w))
    if T >= 16:  # the logits rounded once from exact sums differ: the order is what matters
        assert not torch.equal((x.double() @ w.double().T).float(), got)


@needs_avx512f
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_native_float32_gate_follows_where_rows_start(offset: int) -> None:
    """Rows that do not start on 16 bytes move MKL's first products into a head (per token
    row of x; per expert row of w for one token): views at odd offsets still get its bits."""
    buf = torch.randn(40 * 96 + offset)
    w_buf = torch.randn(8 * 96 + offset) * 0.1
    w = w_buf[offset:].view(8, 96)
    for T in (1, 3, 37):
        x = buf[offset : offset + T * 96].view(T, 96)
        assert torch.equal(kernels.gate_logits_f32(x, w), torch.nn.functional.linear(x, w))


@needs_avx512f
def test_native_float32_gate_refuses_what_it_does_not_repeat() -> None:
    with pytest.raises(kernels.KernelError, match="E in"):
        kernels.gate_logits_f32(torch.randn(3, 64), torch.randn(16, 64))
    with pytest.raises(kernels.KernelError, match="float32 x"):
        kernels.gate_logits_f32(torch.randn(3, 64).bfloat16(), torch.randn(8, 64))
    assert not kernels.native_gate_f32_ok(64, 16)  # MKL splits wider gates by threads


@needs_avx512_bf16
def test_native_gate_refuses_what_it_cannot_read() -> None:
    w = torch.randn(8, 64).bfloat16()
    with pytest.raises(kernels.KernelError, match="bfloat16 x"):
        kernels.gate_logits(torch.randn(3, 64), w, 64)
    with pytest.raises(kernels.KernelError, match="even"):
        kernels.gate_logits(torch.randn(3, 64).bfloat16(), w, 63)
    with pytest.raises(kernels.KernelError, match=r"w \(8, 64\)"):
        kernels.gate_logits(torch.randn(3, 32).bfloat16(), w, 32)


@needs_avx512_bf16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_layer_takes_the_native_gate_in_inference_only(dtype, monkeypatch) -> None:
    """Both inference paths compute the gate natively (the fused one inside its one call),
    with F.linear's bits; autograd, or no native gate for the shape, keeps PyTorch's gate."""
    if dtype == torch.float32 and not kernels.has_avx512f():
        pytest.skip("no AVX-512F")
    layer = _moe_layer(64, 192, dtype)
    x = torch.randn(2, 7, 64).to(dtype)
    calls = []
    name = "gate_logits" if dtype == torch.bfloat16 else "gate_logits_f32"
    real_gate, real_layer = getattr(kernels, name), kernels.moe_layer_topk

    def gate(*args: object) -> torch.Tensor:
        calls.append("general")
        return real_gate(*args)

    def whole_layer(*args: object, **kw: object) -> object:
        if kw["gate_w"] is not None:
            calls.append("fused")
        return real_layer(*args, **kw)

    monkeypatch.setattr(kernels, name, gate)
    monkeypatch.setattr(kernels, "moe_layer_topk", whole_layer)
    with torch.no_grad():
        fused = layer(x, return_routing=True)
        monkeypatch.setenv("EXPERTMESH_FUSED_MOE", "0")
        general = layer(x, return_routing=True)
        monkeypatch.delenv("EXPERTMESH_FUSED_MOE")
    assert calls == ["fused", "general"]
    monkeypatch.setattr(kernels, "native_gate_block", lambda D, E: None)
    monkeypatch.setattr(kernels, "native_gate_f32_ok", lambda D, E: False)
    with torch.no_grad():
        plain = layer(x, return_routing=True)
    assert calls == ["fused", "general"]
    _assert_same(plain, fused)
    _assert_same(plain, general)
    layer(x)  # autograd on: PyTorch's gate
    assert calls == ["fused", "general"]


@needs_avx512f
def test_moe_layer_leaves_a_prefills_gate_to_pytorch(monkeypatch) -> None:
    """Past NATIVE_GATE_MAX_TOKENS tokens the gate is PyTorch's multi-threaded GEMM; below,
    the native one; the logits are the same bits either way."""
    from expertmesh.platform.model.moe import NATIVE_GATE_MAX_TOKENS

    layer = _moe_layer(64, 192)
    calls = []
    real = kernels.gate_logits_f32
    monkeypatch.setattr(kernels, "gate_logits_f32", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(NATIVE_GATE_MAX_TOKENS + 1, 64)
    with torch.no_grad():
        big = layer._gate_logits(x)
        small = layer._gate_logits(x[:NATIVE_GATE_MAX_TOKENS])
    assert calls == [1]
    assert torch.equal(big[:NATIVE_GATE_MAX_TOKENS], small)


# --- native top-k routing (moe_gate.c): topk_choice's bits, ties in torch.topk's order ---
def _probe_logits(kind: str, T: int, E: int, g: torch.Generator) -> torch.Tensor:
    if kind == "ints":  # ties everywhere
        return torch.randint(-2, 3, (T, E), generator=g).float()
    logits = torch.randn(T, E, generator=g) * 3
    return logits.bfloat16().float() if kind == "bf16" else logits  # bf16: 8-bit mantissas


@needs_avx512f
@pytest.mark.parametrize(("E", "k"), [(8, 2), (8, 1), (4, 4), (16, 4), (64, 6), (32, 15)])
@pytest.mark.parametrize("kind", ["randn", "bf16", "ints"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_native_routing_is_topk_choice_bit_for_bit(E: int, k: int, kind: str, with_bias) -> None:
    from expertmesh.platform.model.gates import topk_choice

    g = torch.Generator().manual_seed(E * 7 + k)
    logits = _probe_logits(kind, 3000, E, g)
    bias = (torch.randn(E, generator=g) * 0.5).round() if with_bias else None  # ties stay
    assert kernels.native_route_ok(E, k)
    got = kernels.route_topk(logits, k, bias)
    assert got is not None  # below 64 * k experts every tie has torch.topk's order here
    want = topk_choice(logits, k, bias)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_avx512f
def test_native_routing_leaves_nan_and_unrepeated_tie_orders_to_pytorch() -> None:
    from expertmesh.platform.model.gates import topk_choice

    logits = torch.randn(5, 8)
    logits[3, 2] = float("nan")
    assert kernels.route_topk(logits, 2) is None
    # 128 experts, top-2: torch.topk takes std::partial_sort there, whose tie order this does
    # not repeat: a tie among a token's three largest goes back, a distinct order does not
    ties = torch.zeros(2, 128)
    ties[:, 5] = ties[:, 9] = 1.0
    assert kernels.route_topk(ties, 2) is None
    distinct = torch.randn(4, 128)
    got = kernels.route_topk(distinct, 2)
    assert got is not None
    want = topk_choice(distinct, 2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_avx512f
def test_native_routing_refuses_what_it_cannot_do() -> None:
    with pytest.raises(kernels.KernelError, match="k <= min"):
        kernels.route_topk(torch.randn(3, 4), 5)
    with pytest.raises(kernels.KernelError, match="k <= min"):
        kernels.route_topk(torch.randn(3, 64), 16)  # PyTorch sums 16 exps as a tree
    with pytest.raises(kernels.KernelError, match="float32 logits"):
        kernels.route_topk(torch.randn(3, 8).bfloat16(), 2)
    with pytest.raises(kernels.KernelError, match="bias must be float32"):
        kernels.route_topk(torch.randn(3, 8), 2, torch.zeros(7))
    assert not kernels.native_route_ok(64, 16)


@needs_avx512f
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layer_routes_ties_natively_as_the_general_path(dtype, monkeypatch) -> None:
    """A gate whose logits tie everywhere (small integers): the one native call still takes the
    step, and its routing is the general path's (torch.topk's) to the bit."""
    layer = _moe_layer(64, 192, dtype, balance_bias_rate=1e-3)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.randint(-1, 2, layer.gate.weight.shape))
        layer.expert_bias.copy_(torch.tensor([0.0, 1, 0, 1, 0, 0, 1, 0]))
    x = torch.randint(-1, 2, (2, 9, 64)).to(dtype)
    general, fused = _both_paths(layer, x, monkeypatch)
    _assert_same(general, fused)
    assert (general[1].routing.logits_TE == 0).any()  # ties were there to order


@needs_avx512f
def test_fused_layer_without_native_routing_keeps_pytorchs_choice(monkeypatch) -> None:
    layer = _moe_layer(64, 192)
    monkeypatch.setattr(kernels, "native_route_ok", lambda E, k: False)
    general, fused = _both_paths(layer, torch.randn(3, 5, 64), monkeypatch)
    _assert_same(general, fused)
