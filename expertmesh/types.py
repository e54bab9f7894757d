"""Types shared by the SDK (:mod:`expertmesh.sdk`), the HTTP client and the HTTP API.

They live apart from all three so that each can import them without importing the others:
the Ray-side :class:`~expertmesh.sdk.Cluster` and the HTTP-side
:class:`~expertmesh.client.HttpCluster` both raise :class:`ClusterError`, return
:class:`Completion` and offer the :class:`ClusterHandle` surface. Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from expertmesh.platform.errors import ConfigError, ExpertmeshError

Transport = Literal["direct", "ray"]
TRANSPORTS: tuple[str, ...] = ("direct", "ray")


class ClusterError(ExpertmeshError):
    """An operation on the cluster failed; the message says why."""


class UpgradeInProgressError(ClusterError):
    """A live upgrade was asked for while another one runs (HTTP 409)."""


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Completion:
        return cls(
            text=d["text"],
            finish_reason=d.get("finish_reason"),
            prompt_tokens=d.get("prompt_tokens", 0),
            completion_tokens=d.get("completion_tokens", 0),
            token_ids=list(d.get("token_ids", [])),
            expert_counts=d.get("expert_counts"),
            token_experts=d.get("token_experts"),
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
        """Complete one prompt (returns a Completion) or a list (all sent at once, batched)."""
        ...

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
        """Yield the completion's text piece by piece as tokens are generated."""
        ...

    def status(self) -> dict[str, Any]:
        """Model, shards, placement, nodes, load and router statistics."""
        ...

    def events(self, since: float = 0.0) -> list[dict[str, Any]]:
        """The controller's events (failures, recoveries, scaling) after ``since``."""
        ...

    def scale(self, shards: int) -> dict[str, Any]:
        """Grow or shrink the expert shard pool to ``shards`` actors, live."""
        ...

    def upgrade(self, model: str) -> dict[str, Any]:
        """Serve registered version ``model`` (``NAME/VER``) live, with no failed request."""
        ...
