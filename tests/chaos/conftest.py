"""Fixtures of the chaos tests: a small random checkpoint and its fault-free greedy outputs."""

from __future__ import annotations

import pytest

from expertmesh.platform.engine import Engine
from expertmesh.platform.loader import load_for_inference
from expertmesh.platform.sampling import SamplingParams
from tests.chaos.load import MAX_TOKENS
from tests.integration.helpers import PROMPTS, tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(state_home, tmp_path_factory) -> str:
    return tiny_checkpoint(tmp_path_factory.mktemp("chaos-ckpt"))


@pytest.fixture(scope="module")
def expected(checkpoint) -> dict[str, list[int]]:
    """Greedy outputs of the in-process model: what every request under chaos must return."""
    model, tok = load_for_inference(checkpoint)
    seqs = Engine(model, tok).generate(
        PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    )
    return {p: s.output_ids for p, s in zip(PROMPTS, seqs, strict=True)}
