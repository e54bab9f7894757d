"""The add_expert pipeline end to end on real data: a tiny model trained on two domains grows
a legal expert, is verified, written as a content-addressed checkpoint and registered with its
lineage in a real MLflow store; bad input is refused before anything is registered.

The parent's training publishes its prepared data to a URI (as it does to an object store on a
cluster), so add_expert reads them from there, through a copy in its own cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from expertmesh.pipelines import add_expert, train
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.devices import resolve_device
from expertmesh.platform.engine import Engine
from expertmesh.platform.loader import load_for_inference
from expertmesh.platform.sampling import SamplingParams
from expertmesh.platform.storage import tracking_uri

pytestmark = pytest.mark.integration

NAME = "test-grow"
SMALL = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=96", "model.n_experts=4", "train.steps=6", "train.batch_size=4",
    "train.seq_len=32", "train.warmup_steps=1", "train.eval_every=6", "train.eval_batches=1",
    "train.checkpoint_every=6", "train.log_every=3", f"train.registered_model={NAME}",
]  # fmt: skip
GROW = ["--steps", "4", "--batch-size", "2", "--replay-rows", "2", "--seq-len", "32"]


@pytest.fixture(scope="module")
def published(state_home: Path) -> str:
    return f"file://{state_home}/published/test-grow-data"


@pytest.fixture(scope="module")
def parent(state_home: Path, prepared_data, published: str) -> str:
    data = [f"data.data_dir={prepared_data.data_dir}", f"data.cache_dir={prepared_data.cache_dir}"]
    data.append(f"data.publish_uri={published}")
    argv = ["--config", "configs/tiny.yaml", "--no-progress", "--no-resume"]
    assert train.main([*argv, *[a for s in SMALL + data for a in ("--set", s)]]) == 0
    return f"{NAME}/1"


def test_add_expert_grows_trains_and_registers(
    parent: str, published: str, state_home: Path, prepared_data, capsys
) -> None:
    assert add_expert.main(["--model", parent, "--domain", "legal", "--layers", "1", *GROW]) == 0
    printed = capsys.readouterr().out
    assert "val_loss/legal" in printed and "registered: test-grow version 2" in printed
    client = MlflowClient(tracking_uri())
    mv = client.get_model_version(NAME, "2")
    assert mv.tags["pipeline"] == "add_expert" and mv.tags["parent"] == parent
    # both versions name the published data, which add_expert read through its own copy
    assert client.get_model_version(NAME, "1").tags["data_uri"] == published
    assert mv.tags["data_uri"] == published
    (copy,) = (state_home / "cache" / "data").iterdir()
    original = Path(prepared_data.data_dir)
    for name in ("prepared.json", "tokenizer.json"):
        assert (copy / name).read_bytes() == (original / name).read_bytes()
    assert sorted(p.name for p in (copy / "train").iterdir()) == sorted(
        p.name for p in (original / "train").iterdir()
    )
    assert mv.tags["added_experts"] == "1:4" and mv.tags["domains"] == "legal"
    run = client.get_run(mv.run_id)
    assert {"val_loss/legal", "parent_val_loss/legal", "new_expert_share/python/L1"} <= set(
        run.data.metrics
    )
    # --device defaults to auto: the experts trained where resolve_device put them
    assert run.data.params["grow.device"] == "auto"
    assert run.data.params["grow.resolved_device"] == str(resolve_device("auto"))
    # layer 1 grew to 5 experts, layer 0 kept 4; only the new expert and the dense part
    # (whose gate grew) were written, everything else is referenced in the parent
    child_uri = ckpt.resolve(mv.source)
    manifest = ckpt.read_manifest(child_uri)
    assert manifest.config.layer_experts == {1: 5} and manifest.config.experts_in(0) == 4
    parent_files = ckpt.read_manifest(ckpt.resolve(client.get_model_version(NAME, "1").source))
    written = {p for p, f in manifest.files.items() if f.path is None}
    assert {p for p in written if p.endswith(".safetensors")} == {
        "dense.safetensors",
        ckpt.expert_file(1, 4),
    }
    assert len(manifest.files) == len(parent_files.files) + 1
    model, tok = load_for_inference(child_uri)
    (out,) = Engine(model, tok).generate(["Permission is"], SamplingParams(max_tokens=4))
    assert len(out.output_ids) >= 1


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--domain", "klingon"], "domain: unknown domain 'klingon'"),
        (["--domain", "python"], "domain: 'python' is one of the base domains"),
        (["--domain", "legal", "--layers", "7"], "layers: [7] are not MoE layers"),
        (["--domain", "legal", "--per-layer", "0"], "per_layer: must be a positive integer"),
        (["--domain", "legal", "--device", "tpu"], "device: must be auto, cpu, cuda or cuda:N"),
        # no GPU here, or not 100 of them on a GPU machine: refused before any work either way
        (["--domain", "legal", "--device", "cuda:99"], "device: 'cuda:99': "),
    ],
)
def test_bad_input_is_refused_and_nothing_registered(
    parent: str, extra: list[str], message: str, capsys
) -> None:
    before = len(MlflowClient(tracking_uri()).search_model_versions(f"name='{NAME}'"))
    assert add_expert.main(["--model", parent, *extra, *GROW]) == 2
    assert message in capsys.readouterr().err
    after = len(MlflowClient(tracking_uri()).search_model_versions(f"name='{NAME}'"))
    assert after == before


def test_a_version_that_does_not_exist_is_named(parent: str, capsys) -> None:
    assert add_expert.main(["--model", f"{NAME}/99", "--domain", "legal", *GROW]) == 2
    assert "model:" in capsys.readouterr().err
