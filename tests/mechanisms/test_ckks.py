"""The ckks mechanism: weighted sums under encryption, key separation and bad input."""

from __future__ import annotations

import gc
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fedcrypt.core.mechanism import PayloadRejected, RecoveryError, RoundContext
from fedcrypt.core.messages import FitRes, Payload, from_bytes, to_bytes
from fedcrypt.core import wire
from fedcrypt.core.wire import FileArray, SpooledMessage
from fedcrypt.crypto.ckks import PRESETS, CkksError, SecretKey
from fedcrypt.mechanisms import CkksMechanism, client_mechanism, server_mechanism
from fedcrypt.mechanisms.ckks import PUBLIC_FILE, SECRET_FILE, load_secret, write_keys

SIZE = 5000
CTX = RoundContext("job", 1, ("a", "b", "c"), SIZE)


@pytest.fixture(scope="module")
def secret() -> SecretKey:
    return SecretKey(PRESETS["fast"])


@pytest.fixture(scope="module")
def pair(secret: SecretKey) -> tuple[CkksMechanism, CkksMechanism]:
    """(server instance: public only, client instance: with the secret key)"""
    return CkksMechanism(secret.public), CkksMechanism(secret.public, secret)


def _wire(payload: Payload) -> Payload:
    message = from_bytes(to_bytes(FitRes(1, 1, {}, payload), job="job", sender="a")).message
    assert isinstance(message, FitRes)
    return message.payload


def _vectors(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, SIZE).astype(np.float32) * rng.integers(1, 50) for _ in range(count)]


def test_weighted_sum_under_encryption_matches_the_plaintext_sum(pair: tuple[CkksMechanism, CkksMechanism]) -> None:
    server_side, client_side = pair
    vectors = _vectors(3)
    aggregator = server_side.server_round(CTX)
    for name, vector in zip("abc", vectors):
        aggregator.fold("protect", name, _wire(client_side.client_round(CTX, name).respond("protect", Payload(), vector)))
    total = client_side.recover(_wire(aggregator.finish()), CTX)
    assert total.dtype == np.float32
    np.testing.assert_allclose(total, np.sum(vectors, axis=0, dtype=np.float64), atol=1e-4)


def test_the_server_instance_cannot_encrypt_or_decrypt_and_holds_no_key(
    pair: tuple[CkksMechanism, CkksMechanism],
) -> None:
    server_side, client_side = pair
    aggregator = server_side.server_round(CTX)
    aggregator.fold("protect", "a", client_side.client_round(CTX, "a").respond("protect", Payload(), _vectors(1)[0]))
    with pytest.raises(RecoveryError, match="holds no CKKS secret key"):
        server_side.recover(aggregator.finish(), CTX)
    with pytest.raises(ValueError, match="holds no CKKS secret key"):
        server_side.protect(_vectors(1)[0], CTX)
    # Nothing reachable from the server's objects is a secret key or a SEAL object.
    seen, stack = set(), [server_side, aggregator]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, np.ndarray, str, bytes)):
            continue
        seen.add(id(obj))
        assert not isinstance(obj, SecretKey) and "seal" not in type(obj).__module__.lower()
        stack.extend(gc.get_referents(obj))


def test_ciphertexts_under_another_key_are_rejected(pair: tuple[CkksMechanism, CkksMechanism]) -> None:
    server_side, client_side = pair
    other = SecretKey(PRESETS["fast"])
    stranger = CkksMechanism(other.public, other)
    aggregator = server_side.server_round(CTX)
    with pytest.raises(PayloadRejected, match="fingerprint"):
        aggregator.fold("protect", "x", _wire(stranger.protect(_vectors(1)[0], CTX)))
    aggregator.fold("protect", "a", _wire(client_side.protect(_vectors(1)[0], CTX)))
    with pytest.raises(RecoveryError, match="another key"):
        stranger.recover(_wire(aggregator.finish()), CTX)
    with pytest.raises(CkksError, match="does not belong"):
        CkksMechanism(server_side.public, other)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.arrays.update(c0=p.arrays["c0"][:-1]), "expected c0"),
        (lambda p: p.arrays.update(c0=p.arrays["c0"].astype(np.uint64)), "expected c0"),
        (lambda p: p.arrays.pop("seed"), "seed"),
        (lambda p: p.arrays.update(seed=p.arrays["seed"][:16]), "seed"),
        (lambda p: p.arrays.update(c0=np.full_like(p.arrays["c0"], 2**31)), "out of range"),
        (lambda p: p.meta.update(fingerprint="0" * 32), "fingerprint"),
        (lambda p: p.meta.clear(), "fingerprint"),
    ],
)
def test_bad_ciphertexts_are_rejected_and_leave_the_sum_untouched(
    pair: tuple[CkksMechanism, CkksMechanism], damage: object, reason: str
) -> None:
    server_side, client_side = pair
    good, bad_vector = _vectors(2)
    aggregator = server_side.server_round(CTX)
    aggregator.fold("protect", "a", _wire(client_side.protect(good, CTX)))
    bad = client_side.protect(bad_vector, CTX)
    bad.arrays = dict(bad.arrays)
    damage(bad)  # type: ignore[operator]
    with pytest.raises(PayloadRejected, match=reason):
        aggregator.fold("protect", "b", bad)
    np.testing.assert_allclose(client_side.recover(aggregator.finish(), CTX), good, atol=1e-4)


