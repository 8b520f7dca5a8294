"""The paillier mechanism: weighted sums under per-value encryption, key separation, bad input."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fedcrypt.core.mechanism import PayloadRejected, RecoveryError, RoundContext
from fedcrypt.core.messages import FitRes, Payload, from_bytes, to_bytes
from fedcrypt.crypto.paillier import PaillierError, generate_keypair
from fedcrypt.mechanisms import PaillierMechanism, client_mechanism, server_mechanism
from fedcrypt.mechanisms.paillier import PUBLIC_FILE, SECRET_FILE, write_keys

SIZE = 120
CTX = RoundContext("job", 1, ("a", "b", "c"), SIZE)


@pytest.fixture(scope="module")
def pair() -> tuple[PaillierMechanism, PaillierMechanism]:
    public, private = generate_keypair(1024)
    return PaillierMechanism(public), PaillierMechanism(public, private)


def _wire(payload: Payload) -> Payload:
    message = from_bytes(to_bytes(FitRes(1, 1, {}, payload), job="job", sender="a")).message
    assert isinstance(message, FitRes)
    return message.payload


def _vectors(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [(rng.uniform(-1, 1, SIZE) * rng.integers(1, 50)).astype(np.float32) for _ in range(count)]


def test_the_sum_under_encryption_is_the_plaintext_sum(pair: tuple[PaillierMechanism, PaillierMechanism]) -> None:
    server_side, client_side = pair
    vectors = _vectors(3)
    aggregator = server_side.server_round(CTX)
    for name, vector in zip("abc", vectors):
        aggregator.fold("protect", name, _wire(client_side.client_round(CTX, name).respond("protect", Payload(), vector)))
    total = client_side.recover(_wire(aggregator.finish()), CTX)
    np.testing.assert_allclose(total, np.sum(vectors, axis=0, dtype=np.float64), atol=1e-5)


def test_the_server_instance_can_neither_encrypt_nor_decrypt(pair: tuple[PaillierMechanism, PaillierMechanism]) -> None:
    server_side, client_side = pair
    aggregator = server_side.server_round(CTX)
    aggregator.fold("protect", "a", client_side.protect(_vectors(1)[0], CTX))
    with pytest.raises(RecoveryError, match="no Paillier private key"):
        server_side.recover(aggregator.finish(), CTX)
    with pytest.raises(ValueError, match="no Paillier private key"):
        server_side.protect(_vectors(1)[0], CTX)
    assert not hasattr(server_side, "p") and server_side._private is None


def test_bad_payloads_are_rejected_and_leave_the_sum_untouched(pair: tuple[PaillierMechanism, PaillierMechanism]) -> None:
    server_side, client_side = pair
    stranger = PaillierMechanism(*generate_keypair(1024))  # another key
    vector = _vectors(1)[0]
    aggregator = server_side.server_round(CTX)
    aggregator.fold("protect", "a", _wire(client_side.protect(vector, CTX)))
    good = client_side.protect(vector, CTX)
    zero = Payload(dict(good.meta), {"c": np.array(good.arrays["c"])})
    zero.arrays["c"][7] = 0
    cases = {
        "fingerprint mismatch": stranger.protect(vector, CTX),
        "not invertible": zero,
        "expected 120 ciphertexts": Payload(dict(good.meta), {"c": good.arrays["c"][:-1]}),
        "of 256 bytes": Payload(dict(good.meta), {"c": good.arrays["c"][:, :-1]}),
    }
    for reason, payload in cases.items():
        with pytest.raises(PayloadRejected, match=reason):
            aggregator.fold("protect", "b", _wire(payload))
    total = client_side.recover(_wire(aggregator.finish()), CTX)
    np.testing.assert_allclose(total, vector, atol=1e-6)


def test_contributions_that_could_overflow_are_refused(pair: tuple[PaillierMechanism, PaillierMechanism]) -> None:
    _, client_side = pair
    huge = np.full(SIZE, client_side.encoding.max_value / 2, dtype=np.float64)
    with pytest.raises(ValueError, match="beyond the encoding's range"):
        client_side.protect(huge, CTX)


def test_key_files_separate_the_roles(tmp_path: Path) -> None:
    _, private = generate_keypair(1024)
    write_keys(tmp_path, private)
    assert stat.S_IMODE(os.stat(tmp_path / SECRET_FILE).st_mode) == 0o600
    with pytest.raises(PaillierError, match="refusing to overwrite"):
        write_keys(tmp_path, private)
    server = server_mechanism("paillier", key_dir=tmp_path)
    client = client_mechanism("paillier", key_dir=tmp_path)
    assert isinstance(server, PaillierMechanism) and server._private is None
    assert isinstance(client, PaillierMechanism) and client._private is not None
    public_only = tmp_path / "server"
    public_only.mkdir()
    (public_only / PUBLIC_FILE).write_text((tmp_path / PUBLIC_FILE).read_text())
    with pytest.raises(PaillierError, match="no Paillier private key"):
        client_mechanism("paillier", key_dir=public_only)


def test_pieces_of_the_aggregate_recover_to_the_whole(pair: tuple[PaillierMechanism, PaillierMechanism]) -> None:
    server_side, client_side = pair
    ctx = RoundContext("job", 1, ("a",), 200)
    vector = np.linspace(-3, 3, 200, dtype=np.float32)
    aggregator = server_side.server_round(ctx)
    aggregator.fold("protect", "a", client_side.protect(vector, ctx))
    aggregate = aggregator.finish()
    pieces = server_side.split(aggregate, ctx, 5)
    assert [(p.start, p.stop) for p in pieces] == [(0, 66), (66, 133), (133, 200)]  # >= 64 ciphertexts each
    np.testing.assert_allclose(np.concatenate([client_side.recover(p.payload, ctx) for p in pieces]), vector, atol=1e-6)
    assert server_side.split(aggregate, RoundContext("job", 1, ("a",), 10), 5)[0].payload is aggregate  # mismatch: whole
