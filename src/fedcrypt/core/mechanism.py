"""The update-protection interface that every privacy mechanism implements.

A mechanism turns the clients' contribution vectors into their sum without the server reading
any single one. Per round it runs a short sequence of *stages*; in each stage the server sends
every participating client a (possibly per-recipient) request and folds the replies in one at a
time as they arrive, so the server holds O(one update) however many clients there are.

The common case is one stage: the client *protects* its vector, the server *aggregates*
protected payloads into one aggregate payload, and a key holder *recovers* the sum from it.
:class:`OneShotMechanism` is that case; multi-stage protocols (SecAgg+'s advertise / share /
mask / unmask, BatchCrypt's statistics exchange before protecting, selective encryption's mask
agreement) implement :class:`Mechanism` directly. The server's aggregator names each round's
stages, so a mechanism may run an extra stage in some rounds only; the first stage's request
rides in ``FitIns`` and its reply in ``FitRes``. Who may call :meth:`Mechanism.recover` depends
on the mechanism: for ``none`` and secret sharing the server learns the sum; for homomorphic
encryption only the holders of the secret key do.

Additive sharing needs aggregators besides the server: a mechanism names them in
:attr:`Mechanism.helpers`, and its server aggregator addresses some stages
(:attr:`ServerAggregator.helper_stages`) to all of them instead of to the clients; each helper
answers with a :class:`HelperRound` in its own process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np

from fedcrypt.core.messages import Payload

Accumulator = TypeVar("Accumulator")

#: The stage in which a key-holding client decrypts the aggregate for a server that cannot.
RECOVER_STAGE = "recover"


class PayloadRejected(Exception):
    """A client's payload failed validation; the client is dropped from the round."""


class RecoveryError(Exception):
    """The aggregate could not be recovered (too few survivors, wrong key, overflow)."""


class BudgetSpent(Exception):
    """The job may run no more rounds (e.g. its differential-privacy budget is spent)."""


@dataclass(frozen=True)
class RoundContext:
    """What both sides know about a round before it starts."""

    job: str
    round: int
    participants: tuple[str, ...]
    vector_size: int


@dataclass(frozen=True)
class AggregatePiece:
    """Part of an aggregate that one key holder can recover alone: the sum's values ``[start, stop)``."""

    start: int
    stop: int
    payload: Payload


#: A key holder's piece of an aggregate is worth its round trip from this many ciphertexts on.
MIN_PIECE_ROWS = 64


