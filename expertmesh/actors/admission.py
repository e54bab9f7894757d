"""The router's admission control and its record of cancelled requests.

The router holds at most ``max_batch`` running sequences plus ``max_queued`` waiting for a
slot; :meth:`Admission.check` refuses a request beyond that at once (:class:`Overloaded`, the
API's 429 with ``Retry-After``), and a request that could never fit with a ConfigError naming
what to send less of. Cancellations are counted here, with how far a cancelled sequence ran on
after its cancel (at most the step that was running).

The router owns the sequences; this object sees only their count (``held``), so that it has no
lock of its own: the router calls it from its event loop, where the count changes.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from expertmesh.platform.engine import Sequence
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.sampling import SamplingParams
from expertmesh.types import DEFAULT_MAX_QUEUED, Cancelled, Overloaded

CANCELLED_EARLY = 4096  # cancelled ids remembered for calls that have not arrived yet


def check_max_queued(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError("max_queued", f"must be an integer >= 0, got {value!r}")
    return value


class Admission:
    """How many sequences the router takes, and what happened to those it refused or lost."""

    def __init__(self, max_batch: int, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        self.max_batch = max_batch
        self.max_queued = check_max_queued(max_queued)
        # ids cancelled before their call arrived (a cancel may overtake it): refused on arrival;
        # the last CANCELLED_EARLY of them, oldest first (a dict: looked up per request)
        self.cancelled_early: dict[str, None] = {}
        self.cancelled = 0  # sequences stopped because their caller went away
        self.rejected = 0  # requests refused (Overloaded)
        # recently cancelled sequences with their output length when the cancel came: once
        # stopped, the difference is how far generation ran on for a gone caller
        self.cancel_marks: deque[tuple[Sequence, int]] = deque(maxlen=256)
        self.latencies: deque[float] = deque(maxlen=2048)  # of finished requests, seconds

    @property
    def capacity(self) -> int:
        """Most sequences the router holds at once: ``max_batch`` running + ``max_queued``."""
        return self.max_batch + self.max_queued

    def set_max_queued(self, max_queued: int) -> dict[str, int]:
        self.max_queued = check_max_queued(max_queued)
        return {"max_batch": self.max_batch, "max_queued": self.max_queued}

    def check(
        self,
        sampling: SamplingParams,
        k: int,
        request_id: str | None,
        total: int | None,
        held: int,
    ) -> None:
        """Raise unless ``k`` more sequences fit beside the ``held`` ones.

        ``total``: the sequences of the whole request this call is part of (its prompts'
        candidates); one that could never fit is a ConfigError, not a retry-later."""
        if request_id is not None and request_id in self.cancelled_early:
            raise Cancelled(f"request {request_id} was cancelled")
        total = max(k, total or 0)
        if total > self.capacity:
            prompts = total // sampling.candidates
            field = "prompt" if prompts > 1 else "best_of" if sampling.best_of else "n"
            raise ConfigError(
                field,
                f"{total} sequences in one request ({prompts} prompt(s) x {sampling.candidates} "
                f"candidate(s)); this deployment holds at most {self.capacity} at once (max_batch "
                f"{self.max_batch} + max_queued {self.max_queued}): send fewer",
            )
        if held + k > self.capacity:
            self.rejected += 1
            raise Overloaded(
                f"the model is at capacity: {held} sequences in the router "
                f"(max_batch {self.max_batch} running + max_queued {self.max_queued} waiting); "
                "retry later",
                retry_after=self.retry_after(held),
            )

    def retry_after(self, held: int) -> int:
        """Whole seconds until slots are likely free: the median request latency, once per
        batch's worth of sequences queued ahead (1..60)."""
        lat = sorted(self.latencies)
        median = lat[len(lat) // 2] if lat else 1.0
        ahead = max(0, held - self.max_batch) / self.max_batch
        return int(min(60, max(1, math.ceil(median * (1 + ahead)))))

    def cancelled_before_arrival(self, request_id: str) -> None:
        """Remember ``request_id``, cancelled before any of its calls arrived."""
        self.cancelled_early[request_id] = None
        if len(self.cancelled_early) > CANCELLED_EARLY:
            del self.cancelled_early[next(iter(self.cancelled_early))]

    def cancelling(self, seq: Sequence) -> None:
        """Count ``seq``, stopped for a caller that went away."""
        self.cancelled += 1
        self.cancel_marks.append((seq, len(seq.output_ids)))

    def overrun(self) -> int:
        """Most tokens a recently cancelled sequence generated after its cancel (the step
        running at the cancel may add one), over those that have stopped."""
        done = [len(s.output_ids) - n for s, n in list(self.cancel_marks) if s.slot is None]
        return max(done, default=0)

    def stats(self) -> dict[str, Any]:
        return {
            "max_batch": self.max_batch,
            "max_queued": self.max_queued,
            "rejected": self.rejected,
            "cancelled": self.cancelled,
            "cancel_overrun_tokens": self.overrun(),
        }