def test_wrong_slot_count_for_the_round_is_rejected(pair: tuple[CkksMechanism, CkksMechanism]) -> None:
    server_side, client_side = pair
    longer = RoundContext("job", 1, ("a",), SIZE + 3 * PRESETS["fast"].slots)
    aggregator = server_side.server_round(CTX)
    with pytest.raises(PayloadRejected, match="expected c0"):
        aggregator.fold("protect", "a", client_side.protect(np.zeros(longer.vector_size, np.float32), longer))


def test_contributions_that_could_overflow_are_refused_by_the_client(pair: tuple[CkksMechanism, CkksMechanism]) -> None:
    _, client_side = pair
    huge = np.full(SIZE, PRESETS["fast"].bound / 2, dtype=np.float32)
    with pytest.raises(ValueError, match="beyond preset 'fast'"):
        client_side.protect(huge, CTX)


def test_a_spooled_ciphertext_is_folded_from_the_file(
    pair: tuple[CkksMechanism, CkksMechanism], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wire, "LAZY_BLOB_BYTES", 1024)
    server_side, client_side = pair
    vector = _vectors(1)[0]
    spooled = SpooledMessage()
    spooled.write(to_bytes(FitRes(1, 1, {}, client_side.protect(vector, CTX)), job="job", sender="a"))
    message = from_bytes(spooled).message
    assert isinstance(message, FitRes) and isinstance(message.payload.arrays["c0"], FileArray)
    aggregator = server_side.server_round(CTX)
    aggregator.fold("protect", "a", message.payload)
    spooled.close()
    np.testing.assert_allclose(client_side.recover(aggregator.finish(), CTX), vector, atol=1e-4)


def test_key_files_separate_the_roles(tmp_path: Path, secret: SecretKey) -> None:
    write_keys(tmp_path, secret)
    assert stat.S_IMODE(os.stat(tmp_path / SECRET_FILE).st_mode) == 0o600
    assert "fingerprint" in (tmp_path / PUBLIC_FILE).read_text()
    with pytest.raises(CkksError, match="refusing to overwrite"):
        write_keys(tmp_path, secret)
    server = server_mechanism("ckks", key_dir=tmp_path)
    client = client_mechanism("ckks", key_dir=tmp_path)
    assert isinstance(server, CkksMechanism) and isinstance(client, CkksMechanism)
    assert server.public == client.public == secret.public
    # The server's directory needs no secret file at all.
    public_only = tmp_path / "server"
    public_only.mkdir()
    (public_only / PUBLIC_FILE).write_text((tmp_path / PUBLIC_FILE).read_text())
    assert isinstance(server_mechanism("ckks", key_dir=public_only), CkksMechanism)
    with pytest.raises(CkksError, match="no CKKS secret key"):
        client_mechanism("ckks", key_dir=public_only)
    # A secret that does not match the public file is refused.
    other = tmp_path / "other"
    write_keys(other, SecretKey(PRESETS["fast"]))
    (other / PUBLIC_FILE).write_text((tmp_path / PUBLIC_FILE).read_text())
    with pytest.raises(CkksError, match="does not match"):
        load_secret(other)
    with pytest.raises(ValueError, match="needs --keys"):
        server_mechanism("ckks", key_dir=None)
