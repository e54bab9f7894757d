"""Compact KV-cache slots: sequences leave and join mid-batch, aborts arrive from other threads,
and every sequence still gets exactly the tokens it gets alone."""

from __future__ import annotations

import threading

import torch

from expertmesh.platform.engine import Engine
from expertmesh.platform.model import KVCache, LocalDispatcher, MoETransformer
from expertmesh.platform.model.layers import Attention
from expertmesh.platform.sampling import SamplingParams
from tests.integration.helpers import PROMPTS


def alone(model, tok, prompt: str, params: SamplingParams) -> list[int]:
    return Engine(model, tok, max_batch=1).generate([prompt], params)[0].output_ids


def test_staggered_finishes_compact_slots_and_keep_every_output(model_and_tok) -> None:
    """12 requests of different lengths through 4 slots: every release moves the last sequence
    into the freed slot; the batch stays slots 0..B-1 and no sequence's tokens change."""
    model, tok = model_and_tok
    reqs = [(f"{p} {i}", SamplingParams(max_tokens=3 + (5 * i) % 11, ignore_eos=True))
            for i, p in enumerate(PROMPTS * 3)]  # fmt: skip
    eng = Engine(model, tok, max_batch=4)
    seqs = [eng.add(p, params) for p, params in reqs]
    moved = 0
    while eng.has_work():
        before = {id(s): s.slot for s in eng.running}
        eng.step()
        assert [s.slot for s in eng.running] == list(range(len(eng.running)))
        moved += sum(1 for s in eng.running if before.get(id(s), s.slot) != s.slot)
    assert moved > 0  # the test did exercise moves, not only releases of the last slot
    for s, (p, params) in zip(seqs, reqs, strict=True):
        assert s.output_ids == alone(model, tok, p, params), p


class AbortingDispatcher(LocalDispatcher):
    """Aborts ``victim`` from another thread in the middle of the first step it sees."""

    def __init__(self, model: MoETransformer) -> None:
        super().__init__({i: layer.experts for i, layer in model.moe_layers().items()})
        self.engine: Engine | None = None
        self.victim = None
        self.running_during_abort: list | None = None

    def dispatch(self, layer, x_TD, routing):
        if self.victim is not None and self.running_during_abort is None:
            assert self.engine is not None
            t = threading.Thread(target=self.engine.abort, args=(self.victim,))
            t.start()
            t.join(timeout=5)
            assert not t.is_alive(), "abort blocked while a step was running"
            self.running_during_abort = list(self.engine.running)
        return super().dispatch(layer, x_TD, routing)


def test_abort_from_another_thread_waits_for_the_step(model_and_tok) -> None:
    model, tok = model_and_tok
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = [f"{p} x" for p in PROMPTS]
    disp = AbortingDispatcher(model)
    eng = Engine(model, tok, max_batch=8, dispatcher=disp)
    disp.engine = eng
    seqs = [eng.add(p, params) for p in prompts]
    eng.step()  # prefill
    disp.victim = seqs[1]
    eng.step()  # the abort arrives mid-step
    assert disp.running_during_abort == seqs  # nothing left the batch under the step
    assert seqs[1] not in eng.running and seqs[1].finish_reason == "abort"
    assert [s.slot for s in eng.running] == list(range(len(eng.running)))
    while eng.has_work():
        eng.step()
    for s, p in zip(seqs, prompts, strict=True):
        if s is not seqs[1]:
            assert s.output_ids == alone(model, tok, p, params), p
    # idle engine: an abort applies at once
    late = eng.add("late request", params)
    eng.abort(late)
    assert not eng.has_work() and late.finish_reason == "abort"


