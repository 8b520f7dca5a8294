"""Differential privacy around any mechanism: clip (and noise) before protection, noise after.

:class:`DpMechanism` wraps another mechanism. On the client, before the inner mechanism sees the
contribution ``[delta, 1]`` (DP-FedAvg weighs clients uniformly), it scales ``delta`` to L2 norm
at most ``clip_norm`` and, for ``distributed`` noise, adds ``N(0, (z C)^2 / min_clients)`` per
entry, so the sum of the at least ``min_clients`` survivors carries at least the full noise; for
``local`` noise it adds ``N(0, (z C)^2)``. For ``central`` noise the server adds
``N(0, (z C)^2)`` to the recovered sum. The accountant reports epsilon per round in the round's
metrics, and a job with a ``target_epsilon`` stops before the round that would exceed it.

With adaptive clipping the first request carries the round's bound ``C`` and every client's
first reply one bit, ``||delta|| <= C``, which the server learns in the clear (as in Flower's
adaptive clipping) and counts with Gaussian noise before moving ``C`` for the next round.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedcrypt.core.mechanism import (
    AggregatePiece,
    BudgetSpent,
    ClientProtector,
    ForwardingAggregator,
    HelperRound,
    LocalModel,
    Mechanism,
    PayloadRejected,
    RoundContext,
    ServerAggregator,
)
from fedcrypt.core.messages import Payload
from fedcrypt.dp import DpSettings, epsilon_after, gaussian, rounds_within

CLIP_KEY = "dp_clip_norm"
BIT_KEY = "dp_clip_bit"


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
        self.helpers = inner.helpers
        self.settings = settings
        self.sampling = sampled / clients
        self.min_clients = min_clients
        self.clip_norm = settings.clip_norm  # the current bound (moves each round when adaptive)
        self._round_clip_norm = self.clip_norm  # the bound of the round being run
        self.round_limit = (
            rounds_within(settings.target_epsilon, settings.noise_multiplier, self.sampling, settings.delta,
                          settings.noise, rounds)
            if settings.target_epsilon is not None
            else None
        )

    def noise_std(self, clip_norm: float) -> float:
        """Standard deviation of the noise on the sum for updates clipped to ``clip_norm``."""
        return self.settings.update_noise_multiplier * clip_norm

    def adapt(self, unclipped: int, clients: int) -> None:
        """Move the clip norm toward the target quantile from the noisy count of unclipped updates."""
        s = self.settings
        fraction = (unclipped + float(gaussian(1, s.count_noise)[0])) / max(clients, 1)
        self.clip_norm *= float(np.exp(-s.clip_lr * (fraction - s.target_quantile)))

    def epsilon(self, rounds: int) -> float:
        s = self.settings
        return epsilon_after(rounds, s.noise_multiplier, self.sampling, s.delta, s.noise)

    def state(self) -> dict[str, float]:
        return {**self.inner.state(), CLIP_KEY: self.clip_norm} if self.settings.adaptive else self.inner.state()

    def load_state(self, state: dict[str, float]) -> None:
        state = dict(state)
        if self.settings.adaptive and CLIP_KEY in state:
            clip_norm = state.pop(CLIP_KEY)
            if not isinstance(clip_norm, (int, float)) or isinstance(clip_norm, bool) or not 0 < clip_norm < float("inf"):
                raise ValueError(f"the checkpoint's adaptive clip norm {clip_norm!r} is not a positive number")
            self.clip_norm = float(clip_norm)
        self.inner.load_state(state)

    def check_budget(self, server_round: int) -> None:
        if self.round_limit is not None and server_round > self.round_limit:
            s = self.settings
            raise BudgetSpent(
                f"privacy budget spent: round {server_round} would take epsilon past {s.target_epsilon:g} "
                f"(delta {s.delta:g}); {self.round_limit} rounds reached epsilon {self.epsilon(self.round_limit):.3f}"
            )
        self.inner.check_budget(server_round)

    def server_round(self, ctx: RoundContext) -> ServerAggregator:
        self._round_clip_norm = self.clip_norm
        return _Aggregator(self.inner.server_round(ctx), self, ctx, self.clip_norm)

    def client_round(self, ctx: RoundContext, client: str, local: LocalModel | None = None) -> ClientProtector:
        return _Protector(self.inner.client_round(ctx, client, local), self)

    def helper_round(self, job: str, server_round: int, helper: str) -> HelperRound:
        return self.inner.helper_round(job, server_round, helper)

    def recover(self, aggregate: Payload, ctx: RoundContext) -> np.ndarray:
        return self.inner.recover(aggregate, ctx)

    def server_view(self, stage: str, payload: Payload, ctx: RoundContext) -> np.ndarray | None:
        """The inner mechanism's view of the clipped (and, unless noise is central, noised) update."""
        return self.inner.server_view(stage, payload, ctx)

    def split(self, aggregate: Payload, ctx: RoundContext, pieces: int) -> list[AggregatePiece]:
        return self.inner.split(aggregate, ctx, pieces)

    def finalize(self, summed: np.ndarray, ctx: RoundContext) -> np.ndarray:
        summed = self.inner.finalize(summed, ctx)
        if self.settings.noise == "central":
            noise = gaussian(summed.shape[0] - 1, self.noise_std(self._round_clip_norm))
            summed[:-1] += noise.astype(summed.dtype)
        return summed

    def privatize(self, contribution: np.ndarray, clip_norm: float) -> bool:
        """Clip ``contribution = [delta, 1]`` to ``clip_norm`` in place and add this client's share
        of the noise; returns whether ``delta`` was within the bound."""
        if contribution[-1] != 1.0:
            raise ValueError("differential privacy needs uniform client weights ([strategy] weighting = \"uniform\")")
        delta = contribution[:-1]
        norm = float(np.linalg.norm(delta.astype(np.float64)))
        if not np.isfinite(norm):
            raise ValueError("the update contains NaN/Inf")
        if norm > clip_norm:
            delta *= np.float32(clip_norm / norm)
        if self.settings.noise == "distributed":
            delta += gaussian(delta.shape[0], self.noise_std(clip_norm) / np.sqrt(self.min_clients)).astype(delta.dtype)
        elif self.settings.noise == "local":
            delta += gaussian(delta.shape[0], self.noise_std(clip_norm)).astype(delta.dtype)
        return norm <= clip_norm


