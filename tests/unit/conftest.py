"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from expertmesh.platform.config import ModelConfig
from expertmesh.platform.model import MoETransformer
from tests.integration.helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def model_and_tok() -> tuple[MoETransformer, Tokenizer]:
    """A small random MoE (2 layers, 8 experts, top-2) and the test tokenizer, for engine tests."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=96,
        n_experts=8,
        top_k=2,
        max_seq_len=128,
    )
    return MoETransformer(cfg).eval(), tok
