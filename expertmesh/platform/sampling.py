"""Sampling parameters and the one sampling step: penalties, greedy/temperature/top-p, logprobs.

The engine calls :func:`sample_step` once per step for the whole batch. Semantics follow vLLM's
OpenAI server: penalties change the logits before temperature and top-p; reported logprobs are
the model's own (``log_softmax`` of the raw logits, vLLM's default ``raw_logprobs``), so they
say how likely the model found a token whatever the sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from expertmesh.platform.errors import ConfigError

if TYPE_CHECKING:
    import torch

MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default cap; OpenAI allows 5)
MAX_BEST_OF = 16  # candidate sequences per prompt
# NOTE: temperatures below this are greedy (vLLM's _SAMPLING_EPS): 1e-300 is a valid temperature
# but is 0 in float32, and logits / 0 made the draw's probabilities NaN
GREEDY_BELOW = 1e-5


def _number(name: str, value: object, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not (lo < value if lo_open else lo <= value) or not value <= hi:  # type: ignore[operator]
        interval = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ConfigError(name, f"must be in {interval}, got {value!r}")


def _count(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(name, f"must be an integer in [{lo}, {hi}], got {value!r}")


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    """How to pick tokens for one request (OpenAI completion semantics, vLLM's penalties).

    ``n`` and ``best_of`` are per request: the router runs ``best_of`` sequences and returns the
    ``n`` with the highest cumulative logprob. ``logprobs`` asks for the chosen token's logprob
    and the top ``logprobs`` alternatives at each position; ``prompt_logprobs`` the same for the
    prompt's tokens (from the second one on: the first has no context).
    """

    max_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    n: int = 1
    best_of: int | None = None  # None: n
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # divides (>0) or multiplies (<0) logits of seen tokens

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
        _count("n", self.n, 1, MAX_BEST_OF)
        if self.best_of is not None:
            _count("best_of", self.best_of, 1, MAX_BEST_OF)
            if self.best_of < self.n:
                raise ConfigError(
                    "best_of", f"must be >= n ({self.n}), got {self.best_of}; raise it or lower n"
                )
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _count(name, getattr(self, name), 0, MAX_LOGPROBS)
        _number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _number("repetition_penalty", self.repetition_penalty, 0.0, 2.0, lo_open=True)

    @property
    def candidates(self) -> int:
        """How many sequences the request runs (``best_of``, else ``n``)."""
        return self.best_of or self.n

    @property
    def penalised(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )

    @property
    def wants_logprob(self) -> bool:
        """Whether the chosen tokens' logprobs are needed (reported, or to rank best_of)."""
        return self.logprobs is not None or self.candidates > self.n


@dataclass(kw_only=True, slots=True)
class Row:
    """What :func:`sample_step` needs of one sequence of the batch."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None = None


@dataclass(kw_only=True, slots=True)
class Sampled:
    """One step's picks: ``token_B``; per row, the chosen token's logprob (None where not
    wanted) and the top-k alternatives as ``[(token, logprob), ...]`` (None where not asked)."""

    token_B: torch.Tensor
    logprob: list[float | None]
    top: list[list[tuple[int, float]] | None]


def apply_penalties(
    logits_V: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """vLLM's penalties on one row of float logits (returns a new tensor).

    ``repetition_penalty`` (tokens of the prompt or the output): a positive logit is divided by
    it, a negative one multiplied; then ``frequency_penalty`` times each token's count in the
    output and ``presence_penalty`` once per token present in the output are subtracted.
    """
    import torch

    V = logits_V.shape[-1]
    out_V = logits_V.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(V, dtype=torch.bool)
        seen[torch.tensor([*prompt_ids, *output_ids], dtype=torch.long)] = True
        seen = seen.to(out_V.device)
        rp = params.repetition_penalty
        out_V = torch.where(seen, torch.where(out_V > 0, out_V / rp, out_V * rp), out_V)
    if output_ids and (params.frequency_penalty or params.presence_penalty):
        counts_V = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=V)
        counts_V = counts_V[:V].to(out_V.device, out_V.dtype)
        out_V = out_V - params.frequency_penalty * counts_V
        out_V = out_V - params.presence_penalty * (counts_V > 0).to(out_V.dtype)
    return out_V


def top_logprobs(logprobs_V: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens and their logprobs, most likely first."""
    if k == 0:
        return []
    values, ids = logprobs_V.topk(min(k, logprobs_V.shape[-1]))
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def sample_step(logits_BV: torch.Tensor, rows: list[Row]) -> Sampled:
    """Pick one token per row: penalties, then greedy (temperature 0) or temperature + top-p.

    Sampled rows are drawn on the CPU, whatever device the logits are on: their generators are
    CPU generators, so a seeded request draws the same tokens on every device (given the same
    logits), and a row's draw costs one copy of V floats.
    """
    import torch  # NOTE: here, not at the top, so the SDK and CLI import without torch

    raw_BV = logits_BV.float()
    logits_BV = raw_BV
    penalised = [b for b, r in enumerate(rows) if r.params.penalised]
    if penalised:
        logits_BV = raw_BV.clone()
        for b in penalised:
            r = rows[b]
            logits_BV[b] = apply_penalties(raw_BV[b], r.params, r.prompt_ids, r.output_ids)
        # NOTE: a tiny repetition_penalty (in range: > 0) divides logits into inf; keep them
        # finite so that the draw's probabilities are numbers
        big = torch.finfo(logits_BV.dtype).max / 2
        logits_BV = torch.nan_to_num(logits_BV, nan=-big, posinf=big, neginf=-big)
    out_B = logits_BV.argmax(dim=-1).cpu()
    sampled = [b for b, r in enumerate(rows) if r.params.temperature >= GREEDY_BELOW]
    if sampled:
        sampled_RV = logits_BV[sampled].cpu()
        for i, b in enumerate(sampled):
            p = rows[b].params
            # NOTE: shifted to max 0 before the division: a large logit (penalties can make
            # one near float32's max) over a tiny temperature is inf, and softmax of inf NaN
            x_V = sampled_RV[i]
            probs_V = ((x_V - x_V.max()) / p.temperature).softmax(dim=-1)
            if p.top_p < 1.0:
                sorted_p, order = probs_V.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # smallest prefix reaching top_p
                keep[0] = True  # NOTE: a top_p below float32's range (1e-90) compares as 0
                probs_V = torch.zeros_like(probs_V).scatter(0, order[keep], sorted_p[keep])
            out_B[b] = torch.multinomial(probs_V, 1, generator=rows[b].generator).item()
    logprob: list[float | None] = [None] * len(rows)
    top: list[list[tuple[int, float]] | None] = [None] * len(rows)
    wanted = [b for b, r in enumerate(rows) if r.params.wants_logprob]
    if wanted:
        # NOTE: only for the rows that asked: a log_softmax over V per row is not free at
        # serving batch sizes
        lp_RV = raw_BV[wanted].log_softmax(dim=-1).cpu()
        for i, b in enumerate(wanted):
            logprob[b] = float(lp_RV[i, out_B[b]])
            k = rows[b].params.logprobs
            if k is not None:
                top[b] = top_logprobs(lp_RV[i], k)
    return Sampled(token_B=out_B, logprob=logprob, top=top)
