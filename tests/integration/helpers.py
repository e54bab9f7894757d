"""Small random models and checkpoints for serving tests (real code paths, tiny shapes)."""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.config import ModelConfig
from expertmesh.platform.model import MoETransformer
from expertmesh.runtime import free_port

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


@contextlib.contextmanager
def api_cluster(
    uri: str,
    token: str,
    *,
    prefix: str = "emapi-",
    deploy: dict[str, Any] | None = None,
    serve: dict[str, Any] | None = None,
) -> Iterator[tuple[Any, str]]:
    """A local Ray cluster of its own serving ``uri`` (2 shards x 1 replica unless ``deploy``
    says otherwise) and the HTTP API on a free port: ``(cluster, url)``; all stopped after."""
    import expertmesh

    # NOTE: Ray's own temp folder: in a shared one, ray.init() joins whatever cluster another
    # session started there last (its ray_current_cluster file) instead of starting ours
    with (
        tempfile.TemporaryDirectory(prefix=prefix) as ray_tmp,
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setenv("EXPERTMESH_RAY_TMP", ray_tmp)
        cluster = expertmesh.connect()
        try:
            cluster.deploy(uri, **({"shards": 2, "replicas": 1} | (deploy or {})))
            yield cluster, cluster.serve(port=free_port(), token=token, **(serve or {}))
        finally:
            cluster.shutdown()


@contextlib.contextmanager
def job_server_head(*, prefix: str, num_cpus: int = 4) -> Iterator[str]:
    """A local Ray head of its own with its dashboard (Ray's job server) on free ports, this
    process connected to it; yields the dashboard's URL. Everything stops after.

    ray.cluster_utils rather than ``ray.init``: only it takes the dashboard agent's port, whose
    default (52365) another Ray on the machine may hold; then no agent can run jobs ("No
    available agent to submit job")."""
    import os
    import sys

    import ray
    from ray.cluster_utils import Cluster as RayTestCluster

    dash_port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix=prefix) as ray_tmp,
        pytest.MonkeyPatch.context() as mp,
    ):
        # a job's driver runs `python` from the raylet's PATH: this venv's
        mp.setenv("PATH", os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
        head = RayTestCluster(
            initialize_head=True,
            head_node_args={
                "node_ip_address": "127.0.0.1",
                "temp_dir": ray_tmp,
                "num_cpus": num_cpus,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dash_port,
                "dashboard_agent_listen_port": free_port(),
            },
        )
        try:
            ray.init(address=head.address, _node_ip_address="127.0.0.1", namespace="expertmesh")
            yield f"http://127.0.0.1:{dash_port}"
        finally:
            ray.shutdown()
            head.shutdown()


@contextlib.contextmanager
def unread_request(url: str, token: str, path: str, body: dict[str, Any]) -> Iterator[None]:
    """POST ``body`` on a raw socket and read nothing back; leaving the block hangs up (a
    client that goes away mid-request, which httpx cannot do on purpose)."""
    payload = json.dumps(body).encode()
    u = httpx.URL(url)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {u.host}\r\nAuthorization: Bearer {token}"
        f"\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    with socket.create_connection((u.host, u.port)) as sock:
        sock.sendall(head.encode() + payload)
        yield