def test_attention_reads_compact_slots_in_place_like_a_gather(model_and_tok) -> None:
    """Slots 0..B-1 (read as a view) and the same caches at scattered slots (gathered) agree."""
    model, _ = model_and_tok
    cfg = model.cfg
    attn: Attention = model.layers[0].self_attn
    B, L = 3, 10
    torch.manual_seed(1)
    cache = KVCache(cfg, n_slots=6, max_len=32)
    k0, v0 = (
        torch.randn(B, cfg.n_kv_heads, L, cfg.head_dim),
        torch.randn(B, cfg.n_kv_heads, L, cfg.head_dim),
    )
    x = torch.randn(B, 1, cfg.d_model)
    pos = torch.tensor([[L - 1], [L - 4], [L - 1]])
    rope = model.rotary(pos, x.dtype)
    outs = []
    for slots in ([0, 1, 2], [5, 2, 3]):
        k_buf, v_buf = cache.k[0].zero_(), cache.v[0].zero_()
        k_buf[slots, :, :L], v_buf[slots, :, :L] = k0, v0
        outs.append(attn(x, rope, pos, cache=(k_buf, v_buf), slots_B=torch.tensor(slots)))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_batched_engine_equals_greedy_full_forward(model_and_tok) -> None:
    """Oracle outside the engine: for each prompt, argmax of a full forward pass (no KV cache,
    no batching) appended token by token. The engine runs the prompts together, with later
    ones arriving while others decode, so its steps mix ragged prefills and one-token decodes."""
    model, tok = model_and_tok
    n_new = 6
    prompts = [f"{p} {i}" for i, p in enumerate(PROMPTS)]
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = tok.encode(p).ids
            for _ in range(n_new):
                logits = model(torch.tensor([ids])).logits
                ids.append(int(logits[0, -1].argmax()))
            expected.append(ids[-n_new:])
    eng = Engine(model, tok, max_batch=8)
    params = SamplingParams(max_tokens=n_new, ignore_eos=True)
    seqs = [eng.add(p, params) for p in prompts[:2]]
    eng.step()
    eng.step()
    seqs += [eng.add(p, params) for p in prompts[2:]]  # join two sequences mid-decode
    while eng.has_work():
        eng.step()
    assert [s.output_ids for s in seqs] == expected


def test_routing_is_recorded_only_for_sequences_that_ask(model_and_tok) -> None:
    """A traced request in a batch gets the same expert counts as with every request tracked;
    the untraced ones get none (the router records routing only for ``routing=True``)."""
    model, tok = model_and_tok
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    tracked = Engine(model, tok, max_batch=4, track_routing=True)
    want = tracked.generate(PROMPTS[:3], params)
    eng = Engine(model, tok, max_batch=4)
    seqs = [eng.make_sequence(p, params, trace=(i == 1)) for i, p in enumerate(PROMPTS[:3])]
    for s in seqs:
        eng.enqueue(s)
    while eng.has_work():
        eng.step()
    assert seqs[0].expert_counts is None and seqs[2].expert_counts is None
    assert torch.equal(seqs[1].expert_counts, want[1].expert_counts)
    n_moe = len(model.moe_layers())
    fed = len(seqs[1].prompt_ids) + len(seqs[1].output_ids) - 1  # the last token is never fed
    assert int(seqs[1].expert_counts.sum()) == fed * n_moe * model.cfg.top_k
    assert len(seqs[1].token_experts) == fed


def test_text_is_decoded_per_token_only_for_streams_and_stop_strings(model_and_tok) -> None:
    """A plain request gets its text once, at the end; a streamed one every token. Both end with
    the same text, and each one's deltas add up to it."""
    model, tok = model_and_tok
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    eng = Engine(model, tok, max_batch=4)
    lazy, streamed = (eng.make_sequence(PROMPTS[0], params, stream=s) for s in (False, True))
    deltas: dict[bool, list[str]] = {False: [], True: []}
    for s in (lazy, streamed):
        eng.enqueue(s)
    while eng.has_work():
        for out in eng.step():
            deltas[out.seq.stream].append(out.text_delta)
    assert lazy.output_ids == streamed.output_ids
    assert lazy.text == streamed.text == tok.decode(lazy.output_ids) != ""
    assert "".join(deltas[False]) == "".join(deltas[True]) == lazy.text
    assert all(d == "" for d in deltas[False][:-1])  # nothing decoded before the end
    assert sum(1 for d in deltas[True] if d) > 1  # the stream got its text as it went


def test_prompts_joining_running_sequences_run_as_their_own_pass(model_and_tok) -> None:
    """With the split threshold at one padded row, every step that admits prompts next to
    running sequences runs two passes; every sequence still gets exactly its tokens alone."""
    model, tok = model_and_tok
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    eng = Engine(model, tok, max_batch=4, prefill_split_rows=1)
    seqs = [eng.add(PROMPTS[0], params)]
    for p in [*PROMPTS[1:], *PROMPTS]:  # one more request joins after each step
        eng.step()
        seqs.append(eng.add(p, params))
    while eng.has_work():
        eng.step()
    assert eng.split_steps >= len(PROMPTS)
    for s, p in zip(seqs, [*PROMPTS, *PROMPTS], strict=True):
        assert s.output_ids == alone(model, tok, p, params), p
    never = Engine(model, tok, max_batch=4, prefill_split_rows=10**9)
    never.generate(PROMPTS, params)
    assert never.split_steps == 0
