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

    def sensitivity(self, params: Blob, data: ClientData, *, seed: int, examples: int = 64) -> np.ndarray:
        """Per-entry privacy sensitivity of the model ``params`` on ``data`` (FedML-HE's score).

        For parameter ``j`` it is ``S_j = sqrt(mean_k ||d g_j(x_k) / d x_k||^2)``, with ``g(x)`` the
        loss gradient for example ``x``: how strongly the gradient that parameter contributes
        responds to the input, i.e. how much of the input a gradient-inversion attack can read from
        it. The Jacobian norm is estimated with Hutchinson's trick, ``E[(J v)_j^2] = ||J_j||^2`` for
        a random +-1 vector ``v`` over the inputs, one exact forward-over-reverse JVP per batch
        (``examples`` examples, a seeded sample). Entries that are not trainable parameters
        (buffers such as BatchNorm statistics, which summarize the data directly) get ``inf``.
        """
        from torch.func import functional_call, grad, jvp

        load_flat(self.model, params, self.spec)
        self.model.eval()
        weights = {name: p.detach() for name, p in self.model.named_parameters()}
        buffers = dict(self.model.named_buffers())
        generator = torch.Generator().manual_seed(seed)
        sample = data.indices[torch.randperm(data.num_examples, generator=generator)[:examples]]
        squares = {name: torch.zeros_like(w) for name, w in weights.items()}
        for batch in sample.split(self.config.batch_size):
            x, y = data.x[batch].float(), data.y[batch]

            def gradient(inputs: torch.Tensor, y: torch.Tensor = y) -> dict[str, torch.Tensor]:
                def loss(w: dict[str, torch.Tensor]) -> torch.Tensor:
                    logits = functional_call(self.model, (w, buffers), (inputs,))
                    return nn.functional.cross_entropy(logits, y, reduction="sum")

                return grad(loss)(weights)

            probe = torch.randint(0, 2, x.shape, generator=generator, dtype=x.dtype) * 2 - 1
            _, directional = jvp(gradient, (x,), (probe,))
            for name, tangent in directional.items():
                squares[name] += tangent.detach() ** 2
        out = np.full(self.spec.size, np.inf, dtype=np.float32)
        offset = 0
        for tensor in self.spec.tensors:
            if tensor.name in squares:
                score = (squares[tensor.name] / max(sample.shape[0], 1)).sqrt()
                out[offset : offset + tensor.numel] = score.reshape(-1).numpy()
            offset += tensor.numel
        return out

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

