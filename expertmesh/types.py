"""Types shared by the SDK (:mod:`expertmesh.sdk`), the HTTP client and the HTTP API.

They live apart from all three so that each can import them without importing the others:
the Ray-side :class:`~expertmesh.sdk.Cluster` and the HTTP-side
:class:`~expertmesh.client.HttpCluster` both raise :class:`ClusterError`, return
:class:`Completion` and offer the :class:`ClusterHandle` surface. Nothing here imports Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypedDict, Unpack, runtime_checkable

from expertmesh.platform.errors import ConfigError, ExpertmeshError

Transport = Literal["direct", "ray"]
TRANSPORTS: tuple[str, ...] = ("direct", "ray")


class ClusterError(ExpertmeshError):
    """An operation on the cluster failed; the message says why."""


class UpgradeInProgressError(ClusterError):
    """A live upgrade was asked for while another one runs (HTTP 409)."""


class SamplingOptions(TypedDict, total=False):
    """How ``generate`` and ``stream`` pick tokens: the OpenAI completion parameters, with
    vLLM's ``repetition_penalty`` and ``ignore_eos``. Every key is checked (an error names a
    bad one); see :class:`expertmesh.platform.sampling.SamplingParams` for the defaults."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int
    ignore_eos: bool
    n: int  # sequences per prompt (generate only)
    best_of: int  # candidates per prompt, the n most likely kept (generate only)
    logprobs: int  # the chosen token's logprob and this many alternatives (generate only)
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float


STREAM_REFUSES = ("n", "best_of", "logprobs")  # one streamed sequence, text only


def check_stream_options(sampling: SamplingOptions) -> None:
    """Refuse what a text stream cannot carry, rather than ignore it."""
    for key in STREAM_REFUSES:
        value = sampling.get(key)
        if value is not None and not (key == "n" and value == 1):
            raise ConfigError(key, f"streams one sequence of text; use generate() for {key}")


class CapacityError(ClusterError):
    """A scale asks for more shards than the cluster can place now (HTTP 409)."""


class ScaleInProgressError(ClusterError):
    """A scale was asked for while another one runs (HTTP 409); the message names it."""


EventPage = Callable[[int], dict[str, Any]]  # after_seq -> one page of GET /api/events


def iter_events(page: EventPage, after_seq: int = 0) -> Iterator[dict[str, Any]]:
    """Every event after ``after_seq``, page by page, each once."""
    while True:
        out = page(after_seq)
        yield from out["events"]
        if not out["has_more"]:
            return
        after_seq = out["next"]


