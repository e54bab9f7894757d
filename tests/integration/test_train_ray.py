"""Training on Ray Train V2 with a real local Ray cluster, real MLflow and the real token shards:
DDP equivalence, what rank 0 logs, the registry version, and recovery from a killed worker."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch

from expertmesh.pipelines.train_ray import (
    RayTrainOptions,
    StepHook,
    token_datasets,
    train_on_ray,
)
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from expertmesh.platform.data import TokenData
from expertmesh.platform.tracking import Tracker
from expertmesh.platform.training import TrainResult, train
from expertmesh.runtime import LocalRayOptions, init_ray

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

STEPS = 8
# NOTE: 2 workers of half a logical CPU each and one torch thread: this fits a 2-core host
# next to the driver, and the runs compare like for like
OPTS = {"cpus_per_worker": 0.5, "max_failures": 0}


def small_cfg(data: DataConfig, tmp: Path, batch_size: int) -> ExperimentConfig:
    return ExperimentConfig(
        # NOTE: no Switch aux loss in the objective (still computed and logged): it is a
        # product of batch means, so a rank's own differs from the global batch's (~1e-3 here)
        # and Adam carries that into a loss gap of ~1e-3 within 8 steps; without it, 2 x b
        # and 1 x 2b differ only in summation order
        model=ModelConfig(
            d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, aux_loss_weight=0.0
        ),
        data=data,
        train=TrainConfig(
            steps=STEPS,
            batch_size=batch_size,
            seq_len=32,
            warmup_steps=2,
            eval_every=STEPS,
            eval_batches=1,
            checkpoint_every=3,
            log_every=1,
            threads=1,
            output_dir=str(tmp / "single"),
            experiment="test-train-ray",
            registered_model="test-ray",
        ),
    )


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(tracking_uri=Tracker().uri)
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def last_by_step(run_id: str, key: str) -> torch.Tensor:
    """The metric's value per step 1..STEPS (the last one logged where a step was logged twice)."""
    values = dict(sorted(history(run_id, key), key=lambda sv: sv[0]))
    return torch.tensor([values[s] for s in range(1, STEPS + 1)], dtype=torch.float64)


def kill_once(marker: Path, rank: int, step: int) -> StepHook:
    """A step hook that SIGKILLs the worker of ``rank`` after ``step``, once (the marker file
    keeps the restarted worker alive). Nested, so Ray pickles it by value."""

    def hook(world_rank: int, done: int) -> None:
        if world_rank == rank and done == step and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


@pytest.fixture(scope="module")
def ray_cluster(state_home: Path) -> Iterator[None]:
    import ray

    started = init_ray(local=LocalRayOptions(num_cpus=4))
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def two_workers(ray_cluster, prepared_data, tmp_path_factory) -> TrainResult:
    """2 workers at batch 4, uninterrupted: the reference of the tests below."""
    cfg = small_cfg(prepared_data, tmp_path_factory.mktemp("two"), batch_size=4)
    return train_on_ray(cfg, RayTrainOptions(workers=2, **OPTS))


def test_ray_data_rows_give_the_single_process_stream(ray_cluster, prepared_data) -> None:
    domains = prepared_data.train_domains
    datasets = token_datasets(os.path.abspath(prepared_data.data_dir), domains)
    for split, ds in datasets.items():
        want = TokenData.load(prepared_data.data_dir, domains, split)
        rows = ds.materialize().iter_batches(batch_size=None, batch_format="pyarrow")
        got = TokenData.from_tables(rows, domains, want.vocab_size)
        assert got.spans == want.spans, split
        assert torch.equal(got.stream, want.stream), split


