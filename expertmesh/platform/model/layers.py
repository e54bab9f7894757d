"""Dense building blocks of the decoder: RMSNorm, rotary embeddings, GQA attention, SwiGLU FFN.

Single-device, no Ray. Shapes: B batch, T query positions, L key positions, D model width,
H query heads, G key/value heads, K head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.platform.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op; the same numbers as the lines below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # NOTE: normalise in float32 like Mixtral, then cast back, for bf16 parity.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding in the non-interleaved (``rotate_half``) layout HF Mixtral uses."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device: torch.device | None) -> torch.Tensor:
        arange = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        return 1.0 / (self.theta ** (arange / self.head_dim))

    def _apply(self, fn, recurse=True):  # nn.Module hook behind .to() / .cuda() / .half()
        # NOTE: model.to(torch.bfloat16) must not round inv_freq (HF keeps it float32 too): a bf16
        # inv_freq shifts rotation angles by ~0.5 rad at position 500. Follow device moves only.
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq(self.inv_freq.device)
        return self

    def forward(
        self, pos_BT: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_BTk = pos_BT.float()[..., None] * self.inv_freq
        emb_BTK = torch.cat([freqs_BTk, freqs_BTk], dim=-1)
        return emb_BTK.cos().to(dtype), emb_BTK.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(
    x_BTHK: torch.Tensor, cos_BTK: torch.Tensor, sin_BTK: torch.Tensor
) -> torch.Tensor:
    cos, sin = cos_BTK[:, :, None, :], sin_BTK[:, :, None, :]
    return x_BTHK * cos + _rotate_half(x_BTHK) * sin


class KVCache:
    """Slot-based key/value cache: each sequence owns one slot of a fixed-size buffer.

    ``k[layer]`` has shape (S slots, G kv heads, M max positions, K head dim). A step writes the
    new keys at their positions and attends to positions ``<= query position`` of its own slot,
    so sequences of different lengths share one batched step (continuous batching).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        n_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        # NOTE: one extra position at index max_len is scratch space that padded tokens write to
        shape = (n_slots, cfg.n_kv_heads, max_len + 1, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.n_slots = n_slots

    @property
    def scratch_pos(self) -> int:
        return self.max_len

    def move(self, src: int, dst: int, n: int) -> None:
        """Copy the first ``n`` positions of slot ``src`` into slot ``dst`` (every layer)."""
        for buf in (*self.k, *self.v):
            buf[dst, :, :n] = buf[src, :, :n]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        # inference only: q|k|v weights concatenated, with the versions they were built from
        self._qkv: tuple[tuple[int, ...], torch.Tensor] | None = None

    def _fused_qkv(self) -> torch.Tensor:
        """The q, k and v weights as one (H*K + 2*G*K, D) matrix, rebuilt whenever any of them
        changed (an optimizer step, ``load_state_dict``, in-place ops, ``.to()``, a new ``.data``).

        NOTE: a write through ``weight.data`` in place (``w.data.copy_(...)``) bumps no version
        counter and goes unseen; write the parameter itself under ``torch.no_grad()`` instead.
        """
        ws = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        key = tuple(x for w in ws for x in (w._version, w.data_ptr()))
        if self._qkv is None or self._qkv[0] != key:
            self._qkv = (key, torch.cat([w.detach() for w in ws]))
        return self._qkv[1]

    def _project(
        self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries (B, T, H, K), rotated keys and values (B, T, G, K)."""
        B, T, _ = x_BTD.shape
        H, G, K = self.n_heads, self.n_kv, self.head_dim
        if torch.is_grad_enabled():  # training: separate projections, one autograd node each
            q = apply_rotary(self.q_proj(x_BTD).view(B, T, H, K), *rope)
            k = apply_rotary(self.k_proj(x_BTD).view(B, T, G, K), *rope)
            return q, k, self.v_proj(x_BTD).view(B, T, G, K)
        # NOTE: inference: one matmul for q, k and v and one rotation for q and k (at serving
        # batch sizes each op costs about its fixed overhead)
        qkv = F.linear(x_BTD, self._fused_qkv()).view(B, T, H + 2 * G, K)
        qk = apply_rotary(qkv[:, :, : H + G], *rope)
        return qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + G :]

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        pos_BT: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        slots_B: torch.Tensor | None = None,
        write_pos_BT: torch.Tensor | None = None,
        step: CacheStep | None = None,
    ) -> torch.Tensor:
        """``write_pos_BT`` (cache only) is where each token's key/value is stored; padded tokens
        point at the cache's scratch position so they never overwrite a real entry. ``step``
        (the same for every layer of a forward pass) is derived from the three when not given."""
        B, T, _ = x_BTD.shape
        if cache is not None and step is None:
            assert slots_B is not None
            step = CacheStep.build(pos_BT, slots_B, write_pos_BT)
        q_BTHK, k_BTGK, v_BTGK = self._project(x_BTD, rope)
        if cache is None:
            k_BGLK, v_BGLK = k_BTGK.transpose(1, 2), v_BTGK.transpose(1, 2)
            out_BHTK = F.scaled_dot_product_attention(
                q_BTHK.transpose(1, 2), k_BGLK, v_BGLK, is_causal=T > 1, enable_gqa=True
            )
            return self._out(out_BHTK.transpose(1, 2).reshape(B, T, -1))
        assert step is not None
        k_buf, v_buf = cache
        k_buf[step.slot_BT, :, step.write_pos_BT] = k_BTGK.to(k_buf.dtype)
        v_buf[step.slot_BT, :, step.write_pos_BT] = v_BTGK.to(v_buf.dtype)
        if step.first_slot is not None:  # compact slots: read in place
            rows = slice(step.first_slot, step.first_slot + B)
            k_BGLK, v_BGLK = k_buf[rows, :, : step.L], v_buf[rows, :, : step.L]
        else:
            k_BGLK, v_BGLK = k_buf[step.slots_B, :, : step.L], v_buf[step.slots_B, :, : step.L]
        k_BGLK, v_BGLK = k_BGLK.to(q_BTHK.dtype), v_BGLK.to(q_BTHK.dtype)
        if T == 1 and q_BTHK.dtype == torch.float32:
            assert step.future_B1L is not None  # built for every single-position step
            out_BHK = decode_attention(q_BTHK[:, 0], k_BGLK, v_BGLK, step.future_B1L)
            return self._out(out_BHK.reshape(B, 1, -1))
        out_BHTK = F.scaled_dot_product_attention(
            q_BTHK.transpose(1, 2), k_BGLK, v_BGLK, attn_mask=step.allowed_B1TL, enable_gqa=True
        )
        return self._out(out_BHTK.transpose(1, 2).reshape(B, T, -1))

    def _out(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.o_proj(x_BTD)


@dataclass(kw_only=True, slots=True)
class CacheStep:
    """How one forward pass over a :class:`KVCache` writes and reads it: the same for every
    layer, so it is built once per pass (a dozen small ops per layer otherwise)."""

    slots_B: torch.Tensor
    slot_BT: torch.Tensor  # the cache slot each token writes to
    write_pos_BT: torch.Tensor  # the position it writes (padding: the scratch position)
    L: int  # key positions read: 0 .. max query position
    first_slot: int | None  # slots are first_slot .. first_slot + B - 1: read the cache in place
    future_B1L: torch.Tensor | None = None  # decode: keys past a row's position
    allowed_B1TL: torch.Tensor | None = None  # otherwise: keys each query may see

    @classmethod
    def build(
        cls, pos_BT: torch.Tensor, slots_B: torch.Tensor, write_pos_BT: torch.Tensor | None = None
    ) -> CacheStep:
        B, T = pos_BT.shape
        L = int(pos_BT.max()) + 1
        s0 = int(slots_B[0])
        keys_L = torch.arange(L, device=pos_BT.device)
        return cls(
            slots_B=slots_B,
            slot_BT=slots_B[:, None].expand(B, T),
            write_pos_BT=pos_BT if write_pos_BT is None else write_pos_BT,
            L=L,
            first_slot=s0
            if torch.equal(slots_B, torch.arange(s0, s0 + B, device=slots_B.device))
            else None,
            future_B1L=keys_L[None, None, :] > pos_BT[:, :1, None] if T == 1 else None,
            # each query sees keys of its own slot at positions <= its own position
            allowed_B1TL=None if T == 1 else (keys_L[None, None, :] <= pos_BT[:, :, None])[:, None],
        )


def decode_attention(
    q_BHK: torch.Tensor, k_BGLK: torch.Tensor, v_BGLK: torch.Tensor, future_B1L: torch.Tensor
) -> torch.Tensor:
    """One query per sequence (a decode step) against its cached keys, leaving out those past
    its own position (``future_B1L``, True there).

    The H // G query heads sharing a key/value head become the rows of one (rows x L) product,
    so a batch is two batched matmuls over (B * G) small problems that read the cache in place,
    where ``scaled_dot_product_attention`` with a mask would expand the keys per query head.
    """
    B, H, K = q_BHK.shape
    G, L = k_BGLK.shape[1], k_BGLK.shape[2]
    r = H // G
    q = (q_BHK * K**-0.5).reshape(B * G, r, K)
    s_BHL = torch.bmm(q, k_BGLK.reshape(B * G, L, K).transpose(1, 2)).view(B, H, L)
    p = torch.softmax(s_BHL.masked_fill_(future_B1L, float("-inf")), dim=-1)
    return torch.bmm(p.view(B * G, r, L), v_BGLK.reshape(B * G, L, K)).view(B, H, K)


class SwiGLU(nn.Module):
    """The dense FFN used by non-MoE layers (and the reference a one-expert MoE must equal)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)  # gate
        self.w3 = nn.Linear(d_model, d_ff, bias=False)  # up
        self.w2 = nn.Linear(d_ff, d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
