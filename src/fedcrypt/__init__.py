"""fedcrypt: privacy-preserving federated learning on PyTorch."""

from fedcrypt.config.job import JobConfig, JobError, load_job
from fedcrypt.simulation import SimulationResult, simulate

__version__ = "0.1.0"

__all__ = ["JobConfig", "JobError", "SimulationResult", "__version__", "load_job", "simulate"]
