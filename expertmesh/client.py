"""``expertmesh.connect("http://host:port")``: the SDK's surface over the HTTP API.

Example::

    cluster = expertmesh.connect("http://127.0.0.1:8000", token="...")
    print(cluster.generate("ROMEO.", max_tokens=32).text)
    for piece in cluster.stream("KING.", max_tokens=32):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from expertmesh import envs
from expertmesh.types import ClusterError, Completion, Overloaded


class HttpError(ClusterError):
    """The API answered with an error; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class HttpCluster:
    """A running expertmesh API, driven like :class:`expertmesh.sdk.Cluster`.

    It offers the :class:`~expertmesh.types.ClusterHandle` surface, plus the served models and
    the API's health.

    Args:
        base_url: e.g. ``"http://127.0.0.1:8000"``.
        token: the API's bearer token; default ``EXPERTMESH_TOKEN``, else the token `expertmesh
            up` (or ``Cluster.serve``) wrote down for this URL in ``$EXPERTMESH_HOME``.
        timeout_s: per request; scaling and long generations can take minutes.
    """

    def __init__(
        self, base_url: str, token: str | None = None, *, timeout_s: float = 600.0
    ) -> None:
        from expertmesh.api.info import saved_token

        self.base_url = base_url.rstrip("/")
        self.token = token or envs.api_token() or saved_token(self.base_url)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> HttpCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClusterError(
                f"cannot reach the expertmesh API at {self.base_url}: {exc}"
            ) from None
        if resp.status_code >= 400:
            raise _error(resp.status_code, resp.text, resp.headers.get("retry-after"))
        return resp.json()

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompt: str | list[str],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
        routing: bool = False,
    ) -> Completion | list[Completion]:
        """Complete one prompt (returns a Completion) or a list (one request, batched)."""
        body = _completion_body(
            prompt, max_tokens, temperature, top_p, stop, seed, ignore_eos, routing=routing
        )
        data = self._request("POST", "/v1/completions", json=body)
        choices = sorted(data["choices"], key=lambda c: c["index"])
        outs = []
        for c in choices:
            routing_info = c.get("expertmesh_routing") or {}
            outs.append(
                Completion(
                    text=c["text"],
                    finish_reason=c.get("finish_reason"),
                    prompt_tokens=c.get("prompt_tokens") or 0,
                    completion_tokens=len(c.get("token_ids") or []),
                    token_ids=list(c.get("token_ids") or []),
                    expert_counts=routing_info.get("expert_counts"),
                    token_experts=routing_info.get("token_experts"),
                )
            )
        return outs[0] if isinstance(prompt, str) else outs

    def stream(
        self,
        prompt: str,
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[str]:
        """Yield the completion's text piece by piece as tokens are generated (SSE)."""
        body = _completion_body(
            prompt, max_tokens, temperature, top_p, stop, seed, ignore_eos, routing=False
        )
        body["stream"] = True
        try:
            with self._http.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code >= 400:
                    text = resp.read().decode(errors="replace")
                    raise _error(resp.status_code, text, resp.headers.get("retry-after"))
                for event in iter_sse(resp.iter_lines()):
                    if event == "[DONE]":
                        return
                    chunk = json.loads(event)
                    if "error" in chunk:
                        raise _error(chunk["error"].get("code") or 500, event)
                    for choice in chunk.get("choices", []):
                        if choice.get("text"):
                            yield choice["text"]
        except httpx.HTTPError as exc:
            raise ClusterError(f"stream from {self.base_url} broke off: {exc}") from None

    # ------------------------------------------------------------------ state
    def status(self) -> dict[str, Any]:
        return self._request("GET", "/api/cluster")

    def events(self, since: float = 0.0) -> list[dict[str, Any]]:
        return self._request("GET", "/api/events", params={"since": since})

    def scale(self, shards: int) -> dict[str, Any]:
        """Grow or shrink the expert shard pool to ``shards`` actors, live."""
        if shards < 1:
            raise ClusterError(f"shards must be >= 1, got {shards}")
        return self._request("PUT", "/api/shards", json={"shards": shards})

    def upgrade(self, model: str) -> dict[str, Any]:
        """Serve registered version ``model`` (``NAME/VER``) live (``PUT /api/model``)."""
        return self._request("PUT", "/api/model", json={"model": model})

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models")["data"]]

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/api/health")


def _completion_body(
    prompt: str | list[str],
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop: list[str] | None,
    seed: int | None,
    ignore_eos: bool,
    *,
    routing: bool,
) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stop": list(stop) if stop else None,
        "seed": seed,
        "ignore_eos": ignore_eos,
        "return_token_ids": True,
        "expertmesh_routing": routing,
    }


def iter_sse(lines: Iterator[str]) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent event stream (multi-line data joined)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


class HttpOverloaded(HttpError, Overloaded):
    """429: the deployment's queue or the token's concurrency limit is full."""

    def __init__(self, status: int, message: str, retry_after: int = 1) -> None:
        HttpError.__init__(self, status, message)
        self.retry_after = retry_after


def _error(status: int, text: str, retry_after: str | None = None) -> HttpError:
    """A ClusterError carrying the server's message and the HTTP status (for 429 also an
    :class:`~expertmesh.types.Overloaded` with the ``Retry-After`` seconds)."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text.strip() or "no message"
    if status == 429:
        seconds = int(retry_after) if retry_after and retry_after.isdigit() else 1
        return HttpOverloaded(status, message, seconds)
    return HttpError(status, message)
