"""The generation engine: continuous batching over a slot KV cache, one dispatcher interface.

The same engine runs in process (experts in this process, :class:`LocalDispatcher`) and inside
the router service actor (experts in shard actors, a Ray dispatcher). Requests added while a
step runs join the next step; each step is one forward pass over a ragged batch in which new
requests contribute their whole prompt (prefill) and running ones their last token (decode).

Slots stay compact: the i-th running sequence owns KV-cache slot i, so a step's batch is one
contiguous block of the cache that attention reads in place (no gather of every sequence's keys
and values each layer); when a sequence leaves, the last one moves into its slot. Aborts from
other threads (a client that disconnects while a step runs) are applied by the stepping thread.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from expertmesh.platform.errors import ConfigError
from expertmesh.platform.model import Dispatcher, KVCache, MoETransformer
from expertmesh.platform.overlap import Turns, TurnTakingDispatcher
from expertmesh.platform.sampling import Row, SamplingParams, sample_step, top_logprobs

EOS_ID = 0
MIN_MICRO_BATCH = 8  # rows; below this a split costs more than the overlap gains
# NOTE: a step that admits new requests pads every running row to the longest new prompt. Past
# this many padded decode rows the step runs as two passes (decode rows, then prompts): at 64
# decode rows and a 32-token prompt the padding was ~2000 rows of dense work for 64 real ones,
# against one more pass over the experts' weights (and, distributed, one more round of calls).
PREFILL_SPLIT_ROWS = 1024
_ids = itertools.count()


@dataclass(kw_only=True, slots=True, eq=False)
class Sequence:
    """One request's state; ``text`` is the output so far, with stop strings removed."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "length", "stop" or "eos"
    slot: int | None = None
    n_cached: int = 0
    generator: torch.Generator | None = None
    expert_counts: torch.Tensor | None = None  # (MoE layers, E) tokens served, when tracked
    token_experts: list[list[list[int]]] = field(default_factory=list)  # per fed token, per layer
    trace: bool = False  # record expert_counts and token_experts (Python time per token)
    stream: bool = False  # wants each token's text delta (else only the final text is needed)
    logprobs: list[float] = field(default_factory=list)  # per output token, when wanted
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # with logprobs
    cumulative_logprob: float = 0.0  # of the output tokens, when wanted (ranks best_of)
    # per prompt token from the second on, with params.prompt_logprobs
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(kw_only=True, slots=True)
class StepOutput:
    seq: Sequence
    token_id: int
    text_delta: str
    finished: bool


