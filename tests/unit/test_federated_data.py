"""The federation's client config and the non-IID split of the real legal domain by license
category (the prepared test data and the cached licensedcode-data wheel; no cluster)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from expertmesh.platform.data import TokenData, is_validation, legal_categories
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.federated.config import federation_from_dict, load_federation
from expertmesh.platform.federated.partition import read_rows, write_partitions

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_config_splits_legal_over_six_unequal_clients() -> None:
    fed = load_federation("configs/federated.yaml")
    assert len(fed.clients) >= 6 and fed.strategy == "flame"
    assert {c.k for c in fed.clients} == {1, 2, 4}
    cats = [cat for c in fed.clients for cat in c.categories or ()]
    assert len(cats) == len(set(cats))  # every category in one client at most


def test_the_clients_file_is_found_from_anywhere(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a Ray job's working directory, say
    assert len(load_federation("configs/federated.yaml").clients) >= 6
    assert load_federation(REPO / "expertmesh" / "configs" / "federated.yaml").strategy == "flame"
    with pytest.raises(ConfigError, match=r"^clients: clients file nowhere.yaml does not exist"):
        load_federation("nowhere.yaml")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"clients": [{"name": "a", "k": 1}]}, r"clients\[0\]: client 'a' needs exactly one"),
        ({"clients": [{"name": "a", "k": 0, "domain": "legal"}]}, r"clients\[0\]\.k: must be"),
        ({"clients": [{"name": "a", "k": 1, "domain": "legal", "gpus": 1}]}, r"clients\[0\]\.gpus"),
        ({"min_clients": 9}, "min_clients: 9 exceeds the 2 clients"),
        ({"strategy": "fedprox"}, "strategy: must be fedavg or flame"),
        ({"lora": {"rank": 0}}, r"lora\.rank: must be a positive integer"),
        ({"rounds": 0}, "rounds: must be a positive integer"),
        ({"clients": [{"name": "a", "k": 1, "categories": []}]}, r"clients\[0\]\.categories"),
    ],
)
def test_bad_config_names_the_field(change: dict, message: str) -> None:
    raw = {
        "clients": [
            {"name": "a", "k": 1, "categories": ["Permissive"]},
            {"name": "b", "k": 2, "domain": "python"},
        ]
    }
    with pytest.raises(ConfigError, match=message):
        federation_from_dict(raw | change)


def test_legal_categories_come_from_the_front_matter(prepared_data) -> None:
    cats = legal_categories(prepared_data.cache_dir)
    assert cats["legal/mit.LICENSE"] == "Permissive"
    assert cats["legal/gpl-2.0.LICENSE"] == "Copyleft"
    assert len(set(cats.values()) - {""}) >= 6


def test_partitions_are_non_iid_unequal_and_hold_no_validation_text(
    prepared_data, tmp_path: Path
) -> None:
    shipped = load_federation(REPO / "expertmesh" / "configs" / "federated.yaml")
    # NOTE: the three smallest clients keep the test fast (tokenizing Permissive alone takes
    # seconds); the integration test partitions the large categories
    fed = dataclasses.replace(shipped, clients=shipped.clients[3:], min_clients=None)
    parts = write_partitions(
        fed, data_dir=prepared_data.data_dir, cache_dir=prepared_data.cache_dir, out_dir=tmp_path
    )
    assert list(parts) == [c.name for c in fed.clients]
    sizes = [p.n_tokens for p in parts.values()]
    assert len(set(sizes)) == len(sizes) and max(sizes) > 3 * min(sizes)
    cats = legal_categories(prepared_data.cache_dir)
    import pyarrow.parquet as pq

    for c in fed.clients:
        p = parts[c.name]
        ids = [
            i
            for f in sorted(Path(p.path, "train").glob("*.parquet"))
            for i in pq.read_table(f, columns=["doc_id"]).column("doc_id").to_pylist()
        ]
        assert len(ids) == p.n_docs == read_rows(p)
        assert {cats[i] for i in ids} <= set(c.categories)
        assert not any(is_validation(i) for i in ids)
        assert TokenData.load(p.path, ["legal"], "train").n_tokens() >= p.n_tokens
    # written once: a second call reuses the partitions as they are
    mtime = os.stat(Path(parts["misc"].path, "prepared.json")).st_mtime_ns
    write_partitions(
        fed, data_dir=prepared_data.data_dir, cache_dir=prepared_data.cache_dir, out_dir=tmp_path
    )
    assert os.stat(Path(parts["misc"].path, "prepared.json")).st_mtime_ns == mtime


def test_an_empty_partition_or_a_missing_domain_is_named(prepared_data, tmp_path: Path) -> None:
    def fed(client: dict):
        return federation_from_dict(
            {"clients": [{"name": "ok", "k": 1, "categories": ["CLA"]}, client]}
        )

    kw = {"data_dir": prepared_data.data_dir, "cache_dir": prepared_data.cache_dir}
    with pytest.raises(ConfigError, match=r"^clients\[1\]\.categories: client 'x' has an empty"):
        write_partitions(fed({"name": "x", "k": 1, "categories": ["Nope"]}), **kw, out_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^clients\[1\]\.domain: client 'x': unknown domain"):
        write_partitions(fed({"name": "x", "k": 1, "domain": "klingon"}), **kw, out_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written before the error


def test_gpus_per_client_replaces_every_clients_request() -> None:
    from expertmesh.pipelines.federated import FederatedOptions, _overridden

    fed = load_federation("configs/federated.yaml")
    opts = FederatedOptions(model="m/1", clients="configs/federated.yaml", gpus_per_client=0.25)
    assert {c.num_gpus for c in _overridden(fed, opts).clients} == {0.25}
    assert [c.name for c in _overridden(fed, opts).clients] == [c.name for c in fed.clients]
    unchanged = FederatedOptions(model="m/1", clients="configs/federated.yaml")
    assert _overridden(fed, unchanged).clients == fed.clients
    bad = FederatedOptions(model="m/1", clients="configs/federated.yaml", gpus_per_client=-1)
    with pytest.raises(ConfigError, match="gpus_per_client: must be >= 0, got -1"):
        _overridden(fed, bad)
