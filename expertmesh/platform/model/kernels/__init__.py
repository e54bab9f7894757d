"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

In one library: :func:`thin_experts`, SwiGLU experts for slices of a few rows each, where a
step is bound by reading the weights (see ``thin_experts.c``); :func:`decode_attention`, a
decode step's attention in one pass over the KV cache, and :func:`decode_rope_attention`, the
same preceded by the rotary embedding and the cache append (see ``decode_attention.c``); and
:func:`rms_norm` (``rms_norm.c``). Everything here is optional: with no compiler, a CPU
without AVX2/FMA, a non-x86 machine or ``EXPERTMESH_NATIVE_KERNELS=0``, :func:`available` is
False and callers use their PyTorch path, which computes the same numbers (to float32
rounding).

The shared library is cached per source and flags under ``$EXPERTMESH_KERNEL_CACHE`` (default
``$XDG_CACHE_HOME/expertmesh/kernels``, else ``~/.cache/expertmesh/kernels``), written to a
temporary name and renamed into place, so processes that build it at once (expert shards
starting together) never load a half-written file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from expertmesh import envs
from expertmesh.platform.model import hugepages

log = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name(n)
    for n in ("thin_experts.c", "decode_attention.c", "rms_norm.c", "moe_gate.c")
)
HEADERS = (Path(__file__).with_name("vec_math.h"),)  # included by the sources: part of the digest
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")
LIBS = ("-lm",)
MAX_ROWS = 256  # must match MAX_ROWS in thin_experts.c
MAX_ROWS_BLOCKED = 4096  # ... and MAX_ROWS_BLOCKED there
_ERRORS = {
    1: "D and F must be positive multiples of 8",
    2: f"a slice has more than {MAX_ROWS} rows ({MAX_ROWS_BLOCKED} in blocks)",
    3: "out of memory for the scratch buffers",
    4: (
        "blocked weights need float32 weights and activations on AVX-512F (widths multiples of"
        " 16), or bfloat16 ones on AVX512-BF16 (widths multiples of 64)"
    ),
    5: "an expert index is out of range",
    6: "a chosen expert has no weights",
}


# NOTE: threads for the large calls of a process that otherwise runs one thread (the router):
# see set_large_op_threads. 0: torch.get_num_threads(), as for every other call.
_large_op_threads = 0
LARGE_LINEAR_MACS = 1 << 23  # a 64-row decode step's q|k|v of configs/tiny.yaml, and up
LARGE_ATTENTION_ROWS = 16  # sequences in a decode step


def set_large_op_threads(n: int) -> None:
    """Run this process's large kernel calls on ``n`` threads (0: ``torch.get_num_threads()``):
    decode attention over :data:`LARGE_ATTENTION_ROWS` sequences or more, and blocked
    projections of :data:`LARGE_LINEAR_MACS` multiply-adds or more. The results do not depend
    on the thread count (each output is computed whole by one thread).

    For a process whose other work stays on one thread: the distributed router, whose core
    partner idles while it runs the dense layers. Set ``OMP_WAIT_POLICY=PASSIVE`` in that
    process's environment: an OpenMP worker otherwise spins after each call on the core the
    expert shards are about to need (2 threads for every call, spinning: 0.91x the tokens/s at
    64 clients; for the large ones only, passive: 1.16x)."""
    global _large_op_threads
    if n < 0:
        raise ValueError(f"large-op threads must be >= 0, got {n}")
    _large_op_threads = n


def large_op_threads() -> int:
    """The thread count :func:`set_large_op_threads` set (0: not set)."""
    return _large_op_threads


def _threads(large: bool) -> int:
    n = torch.get_num_threads()
    return max(n, _large_op_threads) if large else n


class KernelError(RuntimeError):
    """A native kernel refused its arguments (a caller bug: they are checked before the call)."""


def _cpu_supported() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    return {"avx2", "fma"} <= set(flags)


