"""Two-batch overlap for remote experts: micro-batches that take turns on the router's core.

A decode step alternates between the router's dense work (attention, norms, gates) and waiting
on the expert shards. Split into micro-batches that take turns, one micro-batch's dense layer
runs while the shards compute the other's experts (DeepSeek's and SGLang's "two-batch overlap").

The micro-batches run in threads, but only the thread holding the turn runs: a micro-batch
gives the turn away right after sending a layer's tokens (:meth:`RayDispatcher.submit`) and
takes it back before reading the answers. So the router's Python never runs on two threads at
once. Free-running threads measured slower than no split at all on a 2-core machine: they
fought over the GIL and took the core the shards needed.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

import torch

from expertmesh.platform.model import Dispatcher, Routing


class Pending(Protocol):
    def result(self) -> torch.Tensor:
        """Wait for the experts' answers and return the combined (T, D) output."""
        ...


@runtime_checkable
class Submitter(Protocol):
    """A dispatcher that can send a layer's tokens and be asked for the answer later."""

    def submit(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> Pending: ...


class Turns:
    """Round-robin turns for ``k`` parties (0 .. k-1); party 0 holds the first turn."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.turn = 0
        self.done: set[int] = set()
        self._cond = threading.Condition()

    def wait(self, i: int) -> None:
        """Block until it is ``i``'s turn."""
        with self._cond:
            self._cond.wait_for(lambda: self.turn == i)

    def pass_on(self, i: int) -> None:
        """``i`` gives its turn to the next party that has not finished (itself if none)."""
        with self._cond:
            self.turn = self._next(i)
            self._cond.notify_all()

    def finish(self, i: int) -> None:
        """``i`` is done for good: it takes no more turns, and hands on the one it holds."""
        with self._cond:
            self.done.add(i)
            if self.turn == i:
                self.turn = self._next(i)
            self._cond.notify_all()

    def _next(self, i: int) -> int:
        for j in range(1, self.k + 1):
            nxt = (i + j) % self.k
            if nxt not in self.done:
                return nxt
        return i


class TurnTakingDispatcher:
    """Dispatches for micro-batch ``i``: sends, lets the other micro-batches run, then reads.

    A dispatcher without :meth:`Submitter.submit` (the in-process one) is called as it is, so the
    micro-batch keeps its turn.
    """

    def __init__(self, inner: Dispatcher, turns: Turns, i: int) -> None:
        self.inner, self.turns, self.i = inner, turns, i
        # checked once: a runtime Protocol check inspects the class, every MoE layer would pay it
        self.submitter = inner if isinstance(inner, Submitter) else None

    def dispatch(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.submitter is None:
            return self.inner.dispatch(layer, x_TD, routing)
        pending = self.submitter.submit(layer, x_TD, routing)
        self.turns.pass_on(self.i)
        self.turns.wait(self.i)
        return pending.result()