def row_ranges(rows: int, pieces: int) -> list[tuple[int, int]]:
    """``rows`` ciphertexts (or other independently decryptable units) cut into at most
    ``pieces`` near-equal ranges of at least ``MIN_PIECE_ROWS``."""
    count = max(1, min(pieces, rows // MIN_PIECE_ROWS))
    bounds = [rows * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def piece_rows(payload: Payload, rows: int) -> tuple[int, int]:
    """The ciphertext rows ``[first, last)`` an aggregate (piece) holds, checked against ``rows``."""
    piece = payload.meta.get("rows")
    if piece is None:
        return 0, rows
    if (
        not isinstance(piece, list)
        or len(piece) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in piece)
        or not 0 <= piece[0] < piece[1] <= rows
    ):
        raise ValueError(f"malformed aggregate piece {piece!r}")
    return piece[0], piece[1]


class LocalModel(Protocol):
    """What a mechanism may ask of the client's model and data besides the contribution."""

    def sensitivity(self) -> np.ndarray:
        """Per-entry privacy sensitivity of the contribution's parameters (>= 0, float32)."""
        ...


class ServerAggregator(ABC):
    """Server half of one round: builds requests, folds replies, yields the aggregate payload."""

    @property
    @abstractmethod
    def stages(self) -> tuple[str, ...]:
        """This round's stages in order; the first one's reply travels inside ``FitRes``."""

    @abstractmethod
    def request(self, stage: str, client: str) -> Payload:
        """The payload sent to ``client`` at the start of ``stage``."""

    @abstractmethod
    def fold(self, stage: str, client: str, payload: Payload) -> None:
        """Fold one client's reply in; raise :class:`PayloadRejected` to drop that client.

        Must validate completely before changing any state, so a rejected payload leaves the
        aggregate exactly as it was.
        """

    def close_stage(self, stage: str, survivors: Sequence[str]) -> None:
        """Called once a stage's replies are in; ``survivors`` answered it successfully."""

    def contributors(self) -> int | None:
        """How many clients' contributions the aggregate holds, where that differs from the
        survivors of the last client stage (SecAgg+: a client can drop after its masked vector)."""
        return None

    @property
    def helper_stages(self) -> frozenset[str]:
        """Stages answered by the mechanism's helper aggregators (every one) instead of the clients;
        the server's client survivors stay as they were. Never the first stage."""
        return frozenset()

    @abstractmethod
    def finish(self) -> Payload:
        """The aggregate payload of the round (readable only by whoever can recover it)."""

    def metrics(self) -> dict[str, float]:
        """Mechanism-specific figures for the round's metrics record."""
        return {}


class ForwardingAggregator(ServerAggregator):
    """Hands every call to ``inner``: the base of wrappers that change or watch a few of them
    (differential privacy around a mechanism, the privacy audit's tap)."""

    def __init__(self, inner: ServerAggregator) -> None:
        self._inner = inner

    @property
    def stages(self) -> tuple[str, ...]:
        return self._inner.stages

    @property
    def helper_stages(self) -> frozenset[str]:
        return self._inner.helper_stages

    def request(self, stage: str, client: str) -> Payload:
        return self._inner.request(stage, client)

    def fold(self, stage: str, client: str, payload: Payload) -> None:
        self._inner.fold(stage, client, payload)

    def close_stage(self, stage: str, survivors: Sequence[str]) -> None:
        self._inner.close_stage(stage, survivors)

    def contributors(self) -> int | None:
        return self._inner.contributors()

    def finish(self) -> Payload:
        return self._inner.finish()

    def metrics(self) -> dict[str, float]:
        return self._inner.metrics()


class ClientProtector(ABC):
    """Client half of one round: answers each stage's request."""

    @abstractmethod
    def respond(self, stage: str, request: Payload, contribution: np.ndarray) -> Payload:
        """The reply to ``request``; ``contribution`` is the vector this client adds to the sum."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """Whether the round needs the contribution no more (the client then forgets it)."""


class HelperRound(ABC):
    """A helper aggregator's half of one round: answers the stages addressed to helpers."""

    @abstractmethod
    def respond(self, stage: str, request: Payload) -> Payload:
        """The reply to the server's ``request`` for ``stage``; raise ``ValueError`` to refuse."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """Whether the round needs this helper no more (it then forgets the round's secrets)."""


class Mechanism(ABC):
    """A way to sum client vectors so the server cannot read any single one."""

    name: ClassVar[str]
    #: Whether the server process can recover the sum (True for ``none`` and secret sharing,
    #: once the helper aggregators, if any, have answered their stages).
    server_can_recover: ClassVar[bool]
    #: Helper aggregators that must answer this mechanism's helper stages every round, by name.
    helpers: tuple[str, ...] = ()

    @abstractmethod
    def server_round(self, ctx: RoundContext) -> ServerAggregator: ...

    @abstractmethod
    def client_round(self, ctx: RoundContext, client: str, local: LocalModel | None = None) -> ClientProtector:
        """The client's half of a round; ``local`` answers questions about its model and data."""

    @abstractmethod
    def recover(self, aggregate: Payload, ctx: RoundContext) -> np.ndarray:
        """The sum of the survivors' contributions (a float array the caller may modify in place),
        or a piece's values for a piece from :meth:`split`; raises :class:`RecoveryError`."""

    def helper_round(self, job: str, server_round: int, helper: str) -> HelperRound:
        """Helper aggregator ``helper``'s half of a round (runs in the helper's process)."""
        raise NotImplementedError(f"mechanism {self.name!r} has no helper aggregators")

    def server_view(self, stage: str, payload: Payload, ctx: RoundContext) -> np.ndarray | None:
        """What the server can read of one client's contribution in its reply to ``stage``: a
        float32 array of ``ctx.vector_size`` with NaN where it reads nothing, or None when the
        reply shows none of the contribution's values (ciphertexts, keys, shares of seeds).
        The privacy audit attacks exactly this. By default a reply shows nothing."""
        return None

    def finalize(self, summed: np.ndarray, ctx: RoundContext) -> np.ndarray:
        """Server-side processing of the recovered sum before averaging (central DP noise)."""
        return summed

    def check_budget(self, server_round: int) -> None:
        """Raise :class:`BudgetSpent` if round ``server_round`` must not run."""

    def state(self) -> dict[str, float]:
        """What the server's instance learned across rounds and a checkpoint must keep (default: nothing)."""
        return {}

    def load_state(self, state: dict[str, float]) -> None:
        """Continue from :meth:`state` of a checkpoint; raises ``ValueError`` for a state it does not know."""
        if state:
            raise ValueError(f"mechanism {self.name!r} keeps no state across rounds, the checkpoint has {sorted(state)}")

    def split(self, aggregate: Payload, ctx: RoundContext, pieces: int) -> list[AggregatePiece]:
        """The aggregate cut into at most ``pieces`` parts, so that several key holders recover it
        in parallel (each decrypts only its part). By default it stays whole."""
        return [AggregatePiece(0, ctx.vector_size, aggregate)]


class OneShotMechanism(Mechanism, Generic[Accumulator]):
    """Protect -> aggregate (streaming) -> recover in a single stage."""

    stage: ClassVar[str] = "protect"

    @abstractmethod
    def protect(self, contribution: np.ndarray, ctx: RoundContext) -> Payload: ...

    @abstractmethod
    def empty(self, ctx: RoundContext) -> Accumulator:
        """The aggregate of no payloads."""

    @abstractmethod
    def fold_one(self, accumulator: Accumulator, payload: Payload, ctx: RoundContext) -> Accumulator:
        """Validate ``payload`` fully, then add it; raise :class:`PayloadRejected` if invalid."""

    @abstractmethod
    def to_payload(self, accumulator: Accumulator, ctx: RoundContext) -> Payload: ...

    def server_round(self, ctx: RoundContext) -> ServerAggregator:
        return _OneShotAggregator(self, ctx)

    def client_round(self, ctx: RoundContext, client: str, local: LocalModel | None = None) -> ClientProtector:
        return _OneShotProtector(self, ctx)


class _OneShotAggregator(ServerAggregator):
    def __init__(self, mechanism: OneShotMechanism[Any], ctx: RoundContext) -> None:
        self._mechanism = mechanism
        self._ctx = ctx
        self._accumulator = mechanism.empty(ctx)
        self.folded = 0

    @property
    def stages(self) -> tuple[str, ...]:
        return (self._mechanism.stage,)

    def request(self, stage: str, client: str) -> Payload:
        return Payload()

    def fold(self, stage: str, client: str, payload: Payload) -> None:
        self._accumulator = self._mechanism.fold_one(self._accumulator, payload, self._ctx)
        self.folded += 1

    def finish(self) -> Payload:
        if self.folded == 0:
            raise RecoveryError("no payload was aggregated this round")
        return self._mechanism.to_payload(self._accumulator, self._ctx)


class _OneShotProtector(ClientProtector):
    def __init__(self, mechanism: OneShotMechanism[Any], ctx: RoundContext) -> None:
        self._mechanism = mechanism
        self._ctx = ctx

    def respond(self, stage: str, request: Payload, contribution: np.ndarray) -> Payload:
        if stage != self._mechanism.stage:
            raise ValueError(f"mechanism {self._mechanism.name!r} has no stage {stage!r}")
        return self._mechanism.protect(contribution, self._ctx)

    @property
    def done(self) -> bool:
        return True
