"""Pipelines as Ray jobs on a real local Ray head with its job server: both `Cluster.submit` and a
plain `ray job submit` (Ray's own JobSubmissionClient, as its CLI calls it) land in the cluster's
MLflow store and checkpoint root; the registered versions carry their lineage, load and generate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from expertmesh import published
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.engine import Engine
from expertmesh.platform.loader import load_for_inference
from expertmesh.platform.sampling import SamplingParams
from expertmesh.runtime import free_port
from tests.integration.helpers import job_server_head

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NAME = "test-jobs"
SMALL = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_ff=96",
    "model.n_experts=4",
    "train.steps=4",
    "train.batch_size=2",
    "train.seq_len=16",
    "train.warmup_steps=1",
    "train.eval_every=4",
    "train.eval_batches=1",
    "train.checkpoint_every=4",
    "train.log_every=2",
    f"train.registered_model={NAME}",
]


@pytest.fixture(scope="module")
def cluster(state_home: Path, prepared_data) -> Iterator:
    import expertmesh

    # NOTE: the dashboard (~1 GB) is Ray's job server: only the modules that submit jobs start it
    with job_server_head(prefix="emjobs-", num_cpus=2) as dashboard:
        c = expertmesh.connect()
        published.ensure(job_server=dashboard)
        yield c
        c.shutdown()


def _generate(uri: str) -> str:
    (out,) = Engine(*load_for_inference(uri)).generate(
        ["ROMEO."], SamplingParams(max_tokens=4, ignore_eos=True)
    )
    assert len(out.output_ids) == 4
    return out.text


def test_submitted_jobs_land_in_the_clusters_store(cluster, state_home, prepared_data) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    settings = published.read()
    assert settings is not None and settings.job_server
    assert settings.checkpoint_root == str(state_home / "checkpoints")
    data = [f"data.data_dir={prepared_data.data_dir}", f"data.cache_dir={prepared_data.cache_dir}"]

    train = cluster.submit(
        "train",
        working_dir=str(REPO),
        wait=True,
        timeout_s=300,
        config="configs/tiny.yaml",
        set=SMALL + data,
        no_progress=True,
    )
    assert train.status == "SUCCEEDED", cluster.job_logs(train.submission_id)

    # a plain `ray job submit --working-dir . -- python -m ...`, as Ray's CLI sends it
    ray_client = JobSubmissionClient(settings.job_server)
    plain = ray_client.submit_job(
        entrypoint=f"python -m expertmesh.pipelines.finetune --model {NAME} --train router "
        "--steps 3 --batch-size 2 --seq-len 16 --domains shakespeare",
        runtime_env={"working_dir": str(REPO)},
    )
    deadline = time.monotonic() + 300
    while not (status := ray_client.get_job_status(plain)).is_terminal():
        assert time.monotonic() < deadline, ray_client.get_job_logs(plain)
        time.sleep(0.5)
    assert status == JobStatus.SUCCEEDED, ray_client.get_job_logs(plain)
    assert {train.submission_id, plain} <= {j.submission_id for j in cluster.jobs()}

    # MLflow's own client on the cluster's store sees both versions and their lineage
    mlflow = MlflowClient(tracking_uri=settings.tracking_uri)
    v1, v2 = sorted(mlflow.search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))
    assert v1.tags["pipeline"] == "train" and v1.tags["parent"] == ""
    assert v1.tags["ray_job_id"] == train.submission_id
    assert v1.tags["git_revision"]  # Cluster.submit sends the working dir's revision along
    assert v2.tags["pipeline"] == "finetune" and v2.tags["parent"] == f"{NAME}/1"
    assert v2.tags["trained_parts"] == "router" and v2.tags["domains"] == "shakespeare"
    assert v2.tags["ray_job_id"] == plain
    for v in (v1, v2):
        assert len(v.tags["data_digest"]) == 64 and len(v.tags["config_digest"]) == 64
    assert v1.tags["data_digest"] != v2.tags["data_digest"]  # other domains
    # the fine-tune's run has the training loop as a nested run, with its dataset
    (child,) = mlflow.search_runs(
        [mlflow.get_run(v2.run_id).info.experiment_id],
        filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{v2.run_id}'",
    )
    assert [d.dataset.name for d in child.inputs.dataset_inputs] == ["shakespeare"]

    # both checkpoints are in the cluster's store, never in a job's working directory
    sources = {str(v.version): ckpt.resolve(v.tags["expertmesh.checkpoint_uri"]) for v in (v1, v2)}
    for uri in sources.values():
        assert uri.removeprefix("file://").startswith(str(state_home)), uri
        assert "working_dir_files" not in uri
    assert sources["2"].startswith(settings.checkpoint_root)

    # router fine-tune: only the dense part (and optimizer state) written; experts bit-exact
    manifest = ckpt.read_manifest(sources["2"])
    assert manifest.written_files() == [ckpt.DENSE, ckpt.TRAIN_STATE]
    keys = manifest.expert_keys()
    before, after = ckpt.load_experts(sources["1"], keys), ckpt.load_experts(sources["2"], keys)
    for key in keys:
        for w in ("w1", "w3", "w2"):
            assert torch.equal(before[key][w], after[key][w]), key
    for uri in sources.values():
        _generate(uri)

    roots = cluster.lineage(NAME)
    assert [r.ref for r in roots] == [f"{NAME}/1"]
    assert [c.ref for c in roots[0].children] == [f"{NAME}/2"]


def test_bad_input_names_the_field(cluster, prepared_data, capsys) -> None:
    from expertmesh.pipelines import finetune

    base = ["--model", NAME, "--steps", "1", "--batch-size", "2", "--seq-len", "16"]
    cases = {
        "domains": ["--train", "router", "--domains", "klingon"],
        "data": ["--train", "router", "--data", "/nonexistent/data"],
        "train": ["--train", "experts:9:0"],
        "model": ["--train", "router", "--model", f"{NAME}/99"],
    }
    for field, extra in cases.items():
        assert finetune.main(base + extra) == 2, field
        err = capsys.readouterr().err
        assert err.startswith(f"error: {field}: "), (field, err)

    # a job on a cluster whose tracking store cannot be reached fails at once, naming it
    port = free_port()
    job = cluster.submit(
        "finetune",
        working_dir=str(REPO),
        env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
        wait=True,
        timeout_s=180,
        model=NAME,
        train="router",
        steps=1,
    )
    assert job.status == "FAILED"
    assert "error: tracking_uri: the MLflow store at" in cluster.job_logs(job.submission_id)
    # nothing half-written was registered
    assert [n.ref for n in cluster.lineage(NAME)[0].children] == [f"{NAME}/2"]


def test_versions_route(cluster) -> None:
    from expertmesh.api.app import create_app
    from expertmesh.api.deps import ApiSettings, token_digest

    app = create_app(ApiSettings(token_sha256=token_digest("t")))
    with TestClient(app) as http:
        auth = {"Authorization": "Bearer t"}
        resp = http.get(f"/api/models/{NAME}/versions", headers=auth)
        assert resp.status_code == 200, resp.text
        (root,) = resp.json()["versions"]
        assert root["ref"] == f"{NAME}/1" and root["children"][0]["trained_parts"] == "router"
        assert http.get("/api/models/nope/versions", headers=auth).status_code == 404


def test_the_http_handle_runs_jobs_and_reads_lineage(cluster) -> None:
    """``expertmesh.connect(url)`` does over the API what the Ray-side handle does."""
    import expertmesh

    port = free_port()
    remote = expertmesh.connect(cluster.serve(port=port, token="jobs-token"), token="jobs-token")
    job = remote.submit(
        "finetune",
        wait=True,
        timeout_s=300,
        poll_s=0.5,
        model=f"{NAME}/1",
        train="router",
        steps=2,
        batch_size=2,
        seq_len=16,
        domains=["shakespeare", "python"],  # a list: comma-joined, as the Ray-side handle does
    )
    assert job.status == "SUCCEEDED", remote.job_logs(job.submission_id)
    assert job.pipeline == "finetune" and "--domains shakespeare,python" in job.entrypoint
    assert job.submission_id in {j.submission_id for j in remote.jobs()}
    assert remote.job(job.submission_id) == cluster.job(job.submission_id)
    assert "registered:" in remote.job_logs(job.submission_id)
    over_http, native = remote.lineage(NAME), cluster.lineage(NAME)
    assert [n.to_dict() for n in over_http] == [n.to_dict() for n in native]
    assert sorted(c.ref for c in over_http[0].children)[-1] == f"{NAME}/3"
    runs = remote.runs("expertmesh", max_results=3)
    assert [r["run_id"] for r in runs] == [r["run_id"] for r in cluster.runs("expertmesh", 3)]
    with pytest.raises(expertmesh.ClusterError, match="no job 'nope'"):
        remote.job("nope")
    with pytest.raises(expertmesh.ClusterError, match="pipeline"):
        remote.submit("no_such_pipeline")
