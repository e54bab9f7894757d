"""Typed, keyword-only configs, loaded from YAML or built in code.

Every config validates itself on construction and raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from expertmesh.platform.errors import ConfigError

RouterKind = Literal["topk", "noisy_topk", "switch", "expert_choice", "hash"]
ROUTER_KINDS: tuple[str, ...] = ("topk", "noisy_topk", "switch", "expert_choice", "hash")
DType = Literal["float32", "bfloat16"]
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: object) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, or a :class:`ConfigError` naming ``device``
    (whether the machine has that GPU is :func:`expertmesh.platform.devices.resolve_device`'s
    question)."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ConfigError("device", f"must be auto, cpu, cuda or cuda:N, got {name!r}")


def _positive(name: str, value: int | float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(name, f"must be a positive number, got {value!r}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Shape and routing of a Mixtral-style MoE decoder LM.

    Defaults are the ``configs/tiny.yaml`` demo model (about 20 M parameters).
    """

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    d_ff: int = 704  # width of each expert's SwiGLU FFN
    d_ff_dense: int | None = None  # width of the dense FFN in non-MoE layers (default: d_ff)
    n_experts: int = 8  # experts per MoE layer, unless layer_experts says otherwise
    # MoE layer -> its expert count, where it differs from n_experts (a layer grown by
    # add_expert); JSON manifests give the layers as strings, read back as ints
    layer_experts: dict[int, int] = field(default_factory=dict)
    top_k: int = 2
    moe_every: int = 1  # layer i is an MoE layer when i % moe_every == moe_every - 1
    router: RouterKind = "topk"
    capacity_factor: float | None = None  # None: dropless
    router_noise_std: float = 1.0  # noisy_topk only
    aux_loss_weight: float = 0.01  # Switch load-balancing loss
    z_loss_weight: float = 0.001  # router z-loss
    # scales the combined expert output (DeepSeek-V2/V3's routed_scaling_factor); top_k makes a
    # token's FFN output as large at init as a dense FFN k experts wide (renormalised top-k gate
    # weights sum to 1, so k experts of width F otherwise give half of one of width k*F, k=2).
    # Mixtral has no such field: the Hugging Face export folds it into w2.
    routed_scale: float = 1.0
    # auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3): each MoE layer keeps a
    # per-expert bias added to the gate logits to *choose* experts (weights stay unbiased); after
    # every optimizer step b_e += rate * sign(mean load - load_e). 0 = off (no bias at all).
    # topk and noisy_topk routers only; Mixtral has no such bias, so export refuses a non-zero one.
    balance_bias_rate: float = 0.0
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_ff",
            "n_experts",
            "top_k",
            "moe_every",
            "max_seq_len",
            "rope_theta",
            "rms_norm_eps",
            "init_std",
        ):
            _positive(name, getattr(self, name))
        if self.d_ff_dense is not None:
            _positive("d_ff_dense", self.d_ff_dense)
        if self.router not in ROUTER_KINDS:
            raise ConfigError(
                "router", f"unknown router {self.router!r}; choose one of {ROUTER_KINDS}"
            )
        if self.top_k > self.n_experts:
            raise ConfigError("top_k", f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        self._check_layer_experts()
        if self.router == "switch" and self.top_k != 1:
            raise ConfigError("top_k", "the switch router is top-1; set top_k: 1")
        if self.d_model % self.n_heads:
            raise ConfigError(
                "n_heads", f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                "n_kv_heads",
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}",
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("n_heads", "head dimension (d_model / n_heads) must be even for RoPE")
        if self.capacity_factor is not None:
            _positive("capacity_factor", self.capacity_factor)
        _positive("routed_scale", self.routed_scale)
        for name in ("aux_loss_weight", "z_loss_weight", "router_noise_std", "balance_bias_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)!r}")
        if self.balance_bias_rate > 0 and self.router not in ("topk", "noisy_topk"):
            raise ConfigError(
                "balance_bias_rate",
                f"the selection bias works with the topk and noisy_topk routers only, not "
                f"{self.router!r} (expert_choice is balanced by construction); set it to 0",
            )

    def _check_layer_experts(self) -> None:
        if not isinstance(self.layer_experts, dict):
            raise ConfigError("layer_experts", "must map MoE layers to expert counts")
        fixed: dict[int, int] = {}
        for key, count in self.layer_experts.items():
            try:
                layer = int(key)
            except (TypeError, ValueError):
                raise ConfigError("layer_experts", f"layer {key!r} is not an integer") from None
            if not 0 <= layer < self.n_layers or not self.is_moe_layer(layer):
                raise ConfigError("layer_experts", f"layer {layer} is not an MoE layer")
            if isinstance(count, bool) or not isinstance(count, int) or count < self.top_k:
                raise ConfigError(
                    "layer_experts",
                    f"layer {layer} needs an integer count >= top_k={self.top_k}, got {count!r}",
                )
            if count != self.n_experts:
                fixed[layer] = count
        self.layer_experts = fixed

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def experts_in(self, layer: int) -> int:
        """How many experts MoE layer ``layer`` has."""
        return self.layer_experts.get(layer, self.n_experts)

    @property
    def max_experts(self) -> int:
        """The largest expert count of any MoE layer."""
        return max([self.n_experts, *self.layer_experts.values()])

    @property
    def uniform_experts(self) -> bool:
        """Whether every MoE layer has :attr:`n_experts` experts (Mixtral's shape)."""
        return not self.layer_experts

    def expert_keys(self) -> list[tuple[int, int]]:
        """Every (MoE layer, expert) of the model, in layer then expert order."""
        return [(layer, e) for layer in self.moe_layers for e in range(self.experts_in(layer))]

    def is_moe_layer(self, layer: int) -> bool:
        return layer % self.moe_every == self.moe_every - 1

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the prepared Parquet token shards live and what goes into them."""

    data_dir: str = ".state/data"  # prepared shards + tokenizer.json
    cache_dir: str = ".state/cache"  # downloaded packages
    # a pyarrow.fs URI the training pipeline copies the prepared data to, for later pipelines
    # on other machines; None: under a remote checkpoint root, else nowhere (read in place)
    publish_uri: str | None = None
    train_domains: tuple[str, ...] = ("shakespeare", "python")
    vocab_size: int = 4096
    shard_tokens: int = 2_000_000  # tokens per Parquet shard
    # a named chat template (platform/chat.py, e.g. "plain") saved with every checkpoint, for
    # /v1/chat/completions; None: the checkpoints have none
    chat_template: str | None = None

    def __post_init__(self) -> None:
        _positive("vocab_size", self.vocab_size)
        _positive("shard_tokens", self.shard_tokens)
        self.train_domains = tuple(self.train_domains)
        if self.publish_uri is not None and (
            not isinstance(self.publish_uri, str) or "://" not in self.publish_uri
        ):
            raise ConfigError(
                "publish_uri", f"must be a URI such as s3://bucket/data, got {self.publish_uri!r}"
            )
        if not self.train_domains:
            raise ConfigError("train_domains", "needs at least one domain")
        if self.chat_template is not None and not (
            isinstance(self.chat_template, str) and self.chat_template
        ):
            raise ConfigError(
                "chat_template", f"must be a template name, got {self.chat_template!r}"
            )


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Optimisation and bookkeeping for one training run."""

    steps: int = 1200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dtype: DType = "float32"
    # "auto": the first CUDA GPU when PyTorch sees one, else the CPU; or "cpu", "cuda", "cuda:N"
    device: str = "auto"
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 400
    log_every: int = 10
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (default: torch's choice)
    # pyarrow.fs URI or path; None: <checkpoint root>/<registered_model>/train, the root being
    # the cluster's when run on one (never a folder relative to a Ray job's working directory)
    output_dir: str | None = None
    experiment: str = "expertmesh"
    registered_model: str = "expertmesh-tiny"

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "lr",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "log_every",
        ):
            _positive(name, getattr(self, name))
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError("dtype", f"must be float32 or bfloat16, got {self.dtype!r}")
        check_device_name(self.device)
        self.betas = tuple(self.betas)  # type: ignore[assignment]


@dataclass(kw_only=True, slots=True)
class ExperimentConfig:
    """A whole YAML file: ``model``, ``data`` and ``train`` sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


T = TypeVar("T")


def from_dict(cls: type[T], values: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}", f"unknown field; known fields: {sorted(known)}")
    nested = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
    if cls is ExperimentConfig:
        for key, sub in nested.items():
            if key in values and not isinstance(values[key], sub):
                if not isinstance(values[key], dict):
                    raise ConfigError(key, "must be a mapping")
                values[key] = from_dict(sub, values[key], where=f"{key}.")
    try:
        return cls(**values)
    except ConfigError as exc:
        if where and not exc.field.startswith(where):
            raise ConfigError(f"{where}{exc.field}", str(exc).split(": ", 1)[1]) from None
        raise
    except TypeError as exc:  # wrong value types slip through dataclass construction as TypeError
        raise ConfigError(where.rstrip(".") or cls.__name__, str(exc)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config dataclass."""
    out = dataclasses.asdict(cfg)

    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, tuple | list):
            return [fix(x) for x in v]
        return v

    return fix(out)


