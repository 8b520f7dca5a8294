"""The gRPC transport against hostile and broken peers, in one process on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrypt.core.wire import SpooledMessage
from fedcrypt.transport import chunks, grpc_server
from fedcrypt.transport.certs import TlsFiles, client_files, server_files, write_bundle
from fedcrypt.transport.chunks import ChunkError, from_chunks, to_chunks
from fedcrypt.transport.grpc_client import ClientLimits, ConnectionRefused, GrpcClientConnection
from fedcrypt.transport.grpc_server import CLIENT_KEY, JOB_KEY, GrpcServerTransport, ServerLimits, is_loopback
from fedcrypt.transport.proto import fedcrypt_pb2 as pb
from fedcrypt.transport.proto import fedcrypt_pb2_grpc as pb_grpc

JOB = "grpc-test"


@given(st.binary(max_size=5000), st.integers(1, 700))
@settings(max_examples=100, deadline=None)
def test_chunks_round_trip(data: bytes, chunk_bytes: int) -> None:
    assert from_chunks(to_chunks(data, chunk_bytes), max_bytes=len(data)) == data


@given(st.lists(st.binary(max_size=700), max_size=6), st.integers(1, 300))
@settings(max_examples=100, deadline=None)
def test_buffers_sent_back_to_back_arrive_as_one_message(parts: list[bytes], chunk_bytes: int) -> None:
    chunks = list(to_chunks([memoryview(p) for p in parts], chunk_bytes))
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    assert from_chunks(chunks, max_bytes=10_000) == b"".join(parts)


def test_chunk_streams_that_lie_are_rejected() -> None:
    with pytest.raises(ChunkError, match="exceeds the limit"):
        from_chunks(to_chunks(b"x" * 100), max_bytes=99)
    with pytest.raises(ChunkError, match="stream ended after 50 of 100"):
        from_chunks([pb.Chunk(data=b"x" * 50, total_size=100)], max_bytes=1000)
    with pytest.raises(ChunkError, match="more than the announced"):
        from_chunks([pb.Chunk(data=b"x" * 10, total_size=5)], max_bytes=1000)
    with pytest.raises(ChunkError, match="after the first"):
        from_chunks([pb.Chunk(data=b"x", total_size=2), pb.Chunk(data=b"x", total_size=2)], max_bytes=1000)
    assert from_chunks([], max_bytes=10) is None


def test_plaintext_is_refused_off_loopback() -> None:
    assert is_loopback("127.0.0.1:1") and is_loopback("localhost:1") and is_loopback("[::1]:1")
    assert not is_loopback("0.0.0.0:1") and not is_loopback("10.1.2.3:1")
    with pytest.raises(ValueError, match="loopback only"):
        GrpcServerTransport(job=JOB, address="0.0.0.0:0", welcome=b"", tls=None)
    with pytest.raises(ValueError, match="loopback only"):
        GrpcClientConnection("192.0.2.1:1", "a", tls=None)


@pytest.fixture()
def server() -> Iterator[GrpcServerTransport]:
    transport = GrpcServerTransport(
        job=JOB,
        address="127.0.0.1:0",
        welcome=b"welcome",
        tls=None,
        limits=ServerLimits(round_timeout=10, liveness_timeout=5, max_message_bytes=10_000, chunk_bytes=1000),
    )
    transport.start()
    yield transport
    transport.close()


def _connect(server: GrpcServerTransport, name: str) -> GrpcClientConnection:
    connection = GrpcClientConnection(f"127.0.0.1:{server.port}", name, tls=None)
    assert connection.hello() == b"welcome"
    connection.job = JOB
    return connection


def _exchange(server: GrpcServerTransport, names: list[str], request: bytes) -> tuple[dict[str, bytes], dict[str, str]]:
    replies: dict[str, bytes] = {}
    failures: dict[str, str] = {}
    server.exchange(names, lambda _: request, replies.__setitem__, failures.__setitem__)
    return replies, failures


def _answer(connection: GrpcClientConnection, reply: bytes | None) -> threading.Thread:
    """A client thread that pulls one request and sends ``reply`` (or raw chunks)."""

    def run() -> None:
        while (request := connection.next_request()) is None:
            pass
        assert request == b"work"
        if reply is not None:
            connection.reply(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_requests_and_replies_of_any_size_travel_in_chunks(server: GrpcServerTransport) -> None:
    alice, bob = _connect(server, "alice"), _connect(server, "bob")
    assert server.available() == ["alice", "bob"]
    threads = [_answer(alice, b"a" * 9_999), _answer(bob, b"")]
    replies, failures = _exchange(server, ["alice", "bob"], b"work")
    assert replies == {"alice": b"a" * 9_999, "bob": b""} and not failures
    for thread in threads:
        thread.join(10)


def test_oversize_reply_is_refused_and_the_others_still_count(server: GrpcServerTransport) -> None:
    alice, bob = _connect(server, "alice"), _connect(server, "bob")
    threads = [_answer(alice, b"a" * 10_001), _answer(bob, b"ok")]
    replies, failures = _exchange(server, ["alice", "bob"], b"work")
    assert replies == {"bob": b"ok"}
    assert "exceeds the limit of 10000" in failures["alice"]
    for thread in threads:
        thread.join(10)


def test_garbage_and_unsolicited_calls_never_crash_the_server(server: GrpcServerTransport) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.FederationStub(channel)
    meta = ((CLIENT_KEY, "eve"), (JOB_KEY, JOB))
    ack = stub.Push(iter([pb.Chunk(data=b"\x00" * 10, total_size=10)]), metadata=meta, timeout=5)
    assert not ack.accepted and "no request is pending" in ack.reason
    ack = stub.Reserve(pb.PullRequest(wait_ms=10), metadata=meta, timeout=5)
    assert not ack.accepted and "no request is pending" in ack.reason
    raw = grpc.insecure_channel(f"127.0.0.1:{server.port}").unary_unary("/fedcrypt.v1.Federation/Push")
    try:  # bytes that may or may not parse as a Chunk: refused either way
        assert not pb.PushAck.FromString(raw(b"\xff\xfe not a protobuf", metadata=meta, timeout=5)).accepted
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INTERNAL
    for metadata, code in [
        (((CLIENT_KEY, "eve"), (JOB_KEY, "other-job")), grpc.StatusCode.FAILED_PRECONDITION),
        (((CLIENT_KEY, "../etc/passwd"), (JOB_KEY, JOB)), grpc.StatusCode.UNAUTHENTICATED),
        (((CLIENT_KEY, "server"), (JOB_KEY, JOB)), grpc.StatusCode.UNAUTHENTICATED),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Pull(pb.PullRequest(wait_ms=10), metadata=metadata, timeout=5))
        assert info.value.code() == code
    # The server still serves an honest client.
    alice = _connect(server, "alice")
    thread = _answer(alice, b"fine")
    replies, _ = _exchange(server, ["alice"], b"work")
    assert replies == {"alice": b"fine"}
    thread.join(10)
    channel.close()


def test_a_truncated_upload_drops_only_that_client(server: GrpcServerTransport) -> None:
    alice = _connect(server, "alice")
    stub = pb_grpc.FederationStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    meta = ((CLIENT_KEY, "alice"), (JOB_KEY, JOB))

    def truncated() -> None:
        while alice.next_request() is None:
            pass
        assert stub.Reserve(pb.PullRequest(wait_ms=1000), metadata=meta, timeout=5).accepted
        ack = stub.Push(iter([pb.Chunk(data=b"x" * 10, total_size=500)]), metadata=meta, timeout=5)
        assert not ack.accepted

    thread = threading.Thread(target=truncated, daemon=True)
    thread.start()
    replies, failures = _exchange(server, ["alice", "ghost"], b"work")
    thread.join(10)
    assert not replies
    assert "stream ended after 10 of 500" in failures["alice"] and failures["ghost"] == "not connected"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    write_bundle(folder, ["alice", "bob"])
    return folder


def test_tls_binds_the_name_to_the_certificate(certs: Path) -> None:
    transport = GrpcServerTransport(
        job=JOB, address="127.0.0.1:0", welcome=b"welcome", tls=server_files(certs), revoked=["bob"]
    )
    transport.start()
    address = f"localhost:{transport.port}"
    try:
        alice = GrpcClientConnection(address, "alice", tls=client_files(certs, "alice"))
        assert alice.hello() == b"welcome"
        impostor = GrpcClientConnection(address, "bob", tls=client_files(certs, "alice"))
        with pytest.raises(ConnectionRefused, match="does not match the certificate's 'alice'"):
            impostor.hello()
        revoked = GrpcClientConnection(address, "bob", tls=client_files(certs, "bob"))
        with pytest.raises(ConnectionRefused, match="revoked"):
            revoked.hello()
        anonymous = grpc.secure_channel(address, grpc.ssl_channel_credentials(TlsFiles.load(client_files(certs, "alice"))[0]))
        with pytest.raises(grpc.RpcError):
            list(pb_grpc.FederationStub(anonymous).Pull(pb.PullRequest(hello=True), timeout=5))
        assert transport.available() == ["alice"]
    finally:
        transport.close()


def test_one_client_uploads_at_a_time(server: GrpcServerTransport) -> None:
    """Clients reserve the upload slot, so waiting clients keep their data until it is their turn."""
    stub = pb_grpc.FederationStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    alice, bob = _connect(server, "alice"), _connect(server, "bob")
    meta = {name: ((CLIENT_KEY, name), (JOB_KEY, JOB)) for name in ("alice", "bob")}
    outcome: dict[str, object] = {}

    def clients() -> None:
        for connection in (alice, bob):
            while connection.next_request() is None:
                pass
        assert stub.Reserve(pb.PullRequest(wait_ms=1000), metadata=meta["alice"], timeout=5).accepted
        busy = stub.Reserve(pb.PullRequest(wait_ms=100), metadata=meta["bob"], timeout=5)
        unreserved = stub.Push(iter(to_chunks(b"bob")), metadata=meta["bob"], timeout=5)
        outcome.update(busy=busy, unreserved=unreserved)
        assert stub.Push(iter(to_chunks(b"alice")), metadata=meta["alice"], timeout=5).accepted
        bob.reply(b"bob")  # reserves, now free, and pushes

    thread = threading.Thread(target=clients, daemon=True)
    thread.start()
    replies, failures = _exchange(server, ["alice", "bob"], b"work")
    thread.join(10)
    assert replies == {"alice": b"alice", "bob": b"bob"} and not failures
    busy, unreserved = outcome["busy"], outcome["unreserved"]
    assert isinstance(busy, pb.PushAck) and not busy.accepted and busy.reason == "another client is uploading"
    assert isinstance(unreserved, pb.PushAck) and unreserved.reason == "reserve the upload slot first"


def test_heartbeats_keep_a_slow_client_in_the_round() -> None:
    """A client that works longer than the liveness timeout stays in while it sends heartbeats."""
    transport = GrpcServerTransport(
        job=JOB,
        address="127.0.0.1:0",
        welcome=b"welcome",
        tls=None,
        limits=ServerLimits(round_timeout=20, liveness_timeout=1.0),
    )
    transport.start()
    try:
        slow, silent = _connect(transport, "slow"), _connect(transport, "silent")
        slow.limits.heartbeat_seconds = 0.2

        def work(connection: GrpcClientConnection, beat: bool) -> None:
            while connection.next_request() is None:
                pass
            if beat:
                with connection.heartbeat():
                    time.sleep(2.5)
                connection.reply(b"done")
            else:
                time.sleep(2.5)

        threads = [threading.Thread(target=work, args=(c, c is slow), daemon=True) for c in (slow, silent)]
        for thread in threads:
            thread.start()
        replies, failures = _exchange(transport, ["slow", "silent"], b"work")
        for thread in threads:
            thread.join(10)
        assert replies == {"slow": b"done"}
        assert "connection lost" in failures["silent"]
    finally:
        transport.close()


def test_large_messages_are_spooled_to_disk_on_both_sides() -> None:
    transport = GrpcServerTransport(
        job=JOB,
        address="127.0.0.1:0",
        welcome=b"welcome",
        tls=None,
        limits=ServerLimits(round_timeout=10, chunk_bytes=1000, spool_bytes=100),
    )
    transport.start()
    try:
        alice = GrpcClientConnection(
            f"127.0.0.1:{transport.port}", "alice", tls=None, limits=ClientLimits(chunk_bytes=700, spool_bytes=100)
        )
        assert alice.hello() == b"welcome"  # small: in memory
        alice.job = JOB
        request, reply = bytes(range(256)) * 20, bytes(range(255, -1, -1)) * 23
        client_saw: list[bytes] = []

        def answer() -> None:
            while (received := alice.next_request()) is None:
                pass
            assert isinstance(received, SpooledMessage)
            client_saw.append(received.read_at(0, len(received)))
            received.close()
            alice.reply([memoryview(reply[:1000]), memoryview(reply[1000:])])

        server_saw: list[SpooledMessage] = []

        def on_reply(name: str, data: object) -> None:
            assert isinstance(data, SpooledMessage)
            server_saw.append(data)
            assert data.read_at(0, len(data)) == reply

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        failures: dict[str, str] = {}
        transport.exchange(["alice"], lambda _: request, on_reply, failures.__setitem__)
        thread.join(10)
        assert client_saw == [request] and len(server_saw) == 1 and not failures
        with pytest.raises(ValueError):  # the transport deleted the temporary file after on_reply
            server_saw[0].read_at(0, 1)
    finally:
        transport.close()


def test_a_broken_stream_leaves_no_spool_behind() -> None:
    closed: list[SpooledMessage] = []

    class Watched(SpooledMessage):
        def close(self) -> None:
            closed.append(self)
            super().close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunks, "SpooledMessage", Watched)
        spooled = from_chunks(to_chunks(b"y" * 50, 7), max_bytes=100, spool_bytes=10)
        assert isinstance(spooled, Watched) and spooled.read_at(0, 50) == b"y" * 50
        with pytest.raises(ChunkError, match="stream ended after 10 of 500"):
            from_chunks([pb.Chunk(data=b"x" * 10, total_size=500)], max_bytes=1000, spool_bytes=10)
    assert len(closed) == 1 and closed[0] is not spooled


def test_downloads_share_a_few_slots_and_waiting_is_not_silence(monkeypatch: pytest.MonkeyPatch) -> None:
    """With one download slot, requests stream one at a time; a client waiting for the slot (or
    receiving slowly) for longer than the liveness timeout is still in the round."""
    active, most = [0], [0]
    lock = threading.Lock()

    def slow_chunks(data: bytes, chunk_bytes: int) -> Iterator[pb.Chunk]:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            for chunk in to_chunks(data, chunk_bytes):
                time.sleep(0.3)
                yield chunk
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(grpc_server, "to_chunks", slow_chunks)
    transport = GrpcServerTransport(
        job=JOB,
        address="127.0.0.1:0",
        welcome=b"welcome",
        tls=None,
        limits=ServerLimits(round_timeout=30, liveness_timeout=0.8, chunk_bytes=2, parallel_downloads=1),
    )
    transport.start()
    try:
        names = ["alice", "bob", "carol"]
        connections = [_connect(transport, name) for name in names]
        threads = [_answer(connection, name.encode()) for connection, name in zip(connections, names)]
        time.sleep(0.5)  # every client is now waiting in Pull, which counts as alive
        replies, failures = _exchange(transport, names, b"work")
        for thread in threads:
            thread.join(10)
        assert replies == {name: name.encode() for name in names} and not failures, failures
        assert most[0] == 1
    finally:
        transport.close()
