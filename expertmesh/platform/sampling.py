"""Sampling parameters and the next-token sampler (greedy, temperature, top-p)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from expertmesh.platform.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    """How to pick tokens for one request (OpenAI completion semantics)."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise ConfigError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 5.0:
            raise ConfigError("temperature", f"must be in [0, 5], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        self.stop = tuple(self.stop)
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise ConfigError("stop", "at most 4 non-empty stop strings")


def sample_next(
    logits_BV: torch.Tensor,
    temperature_B: torch.Tensor,
    top_p_B: torch.Tensor,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Pick one token per row; rows with temperature 0 are greedy. Returns (B,) int64.

    Sampled rows are drawn on the CPU, whatever device the logits are on: their ``generators``
    are CPU generators, so a seeded request draws the same tokens on every device (given the
    same logits), and a row's draw costs one copy of V floats."""
    import torch  # NOTE: here, not at the top, so the SDK and CLI import without torch

    logits_BV = logits_BV.float()
    greedy_B = logits_BV.argmax(dim=-1)
    sampled = temperature_B > 0
    if not bool(sampled.any()):
        return greedy_B
    out_B = greedy_B.cpu()
    rows = torch.nonzero(sampled).flatten().tolist()
    sampled_RV = logits_BV[rows].cpu()
    for r, b in enumerate(rows):
        probs_V = (sampled_RV[r] / temperature_B[b]).softmax(dim=-1)
        if float(top_p_B[b]) < 1.0:
            sorted_p, order = probs_V.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < top_p_B[b]  # smallest prefix reaching top_p
            probs_V = torch.zeros_like(probs_V).scatter(0, order[keep], sorted_p[keep])
        out_B[b] = torch.multinomial(probs_V, 1, generator=generators[b]).item()
    return out_B
