"""Router service: a Ray actor running the dense part of the model and the continuous-batching loop.

Requests that arrive while a step runs join the next step. The model code is the same as in
training; only the dispatcher differs (:class:`RayDispatcher` sends tokens to shard actors).
The router caches the controller's placement table and refreshes it when its version changes.

Live upgrade: the router keeps one engine (dense model, KV cache) per live model version, all
stepped by the one stepping thread. New requests start on the newest version (:meth:`switch`);
a request stays on the engine it started on, so it runs on one version from its first step to
its last; an older engine is retired once it has no work left, and the controller then drops
the experts only it used.

Admission and cancellation: the router holds at most ``max_batch + max_queued`` sequences
(running and waiting for a slot); a request that would go beyond raises :class:`Overloaded`
at once (the API's 429; :mod:`expertmesh.actors.admission`). A caller that goes away calls :meth:`cancel` with the request id it
passed in (or has its Ray call cancelled): the sequences stop at the end of the step that is
running, which frees their slots and KV cache.
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

from expertmesh.actors.admission import Admission
from expertmesh.actors.remote_dispatch import PlacementView, RayDispatcher, VersionDispatcher
from expertmesh.actors.results import result_of, token_logprobs
from expertmesh.platform import chat
from expertmesh.platform.engine import Engine, Sequence, StepOutput, best_of
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.loader import load_for_inference
from expertmesh.platform.sampling import SamplingParams
from expertmesh.types import DEFAULT_MAX_QUEUED, Cancelled, Transport

log = logging.getLogger(__name__)


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
        model_version: int = 0,
        label: str = "",
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        """``model_version`` numbers the deployed version (its shards' calls carry it);
        ``label`` is how status shows it (e.g. ``"name/3"``); ``max_queued``: sequences that
        may wait for a slot beyond the ``max_batch`` running (see :meth:`set_admission`)."""
        torch.set_num_threads(max(1, threads))
        self.controller = controller
        self.dispatcher = RayDispatcher(
            PlacementView(), call_timeout_s=call_timeout_s, transport=transport
        )
        self.max_batch = max_batch
        self.admission = Admission(max_batch, max_queued)
        self.micro_batches = micro_batches
        self.templates: dict[int, str | None] = {}  # chat template per model version
        # one engine per live model version; new requests go to ``current``'s
        self.engines: dict[int, Engine] = {
            model_version: self._build_engine(model_version, checkpoint_uri)
        }
        self.labels: dict[int, str] = {model_version: label or checkpoint_uri}
        self.current = model_version
        self.retired: dict[int, float] = {}  # versions whose last request ended -> when
        self.retired_overlapped = 0  # overlapped steps of retired engines
        self.refresh_s = refresh_s
        # submitted, not yet handed to their engine
        self.pending: deque[tuple[Engine, Sequence]] = deque()
        # guards pending, engines and current; the stepping thread waits on it
        self.has_pending = threading.Condition()
        # one per live sequence (its drain removes it): their count is what admission bounds
        self.waiters: dict[str, asyncio.Queue[StepOutput]] = {}
        # a caller's request id -> its live sequences (several calls may share one id: the
        # prompts and choices of one HTTP request), for cancel()
        self.requests: dict[str, list[tuple[Engine, Sequence]]] = {}
        self.stepper: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.refresh_task: asyncio.Task | None = None
        self.steps = 0
        self.tokens_out = 0
        self.step_s = 0.0
        self.started = time.time()
        self._refresh_now()

    @property
    def engine(self) -> Engine:
        """The engine new requests start on (the newest version's)."""
        return self.engines[self.current]

    def _build_engine(self, model_version: int, checkpoint_uri: str) -> Engine:
        model, tokenizer = load_for_inference(checkpoint_uri, with_experts=False)
        self.templates[model_version] = chat.read_chat_template(checkpoint_uri)
        return Engine(
            model,
            tokenizer,
            dispatcher=VersionDispatcher(self.dispatcher, model_version),
            max_batch=self.max_batch,
            track_routing=False,  # only requests that ask (routing=True) record their experts
            micro_batches=self.micro_batches,
        )

    # ------------------------------------------------------------------ upgrades
    async def switch(self, model_version: int, checkpoint_uri: str, label: str) -> dict[str, Any]:
        """Start new requests on ``model_version`` (its experts must be placed already);
        requests in flight finish on the version they started on."""
        engine = await asyncio.to_thread(self._build_engine, model_version, checkpoint_uri)
        # the new version's table must be here before a request runs on it
        self._take(await self.controller.get_placement.remote(-1))
        view = self.dispatcher.view
        if model_version != view.serving and model_version not in view.others:
            engine.close()
            raise RuntimeError(f"the placement has no table for model version {model_version}")
        with self.has_pending:
            self.engines[model_version] = engine
            self.labels[model_version] = label
            self.retired.pop(model_version, None)
            self.current = model_version
            self.has_pending.notify()  # the old engine may be idle already: retire it
        self._ensure_tasks()
        log.info("new requests start on model version %d (%s)", model_version, label)
        return self.versions()

    def versions(self) -> dict[str, Any]:
        """The version new requests start on, each live version's requests, retired versions."""
        with self.has_pending:
            engines = dict(self.engines)
            queued = [e for e, _ in self.pending]
        live = {
            v: {
                "label": self.labels.get(v, str(v)),
                "running": len(e.running),
                "waiting": len(e.waiting) + sum(q is e for q in queued),
            }
            for v, e in engines.items()
        }
        return {"current": self.current, "live": live, "retired": dict(self.retired)}

    def _retire_idle(self) -> None:
        """Retire the engines of older versions that have no work left (stepping thread)."""
        with self.has_pending:
            for v, engine in list(self.engines.items()):
                queued = any(e is engine for e, _ in self.pending)
                if v == self.current or engine.has_work() or queued:
                    continue
                del self.engines[v]
                self.retired[v] = time.time()
                self.retired_overlapped += engine.overlapped_steps
                engine.close()
                log.info("model version %d (%s) drained: retired", v, self.labels.get(v))

    # ------------------------------------------------------------------ placement cache
    def _refresh_now(self) -> bool:
        return self._take(
            ray.get(self.controller.get_placement.remote(self.dispatcher.view.version))
        )

    def _take(self, update: dict[str, Any] | None) -> bool:
        # NOTE: a refresh that was answered before switch() fetched a newer table must not
        # replace it: the new version's engine would find no table for its experts
        if update is None or update["version"] < self.dispatcher.view.version:
            return False
        self.dispatcher.update(
            PlacementView(
                version=update["version"],
                replicas={tuple(k): list(v) for k, v in update["replicas"]},
                handles=update["handles"],
                serving=update.get("serving", 0),
                others={
                    int(v): {tuple(k): list(s) for k, s in rows}
                    for v, rows in update.get("others", [])
                },
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
                # an older engine, even an idle one, keeps the thread going until it is retired
                while (
                    not self.pending
                    and len(self.engines) == 1
                    and not any(e.has_work() for e in self.engines.values())
                ):
                    self.has_pending.wait()
                # NOTE: handed over under the lock that _abort takes: a sequence cancelled while
                # pending must not reach its engine
                for engine, seq in self.pending:
                    if not seq.finished:
                        engine.enqueue(seq)
                self.pending = deque()
                engines = list(self.engines.values())
            # NOTE: during an upgrade both versions' engines step, one after the other
            for engine in engines:
                if engine.has_work():
                    self._step(engine)
            if len(engines) > 1:
                self._retire_idle()

    def _step(self, engine: Engine) -> None:
        assert self.loop is not None
        try:
            t0 = time.perf_counter()
            outputs = engine.step()
            self.step_s += time.perf_counter() - t0
        except Exception as exc:  # a step that cannot finish fails only its requests
            log.exception("step failed")
            failed = list(engine.running) + list(engine.waiting)
            for seq in failed:
                engine.abort(seq)
            self.loop.call_soon_threadsafe(self._fail, failed, exc)
            return
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

    # ------------------------------------------------------------------ admission, cancellation
    def set_admission(self, max_queued: int) -> dict[str, int]:
        """Bound the sequences that wait for a slot (``Cluster.deploy(max_queued=...)``)."""
        return self.admission.set_max_queued(max_queued)

    async def cancel(self, request_id: str) -> int:
        """Stop the live sequences of ``request_id`` (the caller went away); returns how many.

        They stop at the end of the step that runs now (their slots and KV cache are freed
        there); their waiting calls end with :class:`Cancelled`. An id not (yet) here is
        remembered, so that a call overtaken by its cancel is refused when it arrives."""
        entries = self.requests.get(request_id)
        if not entries:
            self.admission.cancelled_before_arrival(request_id)
            return 0
        stopped = 0
        for engine, seq in list(entries):
            if seq.finished:
                continue
            self._abort(engine, seq)
            stopped += 1
            q = self.waiters.get(seq.request_id)
            if q is not None:
                q.put_nowait(Cancelled(f"request {request_id} was cancelled"))  # type: ignore[arg-type]
        return stopped

    def _abort(self, engine: Engine, seq: Sequence) -> None:
        """Stop a live sequence whose caller is gone, and count it."""
        self.admission.cancelling(seq)
        with self.has_pending:  # see _run_steps: not handed to the engine after this
            engine.abort(seq)

    def _submit(
        self,
        prompt: str | list[int],
        sampling: SamplingParams,
        trace: bool = False,
        stream: bool = False,
        indices: range = range(1),
        request_id: str | None = None,
        total: int | None = None,
    ) -> tuple[list[tuple[Sequence, asyncio.Queue]], Engine]:
        """Queue one sequence per index (candidates of one request) on the current engine,
        if admission lets them in."""
        self._ensure_tasks()
        # NOTE: on the event loop, where ``waiters`` (what admission bounds) changes
        self.admission.check(sampling, len(indices), request_id, total, held=len(self.waiters))
        # NOTE: the engine is chosen and the requests queued under one lock, so that a switch
        # cannot slip in between and retire the engine they were made for
        with self.has_pending:
            engine = self.engine
            seqs = [
                engine.make_sequence(prompt, sampling, trace=trace, stream=stream, index=i)
                for i in indices
            ]
            out = []
            for seq in seqs:
                q: asyncio.Queue = asyncio.Queue()
                self.waiters[seq.request_id] = q
                self.pending.append((engine, seq))
                out.append((seq, q))
                if request_id is not None:
                    self.requests.setdefault(request_id, []).append((engine, seq))
            self.has_pending.notify()
        return out, engine

    async def _drain(
        self, seq: Sequence, q: asyncio.Queue, engine: Engine, request_id: str | None = None
    ):
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._release(seq, engine, request_id)

    def _release(self, seq: Sequence, engine: Engine, request_id: str | None) -> None:
        """Forget ``seq``'s waiter and request entry (what admission counts), and stop it if
        it still runs: its call ended or was cancelled (by Ray, or its caller went away).
        Idempotent: a stream's cleanup may come after its drain's."""
        self.waiters.pop(seq.request_id, None)
        entries = self.requests.get(request_id) if request_id is not None else None
        if entries is not None:
            entries[:] = [(e, s) for e, s in entries if s is not seq]
            if not entries:
                del self.requests[request_id]
        if not seq.finished:
            self._abort(engine, seq)

    async def generate(
        self,
        prompt: str | list[int],
        params: dict[str, Any],
        routing: bool = False,
        request_id: str | None = None,
        total: int | None = None,
    ) -> list[dict[str, Any]]:
        """Complete ``prompt``: a list of ``params["n"]`` results (the best of ``best_of``
        candidates by cumulative logprob), best first when some were dropped.

        ``request_id`` lets the caller :meth:`cancel` it; ``total`` counts the sequences of the
        whole request when this call is one of its prompts. Raises :class:`Overloaded` when the
        router is full, :class:`Cancelled` when it was cancelled."""
        t0 = time.perf_counter()
        sampling = SamplingParams(**params)
        subs, engine = self._submit(
            prompt,
            sampling,
            trace=routing,
            indices=range(sampling.candidates),
            request_id=request_id,
            total=total,
        )

        async def drain(seq: Sequence, q: asyncio.Queue) -> None:
            async for _ in self._drain(seq, q, engine, request_id):
                pass

        await asyncio.gather(*(drain(seq, q) for seq, q in subs))
        self.admission.latencies.append(time.perf_counter() - t0)
        chosen = best_of([seq for seq, _ in subs], sampling.n)
        return [result_of(seq, routing, engine.tokenizer) for seq in chosen]

    async def generate_stream(
        self,
        prompt: str | list[int],
        params: dict[str, Any],
        index: int = 0,
        request_id: str | None = None,
        ack: bool = False,
        total: int | None = None,
        routing: bool = False,
    ):
        """Yields ``{"text": delta, "token_id": id, "finish_reason": ...}`` per generated token
        (with ``"logprobs"`` for that token when asked). One sequence: a stream of ``n`` choices
        is ``n`` of these, ``index`` 0..n-1 (it seeds the sequence ``seed + index``).

        With ``routing`` each item carries ``"token_experts"``: the experts of the tokens fed
        since the last item (the prompt's with the first), so that the items together hold
        the non-streamed result's list; the last item adds ``"expert_counts"``.

        ``request_id`` lets the caller :meth:`cancel` it, ``total`` is as in :meth:`generate`;
        with ``ack`` the first item is
        ``{"admitted": True}``, sent once admission let the request in (the API waits for it
        before it answers 200, so that a full router is a 429, not an error mid-stream)."""
        sampling = SamplingParams(**params)
        if sampling.candidates != sampling.n:
            raise ConfigError("best_of", "cannot be streamed: it ranks finished candidates")
        [(seq, q)], engine = self._submit(
            prompt,
            sampling,
            trace=routing,
            stream=True,
            indices=range(index, index + 1),
            request_id=request_id,
            total=total,
        )
        try:
            # NOTE: the caller may close the stream at this first yield (its other choice was
            # refused), before the drain below, whose cleanup would then never run
            if ack:
                yield {"admitted": True}
            async for item in self._stream_items(seq, q, engine, sampling, request_id, routing):
                yield item
        finally:
            self._release(seq, engine, request_id)

    async def _stream_items(self, seq, q, engine, sampling, request_id, routing):
        """:meth:`generate_stream`'s items, one per output of ``seq``."""
        n_lp, n_traced, first = 0, 0, True
        async for out in self._drain(seq, q, engine, request_id):
            item = {
                "text": out.text_delta,
                "token_id": out.token_id,
                # NOTE: from the output, not the live sequence: by the time a queued token is
                # sent the sequence may have finished, and only its last chunk ends it
                "finish_reason": seq.finish_reason if out.finished else None,
            }
            if first and sampling.prompt_logprobs is not None:
                # the prefill that produced the first token scored the prompt
                item["prompt_logprobs"] = token_logprobs(
                    engine.tokenizer,
                    seq.prompt_ids,
                    [None, *seq.prompt_logprobs],
                    [None, *seq.prompt_top_logprobs],
                )
            if sampling.logprobs is not None:
                # the token this output added (none for an EOS that ended the sequence)
                added = not (out.finished and seq.finish_reason == "eos")
                ids = seq.output_ids[n_lp : n_lp + 1] if added else []
                item["logprobs"] = token_logprobs(
                    engine.tokenizer,
                    ids,
                    seq.logprobs[n_lp : n_lp + len(ids)],
                    seq.top_logprobs[n_lp : n_lp + len(ids)],
                )
                n_lp += len(ids)
            if routing:
                # NOTE: what was fed by now (a queued item may be sent a step late), so that
                # no token's experts are sent twice or lost
                traced = list(seq.token_experts)
                item["token_experts"] = traced[n_traced:]
                n_traced = len(traced)
                if out.finished and seq.expert_counts is not None:
                    item["expert_counts"] = seq.expert_counts.tolist()
            first = False
            yield item

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

    def render_chat(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """``{"prompt", "prompt_tokens", "context"}`` for ``messages`` by the current version's
        chat template (ConfigError naming ``messages`` if the model has none)."""
        template = self.templates.get(self.current)
        if template is None:
            raise ConfigError(
                "messages",
                f"model {self.labels.get(self.current)!r} has no chat template (its checkpoint "
                "has no chat_template.jinja); use /v1/completions with a plain prompt",
            )
        prompt = chat.render(template, messages)
        if not prompt:
            raise ConfigError("messages", "the chat template made an empty prompt of them")
        n = len(self.engine.encode(prompt))
        return {"prompt": prompt, "prompt_tokens": n, "context": self.engine.max_len}

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.admission.latencies)
        pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0.0  # noqa: E731
        d = self.dispatcher.stats
        versions = self.versions()
        live = versions["live"].values()
        return {
            "steps": self.steps,
            "overlapped_steps": self.retired_overlapped
            + sum(e.overlapped_steps for e in list(self.engines.values())),
            "tokens_generated": self.tokens_out,
            "running": sum(v["running"] for v in live),
            "waiting": sum(v["waiting"] for v in live),
            # admission: sequences held (running + waiting) against max_batch + max_queued
            "in_flight": len(self.waiters),
            **self.admission.stats(),
            "model_version": versions["current"],
            # label -> requests running and waiting on that version (two during an upgrade)
            "versions": {
                v["label"]: {"running": v["running"], "waiting": v["waiting"]} for v in live
            },
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
            # breakers open or half-open now (failed_shards: every shard that ever failed)
            "open_breakers": self.dispatcher.breakers.snapshot(time.monotonic()),
            "latency_p50_s": pct(0.5),
            "latency_p99_s": pct(0.99),
            "uptime_s": time.time() - self.started,
            "node_id": ray.get_runtime_context().get_node_id(),
            "model": asdict(self.engine.cfg),
        }
