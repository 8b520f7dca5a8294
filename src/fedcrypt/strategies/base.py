"""The strategy interface: who trains each round, with what settings, and how the global model
moves given the average update. Strategies see plain arrays only; they know nothing of the
transport or of how the average was protected."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from fedcrypt.core.messages import Scalar


class Strategy(ABC):
    """Base class: client sampling and the per-round client config shared by all strategies."""

    name: str

    def __init__(
        self, *, fraction_fit: float = 1.0, min_fit_clients: int = 2, weighting: str = "samples"
    ) -> None:
        if not 0.0 < fraction_fit <= 1.0:
            raise ValueError(f"fraction_fit must be in (0, 1], got {fraction_fit}")
        if min_fit_clients < 1:
            raise ValueError(f"min_fit_clients must be >= 1, got {min_fit_clients}")
        if weighting not in ("samples", "uniform"):
            raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
        self.fraction_fit = fraction_fit
        self.min_fit_clients = min_fit_clients
        self.weighting = weighting

    def sample(self, available: Sequence[str], rng: np.random.Generator) -> list[str]:
        """Pick ``max(min_fit_clients, ceil(fraction_fit * available))`` clients uniformly."""
        if len(available) < self.min_fit_clients:
            raise ValueError(
                f"only {len(available)} clients available, min_fit_clients is {self.min_fit_clients}"
            )
        count = min(len(available), max(self.min_fit_clients, math.ceil(self.fraction_fit * len(available))))
        chosen = rng.choice(len(available), size=count, replace=False)
        return [available[i] for i in sorted(chosen)]

    def fit_config(self, server_round: int) -> dict[str, Scalar]:
        """Settings sent to every client with the round's model."""
        return {"weighting": self.weighting}

    def state(self) -> dict[str, np.ndarray]:
        """Arrays the strategy carries between rounds (for checkpoints); none by default."""
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned."""
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, got {sorted(state)}")

    @abstractmethod
    def apply(self, params: np.ndarray, average_delta: np.ndarray) -> np.ndarray:
        """The next global model, given the current one and the clients' weighted average delta
        (which the strategy may overwrite)."""
