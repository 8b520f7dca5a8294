"""What the server observes: one real round of a job's protocol, with a tap on the server.

The audit does not model the mechanisms; it runs them. :func:`observe_round` gives each of a
few in-process clients one batch, runs one round of the job's mechanism (keys, stages, DP and
all) through the same :class:`~fedcrypt.core.server.Server` a simulation uses, and records, for
every client, what :meth:`Mechanism.server_view` says the server can read of its replies. That is
the input of every gradient-inversion attack.

The round is FedSGD-shaped: every client takes one SGD step on its batch, so its update is
``-lr`` times its batch gradient, the attacker's best case (several local steps only blur it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedcrypt.config.job import JobConfig
from fedcrypt.core.mechanism import (
    AggregatePiece,
    ClientProtector,
    ForwardingAggregator,
    HelperRound,
    LocalModel,
    Mechanism,
    RoundContext,
    ServerAggregator,
)
from fedcrypt.core.messages import Payload
from fedcrypt.core.params import ParamSpec
from fedcrypt.data import Dataset
from fedcrypt.models.training import ClientData, LocalTrainer, TrainConfig
from fedcrypt.simulation import build_server, build_trainer, client_names


@dataclass(frozen=True)
class Batch:
    """One client's training batch in the audited round (the attack's ground truth)."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True)
class Observation:
    """What the server read of one client's contribution ``[w * delta, w]``: ``view`` has NaN
    where it read nothing; None when no reply showed any value of it."""

    client: str
    batch: Batch
    view: np.ndarray | None

    @property
    def readable(self) -> float:
        """Fraction of the contribution's entries the server read."""
        if self.view is None:
            return 0.0
        return float(np.isfinite(self.view).mean())


@dataclass(frozen=True)
class ObservedRound:
    """The audited round: the global model the clients started from and what the server saw."""

    params: np.ndarray
    spec: ParamSpec
    trainer: LocalTrainer
    observations: list[Observation]
    mechanism: str
    job_seed: int


class Eavesdropper(Mechanism):
    """The server's mechanism instance, unchanged, plus a record of what it could read.

    ``reader`` (the clients' instance) interprets the replies: for selective encryption it holds
    the mask's bits, which the audit grants the server (it learns them with the aggregate).
    """

    def __init__(self, inner: Mechanism, reader: Mechanism) -> None:
        self.inner = inner
        self.reader = reader
        self.name = inner.name  # type: ignore[misc]
        self.server_can_recover = inner.server_can_recover  # type: ignore[misc]
        self.helpers = inner.helpers
        self.views: dict[str, np.ndarray] = {}

    def record(self, stage: str, client: str, payload: Payload, ctx: RoundContext) -> None:
        view = self.reader.server_view(stage, payload, ctx)
        if view is None:
            return
        seen = self.views.get(client)
        if seen is None:
            self.views[client] = view
        else:  # a later stage shows more: keep every value read
            np.copyto(seen, view, where=np.isnan(seen))

    def server_round(self, ctx: RoundContext) -> ServerAggregator:
        return _Tap(self.inner.server_round(ctx), self, ctx)

    def client_round(self, ctx: RoundContext, client: str, local: LocalModel | None = None) -> ClientProtector:
        return self.inner.client_round(ctx, client, local)

    def recover(self, aggregate: Payload, ctx: RoundContext) -> np.ndarray:
        return self.inner.recover(aggregate, ctx)

    def helper_round(self, job: str, server_round: int, helper: str) -> HelperRound:
        return self.inner.helper_round(job, server_round, helper)

    def finalize(self, summed: np.ndarray, ctx: RoundContext) -> np.ndarray:
        return self.inner.finalize(summed, ctx)

    def check_budget(self, server_round: int) -> None:
        self.inner.check_budget(server_round)

    def split(self, aggregate: Payload, ctx: RoundContext, pieces: int) -> list[AggregatePiece]:
        return self.inner.split(aggregate, ctx, pieces)


