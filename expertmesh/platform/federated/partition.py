"""Each client's private data partition: the non-IID split of the legal domain by license
category (licensedcode-data's ``category:`` header), or a whole domain, as Parquet shards.

A partition is a small prepared data directory of its own (``prepared.json``, ``train/*.parquet``
with the usual ``domain``, ``doc_id``, ``tokens`` columns), so the client reads it with
:class:`~expertmesh.platform.data.TokenData` and nothing else ever opens it. Documents of the
shared validation split (:func:`~expertmesh.platform.data.is_validation`) are left out of every
partition: the server's validation loss is measured on text no client trained on.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from expertmesh.platform import lineage
from expertmesh.platform.data import (
    DOMAINS,
    FORMAT_VERSION,
    _atomic_write,
    is_validation,
    iter_documents,
    legal_categories,
    load_tokenizer,
    read_manifest,
    write_shards,
)
from expertmesh.platform.errors import ConfigError, DataError
from expertmesh.platform.federated.config import ClientConfig, FederationConfig

PARTITION_SHARD_TOKENS = 2_000_000


@dataclass(kw_only=True, slots=True, frozen=True)
class Partition:
    client: str
    path: str  # a prepared data directory with one train domain
    domain: str
    n_docs: int
    n_tokens: int


def check_domains(fed: FederationConfig, data_dir: str) -> None:
    """Every client's domain is known and prepared in ``data_dir``: a :class:`ConfigError`
    naming the client's field otherwise (cheap; runs before anything is tokenized)."""
    try:
        prepared = read_manifest(data_dir)
    except DataError as exc:
        raise ConfigError("data", str(exc)) from None
    have = set(prepared.get("splits", {}).get("train", {}))
    for c in fed.clients:
        field = f"{c.where}.domain" if c.domain is not None else f"{c.where}.categories"
        if c.data_domain not in DOMAINS:
            raise ConfigError(
                field,
                f"client {c.name!r}: unknown domain {c.data_domain!r}; known: {', '.join(DOMAINS)}",
            )
        if c.data_domain not in have:
            raise ConfigError(
                field, f"client {c.name!r}: domain {c.data_domain!r} is not prepared in {data_dir}"
            )


def _client_docs(
    c: ClientConfig, data_dir: str, cache_dir: str, categories: dict[str, str]
) -> list[tuple[str, str]]:
    """(doc_id, text) of the client's training documents, in a stable order."""
    docs = iter_documents(c.data_domain, cache_dir)
    if c.categories is not None:
        want = set(c.categories)
        docs = (d for d in docs if categories.get(d[0]) in want)
    return [(doc_id, text) for doc_id, text in docs if not is_validation(doc_id)]


def partition_digest(fed: FederationConfig, data_dir: str) -> str:
    """Identifies the partitions: the clients' data choices and the source data's records."""
    domains = sorted({c.data_domain for c in fed.clients})
    choice = [(c.name, c.data_domain, c.categories) for c in fed.clients]
    return lineage.digest({"clients": choice, "data": lineage.data_digest(data_dir, domains)})


def write_partitions(
    fed: FederationConfig, *, data_dir: str, cache_dir: str, out_dir: str | Path
) -> dict[str, Partition]:
    """Split, tokenize (with ``data_dir``'s tokenizer: the model's) and write every client's
    partition under ``out_dir/<client>``; reused when already written for the same digest.

    An empty partition (no document in its categories outside the validation split, or fewer
    tokens than one training window) is a :class:`ConfigError` naming the client's field.
    """
    check_domains(fed, data_dir)
    out = Path(out_dir)
    digest = partition_digest(fed, data_dir)
    tok = None
    categories = legal_categories(cache_dir) if any(c.categories for c in fed.clients) else {}
    known = Counter(categories.values())
    parts: dict[str, Partition] = {}
    todo: dict[str, list[tuple[str, str]]] = {}
    for c in fed.clients:
        where = out / c.name
        manifest_path = where / "prepared.json"
        if manifest_path.is_file():
            m = json.loads(manifest_path.read_text())
            if m.get("partition_digest") == digest:
                entry = m["splits"]["train"][c.data_domain]
                parts[c.name] = Partition(
                    client=c.name,
                    path=str(where),
                    domain=c.data_domain,
                    n_docs=entry["docs"],
                    n_tokens=entry["tokens"],
                )
                continue
        # NOTE: every client's documents are found before any is tokenized, so an empty
        # partition is refused at once, whichever client it is
        todo[c.name] = docs = _client_docs(c, data_dir, cache_dir, categories)
        if not docs:
            field = f"{c.where}.categories" if c.categories else f"{c.where}.domain"
            cats = f" in categories {list(c.categories)}" if c.categories else ""
            raise ConfigError(
                field,
                f"client {c.name!r} has an empty partition: no training documents{cats}; "
                f"categories with documents: {dict(sorted(known.items()))}",
            )
    for c in fed.clients:
        if c.name not in todo:
            continue
        where, docs = out / c.name, todo[c.name]
        manifest_path = where / "prepared.json"
        if tok is None:
            tok = load_tokenizer(data_dir)
            tok.encode_special_tokens = True  # as data.build_dataset: literal specials are text
        encodings = tok.encode_batch([text for _, text in docs], add_special_tokens=False)
        rows = [(d[0], e.ids) for d, e in zip(docs, encodings, strict=True)]
        n_tokens = sum(len(ids) for _, ids in rows)
        # NOTE: TokenData.sample needs seq_len + 1 tokens; fewer cannot train even one step
        if n_tokens < fed.seq_len + 1:
            raise ConfigError(
                f"{c.where}.categories" if c.categories else f"{c.where}.domain",
                f"client {c.name!r} has an empty partition: {n_tokens} tokens, fewer than "
                f"seq_len + 1 = {fed.seq_len + 1}",
            )
        (where / "train").mkdir(parents=True, exist_ok=True)
        manifest_path.unlink(missing_ok=True)
        shards = write_shards(where / "train", c.data_domain, rows, PARTITION_SHARD_TOKENS)
        manifest = {
            "format": FORMAT_VERSION,
            "partition_digest": digest,
            "client": c.name,
            "categories": list(c.categories or []),
            "tokenizer_vocab_size": tok.get_vocab_size(),
            "splits": {
                "train": {c.data_domain: {"docs": len(rows), "tokens": n_tokens, "shards": shards}}
            },
        }
        _atomic_write(manifest_path, lambda tmp, m=manifest: tmp.write_text(json.dumps(m)))
        parts[c.name] = Partition(
            client=c.name,
            path=str(where),
            domain=c.data_domain,
            n_docs=len(rows),
            n_tokens=n_tokens,
        )
    return parts


def read_rows(partition: Partition) -> int:
    """Rows (documents) in a partition's shards (a cheap integrity check for tests)."""
    return sum(
        pq.read_metadata(p).num_rows for p in Path(partition.path, "train").glob("*.parquet")
    )
