"""Server logic, independent of transport: samples clients, runs the mechanism's stages, folds
each reply into the aggregate as it arrives, recovers the average and steps the global model.

A client whose reply is malformed, stale, refused or rejected by the mechanism (NaN/Inf, wrong
length, bad ciphertext) is logged and counted as failed for the round; the round goes on with the
others and fails only when fewer than ``min_fit_clients`` succeed, leaving the model unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcrypt.core import contribution
from fedcrypt.core.mechanism import (
    RECOVER_STAGE,
    Mechanism,
    PayloadRejected,
    RecoveryError,
    RoundContext,
    ServerAggregator,
)
from fedcrypt.core.messages import (
    ErrorReply,
    FitIns,
    FitRes,
    Message,
    Payload,
    Shutdown,
    StageIns,
    StageRes,
    from_bytes,
    to_bytes,
    to_parts,
)
from fedcrypt.core.transport import Inbound, Transport
from fedcrypt.core.wire import WireError
from fedcrypt.strategies.base import Strategy

log = logging.getLogger(__name__)
SERVER_NAME = "server"

Evaluator = Callable[[np.ndarray], tuple[float, float]]


@dataclass
class RoundRecord:
    """Everything measured in one round; one line of ``metrics.jsonl``."""

    round: int
    status: str = "ok"
    error: str = ""
    sampled: int = 0
    succeeded: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0
    protect_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    recover_seconds: float = 0.0
    eval_seconds: float = 0.0
    train_loss: float = float("nan")
    loss: float = float("nan")
    accuracy: float = float("nan")
    mechanism: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A flat JSON-able dict (NaN becomes null)."""
        row = {k: v for k, v in self.__dict__.items() if k != "mechanism"}
        row["failed"] = len(self.failures)
        row.update(self.mechanism)
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}


