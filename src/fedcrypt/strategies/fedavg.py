"""FedAvg (McMahan et al., 2017): the global model moves by the weighted average client delta."""

from __future__ import annotations

import numpy as np

from fedcrypt.strategies.base import Strategy


class FedAvg(Strategy):
    """Weighted federated averaging, optionally with a server learning rate (1.0 is plain FedAvg)."""

    name = "fedavg"

    def __init__(self, *, server_lr: float = 1.0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr

    def apply(self, params: np.ndarray, average_delta: np.ndarray) -> np.ndarray:
        """Reuses ``average_delta``'s memory when it is a writable float32 array (no extra copy)."""
        if average_delta.dtype == np.float32 and average_delta.flags.writeable:
            step = average_delta
        else:
            step = average_delta.astype(np.float32)
        if self.server_lr != 1.0:
            step *= self.server_lr
        step += params
        return step
