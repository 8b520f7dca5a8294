"""fedcrypt: privacy-preserving federated learning on PyTorch.

The top-level names load on first use, so light modules (such as the CKKS worker processes,
which need neither PyTorch nor the job machinery) import quickly and stay small.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedcrypt.config.job import JobConfig, JobError, load_job
    from fedcrypt.simulation import SimulationResult, simulate

__version__ = "0.1.0"

_LAZY = {
    "JobConfig": "fedcrypt.config.job",
    "JobError": "fedcrypt.config.job",
    "load_job": "fedcrypt.config.job",
    "SimulationResult": "fedcrypt.simulation",
    "simulate": "fedcrypt.simulation",
}

__all__ = ["JobConfig", "JobError", "SimulationResult", "__version__", "load_job", "simulate"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedcrypt' has no attribute {name!r}")
