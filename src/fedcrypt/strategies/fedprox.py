"""FedProx (Li et al., 2020): FedAvg whose clients add (mu/2)||w - w_global||^2 to their loss,
which keeps local models near the global one on heterogeneous data."""

from __future__ import annotations

from fedcrypt.core.messages import Scalar
from fedcrypt.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, *, proximal_mu: float = 0.01, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = proximal_mu

    def fit_config(self, server_round: int) -> dict[str, Scalar]:
        return {**super().fit_config(server_round), "proximal_mu": self.proximal_mu}