def test_run_is_logged_checkpointed_and_registered(two_workers, state_home) -> None:
    client = mlflow.MlflowClient(tracking_uri=Tracker().uri)
    run = client.get_run(two_workers.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["ray_train.workers"] == "2"
    assert run.data.params["ray_train.global_batch_size"] == "8"
    assert [s for s, _ in history(two_workers.run_id, "ce_loss")] == list(range(1, STEPS + 1))
    for name in ("aux_loss/L1", "load/L1/E7", "val_loss/python", "submit_to_first_step_s"):
        assert name in run.data.metrics, name
    loads = [run.data.metrics[f"load/L0/E{e}"] for e in range(8)]
    torch.testing.assert_close(sum(loads), 1.0, rtol=0, atol=1e-9)  # float64 mean of fractions

    # Ray Train's run folder sits under the checkpoint root the local cluster publishes
    # (<home>/checkpoints) and holds the project's format
    run_dir = state_home / "checkpoints" / f"train-{two_workers.run_id}"
    assert two_workers.checkpoint_uri == str(run_dir / "step-000008")
    for step in (3, 6, 8):
        assert ckpt.read_manifest(str(run_dir / f"step-{step:06d}")).version["step"] == step
    assert ckpt.resolve(str(run_dir)) == two_workers.checkpoint_uri  # latest.json

    mv = client.get_model_version("test-ray", two_workers.model_version.version)
    assert mv.run_id == two_workers.run_id
    assert mv.tags["pipeline"] == "train" and mv.tags["ray_train.workers"] == "2"
    registered, _ = ckpt.load_model(Tracker().get_version("test-ray", mv.version).source)
    final, _ = ckpt.load_model(two_workers.checkpoint_uri)
    for (name, a), b in zip(
        registered.state_dict().items(), final.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_two_workers_at_b_train_like_one_worker_at_2b(two_workers, prepared_data, tmp_path) -> None:
    cfg = small_cfg(prepared_data, tmp_path, batch_size=8)
    one = train_on_ray(cfg, RayTrainOptions(workers=1, **OPTS), register=False)
    threads = torch.get_num_threads()
    try:
        single = train(cfg, progress=False, register=False)
    finally:
        torch.set_num_threads(threads)  # train() set the config's 1 thread for this process

    # the same step function on the same batches and weights: Ray Train with one worker
    # is the single-process loop, bit for bit
    torch.testing.assert_close(
        last_by_step(one.run_id, "loss"), last_by_step(single.run_id, "loss"), rtol=0, atol=0
    )
    # 2 x 4 rows are the 8 rows of the 1-worker batch, and DDP averages the two halves'
    # gradients: the same steps up to summation order (the z-loss is a token mean too)
    loss_two = last_by_step(two_workers.run_id, "loss")
    torch.testing.assert_close(loss_two, last_by_step(one.run_id, "loss"), rtol=0, atol=1e-5)
    assert loss_two[-1] < loss_two[0] - 0.05  # and it does learn


def test_killed_worker_resumes_from_checkpoint_and_matches(
    two_workers, prepared_data, tmp_path
) -> None:
    marker = tmp_path / "killed"
    cfg = small_cfg(prepared_data, tmp_path, batch_size=4)
    opts = RayTrainOptions(
        workers=2,
        cpus_per_worker=0.5,
        max_failures=1,
        on_step=kill_once(marker, rank=1, step=5),
    )
    resumed = train_on_ray(cfg, opts, register=False)

    assert marker.exists()  # rank 1 was SIGKILLed after step 5...
    steps = [s for s, _ in history(resumed.run_id, "loss")]
    assert steps.count(4) == 2  # ...and the group restarted from the step-3 checkpoint
    assert mlflow.MlflowClient(Tracker().uri).get_run(resumed.run_id).info.status == "FINISHED"
    # the checkpoint holds weights, optimizer, sampler and RNG state: the replayed steps and the
    # final loss equal the uninterrupted run's (same seed); gloo sums 2 ranks in a fixed order
    torch.testing.assert_close(
        last_by_step(resumed.run_id, "loss"),
        last_by_step(two_workers.run_id, "loss"),
        rtol=0,
        atol=1e-6,
    )
    a, _ = ckpt.load_model(resumed.checkpoint_uri)
    b, _ = ckpt.load_model(two_workers.checkpoint_uri)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)


def test_finetune_on_two_workers_trains_like_one_process(two_workers, prepared_data) -> None:
    """``finetune --workers 2`` at batch b against the in-process fine-tune at 2b, from the same
    parent: the same losses and weights up to summation order, the frozen parts untouched."""
    from expertmesh.pipelines.finetune import FinetuneOptions, finetune

    parent = f"test-ray/{two_workers.model_version.version}"
    steps = 4
    common = {
        "model": parent,
        "train": "router,experts:1:3",
        "steps": steps,
        "data": prepared_data.data_dir,
        "domains": ["python"],
        "seq_len": 32,
        "experiment": "test-finetune-ray",
        "overrides": ["train.threads=1"],
    }
    threads = torch.get_num_threads()
    try:
        on_ray = finetune(
            FinetuneOptions(**common, batch_size=4, ray=RayTrainOptions(workers=2, **OPTS))
        )
        single = finetune(FinetuneOptions(**common, batch_size=8))
    finally:
        torch.set_num_threads(threads)

    client = mlflow.MlflowClient(tracking_uri=Tracker().uri)
    losses = []
    for res in (on_ray, single):
        train_run = client.get_run(res.run_id).data.tags["train_run_id"]
        # the training run is the pipeline run's nested child
        assert client.get_run(train_run).data.tags["mlflow.parentRunId"] == res.run_id
        values = dict(history(train_run, "loss"))
        losses.append(torch.tensor([values[s] for s in range(1, steps + 1)], dtype=torch.float64))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-5)

    mv = client.get_model_version("test-ray", on_ray.model_version.version)
    assert (mv.tags["pipeline"], mv.tags["parent"]) == ("finetune", parent)
    a, manifest = ckpt.load_model(on_ray.checkpoint_uri)
    b, _ = ckpt.load_model(single.checkpoint_uri)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5, msg=name)
    # frozen experts are the parent's files, referenced by checksum; the trained one is new
    parent_files = ckpt.read_manifest(two_workers.checkpoint_uri).files
    assert (
        manifest.files[ckpt.expert_file(0, 3)].sha256 == parent_files[ckpt.expert_file(0, 3)].sha256
    )
    assert (
        manifest.files[ckpt.expert_file(1, 3)].sha256 != parent_files[ckpt.expert_file(1, 3)].sha256
    )