class _Aggregator(ForwardingAggregator):
    def __init__(self, inner: ServerAggregator, mechanism: DpMechanism, ctx: RoundContext, clip_norm: float) -> None:
        super().__init__(inner)
        self._mechanism, self._ctx = mechanism, ctx
        self._clip_norm = clip_norm
        self._first = inner.stages[0]
        self._unclipped = 0
        self._reported = 0

    def request(self, stage: str, client: str) -> Payload:
        payload = self._inner.request(stage, client)
        if stage == self._first and self._mechanism.settings.adaptive:
            payload = Payload({**payload.meta, CLIP_KEY: self._clip_norm}, payload.arrays)
        return payload

    def fold(self, stage: str, client: str, payload: Payload) -> None:
        bit = None
        if stage == self._first and self._mechanism.settings.adaptive:
            bit = payload.meta.get(BIT_KEY)
            if bit not in (0, 1) or isinstance(bit, bool):
                raise PayloadRejected("adaptive clipping needs the 0/1 clip bit in the first reply")
        self._inner.fold(stage, client, payload)
        if bit is not None:
            self._unclipped += bit
            self._reported += 1

    def finish(self) -> Payload:
        aggregate = self._inner.finish()
        if self._mechanism.settings.adaptive:
            self._mechanism.adapt(self._unclipped, len(self._ctx.participants))
        return aggregate

    def metrics(self) -> dict[str, float]:
        s = self._mechanism.settings
        figures: dict[str, Any] = dict(self._inner.metrics())
        figures.update(
            dp_epsilon=self._mechanism.epsilon(self._ctx.round),
            dp_delta=s.delta,
            dp_noise_multiplier=s.noise_multiplier,
            dp_clip_norm=self._clip_norm,
        )
        if s.adaptive:
            figures.update(dp_next_clip_norm=self._mechanism.clip_norm, dp_unclipped=float(self._unclipped))
        return figures


class _Protector(ClientProtector):
    def __init__(self, inner: ClientProtector, mechanism: DpMechanism) -> None:
        self._inner, self._mechanism = inner, mechanism
        self._privatized = False

    @property
    def done(self) -> bool:
        return self._inner.done

    def respond(self, stage: str, request: Payload, contribution: np.ndarray) -> Payload:
        if self._privatized:
            return self._inner.respond(stage, request, contribution)
        clip_norm = self._mechanism.settings.clip_norm
        if self._mechanism.settings.adaptive:
            clip_norm = request.meta.get(CLIP_KEY)
            if not isinstance(clip_norm, (int, float)) or isinstance(clip_norm, bool) or not 0 < clip_norm < float("inf"):
                raise ValueError(f"the server sent no usable clip norm ({clip_norm!r})")
        within = self._mechanism.privatize(contribution, float(clip_norm))  # before the inner mechanism sees it
        self._privatized = True
        reply = self._inner.respond(stage, request, contribution)
        if self._mechanism.settings.adaptive:
            reply = Payload({**reply.meta, BIT_KEY: int(within)}, reply.arrays)
        return reply
