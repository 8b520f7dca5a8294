"""The local training loop a client runs each round, and central evaluation.

One :class:`LocalTrainer` owns one model instance; the simulation shares it among all clients
(they train one after another), so memory stays at one model however many clients there are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedcrypt.core.params import ParamSpec, flatten, load_flat
from fedcrypt.core.wire import Blob


@dataclass(frozen=True)
class TrainConfig:
    """Client optimizer settings (plain SGD, as in FedAvg)."""

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class ClientData:
    """A client's examples: rows ``indices`` of the tensors ``x`` and ``y`` (shared, not copied)."""

    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(self.indices.shape[0])

    @classmethod
    def whole(cls, x: torch.Tensor, y: torch.Tensor) -> ClientData:
        return cls(x, y, torch.arange(x.shape[0]))


@dataclass(frozen=True)
class FitResult:
    params: np.ndarray
    train_loss: float
    seconds: float


class LocalTrainer:
    """Loads a flat parameter vector into its model, trains with SGD and returns the new vector."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.model = model
        self.config = config
        self.spec = ParamSpec.from_state_dict(model.state_dict())
        self._loss = nn.CrossEntropyLoss()

    def initial_params(self) -> np.ndarray:
        return flatten(self.model.state_dict(), self.spec)

    def fit(
        self,
        params: Blob,
        data: ClientData,
        *,
        seed: int,
        proximal_mu: float = 0.0,
        out: np.ndarray | None = None,
    ) -> FitResult:
        """Train ``local_epochs`` epochs of shuffled mini-batches; FedProx adds (mu/2)||w - w0||^2.

        The trained parameters are written to ``out`` if given (see :func:`flatten`).
        """
        started = time.perf_counter()
        load_flat(self.model, params, self.spec)
        self.model.train()
        cfg = self.config
        optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        anchors = [p.detach().clone() for p in self.model.parameters()] if proximal_mu > 0 else []
        generator = torch.Generator().manual_seed(seed)
        total, batches = 0.0, 0
        for _ in range(cfg.local_epochs):
            order = data.indices[torch.randperm(data.num_examples, generator=generator)]
            for batch in order.split(cfg.batch_size):
                optimizer.zero_grad(set_to_none=True)
                loss = self._loss(self.model(data.x[batch]), data.y[batch])
                if anchors:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(self.model.parameters(), anchors))
                    loss = loss + 0.5 * proximal_mu * prox
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                batches += 1
        optimizer.zero_grad(set_to_none=True)  # a model's worth of gradients, not needed any more
        trained = flatten(self.model.state_dict(), self.spec, out=out)
        return FitResult(trained, total / max(batches, 1), time.perf_counter() - started)

    @torch.no_grad()
    def evaluate(self, params: np.ndarray, data: ClientData, batch_size: int = 2048) -> tuple[float, float]:
        """Mean cross-entropy loss and accuracy of ``params`` on ``data``."""
        load_flat(self.model, params, self.spec)
        self.model.eval()
        loss_sum, correct = 0.0, 0
        for batch in data.indices.split(batch_size):
            logits = self.model(data.x[batch])
            target = data.y[batch]
            loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=1) == target).sum())
        n = max(data.num_examples, 1)
        return loss_sum / n, correct / n

