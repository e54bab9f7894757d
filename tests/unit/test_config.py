"""Typed configs: bad values and unknown keys raise ConfigError naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertmesh.platform.config import (
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    from_dict,
    load_config,
    to_dict,
)
from expertmesh.platform.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def field_of(exc_info: pytest.ExceptionInfo[ConfigError]) -> str:
    return exc_info.value.field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_experts": 4, "top_k": 5}, "top_k"),
        ({"d_model": 0}, "d_model"),
        ({"n_layers": -1}, "n_layers"),
        ({"d_ff": 0}, "d_ff"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"router": "random"}, "router"),
        ({"router": "switch", "top_k": 2}, "top_k"),
        ({"d_model": 100, "n_heads": 8}, "n_heads"),
        ({"n_heads": 8, "n_kv_heads": 3}, "n_kv_heads"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"routed_scale": 0.0}, "routed_scale"),
        ({"aux_loss_weight": -1.0}, "aux_loss_weight"),
        ({"balance_bias_rate": -0.001}, "balance_bias_rate"),
        ({"router": "switch", "top_k": 1, "balance_bias_rate": 0.001}, "balance_bias_rate"),
        ({"router": "expert_choice", "balance_bias_rate": 0.001}, "balance_bias_rate"),
        ({"router": "hash", "balance_bias_rate": 0.001}, "balance_bias_rate"),
    ],
)
def test_bad_model_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    assert field_of(err) == field
    assert str(err.value).startswith(f"{field}: ")


def test_bad_train_config_names_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig(dtype="float16")  # type: ignore[arg-type]
    assert field_of(err) == "dtype"
    with pytest.raises(ConfigError) as err:
        TrainConfig(min_lr_ratio=2.0)
    assert field_of(err) == "min_lr_ratio"
    with pytest.raises(ConfigError) as err:
        TrainConfig(device="gpu")
    assert field_of(err) == "device"


def test_training_device_resolves_to_what_this_machine_has() -> None:
    import torch

    from expertmesh.platform.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "tpu", "meta"):
        with pytest.raises(ConfigError) as err:
            resolve_device(bad)
        assert field_of(err) == "device"
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    if not torch.cuda.is_available():  # CI's machines: a clear error, not a crash mid-training
        with pytest.raises(ConfigError) as err:
            resolve_device("cuda:0")
        assert field_of(err) == "device" and "no CUDA GPU" in str(err.value)


def test_shipped_tiny_config_loads_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a container or Ray job runs in a folder with no checkout: configs/ is package data
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/tiny.yaml")
    assert cfg.model.n_experts == 8 and cfg.model.top_k == 2 and cfg.model.router == "topk"
    assert cfg.model.moe_layers == [0, 1, 2, 3]
    # a file of that name in the working folder wins (a user's edited copy)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("model:\n  n_experts: 4\n")
    assert load_config("configs/tiny.yaml").model.n_experts == 4
    with pytest.raises(ConfigError, match=r"does not exist \(shipped configs: .*configs/tiny.yaml"):
        load_config("configs/nope.yaml")


def test_no_top_level_configs_that_would_not_ship() -> None:
    # configs live in expertmesh/configs so wheels and images carry them
    stray = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert not stray, f"move {stray} to expertmesh/configs/ (package data)"


def test_yaml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 64\n  n_heads: 4\n  n_kv_heads: 2\ntrain:\n  steps: 10\n")
    cfg = load_config(path, ["train.steps=3", "model.router=hash", "train.betas=[0.8, 0.9]"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.model.d_model == 64 and cfg.model.router == "hash"
    assert cfg.train.steps == 3 and cfg.train.betas == (0.8, 0.9)
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg  # round trips through plain dicts


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "field"),
    [
        ("model:\n  n_expert: 4\n", [], "model.n_expert"),
        ("train:\n  steps: 10\n", ["train.stepz=3"], "train.stepz"),
        ("bogus:\n  x: 1\n", [], "bogus"),
        ("model:\n  top_k: 99\n", [], "model.top_k"),
        ("model:\n  d_model: 0\n", [], "model.d_model"),
        ("", ["model.router=random"], "model.router"),
    ],
)
def test_yaml_errors_name_the_key(
    tmp_path: Path, yaml_text: str, overrides: list[str], field: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert field_of(err) == field


def test_malformed_override_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(path, ["steps=3"])
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "missing.yaml")
    assert field_of(err) == "config"
