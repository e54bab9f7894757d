"""Router service: a Ray actor running the dense part of the model and the continuous-batching loop.

Requests that arrive while a step runs join the next step. The model code is the same as in
training; only the dispatcher differs (:class:`RayDispatcher` sends tokens to shard actors).
The router caches the controller's placement table and refreshes it when its version changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from dataclasses import asdict
from typing import Any

import ray
import torch

from expertmesh.actors.remote_dispatch import PlacementView, RayDispatcher
from expertmesh.platform.engine import Engine, Sequence, StepOutput
from expertmesh.platform.loader import load_for_inference
from expertmesh.platform.sampling import SamplingParams
from expertmesh.types import Transport

log = logging.getLogger(__name__)


def result_of(seq: Sequence, with_routing: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "request_id": seq.request_id,
        "text": seq.text,
        "token_ids": list(seq.output_ids),
        "finish_reason": seq.finish_reason,
        "prompt_tokens": len(seq.prompt_ids),
        "completion_tokens": len(seq.output_ids),
    }
    if with_routing and seq.expert_counts is not None:
        out["expert_counts"] = seq.expert_counts.tolist()
        out["token_experts"] = seq.token_experts
    return out


class RouterService:
    """Wrapped with ``ray.remote`` by the controller; one asyncio loop, one stepping thread."""

    def __init__(
        self,
        checkpoint_uri: str,
        controller: ray.actor.ActorHandle,
        *,
        max_batch: int = 64,
        threads: int = 1,
        micro_batches: int = 1,
        call_timeout_s: float = 2.0,
        transport: Transport = "direct",
        refresh_s: float = 0.25,
    ) -> None:
        torch.set_num_threads(max(1, threads))
        model, tokenizer = load_for_inference(checkpoint_uri, with_experts=False)
        self.controller = controller
        self.dispatcher = RayDispatcher(
            PlacementView(), call_timeout_s=call_timeout_s, transport=transport
        )
        self.engine = Engine(
            model,
            tokenizer,
            dispatcher=self.dispatcher,
            max_batch=max_batch,
            track_routing=False,  # only requests that ask (routing=True) record their experts
            micro_batches=micro_batches,
        )
        self.refresh_s = refresh_s
        self.pending: deque[Sequence] = deque()  # submitted, not yet handed to the engine
        self.has_pending = threading.Condition()  # guards pending; the stepping thread waits on it
        self.waiters: dict[str, asyncio.Queue[StepOutput]] = {}
        self.stepper: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.refresh_task: asyncio.Task | None = None
        self.steps = 0
        self.tokens_out = 0
        self.step_s = 0.0
        self.started = time.time()
        self.latencies: deque[float] = deque(maxlen=2048)
        self._refresh_now()

    # ------------------------------------------------------------------ placement cache
    def _refresh_now(self) -> bool:
        return self._take(
            ray.get(self.controller.get_placement.remote(self.dispatcher.view.version))
        )

    def _take(self, update: dict[str, Any] | None) -> bool:
        if update is None:
            return False
        self.dispatcher.update(
            PlacementView(
                version=update["version"],
                replicas={tuple(k): list(v) for k, v in update["replicas"]},
                handles=update["handles"],
            )
        )
        return True

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                update = await self.controller.get_placement.remote(self.dispatcher.view.version)
            except Exception as exc:  # controller restarting: keep serving on the cached table
                log.warning("placement refresh failed (%s); serving on cached table", exc)
                continue
            self._take(update)

    def _ensure_tasks(self) -> None:
        if self.stepper is None or not self.stepper.is_alive():
            self.loop = asyncio.get_running_loop()
            self.stepper = threading.Thread(target=self._run_steps, daemon=True, name="step")
            self.stepper.start()
        if self.refresh_task is None or self.refresh_task.done():
            self.refresh_task = asyncio.get_running_loop().create_task(self._refresh_loop())

    # ------------------------------------------------------------------ batching loop
    def _run_steps(self) -> None:
        """The stepping thread: engine steps back to back while there is work.

        NOTE: it hands the event loop only what someone waits for (finished requests, tokens of
        streamed ones), once per step. Stepping from the event loop (``run_in_executor`` per
        step) cost a thread round trip per step and event-loop work holding the GIL between
        steps.
        """
        assert self.loop is not None
        while True:
            with self.has_pending:
                while not self.pending and not self.engine.has_work():
                    self.has_pending.wait()
                new, self.pending = list(self.pending), deque()
            for seq in new:
                self.engine.enqueue(seq)
            try:
                t0 = time.perf_counter()
                outputs = self.engine.step()
                self.step_s += time.perf_counter() - t0
            except Exception as exc:  # a step that cannot finish fails only its requests
                log.exception("step failed")
                failed = list(self.engine.running) + list(self.engine.waiting)
                for seq in failed:
                    self.engine.abort(seq)
                self.loop.call_soon_threadsafe(self._fail, failed, exc)
                continue
            self.steps += 1
            self.tokens_out += len(outputs)
            # a non-streamed request is woken once, when it ends
            ready = [o for o in outputs if o.finished or o.seq.stream]
            if ready:
                self.loop.call_soon_threadsafe(self._deliver, ready)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            q = self.waiters.get(out.seq.request_id)
            if q is not None:
                q.put_nowait(out)

    def _fail(self, seqs: list[Sequence], exc: Exception) -> None:
        for seq in seqs:
            q = self.waiters.get(seq.request_id)
            if q is not None:
                q.put_nowait(exc)  # type: ignore[arg-type]

    def _submit(
        self,
        prompt: str | list[int],
        params: dict[str, Any],
        trace: bool = False,
        stream: bool = False,
    ) -> tuple[Sequence, asyncio.Queue]:
        seq = self.engine.make_sequence(
            prompt, SamplingParams(**params), trace=trace, stream=stream
        )
        q: asyncio.Queue = asyncio.Queue()
        self.waiters[seq.request_id] = q
        self._ensure_tasks()
        with self.has_pending:
            self.pending.append(seq)
            self.has_pending.notify()
        return seq, q

    async def _drain(self, seq: Sequence, q: asyncio.Queue):
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self.waiters.pop(seq.request_id, None)
            if not seq.finished:
                self.engine.abort(seq)

    async def generate(
        self, prompt: str | list[int], params: dict[str, Any], routing: bool = False
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        seq, q = self._submit(prompt, params, trace=routing)
        async for _ in self._drain(seq, q):
            pass
        self.latencies.append(time.perf_counter() - t0)
        return result_of(seq, routing)

    async def generate_stream(self, prompt: str | list[int], params: dict[str, Any]):
        """Yields ``{"text": delta, "token_id": id, "finish_reason": ...}`` per generated token."""
        seq, q = self._submit(prompt, params, stream=True)
        async for out in self._drain(seq, q):
            yield {
                "text": out.text_delta,
                "token_id": out.token_id,
                # NOTE: from the output, not the live sequence: by the time a queued token is
                # sent the sequence may have finished, and only its last chunk ends it
                "finish_reason": seq.finish_reason if out.finished else None,
            }

    # ------------------------------------------------------------------ introspection
    async def ready(self, timeout_s: float = 30.0) -> int:
        """Fetch the current placement now (the controller calls this once it has published the
        table of a new deployment) and the shards' channel endpoints; returns the table version
        held. A shard that does not answer in ``timeout_s`` is served by Ray calls meanwhile."""
        self._take(await self.controller.get_placement.remote(self.dispatcher.view.version))
        refs = self.dispatcher.pending_endpoints()
        if refs:
            await asyncio.wait([asyncio.ensure_future(r) for r in refs], timeout=timeout_s)
            self.dispatcher.collect_endpoints(force=True)
        return self.dispatcher.view.version

    def validate(self, prompt: str | list[int], params: dict[str, Any]) -> int:
        """Raise the error a request would get; returns its prompt length in tokens."""
        return len(self.engine.make_sequence(prompt, SamplingParams(**params)).prompt_ids)

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0.0  # noqa: E731
        d = self.dispatcher.stats
        return {
            "steps": self.steps,
            "overlapped_steps": self.engine.overlapped_steps,
            "tokens_generated": self.tokens_out,
            "running": len(self.engine.running),
            "waiting": len(self.engine.waiting) + len(self.pending),
            "placement_version": self.dispatcher.view.version,
            "step_s": self.step_s,  # wall time in engine steps
            # time in shard dispatch (tokens out, waits, results back), summed over micro-batches
            "dispatch_s": d.seconds,
            "dispatch_calls": d.calls,
            "channel_calls": d.channel_calls,  # of dispatch_calls, over the direct channel
            "transport": self.dispatcher.transport,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "dispatch_retries": d.retries,
            "call_deadline_s": self.dispatcher.deadline.current(),
            "failed_shards": sorted(d.failed_shards),
            "latency_p50_s": pct(0.5),
            "latency_p99_s": pct(0.99),
            "uptime_s": time.time() - self.started,
            "node_id": ray.get_runtime_context().get_node_id(),
            "model": asdict(self.engine.cfg),
        }
