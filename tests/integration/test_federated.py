"""The federated pipeline end to end on a real local Ray cluster, real MLflow store and real
Parquet partitions of the legal domain: 4 clients, 2 rounds, one client killed mid-round. The
round still counts, the run records the drop, the dead client is replaced for the next round,
and the merged model registers with its lineage and loads. Bad input is refused before any
round starts."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import ray
import yaml
from mlflow import MlflowClient

import expertmesh
from expertmesh.pipelines import federated, train
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.engine import Engine
from expertmesh.platform.loader import load_for_inference
from expertmesh.platform.sampling import SamplingParams
from expertmesh.platform.storage import tracking_uri

pytestmark = pytest.mark.integration

NAME = "test-fed"
SMALL = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=96", "model.n_experts=4", "train.steps=4", "train.batch_size=4",
    "train.seq_len=32", "train.warmup_steps=1", "train.eval_every=4", "train.eval_batches=1",
    "train.checkpoint_every=4", "train.log_every=2", f"train.registered_model={NAME}",
]  # fmt: skip
CLIENTS = [
    {"name": "permissive", "categories": ["Permissive"], "k": 4},
    {"name": "proprietary", "categories": ["Proprietary Free"], "k": 2},
    {"name": "copyleft", "categories": ["Copyleft", "Copyleft Limited"], "k": 1},
    {"name": "other", "categories": ["Commercial", "Public Domain", "CLA"], "k": 1},
]
KNOBS = {
    "strategy": "flame", "t": 1.0, "rounds": 2, "local_steps": 2, "batch_size": 4,
    "seq_len": 32, "lora": {"rank": 2, "alpha": 4}, "deadline_s": 120, "min_clients": 3,
    "eval_batches": 1,
}  # fmt: skip


def clients_file(tmp_path: Path, clients: list[dict], **knobs) -> str:
    path = tmp_path / "clients.yaml"
    cs = [{"num_cpus": 0.5, "num_gpus": 0} | c for c in clients]
    path.write_text(yaml.safe_dump(KNOBS | knobs | {"clients": cs}))
    return str(path)


@pytest.fixture(scope="module")
def parent(state_home: Path, prepared_data) -> str:
    data = [f"data.data_dir={prepared_data.data_dir}", f"data.cache_dir={prepared_data.cache_dir}"]
    argv = ["--config", "configs/tiny.yaml", "--no-progress", "--no-resume"]
    assert train.main([*argv, *[a for s in SMALL + data for a in ("--set", s)]]) == 0
    return f"{NAME}/1"


@pytest.fixture(scope="module")
def federation(
    parent: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[federated.FederatedResult, list[str]]:
    """The federation, with client ``proprietary`` killed mid-round 1; and who was killed."""
    killed: list[str] = []

    def kill_one(server_round: int, actors: dict) -> None:
        if server_round == 1:  # the tasks are out: this client dies mid-round
            ray.kill(actors["proprietary"])
            killed.append("proprietary")

    clients = clients_file(tmp_path_factory.mktemp("fed"), CLIENTS)
    opts = federated.FederatedOptions(model=parent, clients=clients, on_round_dispatched=kill_one)
    return federated.federate(opts), killed


def test_federation_survives_a_killed_client_and_registers(parent: str, federation) -> None:
    result, killed = federation
    assert killed == ["proprietary"]
    r1, r2 = result.rounds
    assert r1.dead == ["proprietary"] and len(r1.reported) == 3
    assert r2.dropped == [] and len(r2.reported) == 4  # replaced before round 2

    client = MlflowClient(tracking_uri())
    run = client.get_run(result.run_id)
    assert run.data.tags["dropped_round_1"] == "proprietary"
    dropped = {m.step: m.value for m in client.get_metric_history(result.run_id, "clients_dropped")}
    assert dropped == {1: 1.0, 2: 0.0}
    for k in (1, 2, 4):
        assert f"val_loss/legal/k{k}" in run.data.metrics
        assert f"val_loss/python/k{k}" in run.data.metrics
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert sorted(c.data.params["client"] for c in children) == sorted(c["name"] for c in CLIENTS)
    perm = next(c for c in children if c.data.params["client"] == "permissive")
    assert perm.data.params["k"] == "4" and "local_loss" in perm.data.metrics
    assert "activation/L0/E3" in perm.data.metrics

    mv = client.get_model_version(NAME, result.model_version.version)
    assert mv.tags["pipeline"] == "federated" and mv.tags["parent"] == parent
    assert mv.tags["rounds"] == "2" and mv.tags["strategy"] == "flame(t=1.0)"
    assert mv.tags["budgets"] == "permissive:4,proprietary:2,copyleft:1,other:1"
    # only expert files were written; the dense part is the parent's, referenced
    manifest = ckpt.read_manifest(ckpt.resolve(mv.source))
    assert manifest.files[ckpt.DENSE].path is not None
    assert manifest.files[ckpt.expert_file(0, 0)].path is None
    model, tok = load_for_inference(ckpt.resolve(mv.source))
    (out,) = Engine(model, tok).generate(["Permission is"], SamplingParams(max_tokens=4))
    assert len(out.output_ids) >= 1


def test_the_merged_version_goes_live_by_upgrade(parent: str, federation) -> None:
    """A cluster serving the parent upgrades to the federated version: the shards read only
    the merged experts, and the cluster then generates what the merged checkpoint does."""
    result, _ = federation
    target = f"{NAME}/{result.model_version.version}"
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    model, tok = load_for_inference(ckpt.resolve(result.model_version.source))
    (want,) = Engine(model, tok).generate(["Permission is hereby"], params)
    with (
        tempfile.TemporaryDirectory(prefix="emfed-") as ray_tmp,
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setenv("EXPERTMESH_RAY_TMP", ray_tmp)  # a cluster of its own, not the clients'
        cluster = expertmesh.connect()
        try:
            cluster.deploy(parent, shards=2, replicas=1, warm_shards=0)
            before = cluster.generate("Permission is hereby", max_tokens=6, ignore_eos=True)
            out = cluster.upgrade(target)
            assert out["upgraded"]["to"] == target, out["upgraded"]
            after = cluster.generate("Permission is hereby", max_tokens=6, ignore_eos=True)
            assert cluster.status()["versions"][0]["label"] == target
        finally:
            cluster.shutdown()
    assert before.completion_tokens == 6
    assert after.token_ids == want.output_ids
    # the experts the federation merged, and only they, were new to the shards
    manifest = ckpt.read_manifest(ckpt.resolve(result.model_version.source))
    merged = [f for f in manifest.written_files() if f != ckpt.DENSE and "expert" in f]
    assert out["upgraded"]["experts_changed"] == len(merged) > 0


@pytest.mark.parametrize(
    "change,message",
    [
        ({1: {"k": 8}}, "clients[1].k: client 'proprietary': budget k=8 exceeds the model's 4"),
        (
            {0: {"categories": ["No Such Category"]}},
            "clients[0].categories: client 'permissive' has an empty partition",
        ),
        (
            {2: {"categories": None, "domain": "klingon"}},
            "clients[2].domain: client 'copyleft': unknown domain 'klingon'",
        ),
    ],
)
def test_bad_input_is_refused_before_any_round(
    parent: str, tmp_path: Path, change: dict, message: str, capsys
) -> None:
    clients = [dict(c) for c in CLIENTS]
    for i, fields in change.items():
        clients[i] |= fields
        clients[i] = {k: v for k, v in clients[i].items() if v is not None}
    mlflow = MlflowClient(tracking_uri())
    runs_before = len(
        mlflow.search_runs([mlflow.get_experiment_by_name("expertmesh").experiment_id])
    )
    argv = ["--model", parent, "--clients", clients_file(tmp_path, clients)]
    assert federated.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not ray.is_initialized()  # no cluster, no client was started
    runs_after = len(
        mlflow.search_runs([mlflow.get_experiment_by_name("expertmesh").experiment_id])
    )
    assert runs_after == runs_before
