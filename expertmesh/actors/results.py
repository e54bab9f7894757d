"""What the router answers for a finished or streamed sequence: text, token ids, logprobs
with token texts, and the experts that served it when asked."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer

from expertmesh.platform.engine import Sequence


def token_logprobs(
    tokenizer: Tokenizer,
    ids: list[int],
    logprobs: list[float | None],
    tops: list[list[tuple[int, float]] | None],
) -> dict[str, Any]:
    """Logprobs with token texts (each token decoded alone, as vLLM's OpenAI server does);
    the alternatives as ``[text, logprob]`` pairs, most likely first (the completions API makes
    a dict of them, in which tokens that decode alike collapse; the chat API keeps the list)."""
    text = lambda i: tokenizer.decode([i], skip_special_tokens=False)  # noqa: E731
    return {
        "tokens": [text(i) for i in ids],
        "token_logprobs": list(logprobs),
        "top_logprobs": [None if top is None else [[text(i), lp] for i, lp in top] for top in tops],
    }


def result_of(seq: Sequence, with_routing: bool, tokenizer: Tokenizer) -> dict[str, Any]:
    out: dict[str, Any] = {
        "request_id": seq.request_id,
        "text": seq.text,
        "token_ids": list(seq.output_ids),
        "finish_reason": seq.finish_reason,
        "prompt_tokens": len(seq.prompt_ids),
        "completion_tokens": len(seq.output_ids),
        "cumulative_logprob": seq.cumulative_logprob,
    }
    p = seq.params
    if p.logprobs is not None:
        out["logprobs"] = token_logprobs(
            tokenizer, seq.output_ids, list(seq.logprobs), list(seq.top_logprobs)
        )
    if p.prompt_logprobs is not None:
        # the first prompt token has no context: no logprob (None), as in vLLM and OpenAI
        out["prompt_logprobs"] = token_logprobs(
            tokenizer,
            seq.prompt_ids,
            [None, *seq.prompt_logprobs],
            [None, *seq.prompt_top_logprobs],
        )
    if with_routing and seq.expert_counts is not None:
        out["expert_counts"] = seq.expert_counts.tolist()
        out["token_experts"] = seq.token_experts
    return out
