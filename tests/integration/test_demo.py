"""``make demo`` end to end, on a short schedule: train and register the base model, serve it on
a local Ray cluster, grow it by a legal expert per MoE layer, upgrade live under load with no
failed request, and find both versions cached on the next run."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from expertmesh.pipelines import demo
from expertmesh.platform.tracking import Tracker

pytestmark = pytest.mark.integration

NAME = "demo-tiny"


def args(data_dir: str, cache_dir: str) -> list[str]:
    sets = {
        "data.data_dir": data_dir,  # the session's prepared data: no second tokenizing pass
        "data.cache_dir": cache_dir,
        "train.steps": 20,
        "train.batch_size": 8,
        "train.seq_len": 64,
        "train.warmup_steps": 5,
        "train.eval_every": 20,
        "train.eval_batches": 2,
        "train.checkpoint_every": 20,
        "train.registered_model": NAME,
    }
    out = ["--shards", "2", "--replicas", "2", "--max-tokens", "8", "--expert-steps", "10"]
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return [*out, "--no-wait"]


def new_expert_share(completions: dict, domain: str) -> float:
    """The share of ``domain``'s routed tokens that the last expert of each layer served."""
    counts = [c.expert_counts for c in completions[domain]]
    per_layer = []
    for layer in range(len(counts[0])):
        row = [sum(col) for col in zip(*(c[layer] for c in counts), strict=True)]
        per_layer.append(row[-1] / sum(row))
    return sum(per_layer) / len(per_layer)


def test_demo_grows_the_served_model_live(state_home: Path, prepared_data) -> None:
    argv = args(prepared_data.data_dir, prepared_data.cache_dir)
    res = demo.run(demo.build_parser().parse_args(argv))

    assert res.base == f"{NAME}/1" and res.grown == f"{NAME}/2"
    mlflow = MlflowClient(Tracker().uri)
    base = mlflow.get_model_version(NAME, "1")
    grown = mlflow.get_model_version(NAME, "2")
    assert base.tags["pipeline"] == "train"
    assert (grown.tags["pipeline"], grown.tags["parent"], grown.tags["domains"]) == (
        "add_expert",
        f"{NAME}/1",
        "legal",
    )
    assert str(mlflow.get_model_version_by_alias(NAME, "serving").version) == "2"

    # every domain's prompts answered on both versions; the base has 8 experts per layer
    for outs in res.completions.values():
        assert all(c.completion_tokens == 8 for c in outs)
        assert all(len(row) == 8 for c in outs for row in c.expert_counts)
    assert res.completions_after is not None
    for outs in res.completions_after.values():
        assert all(len(row) == 9 for c in outs for row in c.expert_counts)

    up = res.upgrade
    assert up is not None and up.failed == [] and up.requests > 0
    # only the new experts were read (one file per layer, on each of 2 replicas)
    n_moe = len(res.completions_after["legal"][0].expert_counts)
    assert up.upgraded["files_loaded"] == 2 * n_moe
    assert 0 < up.upgraded["bytes_loaded"] < up.model_bytes / 4
    # the new expert serves tokens (that it takes the legal ones on a trained model, not on
    # this 20-step one, is bench/add_expert.py's measure)
    assert new_expert_share(res.completions_after, "legal") > 0

    # the next run trains nothing: both versions come from the registry
    cfg_args = demo.build_parser().parse_args(argv)
    tracker = Tracker()
    assert demo.ensure_model(cfg_args.config, tracker, cfg_args.set) == f"{NAME}/1"
    assert demo.ensure_domain_expert(f"{NAME}/1", tracker, "legal", 10) == f"{NAME}/2"
    assert [v.version for v in tracker.versions(NAME)] == ["1", "2"]
