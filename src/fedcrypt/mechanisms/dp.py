"""Differential privacy around any mechanism: clip (and noise) before protection, noise after.

:class:`DpMechanism` wraps another mechanism. On the client, before the inner mechanism sees the
contribution ``[delta, 1]`` (DP-FedAvg weighs clients uniformly), it scales ``delta`` to L2 norm
at most ``clip_norm`` and, for ``distributed`` noise, adds ``N(0, (z C)^2 / min_clients)`` per
entry, so the sum of the at least ``min_clients`` survivors carries at least the full noise; for
``local`` noise it adds ``N(0, (z C)^2)``. For ``central`` noise the server adds
``N(0, (z C)^2)`` to the recovered sum. The accountant reports epsilon per round in the round's
metrics, and a job with a ``target_epsilon`` stops before the round that would exceed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedcrypt.core.mechanism import (
    AggregatePiece,
    BudgetSpent,
    ClientProtector,
    LocalModel,
    Mechanism,
    RoundContext,
    ServerAggregator,
)
from fedcrypt.core.messages import Payload
from fedcrypt.dp import DpSettings, epsilon_after, gaussian, rounds_within


class DpMechanism(Mechanism):
    """``inner`` with client-level DP; ``clients`` and ``sampled`` set the sampling rate, and
    ``min_clients`` (the strategy's ``min_fit_clients``) the split of distributed noise."""

    def __init__(
        self, inner: Mechanism, settings: DpSettings, *, clients: int, sampled: int, min_clients: int, rounds: int
    ) -> None:
        if not 1 <= min_clients <= sampled <= clients:
            raise ValueError(f"DP needs 1 <= min_clients ({min_clients}) <= sampled ({sampled}) <= clients ({clients})")
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.server_can_recover = inner.server_can_recover  # type: ignore[misc]
        self.settings = settings
        self.sampling = sampled / clients
        self.min_clients = min_clients
        self.round_limit = (
            rounds_within(settings.target_epsilon, settings.noise_multiplier, self.sampling, settings.delta,
                          settings.noise, rounds)
            if settings.target_epsilon is not None
            else None
        )

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the sum."""
        return self.settings.noise_multiplier * self.settings.clip_norm

    def epsilon(self, rounds: int) -> float:
        s = self.settings
        return epsilon_after(rounds, s.noise_multiplier, self.sampling, s.delta, s.noise)

    def check_budget(self, server_round: int) -> None:
        if self.round_limit is not None and server_round > self.round_limit:
            s = self.settings
            raise BudgetSpent(
                f"privacy budget spent: round {server_round} would take epsilon past {s.target_epsilon:g} "
                f"(delta {s.delta:g}); {self.round_limit} rounds reached epsilon {self.epsilon(self.round_limit):.3f}"
            )
        self.inner.check_budget(server_round)

    def server_round(self, ctx: RoundContext) -> ServerAggregator:
        return _Aggregator(self.inner.server_round(ctx), self, ctx)

    def client_round(self, ctx: RoundContext, client: str, local: LocalModel | None = None) -> ClientProtector:
        return _Protector(self.inner.client_round(ctx, client, local), self)

    def recover(self, aggregate: Payload, ctx: RoundContext) -> np.ndarray:
        return self.inner.recover(aggregate, ctx)

    def split(self, aggregate: Payload, ctx: RoundContext, pieces: int) -> list[AggregatePiece]:
        return self.inner.split(aggregate, ctx, pieces)

    def finalize(self, summed: np.ndarray, ctx: RoundContext) -> np.ndarray:
        summed = self.inner.finalize(summed, ctx)
        if self.settings.noise == "central":
            summed[:-1] += gaussian(summed.shape[0] - 1, self.noise_std).astype(summed.dtype)
        return summed

    def privatize(self, contribution: np.ndarray) -> None:
        """Clip ``contribution = [delta, 1]`` in place and add this client's share of the noise."""
        if contribution[-1] != 1.0:
            raise ValueError("differential privacy needs uniform client weights ([strategy] weighting = \"uniform\")")
        delta = contribution[:-1]
        norm = float(np.linalg.norm(delta.astype(np.float64)))
        if not np.isfinite(norm):
            raise ValueError("the update contains NaN/Inf")
        if norm > self.settings.clip_norm:
            delta *= np.float32(self.settings.clip_norm / norm)
        if self.settings.noise == "distributed":
            delta += gaussian(delta.shape[0], self.noise_std / np.sqrt(self.min_clients)).astype(delta.dtype)
        elif self.settings.noise == "local":
            delta += gaussian(delta.shape[0], self.noise_std).astype(delta.dtype)


class _Aggregator(ServerAggregator):
    def __init__(self, inner: ServerAggregator, mechanism: DpMechanism, ctx: RoundContext) -> None:
        self._inner, self._mechanism, self._ctx = inner, mechanism, ctx

    @property
    def stages(self) -> tuple[str, ...]:
        return self._inner.stages

    def request(self, stage: str, client: str) -> Payload:
        return self._inner.request(stage, client)

    def fold(self, stage: str, client: str, payload: Payload) -> None:
        self._inner.fold(stage, client, payload)

    def close_stage(self, stage: str, survivors: Sequence[str]) -> None:
        self._inner.close_stage(stage, survivors)

    def finish(self) -> Payload:
        return self._inner.finish()

    def metrics(self) -> dict[str, float]:
        s = self._mechanism.settings
        figures: dict[str, Any] = dict(self._inner.metrics())
        figures.update(
            dp_epsilon=self._mechanism.epsilon(self._ctx.round),
            dp_delta=s.delta,
            dp_noise_multiplier=s.noise_multiplier,
            dp_clip_norm=s.clip_norm,
        )
        return figures


class _Protector(ClientProtector):
    def __init__(self, inner: ClientProtector, mechanism: DpMechanism) -> None:
        self._inner, self._mechanism = inner, mechanism
        self._privatized = False

    @property
    def done(self) -> bool:
        return self._inner.done

    def respond(self, stage: str, request: Payload, contribution: np.ndarray) -> Payload:
        if not self._privatized:  # before the inner mechanism sees any of it, once per round
            self._mechanism.privatize(contribution)
            self._privatized = True
        return self._inner.respond(stage, request, contribution)