class Server:
    """Runs rounds of federated training over any :class:`Transport`."""

    def __init__(
        self,
        *,
        job: str,
        strategy: Strategy,
        mechanism: Mechanism,
        params: np.ndarray,
        transport: Transport,
        seed: int = 0,
        evaluate: Evaluator | None = None,
        helpers: Transport | None = None,
    ) -> None:
        if mechanism.helpers and helpers is None:
            raise ValueError(
                f"mechanism {mechanism.name!r} needs its helper aggregators ({', '.join(mechanism.helpers)})"
            )
        self.job = job
        self.strategy = strategy
        self.mechanism = mechanism
        self.params = np.asarray(params, dtype=np.float32).copy()
        self.transport = transport
        self.helpers = helpers
        self.evaluate = evaluate
        self._sampler = np.random.default_rng(seed)

    def run_round(self, server_round: int) -> RoundRecord:
        """One round; raises :class:`BudgetSpent` (before doing anything) if it must not run."""
        self.mechanism.check_budget(server_round)
        record = RoundRecord(server_round)
        started = time.perf_counter()
        try:
            self._run_round(server_round, record)
        except (RecoveryError, ValueError) as exc:
            record.status, record.error = "failed", str(exc)
            log.warning("round %d failed: %s", server_round, exc)
        if self.evaluate is not None:
            eval_started = time.perf_counter()
            record.loss, record.accuracy = self.evaluate(self.params)
            record.eval_seconds = time.perf_counter() - eval_started
        record.seconds = time.perf_counter() - started
        return record

    def snapshot(self) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any], dict[str, float]]:
        """What a checkpoint must hold to continue exactly: model, strategy state, sampler state
        and the mechanism's state (e.g. DP's adaptive clip norm).

        The model is a read-only view, not a copy (a checkpoint is written between rounds).
        """
        params = self.params.view()
        params.flags.writeable = False
        return params, self.strategy.state(), self._sampler.bit_generator.state, self.mechanism.state()

    def restore(
        self,
        params: np.ndarray,
        strategy_state: dict[str, np.ndarray],
        sampler: dict[str, Any],
        mechanism_state: dict[str, float],
    ) -> None:
        if params.shape != self.params.shape:
            raise ValueError(f"checkpoint model has {params.shape[0]} parameters, the job's has {self.params.shape[0]}")
        self.params = np.asarray(params, dtype=np.float32).copy()
        self.strategy.load_state(strategy_state)
        self._sampler.bit_generator.state = sampler
        self.mechanism.load_state(mechanism_state)

    def shutdown(self, recipients: list[str] | None = None) -> list[str]:
        """Tell clients and helper aggregators (default: all available) the job is over;
        returns those that acknowledged."""
        message = to_bytes(Shutdown(0), job=self.job, sender=SERVER_NAME)
        acknowledged: list[str] = []
        for transport in (self.transport, self.helpers):
            if transport is None:
                continue
            available = transport.available()
            transport.exchange(
                available if recipients is None else [name for name in recipients if name in available],
                lambda _: message,
                lambda client, _: acknowledged.append(client),
                lambda *_: None,
            )
        return acknowledged

    def _run_round(self, server_round: int, record: RoundRecord) -> None:
        participants = tuple(self.strategy.sample(self.transport.available(), self._sampler))
        record.sampled = len(participants)
        ctx = RoundContext(self.job, server_round, participants, self.params.shape[0] + 1)
        aggregator = self.mechanism.server_round(ctx)
        config = self.strategy.fit_config(server_round)
        losses: list[tuple[float, int]] = []

        shared: list[memoryview] = []  # with no per-client payload all clients get the same buffers
        first_stage, *later_stages = aggregator.stages

        def fit_request(client: str) -> list[memoryview]:
            payload = aggregator.request(first_stage, client)
            personal = bool(payload.meta or payload.arrays)
            if personal or not shared:
                message = FitIns(server_round, self.params, config, participants, payload, first_stage)
                parts = to_parts(message, job=self.job, sender=SERVER_NAME)
                if not personal:
                    shared[:] = parts
            else:
                parts = shared
            record.bytes_down += sum(len(part) for part in parts)
            return parts

        def on_fit(client: str, payload: Message) -> None:
            assert isinstance(payload, FitRes)
            if payload.num_examples <= 0:
                raise PayloadRejected(f"reports {payload.num_examples} training examples")
            self._fold(aggregator, first_stage, client, payload, record)
            losses.append((payload.metrics.get("train_loss", float("nan")), payload.num_examples))
            record.train_seconds += payload.metrics.get("train_seconds", 0.0)
            record.protect_seconds += payload.metrics.get("protect_seconds", 0.0)

        survivors = self._exchange(participants, fit_request, FitRes, on_fit, server_round, record)
        aggregator.close_stage(first_stage, survivors)
        for stage in later_stages:
            if stage in aggregator.helper_stages:
                self._helper_stage(aggregator, stage, server_round, record)
                continue

            def stage_request(client: str, stage: str = stage) -> bytes:
                return self._send(StageIns(server_round, stage, aggregator.request(stage, client)), record)

            def on_stage(client: str, payload: Message, stage: str = stage) -> None:
                assert isinstance(payload, StageRes)
                if payload.stage != stage:
                    raise PayloadRejected(f"answered stage {payload.stage!r} during {stage!r}")
                self._fold(aggregator, stage, client, payload, record)
                record.protect_seconds += payload.seconds

            survivors = self._exchange(survivors, stage_request, StageRes, on_stage, server_round, record)
            aggregator.close_stage(stage, survivors)
        contributors = aggregator.contributors()
        record.succeeded = len(survivors) if contributors is None else contributors
        if record.succeeded < self.strategy.min_fit_clients:
            raise RecoveryError(
                f"only {record.succeeded} of {len(participants)} clients succeeded, "
                f"min_fit_clients is {self.strategy.min_fit_clients}"
            )
        recover_started = time.perf_counter()
        aggregate = aggregator.finish()
        if self.mechanism.server_can_recover:
            summed = self.mechanism.recover(aggregate, ctx)
        else:
            summed = self._recover_by_key_holder(aggregate, ctx, survivors, record)
        summed = self.mechanism.finalize(summed, ctx)
        average_delta, _ = contribution.unpack_average(summed)
        self.params = self.strategy.apply(self.params, average_delta)
        record.recover_seconds = time.perf_counter() - recover_started
        record.mechanism = aggregator.metrics()
        weighted = [(loss, n) for loss, n in losses if np.isfinite(loss)]
        if weighted:
            record.train_loss = sum(loss * n for loss, n in weighted) / sum(n for _, n in weighted)

    def _helper_stage(self, aggregator: ServerAggregator, stage: str, server_round: int, record: RoundRecord) -> None:
        """One stage answered by every helper aggregator (additive sharing); they work in
        parallel, so the slowest one's seconds count towards ``aggregate_seconds``."""
        assert self.helpers is not None
        slowest = 0.0

        def request(helper: str) -> bytes:
            return self._send(StageIns(server_round, stage, aggregator.request(stage, helper)), record)

        def on_reply(helper: str, payload: Message) -> None:
            nonlocal slowest
            assert isinstance(payload, StageRes)
            if payload.stage != stage:
                raise PayloadRejected(f"answered stage {payload.stage!r} during {stage!r}")
            self._fold(aggregator, stage, helper, payload, record)
            slowest = max(slowest, payload.seconds)

        answered = self._exchange(
            list(self.mechanism.helpers), request, StageRes, on_reply, server_round, record, self.helpers
        )
        record.aggregate_seconds += slowest
        aggregator.close_stage(stage, answered)

    def _recover_by_key_holder(
        self, aggregate: Payload, ctx: RoundContext, survivors: list[str], record: RoundRecord
    ) -> np.ndarray:
        """Have the survivors decrypt the aggregate: the mechanism cuts it into up to one piece
        per survivor and each decrypts one piece at the same time. A piece whose key holder fails
        goes to a survivor that succeeded; the round fails only when no key holder is left.

        The server learns the sum of the round's contributions, as with secure aggregation,
        and never any single one.
        """
        pending = self.mechanism.split(aggregate, ctx, len(survivors))
        summed = np.empty(ctx.vector_size, dtype=np.float32)
        holders = list(survivors)
        while pending and holders:
            assignment = dict(zip(holders, pending))
            recovered: set[str] = set()

            def on_sum(client: str, message: Message) -> None:
                assert isinstance(message, StageRes)
                piece = assignment[client]
                total = message.payload.arrays.get("sum")
                if message.stage != RECOVER_STAGE or total is None:
                    raise PayloadRejected("reply carries no decrypted sum")
                expected = (piece.stop - piece.start,)
                if total.dtype != np.float32 or total.shape != expected:
                    raise PayloadRejected(f"decrypted sum has shape {total.shape}, expected {expected}")
                values = np.asarray(total)
                if not np.isfinite(values).all():
                    raise PayloadRejected("decrypted sum contains NaN/Inf")
                summed[piece.start : piece.stop] = values
                recovered.add(client)

            def request(client: str) -> bytes:
                return self._send(StageIns(ctx.round, RECOVER_STAGE, assignment[client].payload), record)

            self._exchange(list(assignment), request, StageRes, on_sum, ctx.round, record)
            failed = [piece for client, piece in assignment.items() if client not in recovered]
            pending = failed + pending[len(assignment) :]
            holders = [client for client in holders if client in recovered or client not in assignment]
        if pending:
            raise RecoveryError("no surviving client could decrypt the aggregate")
        log.info("round %d: the aggregate was decrypted by key-holding clients", ctx.round)
        return summed

    def _send(self, message: Message, record: RoundRecord) -> bytes:
        data = to_bytes(message, job=self.job, sender=SERVER_NAME)
        record.bytes_down += len(data)
        return data

    def _exchange(
        self,
        recipients: tuple[str, ...] | list[str],
        make_request: Callable[[str], bytes],
        expected: type,
        on_message: Callable[[str, Message], None],
        server_round: int,
        record: RoundRecord,
        transport: Transport | None = None,
    ) -> list[str]:
        """One stage's fan-out (to clients, or over ``transport`` to helper aggregators); returns
        the senders whose replies were accepted, in order."""
        accepted: list[str] = []

        def fail(client: str, reason: str) -> None:
            record.failures[client] = reason
            log.warning("round %d: dropped client %s: %s", server_round, client, reason)

        def on_reply(client: str, data: Inbound) -> None:
            record.bytes_up += len(data)
            try:
                received = from_bytes(data)
            except WireError as exc:
                return fail(client, f"malformed reply: {exc}")
            message = received.message
            if isinstance(message, ErrorReply):
                return fail(client, f"client refused: {message.reason}")
            if received.sender != client or received.job != self.job or message.round != server_round:
                return fail(client, "stale or misdirected reply (wrong sender, job or round)")
            if not isinstance(message, expected):
                return fail(client, f"expected {expected.__name__}, got {type(message).__name__}")
            try:
                on_message(client, message)
            except PayloadRejected as exc:
                return fail(client, f"payload rejected: {exc}")
            accepted.append(client)

        (transport or self.transport).exchange(recipients, make_request, on_reply, fail)
        return accepted

    def _fold(
        self, aggregator: ServerAggregator, stage: str, client: str, message: Message, record: RoundRecord
    ) -> None:
        assert isinstance(message, (FitRes, StageRes))
        started = time.perf_counter()
        try:
            aggregator.fold(stage, client, message.payload)
        finally:
            record.aggregate_seconds += time.perf_counter() - started