def wait_for_scale(page: EventPage, ticket: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """The ``scale_finished`` event of the scale ``ticket`` names (what starting it returned),
    read from the events after its ``scale_started``.

    Raises:
        ClusterError: the scale failed (its ``scale_failed`` event's message), or it did not
            end within ``timeout_s`` (it goes on; its events will say how it ended).
    """
    deadline = time.monotonic() + timeout_s
    cursor = ticket["seq"]
    while True:
        out = page(cursor)
        for ev in out["events"]:
            if ev.get("scale_id") != ticket["scale_id"]:
                continue
            if ev["kind"] == "scale_finished":
                return ev
            if ev["kind"] == "scale_failed":
                raise ClusterError(f"scale {ticket['scale_id']} failed: {ev['message']}")
        cursor = out["next"]
        if out["has_more"]:
            continue
        if time.monotonic() > deadline:
            raise ClusterError(
                f"scale {ticket['scale_id']} ({ticket['from']} -> {ticket['to']} shards) did "
                f"not finish within {timeout_s:.0f}s; it goes on: watch its events"
            )
        time.sleep(0.2)


# Sequences a router queues for a free slot beyond the ``max_batch`` it runs (Cluster.deploy's
# ``max_queued``): 64 prompts of 16 candidates each, the largest completion request the API
# takes by default, still fits.
DEFAULT_MAX_QUEUED = 1024


class Overloaded(ClusterError):
    """The deployment is at an admission limit (its queue is full, or the API token has its
    most requests in flight); nothing was run. The HTTP API answers 429 with ``Retry-After``.

    Attributes:
        retry_after: whole seconds after which a retry may be admitted (an estimate).
    """

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        # Ray pickles the error back from the router: replay both arguments
        return (type(self), (self.message, self.retry_after))


class Cancelled(ClusterError):
    """The request was cancelled (its client went away) before it finished."""


@dataclass(kw_only=True, slots=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    expert_counts: list[list[int]] | None = None  # (MoE layer, expert) tokens served
    token_experts: list[list[list[int]]] | None = None  # per token, per MoE layer: experts
    # with ``logprobs=N``: OpenAI's ``tokens``, ``token_logprobs`` and ``top_logprobs`` (per
    # token, the N most likely alternatives as {token text: logprob})
    logprobs: dict[str, list[Any]] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Completion:
        """From the router's result (its alternatives are ``[text, logprob]`` pairs)."""
        lp = d.get("logprobs")
        if lp is not None:
            tops = [None if t is None else dict(map(tuple, t)) for t in lp["top_logprobs"]]
            lp = {"tokens": lp["tokens"], "token_logprobs": lp["token_logprobs"]}
            lp["top_logprobs"] = tops
        return cls(
            text=d["text"],
            finish_reason=d.get("finish_reason"),
            prompt_tokens=d.get("prompt_tokens", 0),
            completion_tokens=d.get("completion_tokens", 0),
            token_ids=list(d.get("token_ids", [])),
            expert_counts=d.get("expert_counts"),
            token_experts=d.get("token_experts"),
            logprobs=lp,
        )


@dataclass(kw_only=True, slots=True, frozen=True)
class RouterTuning:
    """How the router runs; the defaults suit a small CPU machine.

    Passed as ``Cluster.deploy(..., advanced=RouterTuning(...))``. Every field is checked when
    the object is built; a bad value raises a :class:`ValueError` that names the field.

    Args:
        threads: torch intra-op threads for the router's dense part (attention, gates).
        micro_batches: >1 splits each step's batch into parts that take turns on the router:
            one part's dense layers run while another's tokens are with the expert shards.
        transport: how tokens reach the shards: ``"direct"`` (a TCP channel per shard; Ray only
            finds and manages the shards) or ``"ray"`` (every shard call a Ray actor call:
            slower, for comparison).

    Example::

        cluster.deploy("expertmesh-tiny", advanced=RouterTuning(micro_batches=2))
    """

    threads: int = 1
    micro_batches: int = 1
    transport: Transport = "direct"

    def __post_init__(self) -> None:
        for name in ("threads", "micro_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
        if self.transport not in TRANSPORTS:
            raise ConfigError("transport", f"must be one of {TRANSPORTS}, got {self.transport!r}")


@runtime_checkable
class ClusterHandle(Protocol):
    """What a cluster handle offers however it reaches the cluster (Ray or HTTP).

    :class:`~expertmesh.sdk.Cluster` (inside Ray) and :class:`~expertmesh.client.HttpCluster`
    (over HTTP) both implement it; code that only generates, watches and scales (the CLI,
    scripts) can take either.
    """

    def generate(
        self, prompt: str | list[str], *, routing: bool = False, **sampling: Unpack[SamplingOptions]
    ) -> Completion | list[Completion]:
        """Complete one prompt or a list (all sent at once, batched). One prompt gives a
        Completion, or a list of ``n`` with ``n > 1``; a list of prompts gives a list, ``n``
        per prompt in prompt order."""
        ...

    def stream(self, prompt: str, **sampling: Unpack[SamplingOptions]) -> Iterator[str]:
        """Yield the completion's text piece by piece as tokens are generated (one
        sequence: no ``n``, ``best_of`` or ``logprobs``)."""
        ...

    def status(self) -> dict[str, Any]:
        """Model, shards, placement, nodes, load and router statistics."""
        ...

    def events(self, since: float = 0.0, *, after_seq: int = 0) -> list[dict[str, Any]]:
        """The controller's events (failures, recoveries, scaling), oldest first: those newer
        than Unix time ``since`` and with a ``seq`` above ``after_seq``."""
        ...

    def scale(self, shards: int, *, wait: bool = True, timeout_s: float = 600.0) -> dict[str, Any]:
        """Grow or shrink the expert shard pool to ``shards`` actors, live.

        ``wait``: return the status once the scale finished (its ``scale_finished`` event under
        ``"scale"``); else at once ``{"scale_id", "from", "to", "seq"}``."""
        ...

    def upgrade(self, model: str) -> dict[str, Any]:
        """Serve registered version ``model`` (``NAME/VER``) live, with no failed request."""
        ...
