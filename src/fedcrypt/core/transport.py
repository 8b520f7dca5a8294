"""What the server needs from a transport: who is there, and a fan-out of request/reply pairs.

Implementations (in-process for simulation, gRPC for deployment) carry opaque bytes; they never
look inside messages; a large reply may arrive spooled to a temporary file, which the transport
closes once ``on_reply`` returns. ``on_reply`` and ``on_failure`` are called one at a time, never
concurrently, so the server can fold replies into its aggregate as they arrive.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Protocol

from fedcrypt.core.wire import SpooledMessage

#: A message to send: bytes, or buffers to send back to back (large arrays without a copy).
Outbound = bytes | Sequence[memoryview]
#: A received message: in memory, or (when large) in an unlinked temporary file.
Inbound = bytes | bytearray | SpooledMessage


class Responder(Protocol):
    """The far end of a transport: a client, a helper aggregator or a vertical party.

    ``handle`` answers one request's bytes with the reply's buffers; ``finished`` turns true once
    it has answered the message that ends its part in the job."""

    finished: bool

    def handle(self, request: Inbound) -> list[memoryview]: ...


class Transport(ABC):
    @abstractmethod
    def available(self) -> list[str]:
        """Names of the clients that can be asked to take part now."""

    @abstractmethod
    def exchange(
        self,
        recipients: Sequence[str],
        make_request: Callable[[str], Outbound],
        on_reply: Callable[[str, Inbound], None],
        on_failure: Callable[[str, str], None],
    ) -> None:
        """Send each recipient its request and report each reply or failure (with a reason).

        ``make_request`` is never called concurrently with itself, and may be called while an
        earlier reply of the same exchange is being handled.
        """

    def close(self) -> None:
        """Release connections; the default has none."""


class Subset(Transport):
    """The peers of another transport that ``member`` accepts: one gRPC server carries both
    clients and helper aggregators, and the server asks each group through its own view."""

    def __init__(self, transport: Transport, member: Callable[[str], bool]) -> None:
        self.transport = transport
        self.member = member

    def available(self) -> list[str]:
        return [name for name in self.transport.available() if self.member(name)]

    def exchange(
        self,
        recipients: Sequence[str],
        make_request: Callable[[str], Outbound],
        on_reply: Callable[[str, Inbound], None],
        on_failure: Callable[[str, str], None],
    ) -> None:
        chosen = [name for name in recipients if self.member(name)]
        for name in recipients:
            if not self.member(name):
                on_failure(name, "not a member of this group")
        self.transport.exchange(chosen, make_request, on_reply, on_failure)
