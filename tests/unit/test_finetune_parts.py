"""Content-addressed checkpoints and trained parts: what a fine-tune writes, freezes and proves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.config import ModelConfig, TrainConfig
from expertmesh.platform.errors import CheckpointError, ConfigError
from expertmesh.platform.model import MoETransformer
from expertmesh.platform.parts import Freezer, parse_trained_parts, verify_frozen
from expertmesh.platform.training import make_optimizer, train_step

CFG = ModelConfig(
    vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, n_experts=4
)


def model(seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(CFG)


def fit(m: MoETransformer, parts: str, steps: int = 3) -> None:
    """A few real optimizer steps (AdamW with weight decay) under a Freezer."""
    freezer = Freezer(parse_trained_parts(parts, m.cfg))
    freezer.apply(m)
    tc = TrainConfig(steps=steps, batch_size=2, seq_len=8, warmup_steps=0, weight_decay=0.1)
    opt = make_optimizer(m, tc)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        train_step(m, opt, torch.randint(0, 96, (2, 9), generator=gen), step, tc)
        freezer.after_step()


def test_parse_trained_parts_names_the_field() -> None:
    parts = parse_trained_parts("router,experts:1:0,1:3", CFG)
    assert parts.router and not parts.dense and parts.experts == {(1, 0), (1, 3)}
    assert parts.describe() == "router,experts:1:0,experts:1:3"
    assert parse_trained_parts("all", CFG).describe() == "all"
    for bad in ("experts:9:0", "experts:1:4", "bogus", "experts:x", ""):
        with pytest.raises(ConfigError) as info:
            parse_trained_parts(bad, CFG)
        assert info.value.field == "train", bad
    with pytest.raises(ConfigError, match="outside the model"):
        parse_trained_parts("experts:9:0", CFG)


def test_router_finetune_writes_only_dense_and_loaders_follow(tmp_path: Path) -> None:
    parent = model()
    parent_uri = ckpt.save_checkpoint(str(tmp_path / "a"), "v1", parent)
    child = model()
    child.load_state_dict(parent.state_dict())
    fit(child, "router")
    uri = ckpt.save_checkpoint(str(tmp_path / "b"), "v2", child, parent=parent_uri)

    manifest = ckpt.read_manifest(uri)
    assert manifest.written_files() == [ckpt.DENSE]  # every expert file is the parent's
    assert manifest.format == 2
    assert json.loads((Path(uri) / ckpt.MANIFEST).read_text())["files"][ckpt.expert_file(1, 2)][
        "path"
    ].startswith(parent_uri)
    assert sorted(p.name for p in (Path(uri) / "experts").rglob("*") if p.is_file()) == []
    verify_frozen(parent_uri, uri, parse_trained_parts("router", CFG))

    loaded, _ = ckpt.load_model(uri)  # the loaders follow references and verify the bytes
    for (name, a), b in zip(loaded.state_dict().items(), child.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(
        ckpt.load_experts(uri, [(0, 1)])[(0, 1)]["w1"],
        ckpt.load_experts(parent_uri, [(0, 1)])[(0, 1)]["w1"],
    )
    # a child of the child references the original bytes: one hop, never a chain
    grandchild = ckpt.save_checkpoint(str(tmp_path / "c"), "v3", child, parent=uri)
    entry = ckpt.read_manifest(grandchild).files[ckpt.expert_file(0, 0)]
    assert entry.path is not None and entry.path.startswith(parent_uri)
    assert ckpt.read_manifest(grandchild).files[ckpt.DENSE].path.startswith(uri)

    # a referenced file that changed under the child is caught by checksum
    (Path(parent_uri) / ckpt.expert_file(0, 0)).write_bytes(b"x" * entry.size)
    with pytest.raises(CheckpointError, match="sha256"):
        ckpt.load_model(uri)


def test_some_experts_train_the_rest_stay_bit_exact(tmp_path: Path) -> None:
    parent = model(seed=1)
    parent_uri = ckpt.save_checkpoint(str(tmp_path / "a"), "v1", parent)
    child = model(seed=1)
    fit(child, "experts:1:2")
    uri = ckpt.save_checkpoint(str(tmp_path / "b"), "v2", child, parent=parent_uri)
    assert ckpt.read_manifest(uri).written_files() == [ckpt.expert_file(1, 2)]
    verify_frozen(parent_uri, uri, parse_trained_parts("experts:1:2", CFG))
    with pytest.raises(CheckpointError, match=r"frozen expert \(1, 2\)"):
        verify_frozen(parent_uri, uri, parse_trained_parts("experts:1:1", CFG))


def test_plain_checkpoints_stay_format_1(tmp_path: Path) -> None:
    uri = ckpt.save_checkpoint(str(tmp_path), "v1", model())
    raw = json.loads((Path(uri) / ckpt.MANIFEST).read_text())
    assert raw["format"] == 1 and all("path" not in e for e in raw["files"].values())
