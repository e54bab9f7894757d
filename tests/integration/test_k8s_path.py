"""The path the KubeRay deployment takes, run for real on one machine.

`mlflow server` on PostgreSQL with a served artifact store; the training pipeline submitted as
a Ray job (its entrypoint from the RayJob manifest) logs and registers there and publishes its
prepared data; the add-expert pipeline, submitted the same way with a home of its own (another
pod's disk), grows that version from the published data and registers the child; then the
RayService's serve config goes to the same cluster through the dashboard's Serve API (what
KubeRay does), so Serve imports ``expertmesh.api.serve_app:build_app``, which deploys the
child, and the API and the SDK answer with it.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

import expertmesh
from expertmesh.runtime import free_port
from tests.integration.helpers import job_server_head
from tests.integration.tracking_server import mlflow_server, pg_bin, postgres

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        pg_bin("pg_ctl") is None, reason="PostgreSQL is not installed (`make test-deps`)"
    ),
]

REPO = Path(__file__).resolve().parents[2]
MODEL = "expertmesh-k8s-path"
TOKEN = "k8s-path-token-0123456789"
# the tiny config made smaller still: the test checks the path, not the model
SMALL = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_ff=96",
    "train.steps=2",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.warmup_steps=0",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.checkpoint_every=2",
    "train.log_every=1",
    f"train.registered_model={MODEL}",
]


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    artifacts = tmp_path_factory.mktemp("mlflow") / "artifacts"
    artifacts.mkdir()
    with postgres() as db, mlflow_server(db.uri, artifacts) as url:
        yield url


def _manifest(name: str, kind: str) -> dict:
    for path in sorted((REPO / "k8s" / "base").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            # (the JSON patches beside the objects are lists)
            if isinstance(doc, dict) and doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise LookupError(f"{kind}/{name} not in k8s/base")


def _train_entrypoint(output_dir: Path, data, published: str) -> str:
    argv = shlex.split(_manifest("expertmesh-train", "RayJob")["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "expertmesh.pipelines.train"]
    sets = [
        *SMALL,
        f"train.output_dir={output_dir}",
        f"data.data_dir={data.data_dir}",
        f"data.cache_dir={data.cache_dir}",
        # on the cluster the checkpoint root is an object store and training publishes there
        # by itself; here the root is a local folder, so the test names the place
        f"data.publish_uri={published}",
    ]
    # the manifest's flags (config, no progress bars) with local paths instead of the pod's
    keep = [a for a in argv[3:] if not a.startswith(("train.", "data.")) and a != "--set"]
    return shlex.join(
        [sys.executable, "-m", argv[2], *keep, *(x for s in sets for x in ("--set", s))]
    )


def _add_expert_entrypoint() -> str:
    """The manifest's add-expert job, on the small model, with a few short steps."""
    argv = shlex.split(_manifest("expertmesh-add-expert", "RayJob")["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "expertmesh.pipelines.add_expert"]
    argv[argv.index("--model") + 1] = MODEL
    short = ["--layers", "1", "--steps", "2", "--batch-size", "2", "--replay-rows", "2"]
    return shlex.join([sys.executable, *argv[1:], *short, "--seq-len", "32"])


def _wait(what: str, check, timeout_s: float, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        done = check()
        if done:
            return done
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:.0f}s")
        time.sleep(poll_s)


def test_job_registers_on_mlflow_server_and_rayservice_config_serves_it(
    state_home: Path, prepared_data, tracking: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    api_port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        # what the pods get from the manifests: the tracking server and the API token
        mp.setenv("MLFLOW_TRACKING_URI", tracking)
        mp.setenv("EXPERTMESH_TOKEN", TOKEN)
        mp.setenv("EXPERTMESH_CHECKPOINT_ROOT", str(tmp_path / "checkpoints"))
        with job_server_head(prefix="emk8s-") as dashboard:
            try:
                jobs = JobSubmissionClient(dashboard)

                published = f"file://{tmp_path}/object-store/data"
                env = {
                    "MLFLOW_TRACKING_URI": tracking,
                    "EXPERTMESH_CHECKPOINT_ROOT": str(tmp_path / "checkpoints"),
                }

                def submit() -> str | None:
                    try:
                        return jobs.submit_job(
                            entrypoint=_train_entrypoint(
                                tmp_path / "ckpt", prepared_data, published
                            ),
                            runtime_env={"env_vars": env},
                        )
                    except RuntimeError as exc:  # the head's agent starts after the dashboard
                        if "No available agent" not in str(exc):
                            raise
                        return None

                # NOTE: generous bounds: ~65 s in all on a quiet 2-core machine, several times that
                # when other sessions share it
                job = _wait("the job server to take a job", submit, timeout_s=180)
                status = _wait(
                    "the training job to finish",
                    lambda: (s := jobs.get_job_status(job)).is_terminal() and s,
                    timeout_s=300,
                )
                assert status == JobStatus.SUCCEEDED, jobs.get_job_logs(job)[-3000:]

                # MLflow's own client, on the server: the run, its metrics and the new version
                client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
                (base,) = client.search_model_versions(f"name='{MODEL}'")
                run = client.get_run(base.run_id)
                assert run.info.status == "FINISHED" and "ce_loss" in run.data.metrics
                assert base.source.startswith("mlflow-artifacts:"), base.source
                assert base.tags["data_uri"] == published

                # the next pipeline's job, in a "pod" whose disk never saw the prepared data
                other_pod = {**env, "EXPERTMESH_HOME": str(tmp_path / "other-pod")}
                job = jobs.submit_job(
                    entrypoint=_add_expert_entrypoint(), runtime_env={"env_vars": other_pod}
                )
                status = _wait(
                    "the add-expert job to finish",
                    lambda: (s := jobs.get_job_status(job)).is_terminal() and s,
                    timeout_s=300,
                )
                assert status == JobStatus.SUCCEEDED, jobs.get_job_logs(job)[-3000:]
                version = client.get_model_version(MODEL, "2")
                assert version.tags["pipeline"] == "add_expert"
                assert version.tags["parent"] == f"{MODEL}/{base.version}"
                assert version.tags["data_uri"] == published
                assert (tmp_path / "other-pod" / "cache" / "data").is_dir()
                # the child's own files stay in the checkpoint root (a shared mount here); the
                # server registered a reference to them, logged in the run's artifacts
                assert version.source.startswith("mlflow-artifacts:"), version.source

                # the RayService's serve config, as KubeRay submits it, for that version
                svc = _manifest("expertmesh", "RayService")
                config = yaml.safe_load(svc["spec"]["serveConfigV2"])
                config["http_options"] = {"host": "127.0.0.1", "port": api_port}
                (app,) = config["applications"]
                app["args"] |= {
                    "model": MODEL,
                    "version": version.version,
                    "shards": 2,
                    "replicas": 1,
                    "num_cpus": 0.25,
                    "resources": {},  # this one node offers no `expert_shard`
                    "warm_shards": 0,
                    "autoscale": False,
                    "model_wait_s": 30,
                }
                serve_api = ServeSubmissionClient(dashboard)
                serve_api.deploy_applications(config)

                def app_status() -> str | None:
                    apps = serve_api.get_serve_details().get("applications", {})
                    status = apps.get(app["name"], {}).get("status")
                    if status == "DEPLOY_FAILED":
                        raise AssertionError(apps[app["name"]].get("message"))
                    return status == "RUNNING" and status

                _wait("the serve application to run", app_status, timeout_s=240)
                url = f"http://127.0.0.1:{api_port}"
                with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
                    assert http.get("/api/health").json()["model_ready"] is True
                    resp = http.post(
                        "/v1/completions",
                        json={"model": MODEL, "prompt": "ROMEO.", "max_tokens": 4},
                        headers={"Authorization": f"Bearer {TOKEN}"},
                    )
                    assert resp.status_code == 200, resp.text
                    assert resp.json()["usage"]["completion_tokens"] >= 1
                    assert http.get("/v1/models").status_code == 401  # the Secret's token only

                cluster = expertmesh.connect()  # joins the running cluster
                assert cluster.status()["checkpoint_uri"] == version.source
                out = cluster.generate("ROMEO.", max_tokens=4, ignore_eos=True)
                assert out.completion_tokens == 4
                cluster.shutdown()
            finally:
                from ray import serve

                serve.shutdown()
