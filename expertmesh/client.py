"""``expertmesh.connect("http://host:port")``: the SDK's surface over the HTTP API.

Example::

    cluster = expertmesh.connect("http://127.0.0.1:8000", token="...")
    print(cluster.generate("ROMEO.", max_tokens=32).text)
    for piece in cluster.stream("KING.", max_tokens=32):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Unpack

import httpx

from expertmesh import envs
from expertmesh.types import (
    ClusterError,
    Completion,
    Overloaded,
    SamplingOptions,
    check_stream_options,
    iter_events,
    wait_for_scale,
)

if TYPE_CHECKING:
    from expertmesh.jobs import JobInfo
    from expertmesh.platform.lineage import VersionNode


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
        self, prompt: str | list[str], *, routing: bool = False, **sampling: Unpack[SamplingOptions]
    ) -> Completion | list[Completion]:
        """Complete one prompt or a list (one request, batched). One prompt gives a
        Completion, or a list of ``n`` with ``n > 1``; a list of prompts gives a list, ``n``
        per prompt in prompt order. ``sampling``: see :class:`~expertmesh.types.SamplingOptions`
        (the server checks every key and answers a 400 that names a bad one)."""
        body = _completion_body(prompt, sampling, routing=routing)
        data = self._request("POST", "/v1/completions", json=body)
        choices = sorted(data["choices"], key=lambda c: c["index"])
        outs = []
        for c in choices:
            routing_info = c.get("expertmesh_routing") or {}
            lp = c.get("logprobs")
            outs.append(
                Completion(
                    text=c["text"],
                    finish_reason=c.get("finish_reason"),
                    prompt_tokens=c.get("prompt_tokens") or 0,
                    completion_tokens=len(c.get("token_ids") or []),
                    token_ids=list(c.get("token_ids") or []),
                    expert_counts=routing_info.get("expert_counts"),
                    token_experts=routing_info.get("token_experts"),
                    logprobs=None if lp is None else {k: lp[k] for k in _LOGPROB_KEYS},
                )
            )
        one = isinstance(prompt, str) and sampling.get("n", 1) == 1
        return outs[0] if one else outs

    def stream(self, prompt: str, **sampling: Unpack[SamplingOptions]) -> Iterator[str]:
        """Yield the completion's text piece by piece as tokens are generated (SSE; one
        sequence: no ``n``, ``best_of`` or ``logprobs``)."""
        check_stream_options(sampling)
        body = _completion_body(prompt, sampling, routing=False)
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

    def events(self, since: float = 0.0, *, after_seq: int = 0) -> list[dict[str, Any]]:
        """Every event newer than ``since`` with a ``seq`` above ``after_seq`` (paged)."""
        return list(iter_events(lambda after: self._events_page(after, since), after_seq))

    def _events_page(self, after_seq: int, since: float = 0.0) -> dict[str, Any]:
        params = {"after_seq": after_seq, "since": since}
        return self._request("GET", "/api/events", params=params)

    def scale(self, shards: int, *, wait: bool = True, timeout_s: float = 600.0) -> dict[str, Any]:
        """Grow or shrink the expert shard pool to ``shards`` actors, live (``PUT /api/shards``,
        then the events); as :meth:`expertmesh.sdk.Cluster.scale`. A refusal raises HttpError
        with its status (400 or 409) and message."""
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ClusterError(f"shards must be an integer >= 1, got {shards!r}")
        ticket = self._request("PUT", "/api/shards", json={"shards": shards})
        if not wait:
            return ticket
        done = wait_for_scale(self._events_page, ticket, timeout_s)
        return {**self.status(), "scale": done}

    def upgrade(self, model: str) -> dict[str, Any]:
        """Serve registered version ``model`` (``NAME/VER``) live (``PUT /api/model``)."""
        return self._request("PUT", "/api/model", json={"model": model})

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models")["data"]]

    def runs(self, experiment: str = "expertmesh", max_results: int = 20) -> list[dict[str, Any]]:
        """Recent MLflow runs of ``experiment`` (the cluster's store, through the API)."""
        # NOTE: the API lists every experiment's newest runs; ask for enough to fill this one
        runs = self._request("GET", "/api/runs", params={"limit": 500})
        return [r for r in runs if r["experiment"] == experiment][:max_results]

    # ------------------------------------------------------------------ jobs and lineage
    def submit(
        self,
        pipeline: str,
        *,
        wait: bool = False,
        timeout_s: float = 3600.0,
        poll_s: float = 2.0,
        **args: Any,
    ) -> JobInfo:
        """Run ``expertmesh.pipelines.<pipeline>`` as a Ray job on the cluster behind the API
        (``POST /api/jobs``); ``args`` become its flags as in :meth:`expertmesh.Cluster.submit`.
        Uploading a working folder or setting its environment needs the Ray job server itself
        (``expertmesh submit --address``), not this handle."""
        body = {"pipeline": pipeline, "args": {k: v for k, v in args.items() if v is not None}}
        job = _job(self._request("POST", "/api/jobs", json=body))
        return self._wait_job(job.submission_id, timeout_s, poll_s) if wait else job

    def _wait_job(self, job_id: str, timeout_s: float, poll_s: float) -> JobInfo:
        deadline = time.monotonic() + timeout_s
        while not (job := self.job(job_id)).done:
            if time.monotonic() > deadline:
                raise ClusterError(f"job {job_id} still {job.status} after {timeout_s:.0f} s")
            time.sleep(poll_s)
        return job

    def jobs(self) -> list[JobInfo]:
        """Every job of the cluster, newest first."""
        listing = self._request("GET", "/api/jobs")
        if not listing["job_server"]:
            raise ClusterError(listing["message"])
        return [_job(j) for j in listing["jobs"]]

    def job(self, job_id: str) -> JobInfo:
        for job in self.jobs():
            if job.submission_id == job_id:
                return job
        raise ClusterError(f"no job {job_id!r} on the cluster behind {self.base_url}")

    def job_logs(self, job_id: str) -> str:
        return self._request("GET", f"/api/jobs/{job_id}/logs")["logs"]

    def lineage(self, name: str) -> list[VersionNode]:
        """Registered model ``name``'s versions as a tree (roots first), with their lineage."""
        roots = self._request("GET", f"/api/models/{name}/versions")["versions"]
        return [_version_node(v) for v in roots]

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/api/health")


_LOGPROB_KEYS = ("tokens", "token_logprobs", "top_logprobs")  # as the in-process SDK's


def _job(d: dict[str, Any]) -> JobInfo:
    from expertmesh.jobs import JobInfo

    return JobInfo(**{f.name: d[f.name] for f in dataclasses.fields(JobInfo)})


def _version_node(d: dict[str, Any]) -> VersionNode:
    from expertmesh.platform.lineage import VersionNode

    fields = {k: d[k] for k in VersionNode.__slots__ if k != "children"}
    return VersionNode(**fields, children=[_version_node(c) for c in d["children"]])


def _completion_body(
    prompt: str | list[str], sampling: SamplingOptions, *, routing: bool
) -> dict[str, Any]:
    """The request body: the sampling options under their OpenAI names, as given over the
    SDK's defaults where OpenAI's differ (greedy, 64 tokens); the server applies the rest and
    refuses unknown or bad keys by name."""
    body: dict[str, Any] = {"max_tokens": 64, "temperature": 0.0}
    body |= {k: v for k, v in sampling.items() if v is not None}
    if "stop" in body:
        body["stop"] = list(body["stop"])
    return body | {"prompt": prompt, "return_token_ids": True, "expertmesh_routing": routing}


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
