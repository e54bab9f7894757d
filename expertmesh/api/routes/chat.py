"""``POST /v1/chat/completions``: OpenAI chat completions through the model's chat template.

The router renders the messages with the Jinja2 template stored in the checkpoint
(``chat_template.jinja``); a model without one answers 400 naming ``messages``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from expertmesh.actors import names
from expertmesh.api.deps import (
    AfterResponseDep,
    Services,
    ServicesDep,
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
)
from expertmesh.api.routes.completions import common_params
from expertmesh.api.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ErrorResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)

router = APIRouter(
    tags=["completions"],
    dependencies=[Depends(require_token)],
    responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)},
)


def chat_logprobs(lp: dict[str, Any] | None) -> ChatLogprobs | None:
    """The router's logprobs in the chat shape (``content``: one entry per token)."""
    if lp is None:
        return None
    entries = []
    for token, logprob, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        alternatives = [
            TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in (top or [])
        ]
        entries.append(
            TokenLogprob(
                token=token, logprob=logprob, bytes=list(token.encode()), top_logprobs=alternatives
            )
        )
    return ChatLogprobs(content=entries)


async def chat_params(body: ChatCompletionRequest, services: Services) -> tuple[str, dict, int]:
    """The rendered prompt, the router's sampling fields and the prompt's length in tokens."""
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise ApiError(
            400,
            "max_completion_tokens: give max_tokens or max_completion_tokens, not both",
            param="max_completion_tokens",
        )
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
    messages = [m.model_dump() for m in body.messages]
    rendered = await services.call(names.ROUTER, "render_chat", messages)
    max_tokens = body.max_tokens or body.max_completion_tokens
    if max_tokens is None:  # what the context leaves, as OpenAI and vLLM do
        max_tokens = max(1, rendered["context"] - rendered["prompt_tokens"])
    params = common_params(body, max_tokens) | {
        "logprobs": (body.top_logprobs or 0) if body.logprobs else None
    }
    prompt = rendered["prompt"]
    await services.call(names.ROUTER, "validate", prompt, params)
    return prompt, params, rendered["prompt_tokens"]


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=STREAMABLE | GENERATION_ERRORS,
    dependencies=[Depends(token_slot)],
)
async def create_chat_completion(
    body: ChatCompletionRequest, services: ServicesDep, after_response: AfterResponseDep
) -> ChatCompletionResponse | StreamingResponse:
    """Answer a conversation (OpenAI ``chat.completion``); ``stream`` sends SSE chunks.

    429 with ``Retry-After`` when the deployment's queue is full or the token has its most
    requests in flight; a client that hangs up stops its generation."""
    model = await services.require_model(body.model)
    prompt, params, prompt_tokens = await chat_params(body, services)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    head = ChatCompletionChunk(id=cid, created=int(time.time()), model=model.name, choices=[])
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        pieces = await open_stream(services, [prompt], params, cid)
        after_response.callback(pieces.close)
        events = chat_events(pieces, head, prompt_tokens if include_usage else None)
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    (results,) = await generate(services, [prompt], params, cid)
    choices = [
        ChatChoice(
            index=j,
            message=ChatMessageOut(content=r["text"]),
            finish_reason=finish_reason(r["finish_reason"]),
            logprobs=chat_logprobs(r.get("logprobs")),
        )
        for j, r in enumerate(results)
    ]
    n_out = sum(r["completion_tokens"] for r in results)
    return ChatCompletionResponse(
        id=cid,
        created=head.created,
        model=model.name,
        choices=choices,
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=n_out,
            total_tokens=prompt_tokens + n_out,
        ),
    )


async def chat_events(
    pieces: PieceStream,
    head: ChatCompletionChunk,
    prompt_tokens: int | None,
) -> AsyncIterator[bytes]:
    """A role chunk per choice, then one content chunk per token, usage if asked, ``[DONE]``."""

    def chunk(choice: ChatChunkChoice) -> bytes:
        return sse(head.model_copy(update={"choices": [choice]}).model_dump(exclude_none=True))

    completion_tokens = 0
    try:
        async for piece in pieces:
            if piece.first:
                role = ChatDelta(role="assistant", content="")
                yield chunk(ChatChunkChoice(index=piece.index, delta=role, finish_reason=None))
            completion_tokens += len(piece.token_ids)
            yield chunk(
                ChatChunkChoice(
                    index=piece.index,
                    delta=ChatDelta(content=piece.text),
                    finish_reason=finish_reason(piece.finish_reason),
                    logprobs=chat_logprobs(piece.logprobs),
                )
            )
    except Exception as exc:
        err = as_api_error(getattr(exc, "cause", None) or exc)
        yield sse(error_body(err.status, err.message, err.param))
    else:
        if prompt_tokens is not None:
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            )
            yield sse(head.model_copy(update={"usage": usage}).model_dump(exclude_none=True))
    yield sse("[DONE]")
