"""Prepared data published to a URI and copied back, as pipelines on other machines read them
(``file://`` here; object stores go through the same pyarrow.fs calls)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from expertmesh.platform import data_share
from expertmesh.platform.config import DataConfig
from expertmesh.platform.data import TokenData
from expertmesh.platform.errors import ConfigError, DataError


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def prepared(prepared_data, tmp_path: Path) -> Path:
    """A private copy of the real prepared data (the tests change it)."""
    out = tmp_path / "prepared"
    shutil.copytree(prepared_data.data_dir, out)
    return out


def test_publish_then_localize_gives_the_same_folder(prepared: Path, tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/store/data/"
    assert data_share.publish(prepared, uri) == uri.rstrip("/")
    assert _tree(tmp_path / "store" / "data") == _tree(prepared)
    local = Path(data_share.localize(uri, tmp_path / "cache"))
    assert local.parent == tmp_path / "cache" / "data"
    assert _tree(local) == _tree(prepared)
    a = TokenData.load(local, ["legal"], "validation")
    b = TokenData.load(prepared, ["legal"], "validation")
    assert a.stream.equal(b.stream)
    # the second call reuses the copy, leaving no temporary folders behind
    assert data_share.localize(uri, tmp_path / "cache") == str(local)
    assert list((tmp_path / "cache" / "data").iterdir()) == [local]


def test_a_republished_uri_is_copied_again(prepared: Path, tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/store/data"
    data_share.publish(prepared, uri)
    first = data_share.localize(uri, tmp_path / "cache")
    manifest = json.loads((prepared / "prepared.json").read_text())
    manifest["note"] = "prepared again"
    (prepared / "prepared.json").write_text(json.dumps(manifest))
    data_share.publish(prepared, uri)
    second = data_share.localize(uri, tmp_path / "cache")
    assert second != first
    assert json.loads(Path(second, "prepared.json").read_text())["note"] == "prepared again"


def test_publish_is_idempotent_and_writes_the_manifest_last(prepared: Path, tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/store/data"
    data_share.publish(prepared, uri)
    stamp = (tmp_path / "store" / "data" / "tokenizer.json").stat().st_mtime_ns
    (prepared / "tokenizer.json").write_bytes(b"changed, but prepared.json is the same")
    data_share.publish(prepared, uri)  # same manifest: nothing is copied
    assert (tmp_path / "store" / "data" / "tokenizer.json").stat().st_mtime_ns == stamp


def test_a_folder_that_is_not_prepared_is_refused(prepared: Path, tmp_path: Path) -> None:
    (prepared / "prepared.json").unlink()
    with pytest.raises(DataError, match="is not prepared"):
        data_share.publish(prepared, f"file://{tmp_path}/store/data")
    assert not (tmp_path / "store").exists()


def test_a_uri_without_prepared_data_is_named(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tokenizer.json").write_text("{}")  # an interrupted publish
    with pytest.raises(DataError, match=r"half holds no prepared data"):
        data_share.localize(f"file://{tmp_path}/half", tmp_path / "cache")
    assert not (tmp_path / "cache" / "data").exists() or not any(
        (tmp_path / "cache" / "data").iterdir()
    )


def test_stage_reads_a_path_in_place_and_records_uris_as_given(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXPERTMESH_HOME", str(tmp_path / "home"))
    assert data_share.stage(str(prepared)) == (str(prepared), str(prepared.resolve()))
    uri = data_share.publish(prepared, f"file://{tmp_path}/store/data")
    local, recorded = data_share.stage(uri + "/")
    assert recorded == uri
    assert Path(local).is_relative_to(tmp_path / "home" / "cache" / "data")


def test_published_uri_is_per_preparation(prepared: Path) -> None:
    a = data_share.published_uri("s3://bucket/ckpt/", prepared)
    assert a.startswith("s3://bucket/ckpt/data/") and len(a.rsplit("/", 1)[1]) == 16
    (prepared / "prepared.json").write_text("{}")
    assert data_share.published_uri("s3://bucket/ckpt", prepared) != a


def test_publish_uri_must_be_a_uri() -> None:
    with pytest.raises(ConfigError, match="publish_uri: must be a URI"):
        DataConfig(publish_uri="/mnt/data")
    assert DataConfig(publish_uri="s3://b/data").publish_uri == "s3://b/data"
