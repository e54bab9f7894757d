"""Where results go: flag, environment, the cluster's published settings, the embedded default."""

from __future__ import annotations

import pytest

from expertmesh.platform import storage
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.lineage import Lineage, format_tree, lineage_tree
from expertmesh.platform.storage import ClusterSettings
from expertmesh.platform.tracking import ModelVersionInfo

CLUSTER = ClusterSettings(tracking_uri="http://mlflow:5000", checkpoint_root="s3://bucket/ckpt")


def test_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("EXPERTMESH_HOME", str(tmp_path))
    for var in ("MLFLOW_TRACKING_URI", "EXPERTMESH_CHECKPOINT_ROOT", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    # no cluster: the embedded default, absolute
    assert storage.checkpoint_root() == str(tmp_path / "checkpoints")
    assert storage.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    # the cluster's settings beat the default
    assert storage.checkpoint_root(published=CLUSTER) == "s3://bucket/ckpt"
    assert storage.tracking_uri(published=CLUSTER) == "http://mlflow:5000"
    # the environment beats the cluster
    monkeypatch.setenv("EXPERTMESH_CHECKPOINT_ROOT", "gs://other/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert storage.checkpoint_root(published=CLUSTER) == "gs://other"
    assert storage.tracking_uri(published=CLUSTER) == "http://env:5000"
    # a flag beats everything; a relative one is made absolute (a job's cwd is temporary)
    assert storage.checkpoint_root("rel/dir", published=CLUSTER).startswith("/")
    assert storage.tracking_uri("http://flag", published=CLUSTER) == "http://flag"


def test_http_ray_address_is_no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # a dashboard, for `ray job`
    assert not storage.on_cluster()


def test_local_paths_refused_on_multi_node_clusters() -> None:
    local = ClusterSettings(tracking_uri="http://mlflow:5000", checkpoint_root="/data/ckpt")
    storage.check_shared(local, nodes=1)
    storage.check_shared(CLUSTER, nodes=3)
    with pytest.raises(ConfigError, match="others cannot read it") as info:
        storage.check_shared(local, nodes=3)
    assert info.value.field == "checkpoint_root"
    sqlite = ClusterSettings(tracking_uri="sqlite:////data/m.db", checkpoint_root="s3://b")
    with pytest.raises(ConfigError) as info:
        storage.check_shared(sqlite, nodes=2)
    assert info.value.field == "tracking_uri"
    storage.check_shared(
        ClusterSettings(
            tracking_uri="sqlite:////nfs/m.db", checkpoint_root="/nfs/c", shared_storage=True
        ),
        nodes=2,
    )
    assert ClusterSettings.from_json(CLUSTER.to_json()) == CLUSTER


def test_lineage_tree() -> None:
    def version(v: str, parent: str, pipeline: str, parts: str, aliases=()) -> ModelVersionInfo:
        tags = Lineage(
            pipeline=pipeline,
            parent=parent,
            trained_parts=parts,
            domains=["legal"],
            data_digest="d",
            config_digest="c",
        ).tags()
        return ModelVersionInfo(
            name="m", version=v, source="/x", run_id=None, tags=tags, aliases=list(aliases)
        )

    roots = lineage_tree(
        [
            version("1", "", "train", "all", ["serving"]),
            version("2", "m/1", "finetune", "router"),
            version("3", "m/1", "finetune", "experts:1:0"),
            version("4", "m/3", "finetune", "dense"),
        ]
    )
    assert [r.ref for r in roots] == ["m/1"]
    assert [c.ref for c in roots[0].children] == ["m/2", "m/3"]
    assert roots[0].to_dict()["children"][1]["children"][0]["ref"] == "m/4"
    text = format_tree(roots)
    assert text.splitlines()[0].startswith("m/1  train  all") and "@serving" in text
    assert "├── m/2  finetune  router" in text and "    └── m/4  finetune  dense" in text