class Engine:
    """Continuous-batching generator for a :class:`MoETransformer`."""

    def __init__(
        self,
        model: MoETransformer,
        tokenizer: Tokenizer,
        *,
        dispatcher: Dispatcher | None = None,
        max_batch: int = 64,
        max_len: int | None = None,
        max_step_tokens: int = 4096,
        track_routing: bool = False,
        micro_batches: int = 1,
        prefill_split_rows: int = PREFILL_SPLIT_ROWS,
    ) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.dispatcher = dispatcher
        self.max_len = max_len or self.cfg.max_seq_len
        self.max_step_tokens = max_step_tokens
        first = next(model.parameters())
        self.device = first.device  # the cache and every step's inputs live with the weights
        self.cache = KVCache(self.cfg, max_batch, self.max_len, first.dtype, self.device)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # running[i].slot == i
        self._lock = threading.Lock()  # guards _stepping and _aborts
        self._stepping = False
        self._aborts: list[Sequence] = []
        self.track_routing = track_routing
        self.n_moe = len(model.moe_layers())
        if micro_batches < 1:
            raise ConfigError("micro_batches", f"must be >= 1, got {micro_batches}")
        self.micro_batches = micro_batches
        self.prefill_split_rows = prefill_split_rows
        self.split_steps = 0  # steps run as a decode pass and a prefill pass
        self.overlapped_steps = 0  # steps that ran as several micro-batches
        self._pool = (
            ThreadPoolExecutor(micro_batches, thread_name_prefix="micro-batch")
            if micro_batches > 1
            else None
        )

    # ------------------------------------------------------------------ requests
    def encode(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt).ids if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ConfigError("prompt", "is empty")
        return ids

    def add(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> Sequence:
        """Validate and queue a request; it joins the next step."""
        seq = self.make_sequence(prompt, params, request_id)
        self.enqueue(seq)
        return seq

    def enqueue(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def make_sequence(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        trace: bool = False,
        stream: bool = False,
        index: int = 0,
    ) -> Sequence:
        """A validated, not yet queued request (raises ConfigError naming what is wrong).

        ``index`` numbers the candidates of one request (``best_of``): each draws from its own
        generator, seeded ``seed + index``, so that seeded candidates differ yet repeat."""
        ids = self.encode(prompt)
        if max(ids) >= self.cfg.vocab_size or min(ids) < 0:
            raise ConfigError("prompt", f"token ids must be in [0, {self.cfg.vocab_size})")
        if len(ids) + params.max_tokens > self.max_len:
            raise ConfigError(
                "prompt",
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {self.max_len} tokens; shorten the prompt or lower max_tokens",
            )
        seq = Sequence(
            request_id=request_id or f"req-{next(_ids)}",
            prompt_ids=ids,
            params=params,
            trace=trace,
            stream=stream,
        )
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed + index)
        if self.track_routing or trace:
            seq.expert_counts = torch.zeros(self.n_moe, self.cfg.max_experts, dtype=torch.long)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop ``seq``; safe from any thread. During a step it takes effect when the step ends
        (the step's batch and cache slots must not change under it)."""
        with self._lock:
            seq.finish_reason = seq.finish_reason or "abort"
            if self._stepping:
                self._aborts.append(seq)
                return
            self._remove(seq)

    def _remove(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self._release(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def close(self) -> None:
        """Stop the micro-batch threads (an engine retired after a live upgrade)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------ stepping
    def _admit(self) -> None:
        budget = self.max_step_tokens - len(self.running)
        while self.waiting and len(self.running) < self.cache.n_slots:
            n = len(self.waiting[0].prompt_ids)
            if n > budget and len(self.running) > 0:
                break
            seq = self.waiting.pop(0)
            seq.slot = len(self.running)
            self.running.append(seq)
            budget -= n

    def _release(self, seq: Sequence) -> None:
        """Free ``seq``'s slot; the last running sequence moves into it (keys, values, slot)."""
        slot, last = seq.slot, self.running[-1]
        assert slot is not None and self.running[slot] is seq
        if last is not seq:
            self.cache.move(last.slot, slot, last.n_cached)
            last.slot = slot
            self.running[slot] = last
        self.running.pop()
        seq.slot = None

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """Run one forward pass for every running sequence; returns one output per sequence."""
        with self._lock:
            self._stepping = True
        try:
            return self._step()
        finally:
            with self._lock:
                self._stepping = False
                for seq in self._aborts:
                    self._remove(seq)
                self._aborts.clear()

    def _step(self) -> list[StepOutput]:
        self._admit()
        if not self.running:
            return []
        seqs = self.running
        feeds = [s.prompt_ids if s.n_cached == 0 else s.output_ids[-1:] for s in seqs]
        parts = self._split(len(seqs))
        first_new = self._prefill_split(seqs, feeds) if len(parts) == 1 else None
        if first_new is not None:
            self.split_steps += 1
            logits_BV = torch.cat(
                [
                    self._forward(seqs[:first_new], feeds[:first_new]),
                    self._forward(seqs[first_new:], feeds[first_new:]),
                ]
            )
        elif len(parts) == 1:
            logits_BV = self._forward(seqs, feeds)
        else:
            # NOTE: overlap: while the shards compute one micro-batch's experts, another runs
            # its dense layers (taking turns, see overlap.py); rows are independent, so outputs
            # do not change
            assert self._pool is not None
            self.overlapped_steps += 1
            turns = Turns(len(parts))
            futures = [
                self._pool.submit(self._forward_in_turn, turns, i, seqs[a:b], feeds[a:b])
                for i, (a, b) in enumerate(parts)
            ]
            wait(futures)  # all of them, even when one failed: none may outlive the step
            logits_BV = torch.cat([f.result() for f in futures])
        rows = [
            Row(
                params=s.params,
                prompt_ids=s.prompt_ids,
                output_ids=s.output_ids,
                generator=s.generator,
            )
            for s in seqs
        ]
        picked = sample_step(logits_BV, rows)
        seqs = list(seqs)  # _append releases finished ones, which reorders self.running
        for s, f in zip(seqs, feeds, strict=True):
            s.n_cached += len(f)  # before any release moves a sequence's cache entries
        return [
            self._append(s, tok, picked.logprob[b], picked.top[b])
            for b, (s, tok) in enumerate(zip(seqs, picked.token_B.tolist(), strict=True))
        ]

    def _prefill_split(self, seqs: list[Sequence], feeds: list[list[int]]) -> int | None:
        """Where the new sequences start, if this step should run them as a pass of their own.

        New sequences are admitted at the end of ``running``, so they are a suffix of the batch
        (and their slots a compact range of their own)."""
        first = next((i for i, s in enumerate(seqs) if s.n_cached == 0), None)
        if not first or any(s.n_cached for s in seqs[first:]):
            return None
        padded = first * (max(len(f) for f in feeds[first:]) - 1)
        return first if padded >= self.prefill_split_rows else None

    def _split(self, n: int) -> list[tuple[int, int]]:
        """Row ranges of the micro-batches: one unless overlap is on and the batch is large."""
        k = min(self.micro_batches, n // MIN_MICRO_BATCH) if self.micro_batches > 1 else 1
        if k <= 1:
            return [(0, n)]
        bounds = [round(i * n / k) for i in range(k + 1)]
        return list(itertools.pairwise(bounds))

    def _forward_in_turn(
        self, turns: Turns, i: int, seqs: list[Sequence], feeds: list[list[int]]
    ) -> torch.Tensor:
        """:meth:`_forward` for micro-batch ``i``, running only while it holds the turn."""
        turns.wait(i)
        try:
            disp = self.dispatcher
            return self._forward(seqs, feeds, disp and TurnTakingDispatcher(disp, turns, i))
        finally:
            turns.finish(i)

    @torch.no_grad()  # grad mode is per thread: micro-batches run in pool threads
    def _forward(
        self, seqs: list[Sequence], feeds: list[list[int]], dispatcher: Dispatcher | None = None
    ) -> torch.Tensor:
        """One forward pass for ``seqs`` (fed ``feeds``); the next-token logits, (B, V).
        ``dispatcher`` replaces the engine's own for this pass."""
        T = max(len(f) for f in feeds)
        # NOTE: rows built as Python lists and converted once: per-row tensor writes were ~6
        # small torch ops per sequence, a few ms of a 64-sequence decode step
        tokens, positions, valid = [], [], []
        for s, f in zip(seqs, feeds, strict=True):
            n, pad = len(f), T - len(f)
            tokens.append([*f, *([0] * pad)])
            positions.append([*range(s.n_cached, s.n_cached + n), *([0] * pad)])
            valid.append([True] * n + [False] * pad)
        dev = self.device
        tokens_BT = torch.tensor(tokens, dtype=torch.long, device=dev)
        pos_BT = torch.tensor(positions, dtype=torch.long, device=dev)
        valid_BT = torch.tensor(valid, dtype=torch.bool, device=dev)
        ragged = any(len(f) < T for f in feeds)
        # NOTE: routing is recorded only for batches with a sequence that asked for it: it costs
        # a bincount per layer and a tensor add per sequence, a few % of a 64-sequence step
        record = any(s.expert_counts is not None for s in seqs)
        # padded tokens write their key/value to the cache's scratch position
        wpos_BT = torch.where(valid_BT, pos_BT, self.cache.scratch_pos) if ragged else pos_BT
        gather_B = torch.tensor([len(f) - 1 for f in feeds], device=dev)
        # NOTE: prompt logprobs (echo with logprobs) need every prompt position's logits, so a
        # prefill that asks for them computes the LM head over all T positions of the batch
        scored = [
            b
            for b, s in enumerate(seqs)
            if s.n_cached == 0 and s.params.prompt_logprobs is not None and len(feeds[b]) > 1
        ]
        out = self.model(
            tokens_BT,
            positions_BT=pos_BT,
            cache=self.cache,
            slots_B=torch.tensor([s.slot for s in seqs], device=dev),
            dispatcher=dispatcher or self.dispatcher,
            return_routing=record,
            valid_BT=valid_BT if ragged else None,
            write_pos_BT=wpos_BT if ragged else None,
            gather_B=None if scored else gather_B,
        )
        if record:
            self._record_routing(seqs, feeds, valid_BT, out.layer_stats)
        if not scored:
            return out.logits[:, 0]
        logits_BTV = out.logits
        for b in scored:
            self._score_prompt(seqs[b], logits_BTV[b, : len(feeds[b]) - 1])
        return logits_BTV[torch.arange(len(seqs), device=dev), gather_B]

    @staticmethod
    def _score_prompt(seq: Sequence, logits_TV: torch.Tensor) -> None:
        """Logprobs of prompt tokens 1.. given the ones before (position t predicts t+1)."""
        lp_TV = logits_TV.float().log_softmax(dim=-1).cpu()
        targets_T = torch.tensor(seq.prompt_ids[1:], dtype=torch.long)
        seq.prompt_logprobs = lp_TV.gather(1, targets_T[:, None])[:, 0].tolist()
        k = seq.params.prompt_logprobs or 0
        seq.prompt_top_logprobs = [top_logprobs(lp_V, k) for lp_V in lp_TV]

    def _append(
        self,
        s: Sequence,
        tok: int,
        logprob: float | None = None,
        top: list[tuple[int, float]] | None = None,
    ) -> StepOutput:
        p = s.params
        if tok == EOS_ID and not p.ignore_eos:
            s.finish_reason = "eos"  # EOS ends the output and is not part of it
        else:
            s.output_ids.append(tok)
            if logprob is not None:
                s.logprobs.append(logprob)
                s.cumulative_logprob += logprob
            if top is not None:
                s.top_logprobs.append(top)
        # NOTE: the text is decoded every token only when someone reads it every token (a
        # streamed request, or stop strings to look for); otherwise once, at the end. Decoding
        # the whole output per token was ~0.5 ms of a 64-sequence step.
        eager = s.stream or bool(p.stop)
        text = s.text
        if eager:
            text = self.tokenizer.decode(s.output_ids)
            if text.endswith("\ufffd") and s.finish_reason is None:
                # an incomplete UTF-8 character: wait for its next byte
                text = text.rstrip("\ufffd")
            for stop in p.stop:
                cut = text.find(stop)
                if cut >= 0:
                    text, s.finish_reason = text[:cut], "stop"
        if s.finish_reason is None and len(s.output_ids) >= p.max_tokens:
            s.finish_reason = "length"
        if s.finish_reason is None and len(s.prompt_ids) + len(s.output_ids) >= self.max_len:
            s.finish_reason = "length"
        if not eager and s.finished:
            text = self.tokenizer.decode(s.output_ids)
        # the deltas of a sequence always add up to its text (a lazy one's come at the end)
        delta = text[len(s.text) :] if text.startswith(s.text) else ""
        s.text = text
        if s.finished:
            self._release(s)
        return StepOutput(seq=s, token_id=tok, text_delta=delta, finished=s.finished)

    def _record_routing(self, seqs, feeds, valid_BT, stats) -> None:
        """Per-sequence expert counts (vectorised); per-token experts only for traced sequences."""
        row_N = torch.nonzero(valid_BT)[:, 0]  # row of each real token, row-major
        B, E = len(seqs), self.cfg.max_experts  # layers with fewer experts leave columns at 0
        counts_BLE = torch.stack(
            [
                torch.bincount(
                    row_N[st.routing.token_idx_A] * E + st.routing.expert_idx_A, minlength=B * E
                ).view(B, E)
                for st in stats
            ],
            dim=1,
        ).cpu()
        for b, s in enumerate(seqs):
            if s.expert_counts is not None:
                s.expert_counts += counts_BLE[b]
        if not any(s.trace for s in seqs):
            return
        per_layer = [st.experts_per_token() for st in stats]
        starts = [0, *itertools.accumulate(len(f) for f in feeds)]
        for b, s in enumerate(seqs):
            if s.trace:
                for n in range(starts[b], starts[b + 1]):
                    s.token_experts.append([layer[n] for layer in per_layer])

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: list[str | list[int]], params: SamplingParams) -> list[Sequence]:
        """Run ``prompts`` to completion (continuously batched) and return their sequences:
        ``params.n`` per prompt (the best of ``params.best_of``), prompt by prompt."""
        per_prompt = [
            [self.make_sequence(p, params, index=i) for i in range(params.candidates)]
            for p in prompts
        ]
        for seqs in per_prompt:
            for s in seqs:
                self.enqueue(s)
        while any(not s.finished for seqs in per_prompt for s in seqs):
            self.step()
        return [s for seqs in per_prompt for s in best_of(seqs, params.n)]


def best_of(candidates: list[Sequence], n: int) -> list[Sequence]:
    """The ``n`` candidates with the highest cumulative logprob, best first (vLLM's
    ``best_of``); all of them, in order, when there are only ``n``."""
    if len(candidates) <= n:
        return list(candidates)
    return sorted(candidates, key=lambda s: s.cumulative_logprob, reverse=True)[:n]
