"""Paillier on gmpy2 against python-paillier (``phe``) as the oracle, and property tests."""

from __future__ import annotations

import gmpy2
import numpy as np
import phe
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrypt.crypto.paillier import (
    FixedPoint,
    PaillierError,
    PrivateKey,
    PublicKey,
    djn_public_key,
    generate_keypair,
)

BITS = 1024  # tests use the smallest allowed key; the default is 2048


@pytest.fixture(scope="module")
def keys() -> tuple[PublicKey, PrivateKey]:
    return generate_keypair(BITS)


@pytest.fixture(scope="module")
def phe_keys() -> tuple[phe.PaillierPublicKey, phe.PaillierPrivateKey]:
    return phe.generate_paillier_keypair(n_length=BITS)


def test_generated_keys_have_the_requested_size_and_decrypt(keys: tuple[PublicKey, PrivateKey]) -> None:
    public, private = keys
    assert public.bits == BITS and public.ciphertext_bytes == 2 * BITS // 8
    values = [0, 1, 12345, int(public.n) - 1]
    assert private.decrypt(public.encrypt(values)) == values


def test_ciphertexts_are_what_python_paillier_computes_for_the_same_randomness(
    phe_keys: tuple[phe.PaillierPublicKey, phe.PaillierPrivateKey],
) -> None:
    phe_public, phe_private = phe_keys
    n = gmpy2.mpz(phe_public.n)
    x = gmpy2.mpz(987654321987654321)
    public = PublicKey(n, gmpy2.powmod(n - gmpy2.f_mod(x * x, n), n, n * n))  # DJN base with known x
    for m, exponent in [(0, 5), (42, 2**511 + 17), (int(n) - 3, 123456789)]:
        ours = public.encrypt([m], [public.obfuscator(exponent)])[0]
        r = int(gmpy2.powmod(n - gmpy2.f_mod(x * x, n), exponent, n))
        assert ours == phe_public.raw_encrypt(m, r_value=r)
        assert phe_private.raw_decrypt(int(ours)) == m


def test_keys_import_from_python_paillier_and_decrypt_its_ciphertexts(
    phe_keys: tuple[phe.PaillierPublicKey, phe.PaillierPrivateKey],
) -> None:
    phe_public, phe_private = phe_keys
    public = djn_public_key(phe_public.n)
    private = PrivateKey(public, phe_private.p, phe_private.q)
    values = [7, 2**200, phe_public.n - 1]
    theirs = [phe_public.raw_encrypt(v) for v in values]
    assert private.decrypt([gmpy2.mpz(c) for c in theirs]) == values
    # ... and python-paillier decrypts ours, sums included.
    ours = public.encrypt(values[:2])
    assert phe_private.raw_decrypt(int(public.add(ours[0], ours[1]))) == values[0] + values[1]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2**900), min_size=1, max_size=5), st.integers(-(2**40), 2**40))
def test_homomorphic_sum_and_scalar_product_match_integer_arithmetic(
    keys: tuple[PublicKey, PrivateKey], values: list[int], scalar: int
) -> None:
    public, private = keys
    n = int(public.n)
    ciphertexts = public.encrypt(values)
    total = ciphertexts[0]
    for c in ciphertexts[1:]:
        total = public.add(total, c)
    assert private.decrypt([total])[0] == sum(values) % n
    assert private.decrypt([public.multiply(ciphertexts[0], scalar)])[0] == (scalar * values[0]) % n


def test_precomputed_obfuscators_give_fresh_ciphertexts(keys: tuple[PublicKey, PrivateKey]) -> None:
    public, private = keys
    obfuscators = public.obfuscators(4)
    assert len({int(o) for o in obfuscators}) == 4
    ciphertexts = public.encrypt([5, 5, 5, 5], obfuscators)
    assert len({int(c) for c in ciphertexts}) == 4 and private.decrypt(ciphertexts) == [5] * 4
    with pytest.raises(PaillierError, match="obfuscators for"):
        public.encrypt([1, 2], obfuscators[:1] + obfuscators[:1] + obfuscators[:1])


def test_bytes_round_trip_and_bad_ciphertexts_are_refused(keys: tuple[PublicKey, PrivateKey]) -> None:
    public, private = keys
    ciphertexts = public.encrypt([1, 2, 3])
    array = public.to_array(ciphertexts)
    assert array.shape == (3, public.ciphertext_bytes)
    assert public.from_array(array) == ciphertexts
    for bad in (np.zeros((1, public.ciphertext_bytes), np.uint8),  # zero
                np.full((1, public.ciphertext_bytes), 255, np.uint8),  # >= n^2
                public.to_array([public.n * 5])):  # shares a factor with n
        with pytest.raises(PaillierError, match="out of range or not invertible"):
            public.from_array(bad)
    with pytest.raises(PaillierError, match="rows of"):
        public.from_array(array[:, :-1])  # truncated
    with pytest.raises(PaillierError, match="out of range"):
        public.encrypt([int(public.n)])


def test_key_files_round_trip_and_reject_tampering(keys: tuple[PublicKey, PrivateKey]) -> None:
    public, private = keys
    assert PublicKey.from_json(public.to_json()) == public
    restored = PrivateKey.from_json(private.to_json())
    assert restored.decrypt(public.encrypt([99])) == [99]
    tampered = public.to_json().replace(hex(public.h), hex(public.h + 1))
    with pytest.raises(PaillierError, match="fingerprint does not match"):
        PublicKey.from_json(tampered)
    with pytest.raises(PaillierError, match="unreadable"):
        PublicKey.from_json("{}")
    with pytest.raises(PaillierError, match="do not factor"):
        PrivateKey(public, 3, 5)
    with pytest.raises(PaillierError, match="even number of bits >= 1024"):
        generate_keypair(512)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=8))
