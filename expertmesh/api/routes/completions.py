"""``POST /v1/completions``: OpenAI text completions, ``n`` choices per prompt, optionally streamed.

All prompts of a request go to the router at once, so they share its batched steps. ``best_of``,
``logprobs``, ``echo`` and the penalties are served, not ignored (see ``platform/sampling.py``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from itertools import accumulate
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from expertmesh.api.deps import (
    AfterResponseDep,
    ApiSettings,
    ServicesDep,
    SettingsDep,
    as_api_error,
    require_token,
    token_slot,
)
from expertmesh.api.errors import ApiError, error_body
from expertmesh.api.generation import (
    GENERATION_ERRORS,
    STREAMABLE,
    PieceStream,
    finish_reason,
    generate,
    open_stream,
    sse,
    validate_prompts,
)
from expertmesh.api.schemas import (
    SEED_MODULUS,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Routing,
    SamplingFields,
    Usage,
)

router = APIRouter(
    tags=["completions"],
    dependencies=[Depends(require_token)],
    responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)},
)


def common_params(body: SamplingFields, max_tokens: int) -> dict[str, Any]:
    """The router's ``SamplingParams`` fields both APIs share (it checks them again)."""
    return {
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": body.stops(),
        "seed": None if body.seed is None else body.seed % SEED_MODULUS,
        "ignore_eos": body.ignore_eos,
        "n": body.n,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
    }


def sampling_params(body: CompletionRequest) -> dict[str, Any]:
    """The router's ``SamplingParams`` fields; ``echo`` with ``logprobs`` scores the prompt."""
    return common_params(body, body.max_tokens) | {
        "best_of": body.best_of,
        "logprobs": body.logprobs,
        "prompt_logprobs": body.logprobs if body.echo else None,
    }


def check_request(body: CompletionRequest, settings: ApiSettings) -> list[str]:
    """The prompts, after the checks that need no model; raises 400 naming the field."""
    prompts = body.prompts()
    if len(prompts) > settings.max_prompts:
        raise ApiError(
            400,
            f"prompt: {len(prompts)} prompts in one request; the limit is "
            f"{settings.max_prompts}, so split them over several requests",
            param="prompt",
        )
    return prompts


def _top_dict(pairs: list[list[Any]]) -> dict[str, float]:
    """OpenAI's shape: a dict per token. Alternatives that decode alike share a key; the most
    likely one keeps it (pairs come most likely first)."""
    out: dict[str, float] = {}
    for text, logprob in pairs:
        out.setdefault(text, logprob)
    return out


