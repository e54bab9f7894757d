"""Prepared data that pipelines on other machines can read.

The training pipeline prepares its data on the machine it runs on. On one machine every later
pipeline (fine-tune, add-expert, federated) reads that folder in place. On a cluster, a later
pipeline runs in another pod, often after the first is gone, so the prepared folder must live
where every pod reaches it: :func:`publish` copies it to a ``pyarrow.fs`` URI (``s3://``,
``gs://``, ``file://`` on a shared mount) and the registered version records that URI as its
``data_uri``; :func:`localize` copies it back to the reading machine's cache once.

A published folder is complete when its ``prepared.json`` exists: it is written last, as
:func:`expertmesh.platform.data.prepare` writes it last locally.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from pyarrow import fs

from expertmesh.platform.data import read_manifest
from expertmesh.platform.errors import DataError

MANIFEST = "prepared.json"


def is_uri(ref: str) -> bool:
    """Whether ``ref`` is a URI (staged locally before use) rather than a plain path."""
    return "://" in ref


def _open(uri: str) -> tuple[fs.FileSystem, str]:
    try:
        return fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) on bad URIs
        raise DataError(f"cannot open data location {uri!r}: {exc}") from None


def _read(filesystem: fs.FileSystem, path: str) -> bytes | None:
    if filesystem.get_file_info(path).type != fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as f:
        return f.read()


def _files(filesystem: fs.FileSystem, root: str) -> list[str]:
    """Paths of the files under ``root``, relative to it, ``prepared.json`` excluded."""
    infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    rel = [i.path[len(root) :].lstrip("/") for i in infos if i.type == fs.FileType.File]
    return sorted(r for r in rel if r != MANIFEST)


def publish(data_dir: str | Path, uri: str) -> str:
    """Copy the prepared folder ``data_dir`` to ``uri``; returns ``uri`` without a trailing /.

    Idempotent: nothing is copied when ``uri`` already holds the same ``prepared.json``.

    Raises:
        DataError: ``data_dir`` is not prepared, or ``uri`` cannot be written.
    """
    local = Path(data_dir)
    read_manifest(local)  # refuses a folder that is not (completely) prepared
    manifest = (local / MANIFEST).read_bytes()
    uri = uri.rstrip("/")
    filesystem, root = _open(uri)
    if _read(filesystem, f"{root}/{MANIFEST}") == manifest:
        return uri
    try:
        filesystem.create_dir(root, recursive=True)
        for rel in sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()):
            if rel == MANIFEST or ".tmp" in rel:
                continue
            dest = f"{root}/{rel}"
            filesystem.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            with filesystem.open_output_stream(dest) as out:
                out.write((local / rel).read_bytes())
        # last: a reader that finds the manifest finds every file it names
        with filesystem.open_output_stream(f"{root}/{MANIFEST}") as out:
            out.write(manifest)
    except OSError as exc:
        raise DataError(f"cannot publish {local} to {uri}: {exc}") from None
    return uri


def localize(ref: str, cache_dir: str | Path) -> str:
    """A local folder holding the prepared data ``ref`` names.

    A plain path is used in place. A URI is copied once into ``cache_dir`` (a folder per URI
    and ``prepared.json`` content, so a republished URI is copied again) and the copy is reused
    afterwards; the copy appears under its final name only when complete.

    Raises:
        DataError: ``ref`` holds no prepared data (no ``prepared.json``).
    """
    if not is_uri(ref):
        return ref
    filesystem, root = _open(ref.rstrip("/"))
    manifest = _read(filesystem, f"{root}/{MANIFEST}")
    if manifest is None:
        raise DataError(
            f"{ref} holds no prepared data (no {MANIFEST}); prepare and publish it with the "
            "training pipeline (data.publish_uri)"
        )
    key = hashlib.sha256(ref.rstrip("/").encode() + b"\0" + manifest).hexdigest()[:24]
    dest = Path(cache_dir) / "data" / key
    if (dest / MANIFEST).is_file():
        return str(dest)
    tmp = dest.with_name(f"{key}.{uuid.uuid4().hex}.tmp")
    try:
        for rel in _files(filesystem, root):
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with filesystem.open_input_stream(f"{root}/{rel}") as f:
                target.write_bytes(f.read())
        (tmp / MANIFEST).write_bytes(manifest)
        read_manifest(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process put a complete copy there first: use it
            if not (dest / MANIFEST).is_file():
                raise
    except OSError as exc:
        raise DataError(f"cannot copy the prepared data {ref} to {dest}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def published_uri(root: str, data_dir: str | Path) -> str:
    """Where the training pipeline publishes ``data_dir`` under a remote checkpoint ``root``:
    ``<root>/data/<digest of prepared.json>``, so each distinct preparation has its own."""
    digest = hashlib.sha256((Path(data_dir) / MANIFEST).read_bytes()).hexdigest()[:16]
    return f"{root.rstrip('/')}/data/{digest}"


def stage(ref: str) -> tuple[str, str]:
    """``(local folder, data_uri)`` for the prepared data ``ref`` (a path or a URI): where this
    process reads them, and what a version trained on them records so the next pipeline, on any
    machine, finds them (the URI itself; a plain path made absolute)."""
    from expertmesh import envs

    if is_uri(ref):
        return localize(ref, envs.home() / "cache"), ref.rstrip("/")
    return ref, os.path.abspath(ref)
