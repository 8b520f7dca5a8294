"""Federated optimization strategies: one small class each, over plain arrays."""

from __future__ import annotations

from fedcrypt.strategies.base import Strategy
from fedcrypt.strategies.fedavg import FedAvg
from fedcrypt.strategies.fedopt import FedAdam, FedYogi
from fedcrypt.strategies.fedprox import FedProx

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAdam, FedYogi)
}

__all__ = ["STRATEGIES", "FedAdam", "FedAvg", "FedProx", "FedYogi", "Strategy"]
