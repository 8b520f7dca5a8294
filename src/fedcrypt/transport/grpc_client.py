"""The client side of the gRPC transport: pull a request, answer it, push the reply, repeat.

While the client works on a request (training can take minutes) a heartbeat thread tells the
server it is alive, so a crashed client is noticed within the server's liveness timeout rather
than at the round deadline. A server that is briefly unreachable (restarting with ``--resume``)
is retried until ``reconnect_timeout``; a refused credential or a wrong job ends the client
with the server's reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import grpc

from fedcrypt.core.transport import Inbound, Outbound, Responder
from fedcrypt.core.wire import SpooledMessage
from fedcrypt.transport.certs import TlsFiles
from fedcrypt.transport.chunks import DEFAULT_CHUNK_BYTES, DEFAULT_SPOOL_BYTES, from_chunks, to_chunks
from fedcrypt.transport.grpc_server import BUSY, CLIENT_KEY, JOB_KEY, is_loopback
from fedcrypt.transport.proto import fedcrypt_pb2 as pb
from fedcrypt.transport.proto import fedcrypt_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class ConnectionRefused(Exception):
    """The server refused this client (credential, name or job); the message says why."""


@dataclass
class ClientLimits:
    reconnect_timeout: float = 60.0
    poll_ms: int = 5_000
    heartbeat_seconds: float = 2.0
    transfer_timeout: float = 3600.0  # one message's transfer; generous for multi-GB payloads
    max_message_bytes: int = 4 << 30
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    #: Requests larger than this are spooled to an unlinked temporary file as they arrive.
    spool_bytes: int = DEFAULT_SPOOL_BYTES


class GrpcClientConnection:
    """A client's channel to the server, with its identity attached to every call."""

    def __init__(self, address: str, name: str, *, tls: TlsFiles | None, limits: ClientLimits | None = None) -> None:
        if tls is None and not is_loopback(address):
            raise ValueError(f"plaintext gRPC is allowed on loopback only, not on {address}; use TLS")
        self.name = name
        self.job = ""
        self.limits = limits or ClientLimits()
        options = [
            ("grpc.enable_http_proxy", 0),  # never route a federation through an environment proxy
            # gRPC's own reconnect backoff grows to 2 minutes; a restarting server should be found fast.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if tls is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            root, key, chain = tls.load()
            credentials = grpc.ssl_channel_credentials(root, key, chain)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.FederationStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def hello(self) -> Inbound:
        """Announce this client and receive the job description."""
        data = self._retrying(lambda: self._pull(pb.PullRequest(hello=True)))
        if data is None:
            raise ConnectionRefused("the server sent no job description")
        return data

    def next_request(self) -> Inbound | None:
        """Wait up to ``poll_ms`` for the next request (None: nothing yet, ask again); a large one
        comes spooled to a temporary file, which the caller closes when done with it."""
        return self._retrying(lambda: self._pull(pb.PullRequest(wait_ms=self.limits.poll_ms)))

    def reply(self, data: Outbound) -> None:
        """Send the reply to the last request once the server grants the upload slot; a refusal is
        logged (the round goes on without us)."""
        poll = pb.PullRequest(wait_ms=self.limits.poll_ms)
        while True:
            ack = self._retrying(
                lambda: self._stub.Reserve(poll, metadata=self._metadata(), timeout=poll.wait_ms / 1000 + 30)
            )
            if ack.accepted:
                break
            if ack.reason != BUSY:
                log.warning("server did not accept our reply: %s", ack.reason)
                return
        chunks = lambda: to_chunks(data, self.limits.chunk_bytes)  # noqa: E731 - a fresh iterator per try
        timeout = self.limits.transfer_timeout
        ack = self._retrying(lambda: self._stub.Push(chunks(), metadata=self._metadata(), timeout=timeout))
        if not ack.accepted:
            log.warning("server did not accept our reply: %s", ack.reason)

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Signal liveness in the background while the body runs."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.limits.heartbeat_seconds):
                try:  # the answer to a heartbeat is an empty stream
                    list(self._stub.Pull(pb.PullRequest(heartbeat=True), metadata=self._metadata(), timeout=10))
                except grpc.RpcError as exc:
                    log.debug("heartbeat failed: %s", exc.code())

        thread = threading.Thread(target=beat, name="fedcrypt-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _pull(self, request: pb.PullRequest) -> Inbound | None:
        timeout = request.wait_ms / 1000 + self.limits.transfer_timeout
        stream = self._stub.Pull(request, metadata=self._metadata(), timeout=timeout)
        limits = self.limits
        return from_chunks(stream, limits.max_message_bytes, spool_bytes=limits.spool_bytes)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((CLIENT_KEY, self.name), (JOB_KEY, self.job))

    def _retrying(self, call: Callable[[], T]) -> T:
        """Run an RPC, retrying while the server is unreachable, up to the reconnect timeout."""
        deadline = time.monotonic() + self.limits.reconnect_timeout
        delay = 0.2
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code not in _RETRYABLE:
                    raise ConnectionRefused(f"server refused {self.name!r}: {details} ({code.name})") from None
                if time.monotonic() + delay > deadline:
                    raise ConnectionRefused(
                        f"cannot reach the server for {self.limits.reconnect_timeout:g} s: {details or code.name}"
                        " (is it running, and does its certificate match our CA?)"
                    ) from None
                log.info("server unreachable (%s); retrying in %.1f s", code.name, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


def answer_until_finished(connection: GrpcClientConnection, responder: Responder) -> int:
    """Pull requests and push the responder's replies until the server ends the job."""
    answered = 0
    while not responder.finished:
        request = connection.next_request()
        if request is None:
            continue
        log.info("request %d received (%d bytes)", answered + 1, len(request))
        try:
            with connection.heartbeat():
                reply = responder.handle(request)
            connection.reply(reply)
        finally:
            if isinstance(request, SpooledMessage):
                request.close()
        answered += 1
    return answered