def test_fixed_point_is_python_paillier_s_encoding_and_sums_decrypt_exactly(
    keys: tuple[PublicKey, PrivateKey], values: list[float]
) -> None:
    public, private = keys
    encoding = FixedPoint(public, frac_bits=32)
    encoded = encoding.encode(np.array(values))
    phe_public = phe.PaillierPublicKey(int(public.n))
    assert encoded == [phe.EncodedNumber.encode(phe_public, v, precision=2**-32).encoding for v in values]
    ciphertexts = public.encrypt(encoded)
    total = ciphertexts[0]
    for c in ciphertexts[1:]:
        total = public.add(total, c)
    decoded = encoding.decode(private.decrypt([total]))[0]
    assert abs(decoded - sum(values)) <= len(values) * 2**-33 + abs(sum(values)) * 1e-15


def test_fixed_point_overflow_is_reported_never_wrapped(keys: tuple[PublicKey, PrivateKey]) -> None:
    public, private = keys
    encoding = FixedPoint(public, frac_bits=32)
    near = encoding.max_value * 0.9
    with pytest.raises(PaillierError, match="beyond the encoding's range"):
        encoding.encode(np.array([encoding.max_value * 1.5]))
    with pytest.raises(PaillierError, match="NaN"):
        encoding.encode(np.array([np.nan]))
    first, second = public.encrypt(encoding.encode(np.array([near, near])))
    with pytest.raises(PaillierError, match="overflow"):
        encoding.decode(private.decrypt([public.add(first, second)]))
    assert encoding.decode(encoding.encode(np.array([-near, -1.5, 0.0])))[1] == -1.5


# --- Damgard-Jurik levels ------------------------------------------------------------------------


def _textbook_dj_decrypt(c: int, n: int, p: int, q: int, s: int) -> int:
    """Damgard and Jurik's own decryption (their Theorem 1 algorithm, no CRT): ``c^lambda`` gives
    ``(1 + n)^(m lambda)``, whose exponent is peeled off one power of ``n`` at a time."""
    lam = (p - 1) * (q - 1) // int(gmpy2.gcd(p - 1, q - 1))
    a = pow(c, lam, n ** (s + 1))
    i = 0
    for j in range(1, s + 1):
        nj = n**j
        t1 = ((a % n ** (j + 1)) - 1) // n
        t2 = i
        for k in range(2, j + 1):
            i -= 1
            t2 = t2 * i % nj
            t1 = (t1 - t2 * n ** (k - 1) * pow(int(gmpy2.fac(k)), -1, nj)) % nj
        i = t1
    return i * pow(lam, -1, n**s) % n**s


@pytest.mark.parametrize("s", [2, 3])
def test_damgard_jurik_levels_decrypt_as_the_textbook_algorithm_and_add(keys: tuple[PublicKey, PrivateKey], s: int) -> None:
    public, private = keys[0].at_level(s), keys[1].at_level(s)
    assert public.fingerprint == keys[0].fingerprint and public.ciphertext_bytes == (s + 1) * BITS // 8
    bound = int(public.plaintext_modulus)
    rng = np.random.default_rng(s)
    values = [0, 1, bound - 1] + [int.from_bytes(rng.bytes(s * BITS // 8), "little") % bound for _ in range(6)]
    ciphertexts = public.encrypt(values)
    n, p, q = int(public.n), int(private.p), int(private.q)
    assert [_textbook_dj_decrypt(int(c), n, p, q, s) for c in ciphertexts] == values
    assert private.decrypt(ciphertexts) == values
    total = ciphertexts[0]
    for c in ciphertexts[1:]:
        total = public.add(total, c)
    assert private.decrypt([total]) == [sum(values) % bound]
    assert private.decrypt([public.multiply(ciphertexts[4], -3)]) == [(-3 * values[4]) % bound]


def test_a_level_refuses_plaintexts_and_ciphertexts_beyond_its_range(keys: tuple[PublicKey, PrivateKey]) -> None:
    public = keys[0].at_level(2)
    with pytest.raises(PaillierError, match=r"\[0, n\^s\)"):
        public.encrypt([int(public.plaintext_modulus)])
    row = int(public.modulus).to_bytes(public.ciphertext_bytes + 1, "little")[: public.ciphertext_bytes]
    with pytest.raises(PaillierError, match="out of range"):
        public.from_array(np.frombuffer(row, dtype=np.uint8).reshape(1, -1))
    with pytest.raises(PaillierError, match="level"):
        keys[0].at_level(0)


def test_worker_processes_share_large_batches_and_a_failed_worker_is_redone_here(
    keys: tuple[PublicKey, PrivateKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    public, private = keys[0].at_level(2), keys[1].at_level(2)
    count = 300
    for executable in (None, "/bin/false", "/nonexistent/python"):  # working, failing, missing workers
        if executable is not None:
            monkeypatch.setattr("sys.executable", executable)
        obfuscators = public.obfuscators(count, processes=3)
        assert len(obfuscators) == count and len({int(o) for o in obfuscators}) == count
        ciphertexts = public.encrypt(range(count), obfuscators)
        assert private.decrypt(ciphertexts) == list(range(count))