def build(cache_dir: Path | None = None) -> Path:
    """Compile :data:`SOURCES` into one library (if not cached) and return its path."""
    cc = envs.c_compiler()
    if shutil.which(cc) is None:
        raise FileNotFoundError(f"no C compiler {cc!r} on PATH (set CC)")
    src = b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    digest = hashlib.sha256(src + " ".join((cc, *CFLAGS, *LIBS)).encode()).hexdigest()[:16]
    out_dir = cache_dir or envs.kernel_cache_dir()
    lib = out_dir / f"expertmesh-kernels-{digest}.so"
    if lib.exists():
        return lib
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        if cache_dir is not None:
            raise
        out_dir = Path(tempfile.gettempdir()) / f"expertmesh-kernels-{os.getuid()}"
        out_dir.mkdir(parents=True, exist_ok=True)  # a read-only home (containers)
        lib = out_dir / lib.name
        if lib.exists():
            return lib
    fd, tmp = tempfile.mkstemp(prefix=lib.name + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *CFLAGS, "-o", tmp, *map(str, SOURCES), *LIBS], capture_output=True, text=True
        )
        if proc.returncode != 0:
            names = ", ".join(p.name for p in SOURCES)
            raise RuntimeError(f"{cc} failed to build {names}:\n{proc.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def _lib() -> ctypes.CDLL | None:
    if not envs.native_kernels() or not _cpu_supported():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as err:
        log.warning("native expert kernel unavailable, using PyTorch GEMMs: %s", err)
        return None
    fn = lib.thin_experts
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.c_void_p,  # x
        ctypes.c_int,  # x is bfloat16
        ctypes.c_void_p,  # starts (int64)
        ctypes.c_void_p,  # counts (int64)
        ctypes.c_int,  # n_experts
        ctypes.c_void_p,  # w13 pointers
        ctypes.c_void_p,  # w2 pointers
        ctypes.c_int,  # bf16
        ctypes.c_int64,  # D
        ctypes.c_int64,  # F
        ctypes.c_void_p,  # act scratch
        ctypes.c_void_p,  # out
        ctypes.c_int,  # threads
        ctypes.c_int,  # use AVX512-BF16 where the CPU has it
        ctypes.c_int,  # float32 weights in blocks of 16 rows (block_weights)
    ]
    fused = lib.moe_topk_experts
    fused.restype = ctypes.c_int
    fused.argtypes = [
        ctypes.c_void_p,  # x (T, D), the weights' dtype
        ctypes.c_int64,  # T
        ctypes.c_int,  # k
        ctypes.c_void_p,  # expert_TK (int64)
        ctypes.c_void_p,  # weight_TK (float32)
        ctypes.c_int,  # n_experts
        ctypes.c_void_p,  # w13 pointers
        ctypes.c_void_p,  # w2 pointers
        ctypes.c_int,  # bfloat16 weights and x
        ctypes.c_int,  # float32 weights in blocks
        ctypes.c_int64,  # D
        ctypes.c_int64,  # F
        ctypes.c_int64,  # max rows per expert
        ctypes.c_void_p,  # token_A (int64, T * k)
        ctypes.c_void_p,  # expert_A (int64, T * k)
        ctypes.c_void_p,  # weight_A (float32, T * k)
        ctypes.c_void_p,  # counts_E (int64, E)
        ctypes.c_void_p,  # out (T, D), x's dtype
        ctypes.c_int,  # threads
    ]
    lib.thin_experts_has_avx512_bf16.restype = ctypes.c_int
    lib.thin_experts_has_avx512f.restype = ctypes.c_int
    lin = lib.blocked_linear
    lin.restype = ctypes.c_int
    lin.argtypes = [
        ctypes.c_void_p,  # x (n, K)
        ctypes.c_int64,  # n
        ctypes.c_int64,  # K
        ctypes.c_void_p,  # w in blocks (N/16, K, 16)
        ctypes.c_int64,  # N
        ctypes.c_void_p,  # y (n, N)
        ctypes.c_int,  # threads
    ]
    attn = lib.decode_attention
    attn.restype = ctypes.c_int
    attn.argtypes = [
        ctypes.c_void_p,  # q (B, H, K)
        ctypes.c_void_p,  # k
        ctypes.c_void_p,  # v
        ctypes.c_int64,  # k and v stride between sequences (elements)
        ctypes.c_int64,  # ... and between key/value heads
        ctypes.c_void_p,  # n_keys (int64, B)
        *[ctypes.c_int64] * 5,  # B, H, G, K, L
        ctypes.c_float,  # scale
        ctypes.c_void_p,  # out (B, H, K)
        ctypes.c_int,  # threads
    ]
    norm = lib.rms_norm
    norm.restype = ctypes.c_int
    norm.argtypes = [
        ctypes.c_void_p,  # x (rows, D)
        ctypes.c_void_p,  # weight (D,)
        ctypes.c_float,  # eps
        ctypes.c_int64,  # rows
        ctypes.c_int64,  # D
        ctypes.c_void_p,  # out (rows, D)
    ]
    step = lib.decode_rope_attention
    step.restype = ctypes.c_int
    step.argtypes = [
        ctypes.c_void_p,  # qkv (B, H + 2G, K)
        ctypes.c_void_p,  # cos (B, K)
        ctypes.c_void_p,  # sin (B, K)
        ctypes.c_void_p,  # k cache
        ctypes.c_void_p,  # v cache
        ctypes.c_int64,  # cache stride between sequences (elements)
        ctypes.c_int64,  # ... and between key/value heads
        ctypes.c_void_p,  # pos (int64, B)
        ctypes.c_int64,  # positions a cache row holds
        *[ctypes.c_int64] * 4,  # B, H, G, K
        ctypes.c_float,  # scale
        ctypes.c_void_p,  # rotated queries (B, H, K)
        ctypes.c_void_p,  # out (B, H, K)
        ctypes.c_int,  # threads
    ]
    gate = lib.moe_gate_logits_bf16
    gate.restype = ctypes.c_int
    gate.argtypes = [
        ctypes.c_void_p,  # x (T, D) bfloat16
        ctypes.c_int64,  # T
        ctypes.c_int64,  # D
        ctypes.c_void_p,  # w (E, D) bfloat16
        ctypes.c_int64,  # E
        ctypes.c_int64,  # columns summed per piece
        ctypes.c_void_p,  # out (T, E) float32
    ]
    gate32 = lib.moe_gate_logits_f32
    gate32.restype = ctypes.c_int
    gate32.argtypes = [
        ctypes.c_void_p,  # x (T, D) float32
        ctypes.c_int64,  # T
        ctypes.c_int64,  # D
        ctypes.c_void_p,  # w (E, D) float32
        ctypes.c_int64,  # E
        ctypes.c_void_p,  # out (T, E) float32
    ]
    rt = lib.moe_route_topk
    rt.restype = ctypes.c_int
    rt.argtypes = [
        ctypes.c_void_p,  # logits (T, E) float32
        ctypes.c_int64,  # T
        ctypes.c_int64,  # E
        ctypes.c_int64,  # k
        ctypes.c_void_p,  # selection bias (E,) float32 or NULL
        ctypes.c_void_p,  # expert_TK (int64)
        ctypes.c_void_p,  # weight_TK (float32)
    ]
    layer = lib.moe_layer_topk
    layer.restype = ctypes.c_int
    layer.argtypes = [
        ctypes.c_void_p,  # x (T, D), the experts' dtype
        ctypes.c_int64,  # T
        ctypes.c_int64,  # D
        ctypes.c_void_p,  # gate weight (E, D) or NULL (logits given)
        ctypes.c_int64,  # the gate's piece (bfloat16)
        ctypes.c_void_p,  # logits (T, E) float32: out with a gate weight, else in
        ctypes.c_int64,  # E
        ctypes.c_int,  # k
        ctypes.c_void_p,  # selection bias (E,) float32 or NULL
        ctypes.c_void_p,  # expert_TK (int64)
        ctypes.c_void_p,  # weight_TK (float32)
        ctypes.c_void_p,  # w13 pointers
        ctypes.c_void_p,  # w2 pointers
        ctypes.c_int,  # bfloat16 weights and x
        ctypes.c_int,  # weights in blocks
        ctypes.c_int64,  # F
        ctypes.c_int64,  # max rows per expert
        ctypes.c_void_p,  # token_A (int64, T * k)
        ctypes.c_void_p,  # expert_A (int64, T * k)
        ctypes.c_void_p,  # weight_A (float32, T * k)
        ctypes.c_void_p,  # counts_E (int64, E)
        ctypes.c_void_p,  # out (T, D), x's dtype
        ctypes.c_int,  # threads
    ]
    return lib


def available() -> bool:
    """True when the native kernel is built and loadable on this machine."""
    return _lib() is not None


@functools.cache  # a CPU's features do not change; asked on every layer of a decode step
def has_avx512_bf16() -> bool:
    """Whether :func:`thin_experts` can take its AVX512-BF16 path on this CPU (bfloat16 weights
    and activations; the AVX2 path otherwise)."""
    lib = _lib()
    return lib is not None and bool(lib.thin_experts_has_avx512_bf16())


@functools.cache
def has_avx512f() -> bool:
    """Whether :func:`thin_experts` can take float32 weights in blocks (:func:`block_weights`)."""
    lib = _lib()
    return lib is not None and bool(lib.thin_experts_has_avx512f())


BLOCK = 16  # rows of a weight block (one zmm register of float32)
GROUP = 64  # rows of a bfloat16 group: 4 blocks interleaved by pairs of columns


