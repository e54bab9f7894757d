"""Resolve what a user names as a model (checkpoint URI or MLflow registry name[/version])."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.model import MoETransformer
from expertmesh.platform.tracking import ModelVersionInfo, Tracker


@dataclass(kw_only=True, slots=True)
class ResolvedModel:
    name: str  # what clients call it (registry name, or the checkpoint's folder name)
    checkpoint_uri: str
    version: ModelVersionInfo | None


def is_checkpoint_uri(ref: str) -> bool:
    return ("://" in ref and not ref.startswith("models:/")) or ref.startswith(("/", "./", "../"))


def resolve_model(ref: str, tracker: Tracker | None = None) -> ResolvedModel:
    """``ref`` is a checkpoint URI/path, or ``name``, ``name/version``, ``models:/name/version``."""
    if is_checkpoint_uri(ref):
        uri = ckpt.resolve(ref)
        return ResolvedModel(
            name=uri.rstrip("/").rsplit("/", 1)[-1], checkpoint_uri=uri, version=None
        )
    info = (tracker or Tracker()).resolve_model(ref)
    return ResolvedModel(name=info.name, checkpoint_uri=ckpt.resolve(info.source), version=info)


def load_for_inference(uri: str, *, with_experts: bool = True) -> tuple[MoETransformer, Tokenizer]:
    model, _manifest = ckpt.load_model(uri, with_experts=with_experts)
    text = ckpt.read_tokenizer(uri)
    if text is None:
        raise ckpt.CheckpointError(f"checkpoint {uri} has no tokenizer.json")
    return model.eval(), Tokenizer.from_str(text)
