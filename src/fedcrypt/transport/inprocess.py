"""In-process transport for simulation: clients (any :class:`Responder`) are objects called one
after another.

Messages still go through their byte encoding, so simulated byte counts are the real wire
sizes and the server/client code is exactly what deployment runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from fedcrypt.core.transport import Inbound, Outbound, Responder, Transport

log = logging.getLogger(__name__)


class InProcessTransport(Transport):
    def __init__(self, clients: Mapping[str, Responder]) -> None:
        self.clients = dict(clients)

    def available(self) -> list[str]:
        return [name for name, client in self.clients.items() if not client.finished]

    def exchange(
        self,
        recipients: Sequence[str],
        make_request: Callable[[str], Outbound],
        on_reply: Callable[[str, Inbound], None],
        on_failure: Callable[[str, str], None],
    ) -> None:
        for name in recipients:
            client = self.clients.get(name)
            if client is None:
                on_failure(name, "no such client")
                continue
            request = make_request(name)
            if not isinstance(request, bytes):
                request = b"".join(request)
            try:
                reply = client.handle(request)
            except Exception as exc:  # a crashing client is a dropout, not a crashed server
                log.exception("client %s crashed", name)
                on_failure(name, f"client crashed: {type(exc).__name__}: {exc}")
                continue
            on_reply(name, reply if isinstance(reply, bytes) else b"".join(reply))
