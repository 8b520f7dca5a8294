"""Peers as child processes: messages travel as length-prefixed frames over their stdin/stdout.

Simulation runs its helper aggregators this way, so each holds its secret key in its own
process, as it would on its own machine. A frame is an 8-byte little-endian length and the
message bytes; a peer's first frame announces it (e.g. its public key) and every later frame
answers one request. All requests of an exchange are written before any reply is read, so the
peers work in parallel. A peer that exits, closes its pipe, sends an oversized frame or misses
the deadline is reported as failed and never asked again.
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

from fedcrypt.core.transport import Inbound, Outbound, Transport

log = logging.getLogger(__name__)
_LENGTH_BYTES = 8


class PeerFailed(ConnectionError):
    """A peer process cannot be talked to any more; the message says why."""


def write_frame(stream: object, data: Outbound) -> None:
    """Write one frame (length, then bytes) to a binary stream and flush it."""
    parts = [data] if isinstance(data, (bytes, bytearray)) else list(data)
    stream.write(sum(len(part) for part in parts).to_bytes(_LENGTH_BYTES, "little"))  # type: ignore[attr-defined]
    for part in parts:
        stream.write(part)  # type: ignore[attr-defined]
    stream.flush()  # type: ignore[attr-defined]


def read_frame(stream: object, max_bytes: int) -> bytes | None:
    """Read one frame from a binary stream; None at a clean end of the stream."""
    header = stream.read(_LENGTH_BYTES)  # type: ignore[attr-defined]
    if not header:
        return None
    if len(header) != _LENGTH_BYTES:
        raise PeerFailed("truncated frame header")
    size = int.from_bytes(header, "little")
    if size > max_bytes:
        raise PeerFailed(f"frame of {size} bytes exceeds the limit of {max_bytes}")
    data = stream.read(size)  # type: ignore[attr-defined]
    if len(data) != size:
        raise PeerFailed("truncated frame")
    return bytes(data)


class _Peer:
    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str] | None) -> None:
        self.name = name
        self.process = subprocess.Popen(
            list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(env) if env is not None else None
        )
        self.failed = ""

    def send(self, data: Outbound) -> None:
        try:
            write_frame(self.process.stdin, data)
        except (BrokenPipeError, OSError) as exc:
            raise PeerFailed(self._gone(f"cannot write to it ({exc})")) from None

    def receive(self, deadline: float, max_bytes: int) -> bytes:
        """One frame, read without blocking past ``deadline``."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        header = self._read(fd, _LENGTH_BYTES, deadline)
        size = int.from_bytes(header, "little")
        if size > max_bytes:
            raise PeerFailed(f"sent a frame of {size} bytes, above the limit of {max_bytes}")
        return self._read(fd, size, deadline)

    def _read(self, fd: int, size: int, deadline: float) -> bytes:
        buffer = bytearray(size)
        view, filled = memoryview(buffer), 0
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while filled < size:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise PeerFailed("no reply before the deadline")
                chunk = os.read(fd, min(size - filled, 1 << 20))
                if not chunk:
                    raise PeerFailed(self._gone("closed its output"))
                view[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
        return bytes(buffer)

    def _gone(self, what: str) -> str:
        code = self.process.poll()
        return f"process {what}" + (f"; it exited with code {code}" if code is not None else "")


class PipeTransport(Transport):
    """Talks to one child process per peer; ``commands`` maps each peer's name to its argv."""

    def __init__(
        self,
        commands: Mapping[str, Sequence[str]],
        *,
        timeout: float = 600.0,
        max_message_bytes: int = 4 << 30,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._peers = {name: _Peer(name, command, env) for name, command in commands.items()}

    def announcements(self, timeout: float = 60.0) -> dict[str, bytes]:
        """Every peer's first frame; raises :class:`PeerFailed` if one does not announce itself."""
        deadline = time.monotonic() + timeout
        announced: dict[str, bytes] = {}
        for name, peer in self._peers.items():
            try:
                announced[name] = peer.receive(deadline, 1 << 20)
            except PeerFailed as exc:
                self.close()
                raise PeerFailed(f"{name} did not start: {exc}") from None
        return announced

    def available(self) -> list[str]:
        return [name for name, peer in self._peers.items() if not peer.failed and peer.process.poll() is None]

    def pids(self) -> dict[str, int]:
        """Each peer's process id."""
        return {name: peer.process.pid for name, peer in self._peers.items()}

    def exchange(
        self,
        recipients: Sequence[str],
        make_request: Callable[[str], Outbound],
        on_reply: Callable[[str, Inbound], None],
        on_failure: Callable[[str, str], None],
    ) -> None:
        deadline = time.monotonic() + self.timeout
        asked: list[_Peer] = []
        for name in recipients:
            peer = self._peers.get(name)
            if peer is None or peer.failed:
                on_failure(name, peer.failed if peer is not None else "no such peer")
                continue
            try:
                peer.send(make_request(name))
            except PeerFailed as exc:
                peer.failed = str(exc)
                on_failure(name, peer.failed)
                continue
            asked.append(peer)
        for peer in asked:
            try:
                reply = peer.receive(deadline, self.max_message_bytes)
            except PeerFailed as exc:
                peer.failed = str(exc)  # its stream may be mid-frame: never read from it again
                on_failure(peer.name, peer.failed)
                continue
            on_reply(peer.name, reply)

    def close(self) -> None:
        """End every peer: close its input (a clean end), then terminate it if it lingers."""
        for peer in self._peers.values():
            if peer.process.stdin is not None:
                try:
                    peer.process.stdin.close()
                except OSError:
                    pass
        for peer in self._peers.values():
            try:
                peer.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("peer %s did not exit; killing it", peer.name)
                peer.process.kill()
                peer.process.wait()
            if peer.process.stdout is not None:
                peer.process.stdout.close()
