"""Which torch device a job runs on: one rule for training, serving and expert shards."""

from __future__ import annotations

import torch

from expertmesh.platform.config import check_device_name
from expertmesh.platform.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` (the first CUDA GPU PyTorch sees, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N`` as a torch device. Asking for a GPU where there is none is a
    :class:`ConfigError` naming ``device``, raised before any work starts."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{name!r}: PyTorch sees no CUDA GPU on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                "device", f"{name!r}: only {torch.cuda.device_count()} CUDA GPU(s) here"
            )
    return device