class _Tap(ForwardingAggregator):
    def __init__(self, inner: ServerAggregator, eavesdropper: Eavesdropper, ctx: RoundContext) -> None:
        super().__init__(inner)
        self._eavesdropper, self._ctx = eavesdropper, ctx

    def fold(self, stage: str, client: str, payload: Payload) -> None:
        if stage not in self._inner.helper_stages:
            self._eavesdropper.record(stage, client, payload, self._ctx)
        self._inner.fold(stage, client, payload)


def audit_batches(dataset: Dataset, clients: int, batch_size: int, *, seed: int) -> list[Batch]:
    """``clients`` disjoint batches of ``batch_size`` training examples, a seeded sample."""
    needed = clients * batch_size
    if needed > dataset.x_train.shape[0]:
        raise ValueError(f"{clients} batches of {batch_size} need {needed} examples; "
                         f"{dataset.name} has {dataset.x_train.shape[0]}")
    order = torch.randperm(dataset.x_train.shape[0], generator=torch.Generator().manual_seed(seed))[:needed]
    x = torch.from_numpy(np.array(dataset.x_train[order.numpy()]))
    y = torch.from_numpy(np.array(dataset.y_train[order.numpy()]))
    return [Batch(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, needed, batch_size)]


def audit_job(config: JobConfig, clients: int, batch_size: int) -> JobConfig:
    """The job reshaped into the audited round: ``clients`` clients, all sampled, one SGD step
    each on a batch of ``batch_size``; mechanism, keys, model and learning rate stay the job's."""
    return config.with_overrides(
        job={"rounds": 1},
        data={"num_clients": clients, "train_samples": None},
        train={"local_epochs": 1, "batch_size": batch_size},
        strategy={"fraction_fit": 1.0, "min_fit_clients": min(config.strategy.min_fit_clients, clients)},
    )


def observe_round(config: JobConfig, dataset: Dataset, batches: Sequence[Batch]) -> ObservedRound:
    """Run round 1 of ``config``'s protocol with one client per batch; return what the server read.

    Differential privacy keeps the job's own settings (noise multiplier, clip norm, the split of
    distributed noise), not ones recalibrated for this round's few clients.
    """
    if not batches:
        raise ValueError("the audit needs at least one batch")
    batch_size = int(batches[0].y.shape[0])
    if any(int(b.y.shape[0]) != batch_size for b in batches):
        raise ValueError("every audited batch must have the same size")
    round_job = audit_job(config, len(batches), batch_size)
    trainer = build_trainer(round_job, dataset)
    names = client_names(len(batches))
    data = {name: ClientData.whole(b.x, b.y) for name, b in zip(names, batches)}
    taps: list[Eavesdropper] = []

    def tap(server_side: Mechanism, client_side: Mechanism) -> Mechanism:
        taps.append(Eavesdropper(server_side, client_side))
        return taps[0]

    server = build_server(round_job, trainer, data, dp_job=config, tap=tap)
    params = server.params.copy()
    try:
        server.run_round(1)
        server.shutdown()
    finally:
        if server.helpers is not None:
            server.helpers.close()
    views = taps[0].views
    observations = [Observation(name, b, views.get(name)) for name, b in zip(names, batches)]
    return ObservedRound(params, trainer.spec, trainer, observations, config.privacy.mechanism, config.job.seed)


def gradient_of(view: np.ndarray, params: np.ndarray, train: TrainConfig, weighting: str) -> np.ndarray:
    """The batch gradient an observed contribution ``[w * delta, w]`` implies, NaN where unread.

    One SGD step gives ``delta = -lr (g + weight_decay * params)`` (momentum does not act on the
    first step), so ``g = -delta / lr - weight_decay * params``. The weight ``w`` is read from the
    view if the server can; otherwise the attacker assumes the batch size (uniform weighting: 1).
    """
    weight = float(view[-1])
    if not math.isfinite(weight) or weight <= 0:
        weight = 1.0 if weighting == "uniform" else float(train.batch_size)
    with np.errstate(over="ignore", invalid="ignore"):
        gradient = -view[:-1].astype(np.float64) / (weight * train.lr) - train.weight_decay * params
    return gradient.astype(np.float32)
