"""Inference matmuls on weights packed once for oneDNN, instead of per call by MKL.

PyTorch runs a float32 ``F.linear`` on the CPU through MKL's GEMM, which re-packs the weight
into its blocked layout on every call; at a decode step's few dozen rows that packing is much
of the call. oneDNN (bundled with PyTorch, the path its own compiled CPU graphs take) can take
the weight packed ahead of time. Measured on the 2-core EPYC (Zen 4, one thread, float32):

| rows x in -> out | MKL ``F.linear`` | packed oneDNN |
|---|---|---|
| 64 x 256 -> 4096 (the LM head of ``configs/tiny.yaml``) | 3.0-4.2 ms | 1.7-2.0 ms |
| 7 x 256 -> 4096 | 0.42-0.68 ms | 0.19 ms |
| 64 x 256 -> 512 (q, k and v) | 0.22-0.26 ms | 0.20 ms |
| 2048 x 256 -> 512 (a prefill) | 8.4-11.4 ms | 6.0 ms |

A whole dense decode step of that model (64 rows, experts replaced by the identity) ran 1.09x
as fast on one thread and 1.28x on two (medians of 8 alternating 64-step waves in one process;
MKL's two-thread GEMM is the weaker at these sizes). A gate's 8 outputs are too few: the packed
call is slower there, so MoE gates keep ``F.linear``. The results differ from MKL's by
float32 summation order only (~1e-6 relative).

For a decode step's few rows (up to :data:`BLOCKED_MAX_ROWS`) on CPUs with AVX-512F the holder
keeps the weight in the native expert kernel's blocked layout instead and multiplies with that
kernel's tile (:func:`kernels.blocked_linear`): one thread, float32, 64 x 256 -> 512 in 182
against oneDNN's 242 us (1.33x), -> 256 1.44x, the LM head's -> 4096 1.14x; 1.09x at 128 rows.

The packed copy lives beside the weight (:class:`PackedWeight`) and is rebuilt when the
weight changes (an optimizer step, ``load_state_dict``, a new tensor). It is used only where
no gradient is wanted, for float32 on the CPU, and only after a one-time check that the
operators exist and agree with ``F.linear``; everything else (training, bfloat16, GPUs, a
PyTorch without oneDNN, ``EXPERTMESH_ONEDNN_LINEAR=0``) takes ``F.linear`` unchanged.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from expertmesh import envs
from expertmesh.platform.model import kernels

log = logging.getLogger(__name__)

# the row count oneDNN picks its packed layout for: a decode step of a full batch
_PACK_FOR_ROWS = 64
# up to this many rows, the native blocked kernel instead of oneDNN (one thread, K=256, float32:
# 1.33x at 64 x 256 -> 512, 1.44x -> 256, 1.14x -> 4096, 1.57x at 32 rows, 1.09x at 128)
BLOCKED_MAX_ROWS = 128


@functools.cache
def available() -> bool:
    """Whether the packed path is on: the operators exist, agree with ``F.linear`` on a small
    problem, and ``EXPERTMESH_ONEDNN_LINEAR`` is not ``0``. Checked once per process."""
    if not envs.onednn_linear():
        return False
    ops = getattr(torch.ops, "mkldnn", None)
    if not torch.backends.mkldnn.is_available() or ops is None:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(40, 24, generator=gen)
        x = torch.randn(5, 24, generator=gen)
        got = _run(x, _pack(w))
        want = F.linear(x.double(), w.double()).float()
    except (AttributeError, RuntimeError) as exc:  # operator missing or refused on this build
        log.info("oneDNN packed linear unavailable (%s); using F.linear", exc)
        return False
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
        log.warning("oneDNN packed linear disagrees with F.linear; using F.linear")
        return False
    return True


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), _PACK_FOR_ROWS)


def _run(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class PackedWeight:
    """A weight's packed copy for :meth:`linear`; keep one per weight (a module attribute).

    Copies and pickles of the holder start empty: the packed tensor is a cache, rebuilt on
    first use, and oneDNN tensors can be neither deep-copied nor pickled.
    """

    __slots__ = ("_blocks", "_blocks_key", "_blocks_source", "_key", "_packed", "_source")

    def __init__(self) -> None:
        self._source: torch.UntypedStorage | None = None
        self._key: tuple = ()
        self._packed: torch.Tensor | None = None
        # the native expert kernel's layout (kernels.block_weights), kept the same way
        self._blocks_source: torch.UntypedStorage | None = None
        self._blocks_key: tuple = ()
        self._blocks: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> PackedWeight:
        return PackedWeight()

    def __reduce__(self) -> tuple:
        return (PackedWeight, ())

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x @ w.T``, through the packed copy where it applies, else ``F.linear(x, w)``.

        Up to :data:`BLOCKED_MAX_ROWS` rows on AVX-512 CPUs it reads the weight in the native
        expert kernel's blocked layout instead (:func:`kernels.blocked_linear`)."""
        if not applies(x, w):
            return F.linear(x, w)
        if x.numel() <= BLOCKED_MAX_ROWS * x.shape[-1] and _blocked_applies(w):
            return kernels.blocked_linear(x, self.blocks(w))
        # NOTE: the memory of the weight last packed is kept alive (_source: its storage, even
        # if a parameter's .data moved on), so no other tensor can have been allocated at its
        # address since: the same address, layout and version is the same weight unchanged (a
        # fresh view of it too, as an expert's slice of a stacked bank is)
        key = weight_identity(w)
        if self._key != key or self._packed is None:
            self._packed = _pack(w)
            self._source, self._key = w.untyped_storage(), key
        return _run(x, self._packed)

    def blocks(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` in the native expert kernel's blocked layout (:func:`kernels.block_weights`),
        made on first use and again whenever ``w`` changes (the same test as :meth:`linear`)."""
        if self._blocks is None or self._blocks_key != weight_identity(w):
            self.adopt_blocks(w, kernels.block_weights(w))
        return self._blocks

    def adopt_blocks(self, w: torch.Tensor, blocks: torch.Tensor) -> None:
        """Keep ``blocks``, made by the caller from ``w`` as :func:`kernels.block_weights`
        makes them (a view into a larger buffer: ExpertBank stacks its experts' blocks), as
        :meth:`blocks` would have."""
        self._blocks = blocks
        self._blocks_source, self._blocks_key = w.untyped_storage(), weight_identity(w)


def weight_identity(w: torch.Tensor) -> tuple:
    """What tells a weight apart from any other, or from itself before a change (see the NOTE
    in :meth:`PackedWeight.linear`; the holder keeps the storage alive)."""
    return (w.data_ptr(), w._version, w.shape, w.stride())


def _blocked_applies(w: torch.Tensor) -> bool:
    return w.shape[0] % kernels.BLOCK == 0 and blocked_linear_available()


@functools.cache
def blocked_linear_available() -> bool:
    """Whether :meth:`PackedWeight.linear` takes the blocked kernel for few rows: the native
    kernels on a CPU with AVX-512F, and ``EXPERTMESH_ONEDNN_LINEAR`` not ``0`` (the switch
    for both)."""
    return envs.onednn_linear() and kernels.has_avx512f()


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :meth:`PackedWeight.linear` takes the packed path for ``x @ w.T``."""
    return (
        x.dtype == w.dtype == torch.float32
        and x.device.type == w.device.type == "cpu"
        and x.numel() > 0
        and x.dim() in (2, 3)
        and x.shape[-1] == w.shape[1]
        and w.dim() == 2
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        and available()
    )
