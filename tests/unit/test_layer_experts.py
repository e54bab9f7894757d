"""Models whose MoE layers differ in expert count (a layer grown by add_expert)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.config import ModelConfig, from_dict, to_dict
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.hf import export_hf
from expertmesh.platform.model import MoETransformer

BASE = dict(vocab_size=128, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, n_experts=4)


def test_layer_counts_read_from_json_keys_and_list_every_expert() -> None:
    cfg = ModelConfig(**BASE, layer_experts={"1": 6, 2: 4})  # 4 is the default: dropped
    assert cfg.layer_experts == {1: 6}
    assert [cfg.experts_in(i) for i in range(3)] == [4, 6, 4]
    assert cfg.max_experts == 6 and not cfg.uniform_experts
    assert len(cfg.expert_keys()) == 14 and (1, 5) in cfg.expert_keys()
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg  # through a manifest's JSON and back


@pytest.mark.parametrize(
    "layer_experts,message",
    [({3: 5}, "layer 3 is not an MoE layer"), ({0: 1}, "count >= top_k=2"), ({"x": 5}, "'x'")],
)
def test_bad_layer_counts_name_the_field(layer_experts: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        ModelConfig(**BASE, layer_experts=layer_experts)
    assert err.value.field == "layer_experts"


def test_a_model_with_a_grown_layer_runs_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**BASE, layer_experts={1: 6})).eval()
    assert model.moe_layers()[1].gate.weight.shape == (6, 32)
    assert model.moe_layers()[1].experts.w13.shape[0] == 6
    tokens_BT = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        out = model(tokens_BT, return_routing=True)
    assert out.layer_stats[1].counts_E.shape == (6,) and out.layer_stats[0].counts_E.shape == (4,)
    uri = ckpt.save_checkpoint(str(tmp_path), "grown", model)
    assert (1, 5) in ckpt.read_manifest(uri).expert_keys()
    loaded, _ = ckpt.load_model(uri)
    with torch.no_grad():
        assert torch.equal(loaded(tokens_BT).logits, out.logits)


def test_hugging_face_export_refuses_differing_counts(tmp_path: Path) -> None:
    model = MoETransformer(ModelConfig(**BASE, layer_experts={1: 6}))
    with pytest.raises(ConfigError, match="one expert count for every layer") as err:
        export_hf(model, str(tmp_path / "hf"))
    assert err.value.field == "layer_experts"
