"""Small random models and checkpoints for serving tests (real code paths, tiny shapes)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.config import ModelConfig
from expertmesh.platform.model import MoETransformer

TEXT = [
    "To be, or not to be, that is the question: whether tis nobler in the mind to suffer",
    "def main(argv):\n    for line in open(argv[1]):\n        print(line.rstrip())\n",
    "Permission is hereby granted, free of charge, to any person obtaining a copy",
]
PROMPTS = [
    "To be, or not",
    "def main(argv):",
    "Permission is hereby",
    "whether tis nobler in",
    "for line",
]


def tiny_tokenizer(vocab: int = 320) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT * 20, trainer)
    return tok


def tiny_checkpoint(
    root: Path,
    *,
    seed: int = 0,
    n_layers: int = 2,
    n_experts: int = 8,
    dtype: torch.dtype = torch.float32,
    d_model: int = 64,
    max_seq_len: int = 256,
    chat_template: str | None = None,
) -> str:
    """Save a random small MoE (in ``dtype``) with a tokenizer (and ``chat_template``, Jinja2
    text, if given); returns the checkpoint URI."""
    tok = tiny_tokenizer()
    root.mkdir(parents=True, exist_ok=True)
    tok_path = root / "tokenizer.json"
    tok.save(str(tok_path))
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=2,
        d_ff=96,
        n_experts=n_experts,
        top_k=2,
        max_seq_len=max_seq_len,
    )
    model = MoETransformer(cfg).to(dtype)
    return ckpt.save_checkpoint(
        str(root), "v1", model, tokenizer_path=str(tok_path), chat_template=chat_template
    )