SHIPPED_CONFIGS = "configs"  # the package folder of ready configs (expertmesh/configs)


def shipped_config(name: str) -> Path:
    """The path of a config that ships with the package, e.g. ``shipped_config("tiny.yaml")``."""
    return Path(__file__).resolve().parents[1] / SHIPPED_CONFIGS / name


def find_config(path: str | Path) -> Path:
    """``path`` if it exists, else the shipped config a relative ``configs/NAME`` names.

    NOTE: jobs run in whatever folder Ray or a container gives them (a KubeRay head has no
    checkout), so ``--config configs/tiny.yaml`` must mean the packaged file everywhere; a file
    of that name in the working folder still wins, so users can edit a copy.
    """
    path = Path(path)
    if path.exists():
        return path
    parts = path.parts
    if not path.is_absolute() and len(parts) == 2 and parts[0] == SHIPPED_CONFIGS:
        shipped = shipped_config(parts[1])
        if shipped.exists():
            return shipped
    available = sorted(p.name for p in shipped_config("").glob("*.yaml"))
    raise ConfigError(
        "config",
        f"config file {path} does not exist (shipped configs: "
        f"{', '.join(f'{SHIPPED_CONFIGS}/{n}' for n in available)})",
    )


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an :class:`ExperimentConfig` from YAML, applying ``section.key=value`` overrides.

    ``configs/NAME.yaml`` names a shipped config from any working folder (see
    :func:`find_config`).
    """
    path = find_config(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError("config", f"{path} must hold a mapping at the top level")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(
                item, "override must look like section.key=value, e.g. train.steps=100"
            )
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    return from_dict(ExperimentConfig, raw)
