"""Recording runs: the run directory every simulation and server writes."""

from fedcrypt.tracking.rundir import RunDirectory

__all__ = ["RunDirectory"]
