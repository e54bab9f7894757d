"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

Only one for now: :func:`thin_experts`, SwiGLU experts for slices of a few rows each, where a
step is bound by reading the weights (see ``thin_experts.c``). Everything here is optional: with
no compiler, a CPU without AVX2/FMA, a non-x86 machine or ``EXPERTMESH_NATIVE_KERNELS=0``,
:func:`available` is False and callers use their PyTorch path, which computes the same numbers.

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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("thin_experts.c")
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")
LIBS = ("-lm",)
MAX_ROWS = 256  # must match MAX_ROWS in thin_experts.c
_ERRORS = {
    1: "D and F must be positive multiples of 8",
    2: f"a slice has more than {MAX_ROWS} rows",
    3: "out of memory for the scratch buffers",
}


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
    """Compile ``thin_experts.c`` (if not cached) and return the shared library's path."""
    cc = envs.c_compiler()
    if shutil.which(cc) is None:
        raise FileNotFoundError(f"no C compiler {cc!r} on PATH (set CC)")
    src = SOURCE.read_bytes()
    digest = hashlib.sha256(src + " ".join((cc, *CFLAGS, *LIBS)).encode()).hexdigest()[:16]
    out_dir = cache_dir or envs.kernel_cache_dir()
    lib = out_dir / f"thin_experts-{digest}.so"
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
            [cc, *CFLAGS, "-o", tmp, str(SOURCE), *LIBS], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}:\n{proc.stderr[-2000:]}")
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
    ]
    lib.thin_experts_has_avx512_bf16.restype = ctypes.c_int
    return lib


def available() -> bool:
    """True when the native kernel is built and loadable on this machine."""
    return _lib() is not None


def has_avx512_bf16() -> bool:
    """Whether :func:`thin_experts` can take its AVX512-BF16 path on this CPU (bfloat16 weights
    and activations; the AVX2 path otherwise)."""
    lib = _lib()
    return lib is not None and bool(lib.thin_experts_has_avx512_bf16())


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
    shape: tuple[int, int],
    dtype: torch.dtype,
    alive: list[torch.Tensor],
) -> list[int]:
    """Addresses of the n experts' matrices; tensors they point into are appended to ``alive``
    (copies made to get contiguous ones must outlive the call)."""
    if isinstance(w, torch.Tensor) and w.is_contiguous():
        if w.dim() != 3 or w.shape[0] < n or tuple(w.shape[1:]) != shape or w.dtype != dtype:
            raise KernelError(f"weights {tuple(w.shape)} {w.dtype}, want (E, *{shape}) {dtype}")
        step = w.stride(0) * w.element_size()
        return [w.data_ptr() + e * step for e in range(n)]
    mats = [w[e].contiguous() for e in range(n)]
    for e, m in enumerate(mats):
        if tuple(m.shape) != shape or m.dtype != dtype:
            raise KernelError(
                f"expert {e}: weights {tuple(m.shape)} {m.dtype}, want {shape} {dtype}"
            )
    alive.extend(mats)
    return [m.data_ptr() for m in mats]


def thin_experts(
    x_AD: torch.Tensor,
    starts: Sequence[int],
    counts: Sequence[int],
    w13_EFD: torch.Tensor | Sequence[torch.Tensor],
    w2_EDF: torch.Tensor | Sequence[torch.Tensor],
    out_AD: torch.Tensor,
    *,
    avx512: bool = True,
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
    F2, D = w13_EFD[0].shape
    dtype = w13_EFD[0].dtype
    alive: list[torch.Tensor] = []
    p13 = _expert_pointers(w13_EFD, E, (F2, D), dtype, alive)
    p2 = _expert_pointers(w2_EDF, E, (D, F2 // 2), dtype, alive)
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
    )
    if rc != 0:
        raise KernelError(f"thin_experts refused its arguments: {_ERRORS.get(rc, f'code {rc}')}")
