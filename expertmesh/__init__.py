"""expertmesh: an elastic Mixture-of-Experts platform on Ray.

The public SDK surface lives here; internals are importable but not advertised.
"""

from expertmesh.platform.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from expertmesh.platform.sampling import SamplingParams
from expertmesh.sdk import Cluster, ClusterError, Completion, connect

__version__ = "0.1.0"

__all__ = [
    "Cluster",
    "ClusterError",
    "Completion",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "SamplingParams",
    "TrainConfig",
    "__version__",
    "connect",
]
