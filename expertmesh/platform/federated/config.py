"""The federation's typed config: the clients (data, budget, resources) and the training knobs.

Loaded from YAML (``configs/federated.yaml``); every field is checked on construction and a bad
one is a :class:`ConfigError` naming it (``clients[2].k``), before any actor starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from expertmesh.platform.errors import ConfigError
from expertmesh.platform.federated.lora import LoRAConfig

DEFAULT_CLIENTS_FILE = "configs/federated.yaml"


def _positive_int(where: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(where, f"must be a positive integer, got {v!r}")


def _non_negative(where: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise ConfigError(where, f"must be a number >= 0, got {v!r}")


@dataclass(kw_only=True, slots=True, frozen=True)
class ClientConfig:
    """One client: its private data (license ``categories`` of the legal domain, or a whole
    ``domain``), its budget ``k`` (experts per token) and its Ray resource requests."""

    name: str
    k: int
    categories: tuple[str, ...] | None = None
    domain: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    where: str = "clients[?]"  # its place in the file, for error messages

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.replace("-", "").isalnum():
            raise ConfigError(f"{self.where}.name", f"must be letters, digits and -: {self.name!r}")
        _positive_int(f"{self.where}.k", self.k)
        if (self.categories is None) == (self.domain is None):
            raise ConfigError(
                self.where, f"client {self.name!r} needs exactly one of categories or domain"
            )
        if self.categories is not None:
            cats = self.categories
            if isinstance(cats, str) or not cats or not all(isinstance(c, str) for c in cats):
                raise ConfigError(
                    f"{self.where}.categories", f"must be a non-empty list of names, got {cats!r}"
                )
            object.__setattr__(self, "categories", tuple(cats))
        _non_negative(f"{self.where}.num_cpus", self.num_cpus)
        _non_negative(f"{self.where}.num_gpus", self.num_gpus)

    @property
    def data_domain(self) -> str:
        """The domain its documents come from (categories are legal ones)."""
        return self.domain if self.domain is not None else "legal"


@dataclass(kw_only=True, slots=True, frozen=True)
class FederationConfig:
    """Clients and the federated training knobs (the CLI may override the knobs)."""

    clients: tuple[ClientConfig, ...]
    strategy: str = "flame"  # fedavg | flame
    t: float = 1.0  # FLAME's activation exponent (0: FedAvg)
    rounds: int = 10
    local_steps: int = 20
    lr: float = 2e-3
    batch_size: int = 8
    seq_len: int = 64
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    deadline_s: float = 300.0  # a client not back by then is left out of the round
    min_clients: int | None = None  # None: more than half of the clients
    eval_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.clients:
            raise ConfigError("clients", "needs at least one client")
        names = [c.name for c in self.clients]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ConfigError("clients", f"client names must be unique; repeated: {dup}")
        if self.strategy not in ("fedavg", "flame"):
            raise ConfigError("strategy", f"must be fedavg or flame, got {self.strategy!r}")
        _non_negative("t", self.t)
        for f in ("rounds", "local_steps", "batch_size", "seq_len", "eval_batches"):
            _positive_int(f, getattr(self, f))
        if not isinstance(self.lr, int | float) or not self.lr > 0:
            raise ConfigError("lr", f"must be positive, got {self.lr!r}")
        if not isinstance(self.deadline_s, int | float) or not self.deadline_s > 0:
            raise ConfigError("deadline_s", f"must be positive seconds, got {self.deadline_s!r}")
        if self.min_clients is not None:
            _positive_int("min_clients", self.min_clients)
            if self.min_clients > len(self.clients):
                raise ConfigError(
                    "min_clients",
                    f"{self.min_clients} exceeds the {len(self.clients)} clients configured",
                )

    @property
    def quorum(self) -> int:
        """Clients that must report for a round to count."""
        if self.min_clients is not None:
            return self.min_clients
        return math.floor(len(self.clients) / 2) + 1


def _client(i: int, raw: object) -> ClientConfig:
    where = f"clients[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(where, "must be a mapping with name, k and categories or domain")
    known = {"name", "k", "categories", "domain", "num_cpus", "num_gpus"}
    if unknown := sorted(set(raw) - known):
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown field; known: {sorted(known)}")
    for required in ("name", "k"):
        if required not in raw:
            raise ConfigError(f"{where}.{required}", "is required")
    return ClientConfig(where=where, **raw)


def federation_from_dict(raw: dict[str, Any]) -> FederationConfig:
    """A :class:`FederationConfig` from a parsed YAML mapping; unknown keys are errors."""
    if not isinstance(raw, dict):
        raise ConfigError("clients", "the clients file must hold a mapping")
    raw = dict(raw)
    known = set(FederationConfig.__dataclass_fields__)
    if unknown := sorted(set(raw) - known):
        raise ConfigError(unknown[0], f"unknown field; known: {sorted(known)}")
    clients = raw.pop("clients", None)
    if not isinstance(clients, list):
        raise ConfigError("clients", "must be a list of clients")
    lora = raw.pop("lora", None) or {}
    if not isinstance(lora, dict):
        raise ConfigError("lora", "must be a mapping of rank, alpha and init_seed")
    if bad := sorted(set(lora) - {"rank", "alpha", "init_seed"}):
        raise ConfigError(f"lora.{bad[0]}", "unknown field; known: alpha, init_seed, rank")
    try:
        return FederationConfig(
            clients=tuple(_client(i, c) for i, c in enumerate(clients)),
            lora=LoRAConfig(**lora),
            **raw,
        )
    except TypeError as exc:
        raise ConfigError("clients", str(exc)) from None


def find_clients_file(path: str | Path) -> Path:
    """The clients file: ``path`` as given (absolute, or relative to the working directory),
    else the same relative path under the installed package's folder or its repository (a Ray
    job's working directory may be elsewhere, and the configs may move into the package)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute():
        import expertmesh

        pkg = Path(expertmesh.__file__).resolve().parent
        for base in (pkg, pkg.parent):
            if (base / p).is_file():
                return base / p
    raise ConfigError("clients", f"clients file {path} does not exist")


def load_federation(path: str | Path = DEFAULT_CLIENTS_FILE) -> FederationConfig:
    """Load and check the federation config from YAML (see :func:`find_clients_file`)."""
    found = find_clients_file(path)
    try:
        raw = yaml.safe_load(found.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("clients", f"{found} is not valid YAML ({exc})") from None
    return federation_from_dict(raw or {})
