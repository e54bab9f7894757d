"""``POST /v1/completions``: OpenAI text completions, one choice per prompt, optionally streamed.

All prompts of a request go to the router at once, so they share its batched steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from expertmesh.actors import names
from expertmesh.api.deps import (
    ApiSettings,
    Services,
    ServicesDep,
    SettingsDep,
    as_api_error,
    require_token,
)
from expertmesh.api.errors import ApiError, error_body
from expertmesh.api.schemas import (
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Routing,
    Usage,
)

router = APIRouter(
    tags=["completions"],
    dependencies=[Depends(require_token)],
    responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)},
)


def finish_reason(reason: str | None) -> str | None:
    """The engine says "eos" where OpenAI says "stop"."""
    return "stop" if reason == "eos" else reason


def sampling_params(body: CompletionRequest) -> dict[str, Any]:
    """The router's ``SamplingParams`` fields (it checks their ranges)."""
    return {
        "max_tokens": body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": body.stops(),
        "seed": body.seed,
        "ignore_eos": body.ignore_eos,
    }


def check_request(body: CompletionRequest, settings: ApiSettings) -> list[str]:
    """The prompts, after the checks that need no model; raises 400 naming the field."""
    prompts = body.prompts()
    if not prompts:
        raise ApiError(400, "prompt: the list of prompts is empty", param="prompt")
    if len(prompts) > settings.max_prompts:
        raise ApiError(
            400,
            f"prompt: {len(prompts)} prompts in one request; the limit is "
            f"{settings.max_prompts}, so split them over several requests",
            param="prompt",
        )
    if body.n != 1:
        raise ApiError(400, f"n: only n=1 is supported, got {body.n}", param="n")
    if body.echo:
        raise ApiError(400, "echo: echoing the prompt is not supported", param="echo")
    if body.logprobs is not None:
        raise ApiError(400, "logprobs: log probabilities are not supported", param="logprobs")
    if body.stream and body.expertmesh_routing:
        raise ApiError(
            400,
            "expertmesh_routing: routing is reported by non-streamed requests only; "
            "set stream=false",
            param="expertmesh_routing",
        )
    return prompts


async def validate_prompts(
    services: Services, prompts: list[str], params: dict[str, Any]
) -> list[int]:
    """Each prompt's length in tokens; 400 naming the field (and prompt index) if invalid."""

    async def one(i: int, prompt: str) -> int:
        try:
            return await services.call(names.ROUTER, "validate", prompt, params)
        except ApiError as exc:
            if exc.param == "prompt" and len(prompts) > 1:
                exc.message = f"prompt[{i}]{exc.message.removeprefix('prompt')}"
            raise

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(
    body: CompletionRequest, services: ServicesDep, settings: SettingsDep
) -> CompletionResponse | StreamingResponse:
    """Complete one prompt or a list (OpenAI ``text_completion``); ``stream`` sends SSE."""
    prompts = check_request(body, settings)
    model = await services.require_model(body.model)
    params = sampling_params(body)
    prompt_tokens = await validate_prompts(services, prompts, params)
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = stream_events(
            services,
            prompts,
            params,
            CompletionChunk(id=cid, created=created, model=model.name, choices=[]),
            prompt_tokens=prompt_tokens if include_usage else None,
            token_ids=body.return_token_ids,
        )
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    results = await asyncio.gather(
        *(
            services.call(names.ROUTER, "generate", p, params, body.expertmesh_routing)
            for p in prompts
        )
    )
    choices = [
        CompletionChoice(
            index=i,
            text=r["text"],
            finish_reason=finish_reason(r["finish_reason"]),
            token_ids=r["token_ids"] if body.return_token_ids else None,
            prompt_tokens=r["prompt_tokens"] if body.return_token_ids else None,
            expertmesh_routing=Routing(
                expert_counts=r.get("expert_counts"), token_experts=r.get("token_experts")
            )
            if body.expertmesh_routing
            else None,
        )
        for i, r in enumerate(results)
    ]
    n_prompt = sum(r["prompt_tokens"] for r in results)
    n_out = sum(r["completion_tokens"] for r in results)
    return CompletionResponse(
        id=cid,
        created=created,
        model=model.name,
        choices=choices,
        usage=Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out),
    )


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def stream_events(
    services: Services,
    prompts: list[str],
    params: dict[str, Any],
    head: CompletionChunk,
    *,
    prompt_tokens: list[int] | None,
    token_ids: bool,
) -> AsyncIterator[bytes]:
    """One ``data:`` event per generated token (of any prompt), then usage if asked, ``[DONE]``.

    A failure mid-stream (the status line is already sent) arrives as an error event in
    OpenAI's error shape, followed by ``[DONE]``.
    """
    queue: asyncio.Queue[tuple[int, dict[str, Any] | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, prompt: str) -> None:
        gen = None
        try:
            gen = await services.stream(prompt, params)
            async for ref in gen:
                await queue.put((i, await ref))
            await queue.put((i, None))
        except asyncio.CancelledError:
            if gen is not None:  # the client went away: stop generating for it
                with contextlib.suppress(Exception):
                    ray.cancel(gen)
            raise
        except Exception as exc:
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
    completion_tokens = [0] * len(prompts)
    try:
        open_streams = len(prompts)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
                continue
            if isinstance(item, BaseException):
                cause = getattr(item, "cause", None) or item
                err = as_api_error(cause)
                yield sse(error_body(err.status, err.message, err.param))
                break
            completion_tokens[i] += 1
            choice = CompletionChunkChoice(
                index=i,
                text=item["text"],
                finish_reason=finish_reason(item["finish_reason"]),
                token_ids=[item["token_id"]] if token_ids else None,
            )
            yield sse(head.model_copy(update={"choices": [choice]}).model_dump())
        else:
            if prompt_tokens is not None:
                n_prompt, n_out = sum(prompt_tokens), sum(completion_tokens)
                usage = Usage(
                    prompt_tokens=n_prompt,
                    completion_tokens=n_out,
                    total_tokens=n_prompt + n_out,
                )
                yield sse(head.model_copy(update={"usage": usage}).model_dump())
        yield sse("[DONE]")
    finally:
        for t in tasks:
            t.cancel()
