"""Micro-batch overlap in the engine: the same tokens as one batch, in ragged and decode steps."""

from __future__ import annotations

import threading

import pytest

from expertmesh.platform.engine import Engine
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.model import LocalDispatcher, MoETransformer
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