def completion_logprobs(parts: list[dict[str, Any] | None], start: int = 0) -> CompletionLogprobs:
    """OpenAI's logprobs of the tokens in ``parts`` (prompt's, then output's), with each token's
    offset in the choice's text (the first at ``start``)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    for part in parts:
        if part is not None:
            tokens += part["tokens"]
            token_logprobs += part["token_logprobs"]
            top += [None if t is None else _top_dict(t) for t in part["top_logprobs"]]
    offsets = [start + o for o in accumulate((len(t) for t in tokens[:-1]), initial=0)]
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets
    )


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=STREAMABLE | GENERATION_ERRORS,
    dependencies=[Depends(token_slot)],
)
async def create_completion(
    body: CompletionRequest,
    services: ServicesDep,
    settings: SettingsDep,
    after_response: AfterResponseDep,
) -> CompletionResponse | StreamingResponse:
    """Complete one prompt or a list (OpenAI ``text_completion``); ``stream`` sends SSE.

    429 with ``Retry-After`` when the deployment's queue is full or the token has its most
    requests in flight; a client that hangs up stops its generation."""
    prompts = check_request(body, settings)
    model = await services.require_model(body.model)
    params = sampling_params(body)
    prompt_tokens = await validate_prompts(services, prompts, params)
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        pieces = await open_stream(services, prompts, params, cid, body.expertmesh_routing)
        after_response.callback(pieces.close)
        events = stream_events(
            pieces,
            body,
            prompts,
            CompletionChunk(id=cid, created=created, model=model.name, choices=[]),
            prompt_tokens=prompt_tokens if include_usage else None,
        )
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    results = await generate(services, prompts, params, cid, body.expertmesh_routing)
    choices = []
    for i, (prompt, per_prompt) in enumerate(zip(prompts, results, strict=True)):
        for j, r in enumerate(per_prompt):
            logprobs = None
            if body.logprobs is not None:
                parts = [r.get("prompt_logprobs"), r["logprobs"]] if body.echo else [r["logprobs"]]
                logprobs = completion_logprobs(parts)
            choices.append(
                CompletionChoice(
                    index=i * body.n + j,
                    text=prompt + r["text"] if body.echo else r["text"],
                    finish_reason=finish_reason(r["finish_reason"]),
                    logprobs=logprobs,
                    token_ids=r["token_ids"] if body.return_token_ids else None,
                    prompt_tokens=r["prompt_tokens"] if body.return_token_ids else None,
                    expertmesh_routing=Routing(
                        expert_counts=r.get("expert_counts"), token_experts=r.get("token_experts")
                    )
                    if body.expertmesh_routing
                    else None,
                )
            )
    n_prompt = sum(prompt_tokens)
    n_out = sum(r["completion_tokens"] for per_prompt in results for r in per_prompt)
    return CompletionResponse(
        id=cid,
        created=created,
        model=model.name,
        choices=choices,
        usage=Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out),
    )


async def stream_events(
    pieces: PieceStream,
    body: CompletionRequest,
    prompts: list[str],
    head: CompletionChunk,
    *,
    prompt_tokens: list[int] | None,
) -> AsyncIterator[bytes]:
    """One ``data:`` event per generated token (of any choice), then usage if asked, ``[DONE]``.

    With ``echo`` a choice's first event carries its prompt. A failure mid-stream (the status
    line is already sent) arrives as an error event in OpenAI's error shape, then ``[DONE]``.
    """
    completion_tokens = 0
    sent: dict[int, int] = {}  # choice -> characters of text sent (for text_offset)

    def chunk(
        index: int, text: str, reason: str | None, logprobs, token_ids, routing=None
    ) -> bytes:
        choice = CompletionChunkChoice(
            index=index,
            text=text,
            finish_reason=finish_reason(reason),
            logprobs=logprobs,
            token_ids=token_ids if body.return_token_ids else None,
            expertmesh_routing=routing,
        )
        sent[index] = sent.get(index, 0) + len(text)
        return sse(head.model_copy(update={"choices": [choice]}).model_dump())

    try:
        async for piece in pieces:
            want_lp = body.logprobs is not None
            if piece.first and body.echo:
                prompt = prompts[piece.index // body.n]
                lp = completion_logprobs([piece.prompt_logprobs]) if want_lp else None
                yield chunk(piece.index, prompt, None, lp, [])
            completion_tokens += len(piece.token_ids)
            start = sent.get(piece.index, 0)
            lp = completion_logprobs([piece.logprobs], start) if want_lp else None
            routing = None
            if body.expertmesh_routing:
                routing = Routing(
                    token_experts=piece.token_experts or [], expert_counts=piece.expert_counts
                )
            yield chunk(piece.index, piece.text, piece.finish_reason, lp, piece.token_ids, routing)
    except Exception as exc:
        err = as_api_error(getattr(exc, "cause", None) or exc)
        yield sse(error_body(err.status, err.message, err.param))
    else:
        if prompt_tokens is not None:
            n_prompt = sum(prompt_tokens)
            usage = Usage(
                prompt_tokens=n_prompt,
                completion_tokens=completion_tokens,
                total_tokens=n_prompt + completion_tokens,
            )
            yield sse(head.model_copy(update={"usage": usage}).model_dump())
    yield sse("[DONE]")
