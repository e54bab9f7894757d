"""What completions and chat completions share: sending prompts to the router, whole or streamed.

Choices are numbered prompt-major: prompt ``i``'s ``j``-th choice is ``i * n + j`` (vLLM's order).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray

from expertmesh.actors import names
from expertmesh.api.deps import Services, as_api_error
from expertmesh.api.errors import ApiError
from expertmesh.api.schemas import ErrorResponse

# The 200 response of a route that can stream: JSON, or server-sent events with ``stream``.
STREAMABLE = {
    200: {
        "description": "The completion; with stream=true, server-sent events (one JSON chunk "
        "per data: line, then data: [DONE])",
        # NOTE: the schema of one event (its data: line is a JSON chunk, or [DONE]), as
        # OpenAPI 3.2's itemSchema says it and Schemathesis checks each event
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                }
            }
        },
    }
}


# What a generation route answers beyond its 200: the router's or the token's limit is full.
GENERATION_ERRORS: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorResponse,
        "description": "Over an admission limit (the deployment's queue, max_queued, or the "
        "API token's max_concurrent_per_token): nothing ran; retry after Retry-After seconds",
        "headers": {
            "Retry-After": {
                "description": "whole seconds to wait before retrying",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    }
}


def candidates(params: dict[str, Any]) -> int:
    """Sequences the router runs per prompt: ``best_of``, else ``n``."""
    return params.get("best_of") or params.get("n", 1)


def finish_reason(reason: str | None) -> str | None:
    """The engine says "eos" where OpenAI says "stop"."""
    return "stop" if reason == "eos" else reason


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


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


async def generate(
    services: Services,
    prompts: list[str],
    params: dict[str, Any],
    request_id: str,
    routing: bool = False,
) -> list[list[dict[str, Any]]]:
    """Per prompt, the router's ``n`` results (all prompts at once: they share its steps).

    If one prompt fails (the router refused it: full) or the client goes away (Serve cancels
    this coroutine), the router stops the request's other sequences at once."""
    total = len(prompts) * candidates(params)
    calls = [
        asyncio.ensure_future(
            services.call(names.ROUTER, "generate", p, params, routing, request_id, total)
        )
        for p in prompts
    ]
    try:
        return list(await asyncio.gather(*calls))
    except BaseException:
        for c in calls:
            c.cancel()
        services.cancel(request_id)
        raise


@dataclass(kw_only=True, slots=True)
class Piece:
    """Text a choice gained: one token's when streamed token by token, the whole text when
    the choice was ranked first (``best_of``)."""

    index: int
    text: str
    finish_reason: str | None
    token_ids: list[int]
    logprobs: dict[str, Any] | None = None  # tokens / token_logprobs / top_logprobs
    prompt_logprobs: dict[str, Any] | None = None  # on a choice's first piece, when asked
    first: bool = False
    # with routing: the experts of the tokens fed since the last piece; on the last, the counts
    token_experts: list[list[list[int]]] | None = None
    expert_counts: list[list[int]] | None = None


class PieceStream:
    """Every choice's pieces as they come, interleaved (``async for``); raises the first
    failure. :func:`open_stream` makes one; :meth:`close` stops what is left of it."""

    def __init__(
        self,
        services: Services,
        request_id: str,
        queue: asyncio.Queue[Piece | BaseException | None],
        tasks: list[asyncio.Task],
        choices: int,
    ) -> None:
        self.services, self.request_id = services, request_id
        self.queue, self.tasks, self.choices = queue, tasks, choices
        self.done = False

    async def __aiter__(self) -> AsyncIterator[Piece]:
        try:
            open_choices = self.choices
            while open_choices:
                item = await self.queue.get()
                if item is None:
                    open_choices -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
            self.done = True
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the choices' calls; unless all ended, the router stops the request too."""
        for t in self.tasks:
            t.cancel()
        if not self.done:
            self.done = True
            self.services.cancel(self.request_id)


async def open_stream(
    services: Services,
    prompts: list[str],
    params: dict[str, Any],
    request_id: str,
    routing: bool = False,
) -> PieceStream:
    """Start streaming every choice of ``prompts``; returns once the router admitted them all
    (so that its refusal, e.g. a full queue, is raised here, before the response starts).

    With ``best_of > n`` the candidates must finish before they can be ranked, so each chosen
    choice arrives as one piece (vLLM refuses such streams; this answers them, late), and a
    refusal of those arrives in the stream. ``routing``: pieces carry the experts of their
    tokens (:meth:`RouterService.generate_stream`).
    """
    n = params.get("n", 1)
    ranked = candidates(params) > n
    total = len(prompts) * candidates(params)
    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()
    admitted: asyncio.Queue[BaseException | None] = asyncio.Queue()  # one item per choice

    async def pump(i: int, prompt: str, j: int) -> None:
        gen, acked = None, False
        try:
            gen = await services.stream(prompt, params, j, request_id, total, routing)
            first = True
            async for ref in gen:
                item = await ref
                if not acked:  # the router's first item: it admitted the choice
                    acked = True
                    admitted.put_nowait(None)
                    continue
                await queue.put(
                    Piece(
                        index=i * n + j,
                        text=item["text"],
                        finish_reason=item["finish_reason"],
                        token_ids=[item["token_id"]],
                        logprobs=item.get("logprobs"),
                        prompt_logprobs=item.get("prompt_logprobs"),
                        first=first,
                        token_experts=item.get("token_experts"),
                        expert_counts=item.get("expert_counts"),
                    )
                )
                first = False
            await queue.put(None)
        except asyncio.CancelledError:
            if gen is not None:  # the client went away: stop generating for it
                with contextlib.suppress(Exception):
                    ray.cancel(gen)
            raise
        except Exception as exc:
            if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
                exc = exc.cause
            (queue if acked else admitted).put_nowait(exc)

    async def whole(i: int, prompt: str) -> None:
        try:
            results = await services.call(
                names.ROUTER, "generate", prompt, params, routing, request_id, total
            )
        except Exception as exc:
            await queue.put(exc)
            return
        for j, r in enumerate(results):
            await queue.put(
                Piece(
                    index=i * n + j,
                    text=r["text"],
                    finish_reason=r["finish_reason"],
                    token_ids=r["token_ids"],
                    logprobs=r.get("logprobs"),
                    prompt_logprobs=r.get("prompt_logprobs"),
                    first=True,
                    token_experts=r.get("token_experts"),
                    expert_counts=r.get("expert_counts"),
                )
            )
            await queue.put(None)

    if ranked:
        tasks = [asyncio.create_task(whole(i, p)) for i, p in enumerate(prompts)]
    else:
        tasks = [
            asyncio.create_task(pump(i, p, j)) for i, p in enumerate(prompts) for j in range(n)
        ]
    stream = PieceStream(services, request_id, queue, tasks, len(prompts) * n)
    try:
        for _ in range(0 if ranked else len(tasks)):
            refused = await admitted.get()
            if refused is not None:
                raise as_api_error(refused)
    except BaseException:
        stream.close()
        raise
    return stream