def supports_blocked(w13_FD: torch.Tensor, x_dtype: torch.dtype) -> bool:
    """Whether :func:`thin_experts` takes these weights in blocks (``blocked=True``): CPU
    weights and activations both float32 on a CPU with AVX-512F (widths multiples of 16), or
    both bfloat16 on one with AVX512-BF16 (widths multiples of 64)."""
    F2, D = w13_FD.shape
    if w13_FD.dtype != x_dtype or w13_FD.device.type != "cpu" or D % BLOCK or F2 % (2 * BLOCK):
        return False
    if x_dtype == torch.float32:
        return has_avx512f()
    return (
        x_dtype == torch.bfloat16 and D % GROUP == 0 and F2 % (2 * GROUP) == 0 and has_avx512_bf16()
    )


def block_shape(R: int, K: int, dtype: torch.dtype) -> tuple[int, ...]:
    """The shape :func:`block_weights` gives an (R, K) matrix of ``dtype``."""
    if dtype == torch.bfloat16:
        return (R // GROUP, K // 2, GROUP // BLOCK, BLOCK, 2)
    return (R // BLOCK, K, BLOCK)


def block_weights(w_RK: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """An (R, K) matrix in the layout :func:`thin_experts` reads with ``blocked=True``.

    float32: R/16 blocks of (K, 16), block b holding rows 16b..16b+15 column by column (one
    zmm of 16 weights per column). bfloat16 (R a multiple of 64, K even): R/64 groups of
    (K/2, 4, 16, 2), group g holding rows 64g..64g+63 as, for each pair of columns (2p, 2p+1),
    four blocks of 16 rows with each row's two weights side by side: one zmm of 32 weights per
    block and pair, as ``vdpbf16ps`` multiplies them, and a group read front to back is one
    sequential stream (see thin_experts.c).

    Written into ``out`` (contiguous, :func:`block_shape`) when given, else into a new tensor
    on huge pages where the system gives them (:mod:`.hugepages`)."""
    R, K = w_RK.shape
    w = w_RK.detach()
    if w.dtype == torch.bfloat16:
        if R % GROUP or K % 2:
            raise KernelError(
                f"bfloat16 blocks want rows in multiples of {GROUP} and an even row length, got"
                f" {tuple(w.shape)}"
            )
        view = w.reshape(R // GROUP, GROUP // BLOCK, BLOCK, K // 2, 2).permute(0, 3, 1, 2, 4)
    elif R % BLOCK or w.dtype != torch.float32:
        raise KernelError(
            f"blocks want float32 rows in multiples of {BLOCK} or bfloat16 rows in multiples of"
            f" {GROUP}, got {tuple(w.shape)} {w.dtype}"
        )
    else:
        view = w.reshape(R // BLOCK, BLOCK, K).transpose(1, 2)
    if out is None:
        out = hugepages.empty(tuple(view.shape), w.dtype)
    elif out.shape != view.shape or out.dtype != w.dtype or not out.is_contiguous():
        raise KernelError(
            f"out must be contiguous {tuple(view.shape)} {w.dtype}, got {tuple(out.shape)} "
            f"{out.dtype}"
        )
    return out.copy_(view)


def supports(w13_FD: torch.Tensor, x_dtype: torch.dtype) -> bool:
    """Whether :func:`thin_experts` takes these weights for activations of ``x_dtype`` (float32
    or bfloat16): float32 or bfloat16 CPU weights, widths multiples of 8. In which precision it
    computes: see :func:`thin_experts`."""
    F2, D = w13_FD.shape
    return (
        x_dtype in (torch.float32, torch.bfloat16)
        and w13_FD.device.type == "cpu"
        and w13_FD.dtype in (torch.float32, torch.bfloat16)
        and D % 8 == 0
        and F2 % 16 == 0
        and available()
    )


def _expert_pointers(
    w: torch.Tensor | Sequence[torch.Tensor],
    n: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    alive: list[torch.Tensor],
    counts: Sequence[int],
) -> list[int]:
    """Addresses of the n experts' matrices; tensors they point into are appended to ``alive``
    (copies made to get contiguous ones must outlive the call). In a list, an expert without
    rows (``counts``) may be None."""
    if isinstance(w, torch.Tensor) and w.is_contiguous():
        if (
            w.dim() != len(shape) + 1
            or w.shape[0] < n
            or tuple(w.shape[1:]) != shape
            or w.dtype != dtype
        ):
            raise KernelError(f"weights {tuple(w.shape)} {w.dtype}, want (E, *{shape}) {dtype}")
        step = w.stride(0) * w.element_size()
        return [w.data_ptr() + e * step for e in range(n)]
    ptrs = []
    for e in range(n):
        if w[e] is None and counts[e] == 0:
            ptrs.append(0)
            continue
        m = w[e].contiguous()
        if tuple(m.shape) != shape or m.dtype != dtype:
            raise KernelError(
                f"expert {e}: weights {tuple(m.shape)} {m.dtype}, want {shape} {dtype}"
            )
        alive.append(m)
        ptrs.append(m.data_ptr())
    return ptrs


def _blocked_dims(b: torch.Tensor, what: str) -> tuple[int, int, torch.dtype]:
    """(rows, row length, dtype) of the matrix that :func:`block_weights` made ``b`` from."""
    if b.dtype == torch.float32 and b.dim() == 3 and b.shape[2] == BLOCK:
        return b.shape[0] * BLOCK, b.shape[1], b.dtype
    if b.dtype == torch.bfloat16 and b.dim() == 5 and b.shape[2:] == (GROUP // BLOCK, BLOCK, 2):
        return b.shape[0] * GROUP, b.shape[1] * 2, b.dtype
    raise KernelError(
        f"{what}: weights {tuple(b.shape)} {b.dtype}, want blocks: float32 (R/16, K, 16) or"
        " bfloat16 (R/64, K/2, 4, 16, 2)"
    )


def thin_experts(
    x_AD: torch.Tensor,
    starts: Sequence[int],
    counts: Sequence[int],
    w13_EFD: torch.Tensor | Sequence[torch.Tensor],
    w2_EDF: torch.Tensor | Sequence[torch.Tensor],
    out_AD: torch.Tensor,
    *,
    avx512: bool = True,
    blocked: bool = False,
) -> None:
    """For each expert ``e`` with ``counts[e]`` rows (at most :data:`MAX_ROWS`) starting at row
    ``starts[e]`` of ``x_AD`` (float32 or bfloat16): write ``swiglu_e(x)`` to the same rows of
    ``out_AD`` (float32). Rows of experts with count 0 are left alone. Call :func:`supports`
    first. ``avx512=False`` keeps to the AVX2 path (tests compare the two).

    Both paths accumulate in float32. The SwiGLU activations between the two projections are
    float32 on the AVX2 path. On the AVX512-BF16 path (bfloat16 weights and ``x_AD``, ``avx512``
    set, :func:`has_avx512_bf16`) they are rounded to bfloat16 (to nearest even, like
    ``Tensor.to(torch.bfloat16)``) so that the down projection, like gate/up, runs on
    ``vdpbf16ps``: one instruction per 32 weights and row, where widening to float32 takes two
    FMAs per 16 and is compute bound. PyTorch's bfloat16 FFN rounds them at the same point.

    ``blocked``: weights given per expert in :func:`block_weights`' layout (an expert without
    rows may be None), multiplied with no horizontal sums: float32 weights and activations on
    AVX-512F, or bfloat16 ones on AVX512-BF16 (:func:`supports_blocked`; the latter rounds the
    activations as the AVX512-BF16 path does, whatever ``avx512``). Each output element is then
    one chain of multiply-adds over the inputs in order, so results differ from the row-major
    path's by float32 summation order.
    """
    lib = _lib()
    if lib is None:
        raise KernelError("native kernel not available; check kernels.available() first")
    if x_AD.dtype not in (torch.float32, torch.bfloat16) or out_AD.dtype != torch.float32:
        raise KernelError(
            f"activations must be float32 or bfloat16 and out float32, got {x_AD.dtype} / "
            f"{out_AD.dtype}"
        )
    x_AD, E = x_AD.contiguous(), len(counts)
    if not out_AD.is_contiguous() or out_AD.shape != x_AD.shape:
        raise KernelError(f"out must be contiguous {tuple(x_AD.shape)}, got {tuple(out_AD.shape)}")
    alive: list[torch.Tensor] = []
    if blocked:  # per expert, as block_weights makes them
        first = next((e for e, w in enumerate(w13_EFD) if w is not None), 0)
        F2, D, dtype = _blocked_dims(w13_EFD[first], f"expert {first}")
        p13 = _expert_pointers(w13_EFD, E, block_shape(F2, D, dtype), dtype, alive, counts)
        p2 = _expert_pointers(w2_EDF, E, block_shape(D, F2 // 2, dtype), dtype, alive, counts)
    else:
        F2, D = w13_EFD[0].shape
        dtype = w13_EFD[0].dtype
        p13 = _expert_pointers(w13_EFD, E, (F2, D), dtype, alive, counts)
        p2 = _expert_pointers(w2_EDF, E, (D, F2 // 2), dtype, alive, counts)
    meta = (ctypes.c_int64 * (2 * E))(*starts, *counts)
    ptrs = (ctypes.c_void_p * (2 * E))(*p13, *p2)
    act = out_AD.new_empty(x_AD.shape[0], F2 // 2)  # float32 scratch
    rc = lib.thin_experts(
        x_AD.data_ptr(),
        int(x_AD.dtype == torch.bfloat16),
        ctypes.addressof(meta),
        ctypes.addressof(meta) + 8 * E,
        E,
        ctypes.addressof(ptrs),
        ctypes.addressof(ptrs) + ctypes.sizeof(ctypes.c_void_p) * E,
        int(dtype == torch.bfloat16),
        D,
        F2 // 2,
        act.data_ptr(),
        out_AD.data_ptr(),
        torch.get_num_threads(),
        int(avx512),
        int(blocked),
    )
    if rc != 0:
        raise KernelError(f"thin_experts refused its arguments: {_ERRORS.get(rc, f'code {rc}')}")


class ExpertPointers:
    """The addresses of E experts' weights for :func:`moe_topk_experts`, made once and reused
    while the weights stay the same (the holder keeps them alive): float32 or bfloat16 blocks
    (:func:`block_weights`; ``blocked``) or row-major w13 (2F, D) and w2 (D, F) in float32 or
    bfloat16, as :func:`thin_experts` takes them."""

    __slots__ = ("D", "F", "blocked", "dtype", "n_experts", "tensors", "w2", "w13")

    def __init__(
        self, w13: Sequence[torch.Tensor], w2: Sequence[torch.Tensor], *, blocked: bool
    ) -> None:
        if len(w13) != len(w2) or not w13:
            raise KernelError(f"want as many w13 as w2 matrices, got {len(w13)} and {len(w2)}")
        dtype = w13[0].dtype
        if blocked:
            F2, D, _ = _blocked_dims(w13[0], "expert 0")
            F = F2 // 2
            want13, want2 = block_shape(F2, D, dtype), block_shape(D, F, dtype)
        else:
            F2, D = w13[0].shape
            F = F2 // 2
            want13, want2 = (F2, D), (D, F)
        allowed = (torch.float32, torch.bfloat16)
        for e, (a, b) in enumerate(zip(w13, w2, strict=True)):
            if tuple(a.shape) != want13 or tuple(b.shape) != want2:
                raise KernelError(
                    f"expert {e}: weights {tuple(a.shape)} / {tuple(b.shape)}, want {want13} /"
                    f" {want2}"
                )
            if a.dtype != dtype or b.dtype != dtype or dtype not in allowed:
                raise KernelError(
                    f"expert {e}: weights {a.dtype} / {b.dtype}, want one of {allowed} for both"
                )
            if not (a.is_contiguous() and b.is_contiguous()):
                raise KernelError(f"expert {e}: weights must be contiguous")
        E = len(w13)
        self.n_experts, self.D, self.F, self.blocked, self.dtype = E, D, F, blocked, dtype
        self.tensors = (tuple(w13), tuple(w2))  # keeps the addresses valid
        self.w13 = (ctypes.c_void_p * E)(*(w.data_ptr() for w in w13))
        self.w2 = (ctypes.c_void_p * E)(*(w.data_ptr() for w in w2))


def _check_fused_args(x: torch.Tensor, experts: ExpertPointers, max_rows: int) -> None:
    """The checks :func:`moe_topk_experts` and :func:`moe_layer_topk` share: ``x`` (..., D) in
    the experts' dtype and width, and a row limit the kernel takes."""
    if x.dtype != experts.dtype or x.shape[-1] != experts.D:
        raise KernelError(
            f"x must be {experts.dtype} (..., {experts.D}) like the experts, got "
            f"{tuple(x.shape)} {x.dtype}"
        )
    limit = MAX_ROWS_BLOCKED if experts.blocked else MAX_ROWS
    if not 0 < max_rows <= limit:
        raise KernelError(f"max_rows must be in 1..{limit}, got {max_rows}")


def _check_bias(bias_E: torch.Tensor | None, E: int) -> torch.Tensor | None:
    """A selection bias as the native choice reads it: float32 (E,), contiguous; or None."""
    if bias_E is None:
        return None
    if bias_E.dtype != torch.float32 or bias_E.shape != (E,):
        raise KernelError(f"bias must be float32 ({E},), got {bias_E.dtype} {tuple(bias_E.shape)}")
    return bias_E.contiguous()


def moe_topk_experts(
    x_TD: torch.Tensor,
    expert_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    experts: ExpertPointers,
    max_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The end of a top-k MoE layer in one native call, for few tokens: the ``T * k``
    assignments sorted by expert (stable), the tokens' rows gathered, run through their experts
    (:func:`thin_experts`) and added back per token times their gate weights, in ``x_TD``'s
    dtype (the experts'). Returns ``(out_TD, token_A, expert_A, weight_A, counts_E)``, bit for
    bit what route's sort, :func:`~..dispatch.permute`, :func:`thin_experts` and
    :func:`~..dispatch.combine` give; or None, having done nothing else, when an expert got
    more than ``max_rows`` rows (the caller's general path then runs its slices elsewhere)."""
    lib = _lib()
    if lib is None:
        raise KernelError("native kernel not available; check kernels.available() first")
    T, D = x_TD.shape
    _check_fused_args(x_TD, experts, max_rows)
    if expert_TK.shape != weight_TK.shape or expert_TK.dim() != 2 or expert_TK.shape[0] != T:
        raise KernelError(
            f"experts {tuple(expert_TK.shape)} and weights {tuple(weight_TK.shape)} must be (T, k)"
            f" with T = {T}"
        )
    A = expert_TK.numel()
    x_TD = x_TD.contiguous()
    expert_TK = expert_TK.to(torch.int64).contiguous()
    weight_TK = weight_TK.to(torch.float32).contiguous()
    out_TD = torch.empty(T, D, dtype=x_TD.dtype)
    idx = torch.empty(2 * A + experts.n_experts, dtype=torch.int64)
    token_A, expert_A, counts_E = idx[:A], idx[A : 2 * A], idx[2 * A :]
    weight_A = torch.empty(A)
    rc = lib.moe_topk_experts(
        x_TD.data_ptr(),
        T,
        expert_TK.shape[1],
        expert_TK.data_ptr(),
        weight_TK.data_ptr(),
        experts.n_experts,
        ctypes.addressof(experts.w13),
        ctypes.addressof(experts.w2),
        int(experts.dtype == torch.bfloat16),
        int(experts.blocked),
        D,
        experts.F,
        max_rows,
        token_A.data_ptr(),
        expert_A.data_ptr(),
        weight_A.data_ptr(),
        counts_E.data_ptr(),
        out_TD.data_ptr(),
        torch.get_num_threads(),
    )
    if rc == 7:
        return None
    if rc != 0:
        raise KernelError(
            f"moe_topk_experts refused its arguments: {_ERRORS.get(rc, f'code {rc}')}"
        )
    return out_TD, token_A, expert_A, weight_A, counts_E


ATTN_MAX_HEAD_DIM = 256  # must match ATTN_MAX_K in decode_attention.c
ATTN_MAX_GROUP = 16  # query heads per key/value head; ATTN_MAX_R there


GATE_F32_EXPERTS = (4, 8)  # the gate widths moe_gate_logits_f32 repeats MKL's order for
# the token counts native_gate_f32_ok compares at: one token (MKL's GEMV) and several GEMMs
_GATE_F32_PROBE_TOKENS = (1, 1, 1, 2, 3, 5, 16, 37, 256)


def gate_logits_f32(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """An MoE gate's float32 logits ``x @ w.T`` (T, E) for E in :data:`GATE_F32_EXPERTS`,
    summed in the order of MKL's SGEMM here (``moe_gate.c``): ``F.linear``'s bits where
    :func:`native_gate_f32_ok` found them so."""
    lib = _lib()
    if lib is None or not has_avx512f():
        raise KernelError("native float32 gate needs the kernels on a CPU with AVX-512F")
    T, D = x_TD.shape
    if (
        x_TD.dtype != torch.float32
        or w_ED.dtype != torch.float32
        or w_ED.dim() != 2
        or w_ED.shape[1] != D
        or w_ED.shape[0] not in GATE_F32_EXPERTS
    ):
        raise KernelError(
            f"native float32 gate takes float32 x (T, D) and w (E, D) with E in"
            f" {GATE_F32_EXPERTS}; got x {tuple(x_TD.shape)} {x_TD.dtype}, w"
            f" {tuple(w_ED.shape)} {w_ED.dtype}"
        )
    # NOTE: the same tensors F.linear would get: MKL's order depends on where rows start
    x_TD, w_ED = x_TD.contiguous(), w_ED.detach().contiguous()
    out = torch.empty(T, w_ED.shape[0])
    rc = lib.moe_gate_logits_f32(
        x_TD.data_ptr(), T, D, w_ED.data_ptr(), w_ED.shape[0], out.data_ptr()
    )
    if rc != 0:
        raise KernelError(f"moe_gate_logits_f32 refused its arguments (code {rc})")
    return out


def native_gate_f32_ok(D: int, E: int) -> bool:
    """True where :func:`gate_logits_f32` gives ``F.linear``'s float32 bits for gates of this
    shape at PyTorch's current thread count: compared once per shape, thread count and
    process on random tokens, singly and in GEMMs of several sizes (MKL's order depends on its
    build, the CPU and, for wider gates, the threads)."""
    return _native_gate_f32_ok(D, E, torch.get_num_threads())


@functools.cache
def _native_gate_f32_ok(D: int, E: int, threads: int) -> bool:
    if E not in GATE_F32_EXPERTS or D < 1 or not available() or not has_avx512f():
        return False
    g = torch.Generator().manual_seed(D * 131 + E)
    w = torch.randn(E, D, generator=g) * D**-0.5
    with torch.no_grad():
        for T in _GATE_F32_PROBE_TOKENS:
            x = torch.randn(T, D, generator=g)
            if not torch.equal(gate_logits_f32(x, w), torch.nn.functional.linear(x, w)):
                log.info("native float32 gate: not F.linear's bits at D=%d, E=%d, T=%d", D, E, T)
                return False
    return True


ROUTE_MAX_K = 15  # must match ROUTE_MAX_K in moe_gate.c
# the probe native_route_ok compares on (tokens of random logits, with and without a bias)
_ROUTE_PROBE_TOKENS = 4096


def route_topk(
    logits_TE: torch.Tensor, k: int, bias_E: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`~..routers.topk_choice` natively (``moe_gate.c``): ``(expert_TK, weight_TK)`` for
    float32 ``logits_TE``, the experts chosen by ``logits + bias_E`` in descending order, their
    weights the softmax of their unbiased logits, equal values in torch.topk's order; or None
    for a NaN, or for ties where PyTorch's sort is one this does not repeat (``moe_gate.c``).
    Its bits are ``topk_choice``'s where :func:`native_route_ok` found them so."""
    lib = _lib()
    if lib is None or not has_avx512f():
        raise KernelError("native routing needs the kernels on a CPU with AVX-512F")
    T, E = logits_TE.shape
    if logits_TE.dtype != torch.float32 or not 0 < k <= min(E, ROUTE_MAX_K):
        raise KernelError(
            f"native routing takes float32 logits (T, E) and 1 <= k <= min(E, {ROUTE_MAX_K});"
            f" got {logits_TE.dtype} {tuple(logits_TE.shape)}, k={k}"
        )
    bias_E = _check_bias(bias_E, E)
    logits_TE = logits_TE.contiguous()
    expert_TK = torch.empty(T, k, dtype=torch.int64)
    weight_TK = torch.empty(T, k)
    rc = lib.moe_route_topk(
        logits_TE.data_ptr(),
        T,
        E,
        k,
        None if bias_E is None else bias_E.data_ptr(),
        expert_TK.data_ptr(),
        weight_TK.data_ptr(),
    )
    if rc == 8:
        return None
    if rc != 0:
        raise KernelError(f"moe_route_topk refused its arguments (code {rc})")
    return expert_TK, weight_TK


@functools.cache
def native_route_ok(E: int, k: int) -> bool:
    """True where :func:`route_topk` gives :func:`~..routers.topk_choice`'s bits for E experts,
    top-k, here: checked once per shape and process on random logits, with and without a bias,
    and on small integers, ties everywhere (PyTorch's softmax kernel and its sort's order of
    ties may differ between its builds and CPUs)."""
    from expertmesh.platform.model.gates import topk_choice  # routers -> kernels is fine

    if not (available() and has_avx512f() and 0 < k <= min(E, ROUTE_MAX_K)):
        return False
    g = torch.Generator().manual_seed(E * 131 + k)
    logits = torch.randn(_ROUTE_PROBE_TOKENS, E, generator=g) * 4
    ties = torch.randint(-2, 3, (_ROUTE_PROBE_TOKENS, E), generator=g).float()
    bias = torch.randn(E, generator=g) * 0.1
    for x, b in ((logits, None), (logits, bias), (ties, None)):
        got = route_topk(x, k, b)
        if got is None and x is ties:
            continue  # no order of ties here (std::partial_sort's): such tokens go to PyTorch
        want = topk_choice(x, k, b)
        if got is None or not all(torch.equal(u, v) for u, v in zip(got, want, strict=True)):
            log.info("native routing: not topk_choice's bits at E=%d, k=%d; using PyTorch", E, k)
            return False
    return True


def moe_layer_topk(
    x: torch.Tensor,
    k: int,
    experts: ExpertPointers,
    max_rows: int,
    *,
    gate_w: torch.Tensor | None = None,
    gate_block: int = 0,
    logits_TE: torch.Tensor | None = None,
    bias_E: torch.Tensor | None = None,
) -> tuple[
    torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
]:
    """A top-k MoE layer's inference for few tokens in one native call (``moe_layer_topk`` in
    ``thin_experts.c``): the gate's float32 logits (from bfloat16 ``gate_w`` (E, D) in pieces of
    ``gate_block``, :func:`gate_logits`; or given as ``logits_TE``), the choice of
    :func:`route_topk` and :func:`moe_topk_experts`; float32 ``gate_w`` as
    :func:`gate_logits_f32`. ``x`` (..., D) holds T tokens. Returns ``(logits_TE, done)``,
    ``done`` as :func:`moe_topk_experts` returns it (the output in ``x``'s shape), or None
    where the routing is left to the caller (see :func:`route_topk`) or an expert got more
    than ``max_rows`` rows. The caller checks :func:`native_route_ok` (and :func:`native_gate_block` or
    :func:`native_gate_f32_ok` for a gate) first."""
    lib = _lib()
    if lib is None:
        raise KernelError("native kernel not available; check kernels.available() first")
    # NOTE: this runs once per MoE layer of every decode step, right after the experts' weights
    # went through the caches, where each tensor op costs several us: few of them here
    _check_fused_args(x, experts, max_rows)
    D = x.shape[-1]
    T = x.numel() // D if D else 0
    E = experts.n_experts
    if not 0 < k <= min(E, ROUTE_MAX_K):
        raise KernelError(f"k must be in 1..{min(E, ROUTE_MAX_K)}, got {k}")
    if gate_w is not None:
        if gate_w.dtype != experts.dtype or gate_w.shape != (E, D):
            raise KernelError(
                f"gate weight {tuple(gate_w.shape)} {gate_w.dtype}: want ({E}, {D})"
                f" {experts.dtype}, the experts' dtype"
            )
        if gate_w.dtype == torch.bfloat16 and (gate_block <= 0 or gate_block % 2 or D % 2):
            raise KernelError(f"a bfloat16 gate wants an even piece and D, got {gate_block}, {D}")
        if gate_w.dtype == torch.float32 and E not in GATE_F32_EXPERTS:
            raise KernelError(f"a float32 gate takes E in {GATE_F32_EXPERTS}, got {E}")
        if not gate_w.is_contiguous():
            gate_w = gate_w.detach().contiguous()
        logits_TE = torch.empty(T, E)
    elif logits_TE is None or logits_TE.shape != (T, E) or logits_TE.dtype != torch.float32:
        raise KernelError(f"without a gate weight, pass float32 logits ({T}, {E})")
    else:
        logits_TE = logits_TE.contiguous()
    bias_E = _check_bias(bias_E, E)
    x = x.contiguous()
    A = T * k
    # NOTE: one tensor per output, not views of one buffer: a split right after the experts'
    # stream cost ~19 us, three more allocations before it ~5 us
    choice = torch.empty(A, dtype=torch.int64)  # expert_TK, the choice in token order
    token_A = torch.empty(A, dtype=torch.int64)
    expert_A = torch.empty(A, dtype=torch.int64)
    counts_E = torch.empty(E, dtype=torch.int64)
    weight_TK, weight_A = torch.empty(A), torch.empty(A)
    out = torch.empty(x.shape, dtype=x.dtype)
    rc = lib.moe_layer_topk(
        x.data_ptr(),
        T,
        D,
        None if gate_w is None else gate_w.data_ptr(),
        gate_block,
        logits_TE.data_ptr(),
        E,
        k,
        None if bias_E is None else bias_E.data_ptr(),
        choice.data_ptr(),
        weight_TK.data_ptr(),
        ctypes.addressof(experts.w13),
        ctypes.addressof(experts.w2),
        int(experts.dtype == torch.bfloat16),
        int(experts.blocked),
        experts.F,
        max_rows,
        token_A.data_ptr(),
        expert_A.data_ptr(),
        weight_A.data_ptr(),
        counts_E.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if rc in (7, 8):
        return logits_TE, None
    if rc != 0:
        raise KernelError(f"moe_layer_topk refused its arguments: {_ERRORS.get(rc, f'code {rc}')}")
    return logits_TE, (out, token_A, expert_A, weight_A, counts_E)


def supports_decode_attention(
    q_BHK: torch.Tensor, k_BGLK: torch.Tensor, v_BGLK: torch.Tensor
) -> bool:
    """Whether :func:`decode_attention` takes these tensors: float32 on the CPU, the kernel
    available, a head size that is a multiple of 8, and keys and values laid out alike with
    contiguous rows (the KV cache read in place, or a gathered copy)."""
    _, H, K = q_BHK.shape
    G = k_BGLK.shape[1]
    return (
        q_BHK.dtype == k_BGLK.dtype == v_BGLK.dtype == torch.float32
        and q_BHK.device.type == "cpu"
        and K % 8 == 0
        and K <= ATTN_MAX_HEAD_DIM
        and G > 0
        and H % G == 0
        and H // G <= ATTN_MAX_GROUP
        and k_BGLK.shape == v_BGLK.shape
        and k_BGLK.shape[2] > 0
        and k_BGLK.stride() == v_BGLK.stride()
        and k_BGLK.stride()[2:] == (K, 1)
        and available()
    )


def decode_attention(
    q_BHK: torch.Tensor, k_BGLK: torch.Tensor, v_BGLK: torch.Tensor, n_keys_B: torch.Tensor
) -> torch.Tensor:
    """softmax(q k^T / sqrt(K)) v for one query per sequence: row ``b`` attends to its first
    ``n_keys_B[b]`` positions (clipped to [1, L]); query head ``h`` reads key/value head
    ``h // (H // G)``. Returns (B, H, K). Check :func:`supports_decode_attention` first."""
    lib = _lib()
    if lib is None or not supports_decode_attention(q_BHK, k_BGLK, v_BGLK):
        raise KernelError(
            "decode_attention takes float32 CPU tensors, K a multiple of 8 up to "
            f"{ATTN_MAX_HEAD_DIM}, keys and values with the same strides and contiguous rows; got "
            f"q {tuple(q_BHK.shape)} {q_BHK.dtype}, k {tuple(k_BGLK.shape)} {k_BGLK.dtype} "
            f"strides {k_BGLK.stride()}, v strides {v_BGLK.stride()}"
        )
    B, H, K = q_BHK.shape
    G, L = k_BGLK.shape[1], k_BGLK.shape[2]
    if n_keys_B.shape != (B,):
        raise KernelError(f"n_keys must have shape ({B},), got {tuple(n_keys_B.shape)}")
    q_BHK = q_BHK.contiguous()
    n_keys_B = n_keys_B.to(torch.int64).contiguous()
    out = torch.empty_like(q_BHK)
    if B == 0:
        return out
    rc = lib.decode_attention(
        q_BHK.data_ptr(),
        k_BGLK.data_ptr(),
        v_BGLK.data_ptr(),
        k_BGLK.stride(0),
        k_BGLK.stride(1),
        n_keys_B.data_ptr(),
        B,
        H,
        G,
        K,
        L,
        K**-0.5,
        out.data_ptr(),
        _threads(B >= LARGE_ATTENTION_ROWS),
    )
    if rc != 0:
        raise KernelError(f"decode_attention refused its arguments (code {rc})")
    return out


def supports_decode_rope_attention(
    qkv_BRK: torch.Tensor, cos_BK: torch.Tensor, k_SGMK: torch.Tensor, v_SGMK: torch.Tensor
) -> bool:
    """Whether :func:`decode_rope_attention` takes these tensors: float32 on the CPU, the kernel
    available, ``qkv`` and the rotary tables contiguous, and the key and value caches laid out
    alike (contiguous rows of a head size that is a multiple of 8)."""
    K = qkv_BRK.shape[-1]
    return (
        qkv_BRK.dtype == cos_BK.dtype == k_SGMK.dtype == v_SGMK.dtype == torch.float32
        and qkv_BRK.device.type == "cpu"
        and qkv_BRK.dim() == 3
        and qkv_BRK.is_contiguous()
        and cos_BK.is_contiguous()
        and cos_BK.shape == (qkv_BRK.shape[0], K)
        and K % 8 == 0
        and K <= ATTN_MAX_HEAD_DIM
        and k_SGMK.dim() == 4
        and k_SGMK.shape == v_SGMK.shape
        and k_SGMK.shape[3] == K
        and k_SGMK.stride() == v_SGMK.stride()
        and k_SGMK.stride()[2:] == (K, 1)
        and available()
    )


def decode_rope_attention(
    qkv_BRK: torch.Tensor,
    cos_BK: torch.Tensor,
    sin_BK: torch.Tensor,
    k_SGMK: torch.Tensor,
    v_SGMK: torch.Tensor,
    first_slot: int,
    pos_B: torch.Tensor,
    n_heads: int,
) -> torch.Tensor:
    """A decode step's attention from the fused projection ``qkv`` (B, H + 2G, K): rotate the
    queries and keys (``cos``/``sin`` (B, K), as :func:`layers.apply_rotary`), write each
    sequence's key and value into cache slot ``first_slot + b`` at position ``pos_B[b]``, and
    attend to positions ``0 .. pos_B[b]`` of that slot. Returns (B, H, K). The cache entries
    are bitwise those of the PyTorch path; the attention is :func:`decode_attention`'s.
    Check :func:`supports_decode_rope_attention` first."""
    lib = _lib()
    if lib is None or not supports_decode_rope_attention(qkv_BRK, cos_BK, k_SGMK, v_SGMK):
        raise KernelError(
            "decode_rope_attention takes float32 CPU tensors: qkv and cos/sin contiguous, a "
            f"cache of rows of K floats; got qkv {tuple(qkv_BRK.shape)} {qkv_BRK.dtype}, "
            f"cos {tuple(cos_BK.shape)}, cache {tuple(k_SGMK.shape)} strides {k_SGMK.stride()}"
        )
    B, R, K = qkv_BRK.shape
    S, G, M, _ = k_SGMK.shape
    if n_heads + 2 * G != R or n_heads % G:
        raise KernelError(f"qkv has {R} rows per sequence, expected {n_heads} + 2 x {G}")
    if sin_BK.shape != cos_BK.shape or not sin_BK.is_contiguous() or sin_BK.dtype != cos_BK.dtype:
        raise KernelError(f"sin must be like cos {tuple(cos_BK.shape)}, got {tuple(sin_BK.shape)}")
    if pos_B.shape != (B,):
        raise KernelError(f"pos must have shape ({B},), got {tuple(pos_B.shape)}")
    if not 0 <= first_slot <= S - B:
        raise KernelError(f"slots {first_slot}..{first_slot + B - 1} outside the cache's {S}")
    pos_B = pos_B.to(torch.int64).contiguous()
    q_rot = torch.empty(B, n_heads, K)
    out = torch.empty(B, n_heads, K)
    if B == 0:
        return out
    offset = first_slot * k_SGMK.stride(0) * k_SGMK.element_size()
    rc = lib.decode_rope_attention(
        qkv_BRK.data_ptr(),
        cos_BK.data_ptr(),
        sin_BK.data_ptr(),
        k_SGMK.data_ptr() + offset,
        v_SGMK.data_ptr() + offset,
        k_SGMK.stride(0),
        k_SGMK.stride(1),
        pos_B.data_ptr(),
        M,
        B,
        n_heads,
        G,
        K,
        K**-0.5,
        q_rot.data_ptr(),
        out.data_ptr(),
        _threads(B >= LARGE_ATTENTION_ROWS),
    )
    if rc == 2:
        raise KernelError(f"a position in {pos_B.tolist()} is outside the cache's {M}")
    if rc != 0:
        raise KernelError(f"decode_rope_attention refused its arguments (code {rc})")
    return out


def supports_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`rms_norm` takes these: float32 CPU tensors, ``x`` contiguous with a last
    dimension that is a multiple of 8 and equals the weight's length, the kernel available."""
    return (
        x.dtype == weight.dtype == torch.float32
        and x.device.type == "cpu"
        and x.dim() >= 1
        and x.is_contiguous()
        and weight.is_contiguous()
        and weight.dim() == 1
        and x.shape[-1] == weight.shape[0]
        and x.shape[-1] % 8 == 0
        and available()
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` over the last dimension, as ``F.rms_norm``
    (to float32 rounding). Check :func:`supports_rms_norm` first."""
    lib = _lib()
    if lib is None or not supports_rms_norm(x, weight):
        raise KernelError(
            "rms_norm takes contiguous float32 CPU tensors with a last dimension that is a "
            f"multiple of 8 and the weight's length; got x {tuple(x.shape)} {x.dtype}, weight "
            f"{tuple(weight.shape)} {weight.dtype}"
        )
    out = torch.empty_like(x)
    D = x.shape[-1]
    if x.numel():
        rc = lib.rms_norm(x.data_ptr(), weight.data_ptr(), eps, x.numel() // D, D, out.data_ptr())
        if rc != 0:
            raise KernelError(f"rms_norm refused its arguments (code {rc})")
    return out


def blocked_linear(x: torch.Tensor, w_blocks: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for float32 ``x`` (..., K) and ``w`` (N, K) given as :func:`block_weights`
    made it: the experts' blocked tile for a dense layer's few rows. Each output element is one
    FMA chain over K in order (F.linear's order may differ: float32 rounding)."""
    lib = _lib()
    nb, K, width = w_blocks.shape if w_blocks.dim() == 3 else (0, 0, 0)
    if (
        lib is None
        or not has_avx512f()
        or width != BLOCK
        or x.dtype != torch.float32
        or w_blocks.dtype != torch.float32
        or x.shape[-1] != K
        or not w_blocks.is_contiguous()
    ):
        raise KernelError(
            f"blocked_linear takes float32 x (..., K) and blocks (N/16, K, 16) on AVX-512F; got "
            f"x {tuple(x.shape)} {x.dtype}, blocks {tuple(w_blocks.shape)} {w_blocks.dtype}"
        )
    x2 = x.reshape(-1, K).contiguous()
    y = x2.new_empty(x2.shape[0], nb * BLOCK)
    rc = lib.blocked_linear(
        x2.data_ptr(),
        x2.shape[0],
        K,
        w_blocks.data_ptr(),
        nb * BLOCK,
        y.data_ptr(),
        _threads(x2.shape[0] * nb * BLOCK * K >= LARGE_LINEAR_MACS),
    )
    if rc != 0:
        raise KernelError(f"blocked_linear refused its arguments (code {rc})")
    return y.view(*x.shape[:-1], nb * BLOCK)


# the probe native_gate_block compares on: enough logits to meet a one-in-3000 difference
_GATE_PROBE_TOKENS = 4096


def gate_logits(x_TD: torch.Tensor, w_ED: torch.Tensor, block: int) -> torch.Tensor:
    """An MoE gate's logits ``x @ w.T`` for bfloat16 ``x`` (T, D) and ``w`` (E, D), summed in
    pieces of ``block`` columns, each rounded to bfloat16 and returned as float32 (T, E) (see
    ``moe_gate.c``). :func:`native_gate_block` gives the piece for which these are
    ``F.linear``'s bits, if any."""
    lib = _lib()
    if lib is None or not has_avx512_bf16():
        raise KernelError("native gate needs the kernels on a CPU with AVX512-BF16")
    T, D = x_TD.shape
    if (
        x_TD.dtype != torch.bfloat16
        or w_ED.dtype != torch.bfloat16
        or w_ED.dim() != 2
        or w_ED.shape[1] != D
        or D % 2
        or block <= 0
        or block % 2
    ):
        raise KernelError(
            f"native gate takes bfloat16 x (T, D) and w (E, D), D and the block even; got x "
            f"{tuple(x_TD.shape)} {x_TD.dtype}, w {tuple(w_ED.shape)} {w_ED.dtype}, block {block}"
        )
    x_TD, w_ED = x_TD.contiguous(), w_ED.detach().contiguous()
    E = w_ED.shape[0]
    out = torch.empty(T, E)
    rc = lib.moe_gate_logits_bf16(x_TD.data_ptr(), T, D, w_ED.data_ptr(), E, block, out.data_ptr())
    if rc != 0:
        raise KernelError(f"moe_gate_logits_bf16 refused its arguments (code {rc})")
    return out


@functools.cache
def native_gate_block(D: int, E: int) -> int | None:
    """The piece :func:`gate_logits` sums in to give ``F.linear``'s bfloat16 bits for gates of
    this shape here, or None (no kernels, no AVX512-BF16, or no candidate matched). Found once
    per shape and process by a probe of 4096 random tokens compared bit for bit: how PyTorch's
    bfloat16 GEMM splits the sum depends on its oneDNN build, the CPU and the width."""
    if D % 2 or E < 1 or not available() or not has_avx512_bf16():
        return None
    g = torch.Generator().manual_seed(D * 131 + E)
    x = torch.randn(_GATE_PROBE_TOKENS, D, generator=g).to(torch.bfloat16)
    w = (torch.randn(E, D, generator=g) * D**-0.5).to(torch.bfloat16)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, w).float()
    candidates = dict.fromkeys(
        b for b in (D, 1024, 512, 2048, 256, D // 2, D // 4) if 0 < b <= D and b % 2 == 0
    )
    for block in candidates:
        if torch.equal(gate_logits(x, w, block), want):
            return block
    log.info("native MoE gate: no piece gives F.linear's bits at D=%d, E=%d; using F.linear", D, E)
    return None
