"""Micro-batch overlap in the engine: the same tokens as one batch, in ragged and decode steps."""

from __future__ import annotations

import itertools
import threading

import pytest

from expertmesh.platform.engine import Engine
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.model import LocalDispatcher, MoETransformer
from expertmesh.platform.overlap import Turns
from expertmesh.platform.sampling import SamplingParams
from tests.integration.helpers import PROMPTS


class CountingDispatcher(LocalDispatcher):
    """The in-process dispatcher, noting which threads and batch sizes reach it."""

    def __init__(self, model: MoETransformer) -> None:
        super().__init__({i: layer.experts for i, layer in model.moe_layers().items()})
        self.threads: set[str] = set()
        self.rows: list[int] = []

    def dispatch(self, layer, x_TD, routing):
        self.threads.add(threading.current_thread().name)
        self.rows.append(x_TD.shape[0])
        return super().dispatch(layer, x_TD, routing)


def test_micro_batches_give_the_same_tokens(model_and_tok) -> None:
    model, tok = model_and_tok
    prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS]  # 20 ragged prompts
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    one = CountingDispatcher(model)
    whole = Engine(model, tok, max_batch=32, dispatcher=one).generate(prompts, params)
    two = CountingDispatcher(model)
    split = Engine(model, tok, max_batch=32, dispatcher=two, micro_batches=2)
    got = split.generate(prompts, params)
    assert [s.output_ids for s in got] == [s.output_ids for s in whole]
    # every step ran as two halves of 10 sequences, from the pool's threads
    assert len(two.rows) == 2 * len(one.rows)
    assert sum(two.rows) == sum(one.rows)
    assert {t.split("_")[0] for t in two.threads} == {"micro-batch"}


def test_small_batches_are_not_split(model_and_tok) -> None:
    model, tok = model_and_tok
    disp = CountingDispatcher(model)
    eng = Engine(model, tok, dispatcher=disp, micro_batches=2)
    eng.generate(PROMPTS[:3], SamplingParams(max_tokens=3, ignore_eos=True))
    assert disp.threads == {threading.current_thread().name}


def test_micro_batches_must_be_positive(model_and_tok) -> None:
    model, tok = model_and_tok
    with pytest.raises(ConfigError, match="micro_batches"):
        Engine(model, tok, micro_batches=0)


class SubmittingDispatcher(LocalDispatcher):
    """The in-process dispatcher with ``submit``: the experts run when the answer is read.
    Notes each send and read as (event, micro-batch thread, layer)."""

    def __init__(self, model: MoETransformer) -> None:
        super().__init__({i: layer.experts for i, layer in model.moe_layers().items()})
        self.events: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()

    def _note(self, what: str, layer: int) -> None:
        with self._lock:
            self.events.append((what, threading.current_thread().name, layer))

    def submit(self, layer, x_TD, routing):
        self._note("send", layer)
        dispatcher = self

        class Answer:
            def result(self):
                dispatcher._note("read", layer)
                return LocalDispatcher.dispatch(dispatcher, layer, x_TD, routing)

        return Answer()


def test_micro_batches_take_turns_between_send_and_read(model_and_tok) -> None:
    """With a dispatcher that can send now and read later, each micro-batch hands the turn on
    after sending a layer's tokens: the other's send comes before its own read, every layer."""
    model, tok = model_and_tok
    prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    whole = Engine(model, tok, max_batch=32).generate(prompts, params)
    disp = SubmittingDispatcher(model)
    got = Engine(model, tok, max_batch=32, dispatcher=disp, micro_batches=2).generate(
        prompts, params
    )
    assert [s.output_ids for s in got] == [s.output_ids for s in whole]
    n_layers = len(model.moe_layers())
    steps = len(disp.events) // (4 * n_layers)  # 2 micro-batches x (send, read) per layer
    assert steps >= 6 and len(disp.events) == steps * 4 * n_layers
    layers = sorted(model.moe_layers())
    for s in range(steps):
        step = disp.events[s * 4 * n_layers : (s + 1) * 4 * n_layers]
        first, second = step[0][1], step[1][1]
        assert first != second
        # A sends layer 0, B sends layer 0, then for every further layer: A reads the one
        # before and sends, B the same; at the end A reads its last layer, then B
        order = [("send", first, layers[0]), ("send", second, layers[0])]
        for before, layer in itertools.pairwise(layers):
            order += [("read", first, before), ("send", first, layer)]
            order += [("read", second, before), ("send", second, layer)]
        order += [("read", first, layers[-1]), ("read", second, layers[-1])]
        assert step == order


def test_turns_go_round_and_skip_finished_parties() -> None:
    turns = Turns(3)
    assert turns.turn == 0
    turns.pass_on(0)
    assert turns.turn == 1
    turns.finish(2)  # not its turn: only marked done
    assert turns.turn == 1
    turns.pass_on(1)
    assert turns.turn == 0  # 2 is skipped
    turns.finish(0)
    assert turns.turn == 1
    turns.pass_on(1)
    assert turns.turn == 1  # the last one left keeps the turn
    turns.wait(1)  # returns at once: it holds the turn


class FailingDispatcher(SubmittingDispatcher):
    """Fails the first micro-batch's reads of one step; notes when each micro-batch finished."""

    def __init__(self, model: MoETransformer) -> None:
        super().__init__(model)
        self.fail_thread: str | None = None

    def submit(self, layer, x_TD, routing):
        answer = super().submit(layer, x_TD, routing)
        if self.fail_thread is None:
            self.fail_thread = threading.current_thread().name
        if threading.current_thread().name != self.fail_thread:
            return answer

        class Failing:
            def result(self):
                raise RuntimeError("no live replica (test)")

        return Failing()


def test_a_failed_micro_batch_fails_the_step_after_the_others_finish(model_and_tok) -> None:
    """One micro-batch's dispatch fails: the step raises, but only once every other
    micro-batch of it has finished (none may still run into the next step)."""
    model, tok = model_and_tok
    disp = FailingDispatcher(model)
    eng = Engine(model, tok, max_batch=32, dispatcher=disp, micro_batches=2)
    for p in [f"{p} {i}" for i in range(4) for p in PROMPTS]:
        eng.add(p, SamplingParams(max_tokens=4, ignore_eos=True))
    with pytest.raises(RuntimeError, match="no live replica"):
        eng.step()
    other = {t for _, t, _ in disp.events} - {disp.fail_thread}
    assert len(other) == 1
    last_layer = max(model.moe_layers())
    # the other micro-batch read its last layer's answer before step() raised
    assert ("read", other.pop(), last_layer) in disp.events
