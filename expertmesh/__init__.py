"""expertmesh: an elastic Mixture-of-Experts platform on Ray.

The public SDK surface lives here; internals are importable but not advertised.
"""

from expertmesh.platform.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from expertmesh.platform.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "SamplingParams",
    "TrainConfig",
    "__version__",
]
