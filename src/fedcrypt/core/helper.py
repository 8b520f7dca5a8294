"""Helper aggregator logic, independent of transport: bytes in, bytes out.

Additive secret sharing spreads every contribution over ``k`` non-colluding aggregators: the
server and ``k - 1`` helpers. A helper sees no model and no data; it answers the stages the
server's aggregator addresses to helpers (``StageIns``) through the mechanism's
:class:`~fedcrypt.core.mechanism.HelperRound`, holding its own secret key. Simulation runs it in
child processes, deployment as ``fedcrypt aggregator`` over gRPC; both call :meth:`handle`.
"""

from __future__ import annotations

import logging
import time

from fedcrypt.core.mechanism import HelperRound, Mechanism
from fedcrypt.core.messages import ErrorReply, Message, Shutdown, StageIns, StageRes, from_bytes, to_parts
from fedcrypt.core.transport import Inbound
from fedcrypt.core.wire import WireError

log = logging.getLogger(__name__)


class HelperAggregator:
    """One helper aggregator: answers the server's helper stages for one job."""

    def __init__(self, name: str, job: str, mechanism: Mechanism) -> None:
        if name not in mechanism.helpers:
            raise ValueError(f"{name!r} is not a helper aggregator of this job ({', '.join(mechanism.helpers)})")
        self.name = name
        self.job = job
        self.mechanism = mechanism
        self.finished = False
        self._round: tuple[int, HelperRound] | None = None

    def handle(self, request: Inbound) -> list[memoryview]:
        """Answer one server message with the reply's buffers; refusals come back as
        ``ErrorReply``, never as exceptions."""
        try:
            received = from_bytes(request)
        except WireError as exc:
            return self._reply(ErrorReply(0, f"undecodable request: {exc}"))
        if received.job != self.job:
            return self._reply(ErrorReply(received.message.round, f"wrong job {received.job!r}"))
        try:
            return self._reply(self._dispatch(received.message))
        except ValueError as exc:
            log.warning("helper %s refused a %s: %s", self.name, type(received.message).__name__, exc)
            return self._reply(ErrorReply(received.message.round, str(exc)))

    def _dispatch(self, message: Message) -> Message:
        if isinstance(message, Shutdown):
            self.finished = True
            return Shutdown(message.round)
        if not isinstance(message, StageIns):
            raise ValueError(f"a helper aggregator does not answer a {type(message).__name__}")
        if self._round is None or self._round[0] != message.round or self._round[1].done:
            self._round = (message.round, self.mechanism.helper_round(self.job, message.round, self.name))
        started = time.perf_counter()
        helper_round = self._round[1]
        payload = helper_round.respond(message.stage, message.payload)
        if helper_round.done:
            self._round = None
        return StageRes(message.round, message.stage, payload, time.perf_counter() - started)

    def _reply(self, message: Message) -> list[memoryview]:
        return to_parts(message, job=self.job, sender=self.name)
