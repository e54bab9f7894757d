"""expertmesh: an elastic Mixture-of-Experts platform on Ray.

The public SDK surface lives here; internals are importable but not advertised. Names load
lazily so ``import expertmesh`` (and the CLI) does not pay for torch or Ray until used.

Example::

    import expertmesh

    cluster = expertmesh.connect()  # local Ray on loopback + local MLflow store
    cluster.deploy("expertmesh-tiny", shards=4, replicas=2)
    print(cluster.generate("ROMEO.", max_tokens=32).text)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "connect": "expertmesh.sdk",
    "Cluster": "expertmesh.sdk",
    "ClusterError": "expertmesh.types",
    "CapacityError": "expertmesh.types",
    "ScaleInProgressError": "expertmesh.types",
    "ClusterHandle": "expertmesh.types",
    "Completion": "expertmesh.types",
    "RouterTuning": "expertmesh.types",
    "Overloaded": "expertmesh.types",
    "HttpCluster": "expertmesh.client",
    "SamplingParams": "expertmesh.platform.sampling",
    "ModelConfig": "expertmesh.platform.config",
    "DataConfig": "expertmesh.platform.config",
    "TrainConfig": "expertmesh.platform.config",
    "ExperimentConfig": "expertmesh.platform.config",
    "LocalRayOptions": "expertmesh.runtime",
}

__all__ = [
    "CapacityError",
    "Cluster",
    "ClusterError",
    "ClusterHandle",
    "Completion",
    "DataConfig",
    "ExperimentConfig",
    "HttpCluster",
    "LocalRayOptions",
    "ModelConfig",
    "Overloaded",
    "RouterTuning",
    "SamplingParams",
    "ScaleInProgressError",
    "TrainConfig",
    "__version__",
    "connect",
]

if TYPE_CHECKING:
    from expertmesh.client import HttpCluster
    from expertmesh.platform.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
    from expertmesh.platform.sampling import SamplingParams
    from expertmesh.runtime import LocalRayOptions
    from expertmesh.sdk import Cluster, connect
    from expertmesh.types import (
        CapacityError,
        ClusterError,
        ClusterHandle,
        Completion,
        Overloaded,
        RouterTuning,
        ScaleInProgressError,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'expertmesh' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
