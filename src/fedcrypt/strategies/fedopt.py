"""Adaptive server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The average client delta is treated as a pseudo-gradient Delta; the server keeps moments
m <- b1*m + (1-b1)*Delta and a second moment v, and steps x <- x + eta * m / (sqrt(v) + tau).
FedAdam: v <- b2*v + (1-b2)*Delta^2. FedYogi: v <- v - (1-b2)*Delta^2*sign(v - Delta^2).
"""

from __future__ import annotations

import numpy as np

from fedcrypt.strategies.base import Strategy


class FedAdam(Strategy):
    name = "fedadam"

    def __init__(
        self,
        *,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if server_lr <= 0 or tau <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
            raise ValueError("need server_lr > 0, tau > 0 and 0 <= beta1, beta2 < 1")
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m_: np.ndarray | None = None
        self.v_: np.ndarray | None = None

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.m_ is None or self.v_ is None else {"m": self.m_, "v": self.v_}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if state and set(state) != {"m", "v"}:
            raise ValueError(f"{self.name} state needs arrays m and v, got {sorted(state)}")
        self.m_, self.v_ = (state["m"], state["v"]) if state else (None, None)

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * delta_sq

    def apply(self, params: np.ndarray, average_delta: np.ndarray) -> np.ndarray:
        delta = average_delta.astype(np.float64)
        if self.m_ is None or self.v_ is None:
            self.m_ = np.zeros_like(delta)
            self.v_ = np.full_like(delta, self.tau**2)
        self.m_ = self.beta1 * self.m_ + (1 - self.beta1) * delta
        self.v_ = self._second_moment(self.v_, delta * delta)
        step = self.server_lr * self.m_ / (np.sqrt(self.v_) + self.tau)
        return (params + step).astype(np.float32)


class FedYogi(FedAdam):
    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v - (1 - self.beta2) * delta_sq * np.sign(v - delta_sq)
