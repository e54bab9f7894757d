"""Expert-sharded checkpoints over ``pyarrow.fs`` (local paths, ``file://``, ``s3://``, ``gs://``).

One checkpoint is an immutable directory, so a shard can read just its experts::

    <root>/<name>/manifest.json                   written LAST: config, version, sha256 + size per file
    <root>/<name>/dense.safetensors               every non-expert tensor (state_dict names)
    <root>/<name>/experts/L000/E000.safetensors   w1 (F, D), w3 (F, D), w2 (D, F) of (layer 0, expert 0)
    <root>/<name>/tokenizer.json                  optional, copied
    <root>/<name>/train_state.pt                  optional, opaque bytes (optimizer state etc.)
    <root>/latest.json                            {"name": <name>}, replaced after each save

Content-addressed: saved with a ``parent``, a checkpoint writes only the files whose bytes differ
from the parent's; its manifest lists every file, and an unchanged one's entry carries the
``path`` (URI) of the parent's copy with the same sha256 and size instead of a copy. So
fine-tuning the router writes one new ``dense.safetensors``. Such a manifest says ``format: 2``
(a reader of format 1 refuses it by name rather than miss files); one without references stays
``format: 1``. Every loader here follows the references and verifies the bytes it reads.

Every file is written to a temporary name and renamed (object stores write single objects
atomically anyway), and ``latest.json`` moves only after the new manifest exists, so a crash
mid-save leaves the previous checkpoint and ``latest.json`` intact. Reads verify size and sha256
and raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from expertmesh.platform.config import ModelConfig, from_dict, to_dict
from expertmesh.platform.errors import CheckpointError, ConfigError
from expertmesh.platform.model import MoETransformer
from expertmesh.platform.placement import ExpertKey

FORMAT = 2  # 2: entries may reference another checkpoint's file by ``path``
_FORMAT_PLAIN = 1  # what a checkpoint without references is written as
MANIFEST, LATEST, DENSE = "manifest.json", "latest.json", "dense.safetensors"
TOKENIZER, TRAIN_STATE = "tokenizer.json", "train_state.pt"
CHAT_TEMPLATE = "chat_template.jinja"  # beside tokenizer.json, as Hugging Face keeps it
EXPERT_TENSORS = ("w1", "w3", "w2")
_ATOMIC_OBJECT_STORES = ("s3", "gcs")  # single-object PUTs are atomic; no rename needed


def expert_file(layer: int, expert: int) -> str:
    """Path of one expert's file, relative to the checkpoint directory."""
    return f"experts/L{layer:03d}/E{expert:03d}.safetensors"


@dataclass(kw_only=True, slots=True, frozen=True)
class FileEntry:
    sha256: str
    size: int
    path: str | None = None  # where the bytes are when not in this checkpoint (a parent's file)


@dataclass(kw_only=True, slots=True)
class Manifest:
    """What ``manifest.json`` says about one checkpoint."""

    format: int
    name: str
    config: ModelConfig
    version: dict[str, Any]  # version and lineage, as given by the caller
    files: dict[str, FileEntry]  # relative path -> checksum and size
    tokenizer: str | None  # file name of the tokenizer, if the checkpoint has one
    created_at: str  # ISO 8601, UTC

    def expert_keys(self) -> list[ExpertKey]:
        return self.config.expert_keys()

    @property
    def nbytes(self) -> int:
        """The model's size: every file it lists, its own or a parent's."""
        return sum(f.size for f in self.files.values())

    def to_json(self) -> str:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        body["config"] = to_dict(self.config)
        body["files"] = {
            k: {f: x for f, x in dataclasses.asdict(v).items() if x is not None}
            for k, v in sorted(self.files.items())
        }
        return json.dumps(body, indent=2)

    def written_files(self) -> list[str]:
        """Files this checkpoint holds itself (not referenced from a parent), sorted."""
        return sorted(rel for rel, e in self.files.items() if e.path is None)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        try:
            raw = json.loads(text)
            if raw["format"] > FORMAT:
                raise CheckpointError(
                    f"{where}: format {raw['format']} is newer than this expertmesh reads ({FORMAT})"
                )
            raw["config"] = from_dict(ModelConfig, raw["config"])
            raw["files"] = {k: FileEntry(**v) for k, v in raw["files"].items()}
            return cls(**raw)
        except (ValueError, KeyError, TypeError, ConfigError) as exc:
            raise CheckpointError(
                f"{where}: unreadable manifest ({type(exc).__name__}: {exc})"
            ) from exc


