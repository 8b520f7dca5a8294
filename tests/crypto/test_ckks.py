"""CKKS with seeded symmetric encryption, against plaintext sums and SEAL's own checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrypt.crypto.ckks import PRESETS, CkksError, Preset, PublicParams, SecretKey, expand_a


@pytest.fixture(scope="module")
def key() -> SecretKey:
    return SecretKey(PRESETS["fast"])


def _sum_ciphertexts(key: SecretKey, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the server does: add c0 and the seed-expanded c1 modulo each prime."""
    q = np.array(key.public.moduli, dtype=np.uint64)
    shape = (key.public.blocks(vectors.shape[1]), *key.public.shape)
    c0_sum, c1_sum = np.zeros(shape, np.uint64), np.zeros(shape, np.uint64)
    for vector in vectors:
        c0, seed = key.encrypt(vector)
        c0_sum += c0
        for block in range(shape[0]):
            c1_sum[block] += expand_a(seed, block, q, shape[2])
    return c0_sum % q[:, None], c1_sum % q[:, None]


def test_sum_of_100_updates_decrypts_within_1e_6(key: SecretKey) -> None:
    vectors = np.random.default_rng(0).uniform(-1, 1, size=(100, 2 * key.preset.slots + 77))
    c0, c1 = _sum_ciphertexts(key, vectors)
    total = key.decrypt(c0, c1, vectors.shape[1])
    error = np.abs(total - vectors.sum(axis=0)).max()
    assert error <= 1e-6, error


def test_ciphertexts_are_half_size_and_fresh(key: SecretKey) -> None:
    values = np.linspace(-1, 1, 3000)
    first, seed_1 = key.encrypt(values)
    second, seed_2 = key.encrypt(values)
    assert first.dtype == np.uint32 and first.shape == (2, *key.public.shape)
    assert seed_1 != seed_2 and not np.array_equal(first, second)  # fresh randomness every time
    assert first.nbytes / values.size < 25 * 1.1  # c0 only: 16 bytes per value with 2 slots per coefficient pair


def test_decrypting_with_another_key_gives_noise_not_the_values(key: SecretKey) -> None:
    other = SecretKey(PRESETS["fast"])
    assert other.public.fingerprint != key.public.fingerprint
    values = np.full(100, 0.5)
    c0, c1 = _sum_ciphertexts(key, values[None, :])
    assert np.abs(other.decrypt(c0, c1, 100) - values).max() > 1.0


@given(st.binary(min_size=32, max_size=32), st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_seed_expansion_is_deterministic_uniform_and_in_range(seed: bytes, block: int) -> None:
    moduli = np.array([1073651713, 1073668097], dtype=np.uint64)
    a = expand_a(seed, block, moduli, 4096)
    assert np.array_equal(a, expand_a(seed, block, moduli, 4096))
    assert (a < moduli[:, None]).all()
    assert not np.array_equal(a, expand_a(seed, block + 1, moduli, 4096))
    # Uniform modulo ~2^30: the mean is near q/2 (4096 samples: standard error q/sqrt(12*4096)).
    assert np.abs(a.mean(axis=1) / moduli - 0.5).max() < 6 / np.sqrt(12 * 4096)


def test_public_parameters_round_trip_and_reject_garbage(key: SecretKey) -> None:
    assert PublicParams.from_json(key.public.to_json()) == key.public
    with pytest.raises(CkksError, match="not a fedcrypt CKKS public"):
        PublicParams.from_json('{"kind": "something else"}')
    with pytest.raises(CkksError, match="unreadable"):
        PublicParams.from_json("{not json")
    altered = key.public.to_json().replace('"poly_modulus_degree": 4096', '"poly_modulus_degree": 1024')
    with pytest.raises(CkksError, match="altered preset"):
        PublicParams.from_json(altered)


def test_wrong_shapes_are_refused(key: SecretKey) -> None:
    c0 = np.zeros((1, *key.public.shape), dtype=np.uint32)
    with pytest.raises(CkksError, match="cannot hold"):
        key.decrypt(c0, c0, 5 * key.preset.slots)
    with pytest.raises(CkksError, match="shape"):
        key.decrypt(c0[:, :1], c0[:, :1], 10)


def test_every_preset_is_accepted_by_seal_at_128_bits() -> None:
    for preset in PRESETS.values():
        key = SecretKey(preset)  # SEAL's TC128 check raises for insecure parameters
        assert key.public.shape == (len(preset.prime_bits) - 1, preset.poly_modulus_degree)
        assert preset.bound >= 2**18
    insecure = Preset("insecure", 4096, (60, 60), 40, "log q = 120 > 109 for N = 4096")
    with pytest.raises(CkksError, match="rejected by SEAL"):
        SecretKey(insecure)


def test_worker_processes_encrypt_and_decrypt_what_a_single_process_does(
    key: SecretKey, caplog: pytest.LogCaptureFixture
) -> None:
    shared = SecretKey(key.preset, key_bytes=key.to_bytes(), processes=2)
    try:
        assert shared.public == key.public
        vectors = np.random.default_rng(5).uniform(-1, 1, size=(2, 40 * key.preset.slots + 5))
        c0, c1 = _sum_ciphertexts(shared, vectors)  # 41 ciphertexts: split between two processes
        assert shared._workers is not None and len(shared._workers) == 1
        expected = vectors.sum(axis=0)
        assert np.abs(key.decrypt(c0, c1, vectors.shape[1]) - expected).max() <= 1e-6  # in-process
        assert np.abs(shared.decrypt(c0, c1, vectors.shape[1]) - expected).max() <= 1e-6  # split
        shared._workers[0]._process.kill()  # a worker dies: its share is redone here, correctly
        shared._workers[0]._process.wait()
        assert np.abs(shared.decrypt(c0, c1, vectors.shape[1]) - expected).max() <= 1e-6
        assert "redoing its share in this process" in caplog.text
        c0, c1 = _sum_ciphertexts(shared, vectors[:1])  # a fresh pool after the failure
        assert np.abs(key.decrypt(c0, c1, vectors.shape[1]) - vectors[0]).max() <= 1e-6
    finally:
        shared.close()


def test_a_key_from_bytes_must_be_a_key(key: SecretKey) -> None:
    with pytest.raises(CkksError, match="not a CKKS secret key"):
        SecretKey(key.preset, key_bytes=b"\x00" * 64)
