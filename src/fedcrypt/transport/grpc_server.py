"""The server side of the gRPC transport: clients pull requests and push replies in chunks.

The :class:`~fedcrypt.core.server.Server` drives rounds through :meth:`exchange` exactly as in
simulation. gRPC handler threads only move bytes; every ``make_request`` call is serialized and
every ``on_reply`` / ``on_failure`` call happens on the thread that called :meth:`exchange`, so
the server folds one reply at a time. Clients reserve the single upload slot before pushing, so
one upload at a time is in flight and reassembled (waiting clients keep their data), and server
memory stays at a few updates however many clients there are.

Identity: under TLS a client is the common name of its certificate (mutual TLS, issued by the
job's CA); a revoked name, another job's name or a claimed name that differs from the
certificate is refused. ``--insecure`` (plaintext, unauthenticated) is for loopback only.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc

from fedcrypt.core.transport import Inbound, Outbound, Transport
from fedcrypt.core.wire import SpooledMessage
from fedcrypt.transport.certs import TlsFiles
from fedcrypt.transport.chunks import DEFAULT_CHUNK_BYTES, DEFAULT_SPOOL_BYTES, ChunkError, from_chunks, to_chunks
from fedcrypt.transport.proto import fedcrypt_pb2 as pb
from fedcrypt.transport.proto import fedcrypt_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
CLIENT_KEY, JOB_KEY = "fedcrypt-client", "fedcrypt-job"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_WAIT_MS = 30_000
NOT_PENDING = "no request is pending for this client"
BUSY = "another client is uploading"


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT names this machine only (127.0.0.0/8, ::1, localhost)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerLimits:
    """Deadlines and sizes that keep one slow or hostile client from stalling the job."""

    round_timeout: float = 600.0
    liveness_timeout: float = 30.0
    max_message_bytes: int = 4 << 30
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_workers: int = 64
    #: Uploads larger than this are spooled to an unlinked temporary file as they arrive.
    spool_bytes: int = DEFAULT_SPOOL_BYTES
    #: Requests streamed at once; each stream buffers a few chunks, so this bounds server memory.
    parallel_downloads: int = 4


@dataclass
class _Peer:
    last_seen: float
    state: str = "idle"  # idle -> pending (request waiting) -> sent (pulled, reply awaited)


class GrpcServerTransport(Transport, pb_grpc.FederationServicer):
    def __init__(
        self,
        *,
        job: str,
        address: str,
        welcome: bytes,
        tls: TlsFiles | None,
        limits: ServerLimits | None = None,
        revoked: Iterable[str] = (),
    ) -> None:
        if tls is None and not is_loopback(address):
            raise ValueError(f"plaintext gRPC is allowed on loopback only, not on {address}; use TLS")
        self.job = job
        self.address = address
        self.limits = limits or ServerLimits()
        self._welcome = welcome
        self._tls = tls
        self._revoked = frozenset(revoked)
        self._peers: dict[str, _Peer] = {}
        self._cond = threading.Condition()
        self._build_lock = threading.Lock()
        self._uploader: str | None = None  # the one client allowed to upload now (see Reserve)
        self._uploader_since = 0.0
        self._upload_started = False
        self._download_slots = threading.BoundedSemaphore(self.limits.parallel_downloads)
        self._replies: queue.Queue[tuple[str, Inbound, threading.Event]] = queue.Queue(maxsize=1)
        self._failures: list[tuple[str, str]] = []
        self._make_request: Callable[[str], Outbound] | None = None
        self._round_open = False
        self._server: grpc.Server | None = None
        self.port = 0

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> int:
        """Listen on the address; returns the bound port (useful with port 0)."""
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.limits.max_workers, thread_name_prefix="fedcrypt-rpc")
        )
        pb_grpc.add_FederationServicer_to_server(self, server)
        if self._tls is None:
            log.warning("serving plaintext gRPC on %s: no TLS, no client authentication", self.address)
            self.port = server.add_insecure_port(self.address)
        else:
            root, key, chain = self._tls.load()
            credentials = grpc.ssl_server_credentials([(key, chain)], root_certificates=root, require_client_auth=True)
            self.port = server.add_secure_port(self.address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.address}")
        server.start()
        self._server = server
        return self.port

    def close(self) -> None:
        with self._cond:
            self._round_open = False
            self._cond.notify_all()
        if self._server is not None:
            self._server.stop(grace=1.0).wait(5.0)

    def wait_for_clients(self, count: int, timeout: float) -> list[str]:
        """Block until ``count`` clients are connected or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while len(self.available()) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.available()

    def known(self) -> list[str]:
        """Every client that has connected since the server started, alive or not."""
        with self._cond:
            return sorted(self._peers)

    # --- Transport -----------------------------------------------------------------------

    def available(self) -> list[str]:
        now = time.monotonic()
        with self._cond:
            return sorted(n for n, p in self._peers.items() if now - p.last_seen <= self.limits.liveness_timeout)

    def exchange(
        self,
        recipients: Sequence[str],
        make_request: Callable[[str], Outbound],
        on_reply: Callable[[str, Inbound], None],
        on_failure: Callable[[str, str], None],
    ) -> None:
        outstanding: set[str] = set()
        with self._cond:
            self._make_request = make_request
            self._round_open = True
            for name in recipients:
                peer = self._peers.get(name)
                if peer is None:
                    self._failures.append((name, "not connected"))
                else:
                    peer.state = "pending"
                    outstanding.add(name)
            self._cond.notify_all()
        deadline = time.monotonic() + self.limits.round_timeout
        try:
            while outstanding and time.monotonic() < deadline:
                self._report_failures(outstanding, on_failure)
                try:
                    name, data, handled = self._replies.get(timeout=min(0.2, max(deadline - time.monotonic(), 0.01)))
                except queue.Empty:
                    continue
                try:
                    if name in outstanding:
                        outstanding.discard(name)
                        on_reply(name, data)
                finally:
                    _release(data)
                    del data
                    handled.set()
            self._report_failures(outstanding, on_failure)
            for name in sorted(outstanding):
                on_failure(name, f"no reply within the round deadline of {self.limits.round_timeout:g} s")
        finally:
            with self._cond:
                self._round_open = False
                self._make_request = None
                self._uploader = None
                for peer in self._peers.values():
                    peer.state = "idle"
                self._cond.notify_all()
            while not self._replies.empty():
                _, data, handled = self._replies.get_nowait()
                _release(data)
                handled.set()

    def _report_failures(self, outstanding: set[str], on_failure: Callable[[str, str], None]) -> None:
        now = time.monotonic()
        with self._cond:
            failures, self._failures = self._failures, []
            for name in outstanding:
                peer = self._peers[name]
                if now - peer.last_seen > self.limits.liveness_timeout:
                    failures.append((name, f"connection lost (silent for {now - peer.last_seen:.0f} s)"))
                    peer.state = "idle"
            uploader = self._uploader
            if uploader is not None and not self._upload_started:
                gone = self._peers[uploader].state != "sent"
                if gone or now - self._uploader_since > self.limits.liveness_timeout:
                    self._uploader = None  # a reservation its client never used
                    self._cond.notify_all()
        for name, reason in failures:
            if name in outstanding or name not in self._peers:
                outstanding.discard(name)
                on_failure(name, reason)

    # --- gRPC handlers -------------------------------------------------------------------

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        name = self._identify(context, hello=request.hello)
        if request.hello:
            self._fail_if_sent(name, "client restarted during the stage")
            yield from to_chunks(self._welcome, self.limits.chunk_bytes)
            return
        if request.heartbeat:
            return
        data = self._wait_for_request(name, min(request.wait_ms, MAX_WAIT_MS) / 1000, context)
        if data is None:
            return
        sent = False
        while not self._download_slots.acquire(timeout=0.5):
            self._touch(name)  # waiting for a slot is not silence
            if not context.is_active():
                self._fail_if_sent(name, "connection lost while waiting to receive the request")
                return
        try:
            for chunk in to_chunks(data, self.limits.chunk_bytes):
                yield chunk
                self._touch(name)  # a long transfer is not silence either
            sent = True
        finally:
            self._download_slots.release()
            if not sent:
                self._fail_if_sent(name, "connection lost while sending the request")

    def Reserve(self, request: pb.PullRequest, context: grpc.ServicerContext) -> pb.PushAck:
        name = self._identify(context, hello=False)
        deadline = time.monotonic() + min(request.wait_ms, MAX_WAIT_MS) / 1000
        with self._cond:
            while True:
                if self._peers[name].state != "sent":
                    return pb.PushAck(accepted=False, reason=NOT_PENDING)
                if self._uploader in (None, name):
                    self._uploader, self._uploader_since, self._upload_started = name, time.monotonic(), False
                    return pb.PushAck(accepted=True)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not context.is_active():
                    return pb.PushAck(accepted=False, reason=BUSY)
                self._cond.wait(min(remaining, 1.0))

    def Push(self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext) -> pb.PushAck:
        name = self._identify(context, hello=False)
        with self._cond:
            if self._peers[name].state != "sent":
                log.warning("refused an unsolicited upload from %s", name)
                return pb.PushAck(accepted=False, reason=NOT_PENDING)
            if self._uploader != name:
                return pb.PushAck(accepted=False, reason="reserve the upload slot first")
            self._upload_started = True
        try:
            try:
                data = from_chunks(
                    self._touching(name, request_iterator),
                    self.limits.max_message_bytes,
                    spool_bytes=self.limits.spool_bytes,
                )
            except ChunkError as exc:
                log.warning("refused an upload from %s: %s", name, exc)
                self._fail_if_sent(name, f"bad upload: {exc}")
                return pb.PushAck(accepted=False, reason=str(exc))
            except OSError as exc:  # the spool's disk is full or unwritable
                log.error("could not store an upload from %s: %s", name, exc)
                self._fail_if_sent(name, f"server could not store the upload: {exc}")
                return pb.PushAck(accepted=False, reason="the server could not store the upload")
            with self._cond:
                if self._peers[name].state != "sent" or data is None:
                    if data is not None:
                        _release(data)
                    return pb.PushAck(accepted=False, reason=NOT_PENDING)
                self._peers[name].state = "idle"
            # Keep the upload slot until the server has handled this reply, so that at most one
            # received upload exists at a time.
            handled = threading.Event()
            while True:
                with self._cond:
                    if not self._round_open:
                        _release(data)
                        return pb.PushAck(accepted=False, reason="the stage ended before the reply arrived")
                try:
                    self._replies.put((name, data, handled), timeout=0.2)
                    break
                except queue.Full:
                    continue
            del data
            while not handled.wait(0.2):
                with self._cond:
                    if not self._round_open:
                        break
            return pb.PushAck(accepted=True)
        finally:
            with self._cond:
                if self._uploader == name:
                    self._uploader = None
                    self._cond.notify_all()

    def _wait_for_request(self, name: str, wait: float, context: grpc.ServicerContext) -> Outbound | None:
        deadline = time.monotonic() + wait
        with self._cond:
            peer = self._peers[name]
            if peer.state == "sent":
                self._failures.append((name, "client asked for new work before replying"))
                peer.state = "idle"
            while peer.state != "pending":
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not context.is_active():
                    return None
                peer.last_seen = time.monotonic()  # waiting on an open call is not silence
                self._cond.wait(min(remaining, 0.5))
            peer.last_seen = time.monotonic()
            peer.state = "sent"
            make_request = self._make_request
        assert make_request is not None
        with self._build_lock:
            return make_request(name)

    def _touch(self, name: str) -> None:
        with self._cond:
            self._peers[name].last_seen = time.monotonic()

    def _touching(self, name: str, chunks: Iterator[pb.Chunk]) -> Iterator[pb.Chunk]:
        """The upload's chunks, marking the client alive as each arrives."""
        for chunk in chunks:
            self._touch(name)
            yield chunk

    def _fail_if_sent(self, name: str, reason: str) -> None:
        with self._cond:
            peer = self._peers.get(name)
            if peer is not None and peer.state in ("sent", "pending") and self._round_open:
                peer.state = "idle"
                self._failures.append((name, reason))

    def _identify(self, context: grpc.ServicerContext, *, hello: bool) -> str:
        """The authenticated client name; aborts the call for a wrong job, name or credential."""
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        job, claimed = metadata.get(JOB_KEY, ""), metadata.get(CLIENT_KEY, "")
        if job != self.job and not (hello and not job):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this server runs job {self.job!r}, not {job!r}")
        if self._tls is not None:
            names = context.auth_context().get("x509_common_name") or [b""]
            name = names[0].decode(errors="replace")
            if claimed and claimed != name:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"name {claimed!r} does not match the certificate's {name!r}"
                )
        else:
            name = claimed
        if not NAME_PATTERN.match(name) or name == "server":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"invalid client name {name!r}")
        if name in self._revoked:
            log.warning("refused revoked client %s", name)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"the credential of {name!r} is revoked")
        with self._cond:
            peer = self._peers.setdefault(name, _Peer(time.monotonic()))
            peer.last_seen = time.monotonic()
        return name


def _release(data: Inbound) -> None:
    """Delete a spooled reply's temporary file now rather than at garbage collection."""
    if isinstance(data, SpooledMessage):
        data.close()