# --- filesystem access -------------------------------------------------------------------------


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    from expertmesh.platform import tracking

    if tracking.is_mlflow_artifact_uri(uri):
        # NOTE: a version registered on an MLflow server points at the server's proxied store,
        # which pyarrow cannot open: every node reads a local copy (read-only use only)
        return pafs.LocalFileSystem(), str(tracking.local_artifact_copy(uri))
    return pafs.FileSystem.from_uri(uri)


def _normalize(uri: str) -> str:
    from expertmesh.platform import tracking

    if "://" in uri or tracking.is_mlflow_artifact_uri(uri):
        return uri.rstrip("/")
    return os.path.abspath(uri)


class _Dir:
    """A directory on some pyarrow filesystem; ``rel`` paths below it use ``/``."""

    def __init__(
        self, uri: str, fs: pafs.FileSystem | None = None, path: str | None = None
    ) -> None:
        self.uri = _normalize(uri)
        if fs is None or path is None:
            fs, path = _filesystem(self.uri)
        self.fs, self.path = fs, path.rstrip("/")

    def sub(self, name: str) -> _Dir:
        return _Dir(f"{self.uri}/{name}", self.fs, f"{self.path}/{name}")

    def uri_of(self, rel: str) -> str:
        return f"{self.uri}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(f"{self.path}/{rel}").type == pafs.FileType.File

    def read(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(f"{self.path}/{rel}") as f:
                return f.read()
        except FileNotFoundError:
            raise CheckpointError(f"{self.uri_of(rel)}: file is missing") from None
        except OSError as exc:
            raise CheckpointError(f"{self.uri_of(rel)}: cannot read ({exc})") from exc

    def write(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically: temp name + rename, or one object PUT."""
        path = f"{self.path}/{rel}"
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if self.fs.type_name in _ATOMIC_OBJECT_STORES:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, path)  # rename(2): replaces an existing file atomically
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            raise


def _read_uri(uri: str) -> bytes:
    parent, _, base = _normalize(uri).rpartition("/")
    return _Dir(parent or "/").read(base)


def _read_verified(d: _Dir, manifest: Manifest, rel: str) -> bytes:
    entry = manifest.files.get(rel)
    if entry is None:
        raise CheckpointError(f"{d.uri_of(rel)}: not listed in the checkpoint's manifest")
    where = entry.path or d.uri_of(rel)
    data = _read_uri(entry.path) if entry.path else d.read(rel)
    if len(data) != entry.size:
        raise CheckpointError(
            f"{where}: truncated or corrupt: {len(data)} bytes, manifest says {entry.size}"
        )
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise CheckpointError(f"{where}: corrupt: sha256 does not match the manifest")
    return data


def _load_tensors(d: _Dir, manifest: Manifest, rel: str) -> dict[str, torch.Tensor]:
    data = _read_verified(d, manifest, rel)
    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{d.uri_of(rel)}: not a safetensors file ({exc})") from exc


def _open(uri: str) -> tuple[_Dir, Manifest]:
    d = _Dir(resolve(uri))
    return d, Manifest.from_json(d.read(MANIFEST), d.uri_of(MANIFEST))


# --- saving ------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name in (".", "..", LATEST) or ".tmp-" in name:
        raise ValueError(f"checkpoint name {name!r} must be one plain path component")


def _dense_state(model: MoETransformer) -> dict[str, torch.Tensor]:
    out = {
        k: v.detach()
        for k, v in model.state_dict().items()
        if not k.endswith((".experts.w13", ".experts.w2"))
    }
    if model.cfg.tie_embeddings:
        out.pop("lm_head.weight", None)  # NOTE: it *is* embed_tokens.weight; re-tied on load
    return out


def _expert_source(
    model: MoETransformer, overrides: dict[ExpertKey, dict[str, torch.Tensor]]
) -> dict[ExpertKey, Any]:
    """Check every (layer, expert) has weights (model or override) of the right shape."""
    cfg = model.cfg
    keys = cfg.expert_keys()
    stray = sorted(set(overrides) - set(keys))
    if stray:
        raise ValueError(f"experts_override has keys {stray} outside this model's (layer, expert)s")
    F_, D = cfg.d_ff, cfg.d_model
    shapes = {"w1": (F_, D), "w3": (F_, D), "w2": (D, F_)}
    for key, tensors in overrides.items():
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != shapes:
            raise ValueError(f"experts_override[{key}] has shapes {got}; expected {shapes}")
    moe = model.moe_layers()
    missing = [k for k in keys if k not in overrides and moe[k[0]].experts is None]
    if missing:
        raise ValueError(f"model holds no experts {missing[:4]}...; pass them in experts_override")
    return {k: overrides.get(k) for k in keys}


def save_checkpoint(
    root: str,
    name: str,
    model: MoETransformer,
    *,
    tokenizer_path: str | None = None,
    version: dict[str, Any] | None = None,
    train_state: bytes | None = None,
    experts_override: dict[ExpertKey, dict[str, torch.Tensor]] | None = None,
    parent: str | None = None,
    chat_template: str | None = None,
) -> str:
    """Write ``model`` as the new checkpoint ``<root>/<name>`` and point ``<root>/latest.json`` at it.

    Args:
        root: directory URI or local path holding checkpoints (created if needed).
        name: new checkpoint's directory name; existing complete checkpoints are never overwritten.
        model: the model; with ``with_experts=False`` every expert must come from ``experts_override``.
        tokenizer_path: a ``tokenizer.json`` (path or URI) to copy into the checkpoint.
        version: JSON-serialisable version/lineage record, stored as given.
        train_state: opaque bytes (e.g. ``torch.save`` of the optimizer) for resuming.
        experts_override: per-(layer, expert) ``{"w1", "w3", "w2"}`` tensors used instead of the
            model's own (experts trained or held elsewhere).
        parent: a checkpoint URI; files byte-identical to one of its files (same sha256 and
            size) are referenced there instead of written again.
        chat_template: a Jinja2 chat template (the text) for ``/v1/chat/completions``; unset,
            a checkpoint with a ``parent`` keeps the parent's (a fine-tune or a grown model
            answers chat as its parent did).

    Returns:
        The checkpoint's URI, e.g. ``file:///ckpt/step-400`` or ``/ckpt/step-400``.

    Example:
        >>> uri = save_checkpoint("/tmp/ckpt", "step-400", model, version={"step": 400})
        >>> model2, manifest = load_model("/tmp/ckpt")  # follows latest.json
    """
    _check_name(name)
    version = dict(version or {})
    try:
        json.dumps(version)
    except TypeError as exc:
        raise ValueError(f"version must be JSON-serialisable: {exc}") from None
    experts = _expert_source(model, experts_override or {})
    tokenizer = None if tokenizer_path is None else _read_uri(tokenizer_path)
    reusable = _reusable_files(parent) if parent is not None else {}
    if chat_template is None and parent is not None:
        chat_template = read_chat_template(parent)

    root_dir = _Dir(root)
    ckpt = root_dir.sub(name)
    if ckpt.exists(MANIFEST):
        raise CheckpointError(
            f"{ckpt.uri}: checkpoint already exists; checkpoints are immutable, choose a new name"
        )
    files: dict[str, FileEntry] = {}

    def put(rel: str, data: bytes) -> None:
        entry = FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        elsewhere = reusable.get((entry.sha256, entry.size))
        if elsewhere is not None:
            files[rel] = dataclasses.replace(entry, path=elsewhere)
            return
        ckpt.write(rel, data)
        files[rel] = entry

    moe = model.moe_layers()
    with torch.no_grad():
        for (layer, e), override in experts.items():
            tensors = override if override is not None else moe[layer].experts.expert_tensors(e)
            put(
                expert_file(layer, e), st_save({k: tensors[k].contiguous() for k in EXPERT_TENSORS})
            )
        put(DENSE, st_save(_dense_state(model)))
    if tokenizer is not None:
        put(TOKENIZER, tokenizer)
    if train_state is not None:
        put(TRAIN_STATE, bytes(train_state))
    if chat_template is not None:
        put(CHAT_TEMPLATE, chat_template.encode())
    manifest = Manifest(
        format=FORMAT if any(e.path for e in files.values()) else _FORMAT_PLAIN,
        name=name,
        config=model.cfg,
        version=version,
        files=files,
        tokenizer=TOKENIZER if tokenizer is not None else None,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    ckpt.write(MANIFEST, manifest.to_json().encode())
    root_dir.write(LATEST, json.dumps({"name": name}).encode())
    return ckpt.uri


def _reusable_files(parent: str) -> dict[tuple[str, int], str]:
    """``(sha256, size) -> URI`` of every file of checkpoint ``parent``, following its own
    references so that a chain of versions stays one hop deep."""
    d, manifest = _open(parent)
    return {(e.sha256, e.size): e.path or d.uri_of(rel) for rel, e in manifest.files.items()}


# --- loading -----------------------------------------------------------------------------------


def resolve(uri: str) -> str:
    """The checkpoint directory ``uri`` names: itself if it has ``manifest.json``, else the one
    its ``latest.json`` points at."""
    d = _Dir(uri)
    if d.exists(MANIFEST):
        return d.uri
    if d.exists(LATEST):
        try:
            name = json.loads(d.read(LATEST))["name"]
            _check_name(name)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{d.uri_of(LATEST)}: unreadable ({exc})") from exc
        target = d.sub(name)
        if not target.exists(MANIFEST):
            raise CheckpointError(
                f"{target.uri_of(MANIFEST)}: file is missing (named by latest.json)"
            )
        return target.uri
    raise CheckpointError(f"{d.uri}: no checkpoint here (neither {MANIFEST} nor {LATEST})")


def read_manifest(uri: str) -> Manifest:
    return _open(uri)[1]


def load_dense(uri: str) -> dict[str, torch.Tensor]:
    """Every non-expert tensor by state_dict name (``lm_head.weight`` absent when tied)."""
    d, manifest = _open(uri)
    return _load_tensors(d, manifest, DENSE)


def load_experts(uri: str, keys: Iterable[ExpertKey]) -> dict[ExpertKey, dict[str, torch.Tensor]]:
    """``{(layer, expert): {"w1", "w3", "w2"}}`` for ``keys``, opening only those experts' files."""
    d, manifest = _open(uri)
    return _load_experts(d, manifest, keys)


def _load_experts(
    d: _Dir, manifest: Manifest, keys: Iterable[ExpertKey]
) -> dict[ExpertKey, dict[str, torch.Tensor]]:
    out: dict[ExpertKey, dict[str, torch.Tensor]] = {}
    for layer, e in keys:
        rel = expert_file(layer, e)
        if rel not in manifest.files:
            raise CheckpointError(f"{d.uri_of(rel)}: checkpoint has no expert ({layer}, {e})")
        out[(layer, e)] = _load_tensors(d, manifest, rel)
    return out


def load_model(uri: str, *, with_experts: bool = True) -> tuple[MoETransformer, Manifest]:
    """Rebuild the model (in eval mode, in the checkpoint's dtype) and return it with its manifest.

    ``with_experts=False`` builds the dense part only and reads no expert file.
    """
    d, manifest = _open(uri)
    dense = _load_tensors(d, manifest, DENSE)
    keys = manifest.expert_keys() if with_experts else []
    experts = ((k, _load_experts(d, manifest, [k])[k]) for k in keys)  # one file at a time
    model = assemble_model(manifest.config, dense, experts, with_experts=with_experts, where=d.uri)
    return model, manifest


def assemble_model(
    cfg: ModelConfig,
    dense: dict[str, torch.Tensor],
    experts: Iterable[tuple[ExpertKey, dict[str, torch.Tensor]]],
    *,
    with_experts: bool = True,
    where: str = "",
) -> MoETransformer:
    """Build a model (eval mode, in the dtype of ``dense``) from a dense state dict and
    ``((layer, expert), {"w1", "w3", "w2"})`` pairs; CheckpointError (naming ``where``) on mismatch.
    """
    model = MoETransformer(cfg, with_experts=with_experts)
    dtype = dense["embed_tokens.weight"].dtype if "embed_tokens.weight" in dense else torch.float32
    for p in model.parameters():  # NOTE: parameters only; RoPE's inv_freq stays float32
        p.data = p.data.to(dtype)
    dense = dict(dense)
    if cfg.tie_embeddings and "embed_tokens.weight" in dense:
        dense["lm_head.weight"] = dense["embed_tokens.weight"]
    moe = model.moe_layers()
    try:
        missing, unexpected = model.load_state_dict(dense, strict=False)
        # NOTE: a selection bias absent from the weights (saved before balance_bias_rate
        # existed, or with it 0) stays at its zeros: routing is then exactly the unbiased one
        missing = [
            k for k in missing if not k.endswith((".experts.w13", ".experts.w2", ".expert_bias"))
        ]
        if missing or unexpected:
            raise CheckpointError(
                f"{where}: weights do not match the config: missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}"
            )
        loaded = set()
        for (layer, e), tensors in experts:
            moe[layer].experts.load_expert(e, tensors)
            loaded.add((layer, e))
    except (RuntimeError, KeyError) as exc:  # shape mismatch, missing w1/w3/w2
        raise CheckpointError(f"{where}: weights do not match the config ({exc})") from exc
    want = set(cfg.expert_keys())
    if with_experts and loaded != want:
        raise CheckpointError(f"{where}: no weights for experts {sorted(want - loaded)[:4]}")
    return model.eval()


def write_reference(uri: str, dest: str) -> str:
    """Write at ``dest`` a checkpoint of ``manifest.json`` alone that names every file of
    checkpoint ``uri`` where it lies (absolute locations), so it loads the same model, checked
    against the same checksums; returns ``dest``.

    An MLflow server registers a version only from its own artifact store or a non-local URI,
    while a content-addressed checkpoint on a shared mount is a local path: the reference,
    logged as an artifact, is what gets registered.
    """
    d, manifest = _open(uri)
    files = {
        rel: FileEntry(sha256=e.sha256, size=e.size, path=e.path or d.uri_of(rel))
        for rel, e in manifest.files.items()
    }
    out = _Dir(dest)
    out.write(MANIFEST, dataclasses.replace(manifest, files=files).to_json().encode())
    return out.uri


def load_train_state(uri: str) -> bytes | None:
    d, manifest = _open(uri)
    return _read_verified(d, manifest, TRAIN_STATE) if TRAIN_STATE in manifest.files else None


def read_tokenizer(uri: str) -> str | None:
    """The checkpoint's ``tokenizer.json`` text, or None if it was saved without one."""
    d, manifest = _open(uri)
    if manifest.tokenizer is None:
        return None
    return _read_verified(d, manifest, manifest.tokenizer).decode()


def read_chat_template(uri: str) -> str | None:
    """The checkpoint's ``chat_template.jinja`` text, or None if it has none."""
    d, manifest = _open(uri)
    if CHAT_TEMPLATE not in manifest.files:
        return None
    return _read_verified(d, manifest, CHAT_TEMPLATE).decode()


__all__ = [
    "ExpertKey",
    "FileEntry",
    "Manifest",
    "assemble_model",
    "expert_file",
    "load_dense",
    "load_experts",
    "load_model",
    "load_train_state",
    "read_chat_template",
    "read_manifest",
    "read_tokenizer",
    "resolve",
    "save_checkpoint",
    "write_reference",
]
