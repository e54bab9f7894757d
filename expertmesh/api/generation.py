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
from expertmesh.api.deps import Services
from expertmesh.api.errors import ApiError

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
    services: Services, prompts: list[str], params: dict[str, Any], routing: bool = False
) -> list[list[dict[str, Any]]]:
    """Per prompt, the router's ``n`` results (all prompts at once: they share its steps)."""
    return list(
        await asyncio.gather(
            *(services.call(names.ROUTER, "generate", p, params, routing) for p in prompts)
        )
    )


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


async def stream_pieces(
    services: Services, prompts: list[str], params: dict[str, Any]
) -> AsyncIterator[Piece]:
    """Every choice's pieces as they come, interleaved; raises the first failure.

    With ``best_of > n`` the candidates must finish before they can be ranked, so each chosen
    choice arrives as one piece (vLLM refuses such streams; this answers them, late).
    """
    n = params.get("n", 1)
    ranked = (params.get("best_of") or n) > n
    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

    async def pump(i: int, prompt: str, j: int) -> None:
        gen = None
        try:
            gen = await services.stream(prompt, params, j)
            first = True
            async for ref in gen:
                item = await ref
                await queue.put(
                    Piece(
                        index=i * n + j,
                        text=item["text"],
                        finish_reason=item["finish_reason"],
                        token_ids=[item["token_id"]],
                        logprobs=item.get("logprobs"),
                        prompt_logprobs=item.get("prompt_logprobs"),
                        first=first,
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
            await queue.put(exc)

    async def whole(i: int, prompt: str) -> None:
        try:
            results = await services.call(names.ROUTER, "generate", prompt, params, False)
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
                )
            )
            await queue.put(None)

    if ranked:
        tasks = [asyncio.create_task(whole(i, p)) for i, p in enumerate(prompts)]
    else:
        tasks = [
            asyncio.create_task(pump(i, p, j)) for i, p in enumerate(prompts) for j in range(n)
        ]
    try:
        open_choices = len(prompts) * n
        while open_choices:
            item = await queue.get()
            if item is None:
                open_choices -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
