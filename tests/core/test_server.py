"""Server round logic against scripted clients: averaging, dropouts, malformed and hostile replies."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import pytest

from fedcrypt.core import contribution
from fedcrypt.core.mechanism import (
    ClientProtector,
    LocalModel,
    Mechanism,
    PayloadRejected,
    RoundContext,
    ServerAggregator,
)
from fedcrypt.core.messages import (
    ErrorReply,
    FitIns,
    FitRes,
    Payload,
    Shutdown,
    StageIns,
    StageRes,
    from_bytes,
    to_bytes,
)
from fedcrypt.core.server import Server
from fedcrypt.mechanisms.plaintext import PlaintextMechanism
from fedcrypt.strategies import FedAvg
from fedcrypt.transport.inprocess import InProcessTransport

JOB = "test-job"
SIZE = 5


class ScriptedClient:
    """Answers FitIns with a fixed delta, or misbehaves in a chosen way."""

    def __init__(self, name: str, delta: np.ndarray, examples: int, mechanism: Mechanism, fault: str = "") -> None:
        self.name, self.delta, self.examples, self.mechanism, self.fault = name, delta, examples, mechanism, fault
        self.finished = False
        self.protector: ClientProtector | None = None
        self.contribution = np.empty(0)

    def handle(self, request: bytes) -> bytes:
        message = from_bytes(request).message
        if isinstance(message, Shutdown):
            self.finished = True
            return self._send(Shutdown())
        if self.fault == "crash":
            raise RuntimeError("disk on fire")
        if self.fault == "garbage":
            return b"\x00garbage"
        if self.fault == "refuse":
            return self._send(ErrorReply(message.round, "not today"))
        if isinstance(message, StageIns):
            assert self.protector is not None
            payload = self.protector.respond(message.stage, message.payload, self.contribution)
            return self._send(StageRes(message.round, message.stage, payload))
        assert isinstance(message, FitIns)
        self.contribution = contribution.pack(self.delta, float(self.examples))
        if self.fault == "nan":
            self.contribution[1] = np.nan
        if self.fault == "short":
            self.contribution = self.contribution[:-2]
        ctx = RoundContext(JOB, message.round, message.participants, SIZE + 1)
        self.protector = self.mechanism.client_round(ctx, self.name)
        payload = self.protector.respond(message.stage, message.payload, self.contribution)
        if self.protector.done:
            self.contribution = np.empty(0)  # like the real client: nothing kept after the last stage
        rnd = message.round - 1 if self.fault == "stale" else message.round
        examples = 0 if self.fault == "zero_examples" else self.examples
        sender = "someone-else" if self.fault == "impersonate" else self.name
        return to_bytes(FitRes(rnd, examples, {"train_loss": 1.0}, payload), job=JOB, sender=sender)

    def _send(self, message: object) -> bytes:
        return to_bytes(message, job=JOB, sender=self.name)  # type: ignore[arg-type]


def _server(clients: dict[str, ScriptedClient], mechanism: Mechanism, min_fit: int = 2) -> Server:
    return Server(
        job=JOB,
        strategy=FedAvg(min_fit_clients=min_fit),
        mechanism=mechanism,
        params=np.zeros(SIZE, dtype=np.float32),
        transport=InProcessTransport(clients),  # type: ignore[arg-type]
    )


def _clients(faults: dict[str, str], mechanism: Mechanism) -> tuple[dict[str, ScriptedClient], np.ndarray]:
    """Four clients with known deltas; returns them and the weighted average of the honest ones."""
    rng = np.random.default_rng(3)
    clients, deltas, weights = {}, [], []
    for i in range(4):
        name = f"c{i}"
        delta = rng.normal(size=SIZE).astype(np.float32)
        clients[name] = ScriptedClient(name, delta, 10 * (i + 1), mechanism, faults.get(name, ""))
        if name not in faults:
            deltas.append(delta)
            weights.append(10 * (i + 1))
    return clients, np.average(deltas, axis=0, weights=weights)


def test_round_applies_the_sample_weighted_average() -> None:
    clients, expected = _clients({}, PlaintextMechanism())
    server = _server(clients, PlaintextMechanism())
    record = server.run_round(1)
    assert record.status == "ok" and record.succeeded == 4 and not record.failures
    np.testing.assert_allclose(server.params, expected, rtol=1e-5)
    assert record.bytes_up > 4 * 4 * SIZE and record.bytes_down > 4 * 4 * SIZE


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("nan", "NaN/Inf"),
        ("short", "shape"),
        ("crash", "client crashed"),
        ("garbage", "malformed reply"),
        ("refuse", "client refused: not today"),
        ("stale", "stale or misdirected"),
        ("impersonate", "stale or misdirected"),
        ("zero_examples", "0 training examples"),
    ],
)
def test_faulty_client_is_dropped_and_the_round_goes_on(fault: str, reason: str) -> None:
    clients, expected = _clients({"c1": fault}, PlaintextMechanism())
    server = _server(clients, PlaintextMechanism())
    record = server.run_round(1)
    assert record.status == "ok"
    assert record.succeeded == 3 and list(record.failures) == ["c1"]
    assert reason in record.failures["c1"]
    np.testing.assert_allclose(server.params, expected, rtol=1e-5)


def test_too_few_survivors_fails_the_round_and_keeps_the_model() -> None:
    clients, _ = _clients({"c0": "nan", "c1": "crash", "c2": "garbage"}, PlaintextMechanism())
    server = _server(clients, PlaintextMechanism(), min_fit=2)
    record = server.run_round(1)
    assert record.status == "failed" and "only 1 of 4 clients succeeded" in record.error
    np.testing.assert_array_equal(server.params, np.zeros(SIZE))


def test_shutdown_reaches_every_client() -> None:
    clients, _ = _clients({}, PlaintextMechanism())
    _server(clients, PlaintextMechanism()).shutdown()
    assert all(c.finished for c in clients.values())


class PairwiseMaskMechanism(Mechanism):
    """A toy two-stage protocol (NOT secure: masks from public seeds) that exercises the staged
    interface the way SecAgg does: advertise seeds, then send vectors masked with pairwise
    masks that cancel in the sum, using per-recipient requests and the survivor list."""

    name: ClassVar[str] = "toy-pairwise"
    server_can_recover: ClassVar[bool] = True

    def server_round(self, ctx: RoundContext) -> ServerAggregator:
        return _ToyServer(ctx)

    def client_round(self, ctx: RoundContext, client: str, local: LocalModel | None = None) -> ClientProtector:
        return _ToyClient(client)

    def recover(self, aggregate: Payload, ctx: RoundContext) -> np.ndarray:
        return np.asarray(aggregate.arrays["sum"], dtype=np.float64)


def _mask(a: str, b: str, seeds: dict[str, int], size: int) -> np.ndarray:
    lo, hi = sorted((a, b))
    return np.random.default_rng([seeds[lo], seeds[hi]]).normal(size=size)


class _ToyServer(ServerAggregator):
    def __init__(self, ctx: RoundContext) -> None:
        self.ctx, self.seeds, self.total = ctx, {}, np.zeros(ctx.vector_size)
        self.requests: list[tuple[str, str]] = []
        self.closed: list[tuple[str, tuple[str, ...]]] = []

    @property
    def stages(self) -> tuple[str, ...]:
        return ("advertise", "masked")

    def request(self, stage: str, client: str) -> Payload:
        self.requests.append((stage, client))
        if stage == "masked":
            return Payload({"seeds": {k: v for k, v in self.seeds.items()}})
        return Payload()

    def fold(self, stage: str, client: str, payload: Payload) -> None:
        if stage == "advertise":
            seed = payload.meta.get("seed")
            if not isinstance(seed, int):
                raise PayloadRejected("no seed")
            self.seeds[client] = seed
        else:
            self.total += payload.arrays["masked"]

    def close_stage(self, stage: str, survivors: list[str]) -> None:  # type: ignore[override]
        self.closed.append((stage, tuple(survivors)))

    def finish(self) -> Payload:
        return Payload(arrays={"sum": self.total})


class _ToyClient(ClientProtector):
    def __init__(self, name: str) -> None:
        self.name = name
        self.seed = sum(map(ord, name))
        self.answered: list[str] = []

    @property
    def done(self) -> bool:
        return "masked" in self.answered

    def respond(self, stage: str, request: Payload, contribution: np.ndarray) -> Payload:
        self.answered.append(stage)
        if stage == "advertise":
            return Payload({"seed": self.seed})
        seeds = request.meta["seeds"]
        masked = contribution.astype(np.float64)
        for other in seeds:
            if other != self.name:
                sign = 1.0 if self.name < other else -1.0
                masked = masked + sign * _mask(self.name, other, seeds, masked.shape[0])
        return Payload(arrays={"masked": masked})


def test_multi_stage_mechanism_runs_every_stage_with_survivors() -> None:
    mechanism = PairwiseMaskMechanism()
    clients, expected = _clients({"c3": "refuse"}, mechanism)
    aggregators: list[_ToyServer] = []
    original = mechanism.server_round

    def recording(ctx: RoundContext) -> ServerAggregator:
        aggregator = original(ctx)
        aggregators.append(aggregator)  # type: ignore[arg-type]
        return aggregator

    mechanism.server_round = recording  # type: ignore[method-assign]
    server = _server(clients, mechanism)
    record = server.run_round(1)
    assert record.status == "ok" and record.succeeded == 3
    np.testing.assert_allclose(server.params, expected, rtol=1e-5, atol=1e-6)
    (toy,) = aggregators
    assert toy.closed == [("advertise", ("c0", "c1", "c2")), ("masked", ("c0", "c1", "c2"))]
    assert [c for s, c in toy.requests if s == "masked"] == ["c0", "c1", "c2"]


def test_stage_reply_for_the_wrong_stage_is_rejected() -> None:
    mechanism = PairwiseMaskMechanism()
    clients, _ = _clients({}, mechanism)
    original: Callable[[bytes], bytes] = clients["c2"].handle

    def wrong_stage(request: bytes) -> bytes:
        reply = from_bytes(original(request)).message
        if isinstance(reply, StageRes):
            reply.stage = "advertise"
        return to_bytes(reply, job=JOB, sender="c2")

    clients["c2"].handle = wrong_stage  # type: ignore[method-assign]
    record = _server(clients, mechanism).run_round(1)
    assert "answered stage 'advertise' during 'masked'" in record.failures["c2"]
