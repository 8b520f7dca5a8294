"""Paillier encryption on gmpy2, compatible with python-paillier (``phe``).

With ``n = p q`` and ``g = n + 1`` (as python-paillier and FATE choose):

* **Encryption** of ``0 <= m < n`` with randomness ``r`` in ``Z_n^*``:
  ``c = (1 + m n) * r^n mod n^2`` (``(n + 1)^m = 1 + m n mod n^2``, so no exponentiation for ``m``).
* **Addition**: ``Dec(c1 * c2 mod n^2) = m1 + m2 mod n``; **scalar**: ``Dec(c^k) = k m mod n``.
* **Decryption** by the Chinese remainder theorem, as python-paillier: ``m_p = L_p(c^(p-1) mod p^2)
  * h_p mod p`` with ``L_p(x) = (x - 1) / p`` and ``h_p = L_p(g^(p-1) mod p^2)^-1 mod p``; the same
  modulo ``q``; then ``m = m_p + p * ((m_q - m_p) p^-1 mod q)``.
* **Fast randomness** (Damgard, Jurik and Nielsen 2010, "A generalization of Paillier's public-key
  system..."): the public key carries ``h = (-x^2)^n mod n^2`` for a secret random ``x``; the
  obfuscator ``r^n`` is ``h^a mod n^2`` for a uniformly random *short* exponent ``a`` of
  ``n_bits / 2`` bits. It is the obfuscator python-paillier computes for ``r = (-x^2)^a mod n``,
  so ciphertexts are ordinary Paillier ciphertexts. Since ``h`` is fixed, ``h^a`` is computed
  from a table of ``h^(j * 2^(w i))`` with ``n_bits / (2 w)`` multiplications and no squarings.
  Obfuscators do not depend on the message, so clients can compute them ahead of time
  (:meth:`PublicKey.obfuscators`); encrypting is then one multiplication per value.

Floats are encoded in fixed point (:class:`FixedPoint`), as python-paillier and FATE do.
All randomness comes from :mod:`secrets`. Ciphertexts travel as fixed-width little-endian bytes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import gmpy2
import numpy as np
from gmpy2 import mpz

DEFAULT_BITS = 2048
_WINDOW = 8


class PaillierError(ValueError):
    """Wrong key, malformed key file or ciphertext, or a plaintext out of range."""


def _random_below(bound: mpz) -> mpz:
    return mpz(secrets.randbelow(int(bound)))


def _random_prime(bits: int) -> mpz:
    """A random prime of exactly ``bits`` bits (top two bits set, so ``p q`` has ``2 bits``)."""
    while True:
        candidate = mpz(secrets.randbits(bits)) | (mpz(3) << (bits - 2)) | 1
        if gmpy2.is_prime(candidate, 50):
            return candidate


@dataclass(frozen=True)
class PublicKey:
    """``n`` and the DJN base ``h``: enough to encrypt and add, nothing to decrypt."""

    n: mpz
    h: mpz
    nsquare: mpz = field(init=False, repr=False, compare=False)
    _table: list[list[mpz]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nsquare", self.n * self.n)
        object.__setattr__(self, "_table", [])

    @property
    def bits(self) -> int:
        return int(self.n.bit_length())

    @property
    def ciphertext_bytes(self) -> int:
        return (2 * self.bits + 7) // 8

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(b"fedcrypt-paillier-v1" + int(self.n).to_bytes(self.bits // 8 + 1, "little"))
        digest.update(int(self.h).to_bytes(self.ciphertext_bytes, "little"))
        return digest.hexdigest()[:32]

    # --- randomness ------------------------------------------------------------------------

    def _fixed_base_table(self) -> list[list[mpz]]:
        """``table[i][j] = h^(j * 2^(w i)) mod n^2`` for the short exponent's windows."""
        if not self._table:
            windows = -(-self.bits // 2 // _WINDOW)
            base = self.h
            for _ in range(windows):
                row = [mpz(1), base]
                for _ in range(2, 1 << _WINDOW):
                    row.append(gmpy2.f_mod(row[-1] * base, self.nsquare))
                self._table.append(row)
                base = gmpy2.f_mod(row[-1] * base, self.nsquare)
        return self._table

    def obfuscator(self, exponent: int | None = None) -> mpz:
        """``h^a mod n^2`` for a random short ``a`` (or the given one): a fresh ``r^n``."""
        table = self._fixed_base_table()
        a = secrets.randbits(len(table) * _WINDOW) if exponent is None else exponent
        mask = (1 << _WINDOW) - 1
        result = mpz(1)
        for row in table:
            digit = a & mask
            if digit:
                result = gmpy2.f_mod(result * row[digit], self.nsquare)
            a >>= _WINDOW
        return result

    def obfuscators(self, count: int) -> list[mpz]:
        """``count`` fresh obfuscators, e.g. computed by a client between rounds."""
        return [self.obfuscator() for _ in range(count)]

    # --- encryption and arithmetic -----------------------------------------------------------

    def encrypt(self, plaintexts: Iterable[int], obfuscators: Sequence[mpz] | None = None) -> list[mpz]:
        """Encrypt integers in ``[0, n)``; uses (and so consumes) ``obfuscators`` if given."""
        n, nsquare = self.n, self.nsquare
        out = []
        for index, m in enumerate(plaintexts):
            m = mpz(m)
            if not 0 <= m < n:
                raise PaillierError("plaintext out of range [0, n): encode it first")
            r_n = obfuscators[index] if obfuscators is not None else self.obfuscator()
            out.append(gmpy2.f_mod((n * m + 1) * r_n, nsquare))
        if obfuscators is not None and len(out) != len(obfuscators):
            raise PaillierError(f"{len(obfuscators)} obfuscators for {len(out)} plaintexts")
        return out

    def add(self, a: mpz, b: mpz) -> mpz:
        return gmpy2.f_mod(a * b, self.nsquare)

    def multiply(self, ciphertext: mpz, scalar: int) -> mpz:
        """The encryption of ``scalar * m`` (negative scalars through the inverse)."""
        if scalar < 0:
            return gmpy2.powmod(gmpy2.invert(ciphertext, self.nsquare), -scalar, self.nsquare)
        return gmpy2.powmod(ciphertext, scalar, self.nsquare)

    # --- bytes -------------------------------------------------------------------------------

    def to_array(self, ciphertexts: Sequence[mpz]) -> np.ndarray:
        """Ciphertexts as a (count, ciphertext_bytes) uint8 array."""
        width = self.ciphertext_bytes
        data = b"".join(int(c).to_bytes(width, "little") for c in ciphertexts)
        return np.frombuffer(data, dtype=np.uint8).reshape(len(ciphertexts), width)

    def from_array(self, array: np.ndarray) -> list[mpz]:
        """Parse and validate ciphertexts: each must be a unit of ``Z_{n^2}`` (not 0, < n^2, coprime)."""
        width = self.ciphertext_bytes
        if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != width:
            raise PaillierError(f"ciphertexts must be rows of {width} bytes")
        data = np.ascontiguousarray(array).tobytes()
        n, nsquare = self.n, self.nsquare
        out = []
        product = mpz(1)  # a ciphertext sharing a factor with n makes the product share it too
        for start in range(0, len(data), width):
            c = mpz(int.from_bytes(data[start : start + width], "little"))
            if not 0 < c < nsquare:
                raise PaillierError("ciphertext out of range or not invertible: corrupted or under another key")
            product = gmpy2.f_mod(product * c, n)
            out.append(c)
        if gmpy2.gcd(product, n) != 1:
            raise PaillierError("ciphertext out of range or not invertible: corrupted or under another key")
        return out

    def to_json(self) -> str:
        return json.dumps({"kind": "fedcrypt-paillier-public", "n": hex(self.n), "h": hex(self.h),
                           "fingerprint": self.fingerprint}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> PublicKey:
        try:
            raw = json.loads(text)
            if raw.get("kind") != "fedcrypt-paillier-public":
                raise ValueError("not a fedcrypt Paillier public key file")
            key = cls(mpz(int(raw["n"], 16)), mpz(int(raw["h"], 16)))
        except (ValueError, KeyError, TypeError) as exc:
            raise PaillierError(f"unreadable Paillier public key: {exc}") from None
        if key.bits < 1024 or key.n % 2 == 0 or not 0 < key.h < key.nsquare:
            raise PaillierError("Paillier public key is malformed (n too small or even, or h out of range)")
        if raw.get("fingerprint") != key.fingerprint:
            raise PaillierError("Paillier public key fingerprint does not match its contents")
        return key


class PrivateKey:
    """The factors of ``n``: decrypts. Never give it to the server."""

    def __init__(self, public: PublicKey, p: int, q: int) -> None:
        p, q = mpz(min(p, q)), mpz(max(p, q))
        if p * q != public.n or p == q:
            raise PaillierError("p and q do not factor the public key's n")
        self.public = public
        self.p, self.q = p, q
        self._psquare, self._qsquare = p * p, q * q
        self._p_inverse = gmpy2.invert(p, q)
        self._hp = self._h(p, self._psquare)
        self._hq = self._h(q, self._qsquare)

    def _h(self, prime: mpz, square: mpz) -> mpz:
        g_power = gmpy2.powmod(self.public.n + 1, prime - 1, square)
        return gmpy2.invert((g_power - 1) // prime, prime)

    def decrypt(self, ciphertexts: Iterable[mpz]) -> list[mpz]:
        """Plaintexts in ``[0, n)``."""
        p, q = self.p, self.q
        out = []
        for c in ciphertexts:
            mp = gmpy2.f_mod((gmpy2.powmod(c, p - 1, self._psquare) - 1) // p * self._hp, p)
            mq = gmpy2.f_mod((gmpy2.powmod(c, q - 1, self._qsquare) - 1) // q * self._hq, q)
            out.append(mp + p * gmpy2.f_mod((mq - mp) * self._p_inverse, q))
        return out

    def to_json(self) -> str:
        return json.dumps({"kind": "fedcrypt-paillier-secret", "public": json.loads(self.public.to_json()),
                           "p": hex(self.p), "q": hex(self.q)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> PrivateKey:
        try:
            raw = json.loads(text)
            if raw.get("kind") != "fedcrypt-paillier-secret":
                raise ValueError("not a fedcrypt Paillier secret key file")
            public = PublicKey.from_json(json.dumps(raw["public"]))
            return cls(public, int(raw["p"], 16), int(raw["q"], 16))
        except (ValueError, KeyError, TypeError) as exc:
            raise PaillierError(f"unreadable Paillier secret key: {exc}") from None


def generate_keypair(bits: int = DEFAULT_BITS) -> tuple[PublicKey, PrivateKey]:
    """A fresh key: ``n`` of ``bits`` bits and the DJN base ``h = (-x^2)^n mod n^2``."""
    if bits < 1024 or bits % 2:
        raise PaillierError(f"key size must be an even number of bits >= 1024, got {bits}")
    while True:
        p, q = _random_prime(bits // 2), _random_prime(bits // 2)
        n = p * q
        if p != q and n.bit_length() == bits and gmpy2.gcd(n, (p - 1) * (q - 1)) == 1:
            break
    public = djn_public_key(n)
    return public, PrivateKey(public, p, q)


def djn_public_key(n: int) -> PublicKey:
    """A public key for ``n`` (e.g. python-paillier's) with a fresh DJN base."""
    n = mpz(n)
    while True:
        x = _random_below(n)
        if x > 1 and gmpy2.gcd(x, n) == 1:
            break
    return PublicKey(n, gmpy2.powmod(n - gmpy2.f_mod(x * x, n), n, n * n))


class FixedPoint:
    """Fixed-point encoding of floats into ``Z_n`` (python-paillier's with ``precision = 2^-bits``).

    ``x`` becomes ``round(x * 2^frac_bits) mod n``: negatives wrap to the top of ``Z_n``. Only the
    lowest and highest thirds of ``Z_n`` are valid encodings (``|m| <= n // 3``), so a sum that
    overflows lands in the middle third and is *reported* when decoded, never wrapped into a wrong
    number. Every value shares one scale, so encodings add homomorphically without rescaling.
    """

    def __init__(self, public: PublicKey, frac_bits: int = 32) -> None:
        self.n = int(public.n)
        self.max_int = self.n // 3
        self.frac_bits = frac_bits
        self.scale = float(2**frac_bits)

    @property
    def max_value(self) -> float:
        """The largest magnitude a value, or a sum of values, may reach (capped at float64's)."""
        try:
            return self.max_int / 2**self.frac_bits
        except OverflowError:
            return sys.float_info.max

    def encode(self, values: np.ndarray) -> list[int]:
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).all():
            raise PaillierError("cannot encode NaN or Inf")
        if values.size and np.abs(values).max() > self.max_value:
            raise PaillierError(f"values beyond the encoding's range of +-{self.max_value:.3g}")
        n = self.n
        return [int(v) % n for v in np.rint(values * self.scale)]

    def decode(self, encodings: Iterable[int]) -> np.ndarray:
        """Floats from (summed) encodings; raises :class:`PaillierError` on overflow."""
        n, max_int = self.n, self.max_int
        out = []
        for m in encodings:
            m = int(m)
            if m <= max_int:
                out.append(m / 2**self.frac_bits)
            elif m >= n - max_int:
                out.append((m - n) / 2**self.frac_bits)
            else:
                raise PaillierError("overflow: a sum left the encoding's range (it is not wrapped)")
        return np.array(out, dtype=np.float64)
