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

* **Damgard-Jurik levels** (:meth:`PublicKey.at_level`): the same key with plaintexts in
  ``Z_{n^s}`` and ciphertexts in ``Z_{n^(s+1)}``; ``(1 + n)^m`` is a short binomial sum, the
  randomness base is ``h^(n^(s-1))``, and decryption takes the p-adic logarithm of ``c^(p-1)``
  (:class:`_PrimePart`). ``s = 2`` carries twice the plaintext in 1.5x the ciphertext bytes.
* **All cores**: decryption's exponentiations run in threads (gmpy2 releases the GIL in
  ``powmod_base_list``); large batches of randomness are shared with worker processes.

Floats are encoded in fixed point (:class:`FixedPoint`), as python-paillier and FATE do.
All randomness comes from :mod:`secrets`. Ciphertexts travel as fixed-width little-endian bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import subprocess
import threading
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import gmpy2
import numpy as np
from gmpy2 import mpz

DEFAULT_BITS = 2048
_WINDOW = 8
#: Fewer obfuscators than this are not worth a worker process.
_PARALLEL_MIN_OBFUSCATORS = 256
#: This process's share of a batch relative to one worker's (workers first build their table).
_LOCAL_SHARE_WEIGHT = 1.3

log = logging.getLogger(__name__)
_TABLE_LOCK = threading.Lock()


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
    """``n`` and the DJN base ``h``: enough to encrypt and add, nothing to decrypt.

    ``s`` is the Damgard-Jurik level: plaintexts live in ``Z_{n^s}``, ciphertexts in
    ``Z_{n^(s+1)}``. ``s = 1`` is Paillier; larger ``s`` carries ``s`` times the plaintext bits in
    ``(s + 1) / s`` times fewer ciphertext bits per plaintext bit. Every level uses the same key.
    """

    n: mpz
    h: mpz
    s: int = 1
    plaintext_modulus: mpz = field(init=False, repr=False, compare=False)
    modulus: mpz = field(init=False, repr=False, compare=False)
    _table: list[list[mpz]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.s <= 8:
            raise PaillierError(f"Damgard-Jurik level must be 1..8, got {self.s}")
        object.__setattr__(self, "plaintext_modulus", self.n**self.s)
        object.__setattr__(self, "modulus", self.n ** (self.s + 1))
        object.__setattr__(self, "_table", [])

    def at_level(self, s: int) -> PublicKey:
        """The same key at Damgard-Jurik level ``s``."""
        return PublicKey(self.n, self.h, s)

    @property
    def bits(self) -> int:
        return int(self.n.bit_length())

    @property
    def plaintext_bits(self) -> int:
        """Bits every plaintext below ``n^s`` can hold."""
        return int(self.plaintext_modulus.bit_length()) - 1

    @property
    def ciphertext_bytes(self) -> int:
        return ((self.s + 1) * self.bits + 7) // 8

    @property
    def fingerprint(self) -> str:
        """Identifies the key (the same at every level)."""
        digest = hashlib.sha256(b"fedcrypt-paillier-v1" + int(self.n).to_bytes(self.bits // 8 + 1, "little"))
        digest.update(int(self.h).to_bytes((2 * self.bits + 7) // 8, "little"))
        return digest.hexdigest()[:32]

    # --- randomness ------------------------------------------------------------------------

    def _fixed_base_table(self) -> list[list[mpz]]:
        """``table[i][j] = h_s^(j * 2^(w i)) mod n^(s+1)`` for the short exponent's windows, where
        ``h_s = h^(n^(s-1))`` is the DJN base of level ``s`` (``(-x^2)^(n^s)``, since lifting
        ``h = (-x^2)^n mod n^2`` to the ``n^(s-1)``-th power fixes it modulo ``n^(s+1)``)."""
        with _TABLE_LOCK:  # threads may encrypt under one key; build the table once
            if not self._table:
                windows = -(-self.bits // 2 // _WINDOW)
                modulus = self.modulus
                base = gmpy2.powmod(self.h, self.n ** (self.s - 1), modulus)
                rows = []
                for _ in range(windows):
                    row = [mpz(1), base]
                    for _ in range(2, 1 << _WINDOW):
                        row.append(gmpy2.f_mod(row[-1] * base, modulus))
                    rows.append(row)
                    base = gmpy2.f_mod(row[-1] * base, modulus)
                self._table.extend(rows)
        return self._table

    def obfuscator(self, exponent: int | None = None) -> mpz:
        """``h_s^a mod n^(s+1)`` for a random short ``a`` (or the given one): a fresh ``r^(n^s)``."""
        table = self._fixed_base_table()
        a = secrets.randbits(len(table) * _WINDOW) if exponent is None else exponent
        mask = (1 << _WINDOW) - 1
        modulus = self.modulus
        result = mpz(1)
        for row in table:
            digit = a & mask
            if digit:
                result = gmpy2.f_mod(result * row[digit], modulus)
            a >>= _WINDOW
        return result

    def obfuscators(self, count: int, processes: int | None = None) -> list[mpz]:
        """``count`` fresh obfuscators, e.g. computed by a client between rounds. Large batches
        are shared with ``processes - 1`` worker processes (default: one per extra core)."""
        processes = len(os.sched_getaffinity(0)) if processes is None else processes
        if processes <= 1 or count < _PARALLEL_MIN_OBFUSCATORS:
            return [self.obfuscator() for _ in range(count)]
        per_worker = int(count / (processes - 1 + _LOCAL_SHARE_WEIGHT))
        jobs = [_ObfuscatorJob(self, per_worker) for _ in range(processes - 1)]
        out = [self.obfuscator() for _ in range(count - per_worker * len(jobs))]
        for job in jobs:
            out.extend(job.result())
        return out

    # --- encryption and arithmetic -----------------------------------------------------------

    def _g_power(self, m: mpz) -> mpz:
        """``(1 + n)^m mod n^(s+1) = sum_k C(m, k) n^k`` for ``k <= s``: no exponentiation."""
        if self.s == 1:
            return self.n * m + 1
        result, term, n_power = mpz(1), mpz(1), mpz(1)
        for k in range(1, self.s + 1):
            term = term * (m - k + 1) // k  # C(m, k), exactly
            n_power *= self.n
            result += term * n_power
        return gmpy2.f_mod(result, self.modulus)

    def encrypt(self, plaintexts: Iterable[int], obfuscators: Sequence[mpz] | None = None) -> list[mpz]:
        """Encrypt integers in ``[0, n^s)``; uses (and so consumes) ``obfuscators`` if given."""
        bound, modulus = self.plaintext_modulus, self.modulus
        out = []
        for index, m in enumerate(plaintexts):
            m = mpz(m)
            if not 0 <= m < bound:
                raise PaillierError("plaintext out of range [0, n^s): encode it first")
            r_n = obfuscators[index] if obfuscators is not None else self.obfuscator()
            out.append(gmpy2.f_mod(self._g_power(m) * r_n, modulus))
        if obfuscators is not None and len(out) != len(obfuscators):
            raise PaillierError(f"{len(obfuscators)} obfuscators for {len(out)} plaintexts")
        return out

    def add(self, a: mpz, b: mpz) -> mpz:
        return gmpy2.f_mod(a * b, self.modulus)

    def multiply(self, ciphertext: mpz, scalar: int) -> mpz:
        """The encryption of ``scalar * m`` (negative scalars through the inverse)."""
        if scalar < 0:
            return gmpy2.powmod(gmpy2.invert(ciphertext, self.modulus), -scalar, self.modulus)
        return gmpy2.powmod(ciphertext, scalar, self.modulus)

    # --- bytes -------------------------------------------------------------------------------

    def to_array(self, ciphertexts: Sequence[mpz]) -> np.ndarray:
        """Ciphertexts as a (count, ciphertext_bytes) uint8 array."""
        width = self.ciphertext_bytes
        data = b"".join(int(c).to_bytes(width, "little") for c in ciphertexts)
        return np.frombuffer(data, dtype=np.uint8).reshape(len(ciphertexts), width)

    def from_array(self, array: np.ndarray) -> list[mpz]:
        """Parse and validate ciphertexts: each must be a unit modulo ``n^(s+1)`` (not 0, in range,
        coprime to ``n``)."""
        width = self.ciphertext_bytes
        if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != width:
            raise PaillierError(f"ciphertexts must be rows of {width} bytes")
        data = np.ascontiguousarray(array).tobytes()
        n, modulus = self.n, self.modulus
        out = []
        product = mpz(1)  # a ciphertext sharing a factor with n makes the product share it too
        for start in range(0, len(data), width):
            c = mpz(int.from_bytes(data[start : start + width], "little"))
            if not 0 < c < modulus:
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
        if key.bits < 1024 or key.n % 2 == 0 or not 0 < key.h < key.n**2:
            raise PaillierError("Paillier public key is malformed (n too small or even, or h out of range)")
        if raw.get("fingerprint") != key.fingerprint:
            raise PaillierError("Paillier public key fingerprint does not match its contents")
        return key


class _ObfuscatorJob:
    """A share of a batch of obfuscators computed by a worker process
    (:mod:`fedcrypt.crypto._paillier_worker`); the main process redoes it if the worker fails.
    The obfuscators travel over the worker's stdout pipe, never through a file."""

    def __init__(self, public: PublicKey, count: int) -> None:
        self._public, self._count = public, count
        self._data = b""
        self._process: subprocess.Popen[bytes] | None = None
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "fedcrypt.crypto._paillier_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert self._process.stdin is not None
            request = {"n": hex(public.n), "h": hex(public.h), "s": public.s, "count": count}
            self._process.stdin.write(json.dumps(request).encode() + b"\n")
            self._process.stdin.close()
        except OSError as exc:
            log.warning("Paillier worker process unavailable (%s); computing in this process", exc)
            self._process = None
        self._reader = threading.Thread(target=self._read, name="paillier-worker-read", daemon=True)
        self._reader.start()  # drains the pipe while this process computes its own share

    def _read(self) -> None:
        if self._process is not None and self._process.stdout is not None:
            self._data = self._process.stdout.read()

    def result(self) -> list[mpz]:
        self._reader.join()
        width, count = self._public.ciphertext_bytes, self._count
        if self._process is not None:
            returncode = self._process.wait()
            if returncode == 0 and len(self._data) == width * count:
                data = self._data
                out = [mpz(int.from_bytes(data[i : i + width], "little")) for i in range(0, len(data), width)]
                if all(0 < value < self._public.modulus for value in out):
                    return out
            log.warning("a Paillier worker process failed (exit %s); redoing its share here", returncode)
        return [self._public.obfuscator() for _ in range(count)]


class _PrimePart:
    """Decryption modulo ``p^(s+1)`` for one prime ``p`` of ``n`` (CRT half).

    ``c^(p-1)`` kills the randomness (its order divides ``p - 1``) and leaves
    ``(1 + n)^(m (p-1))``, an element of ``1 + p Z``. The p-adic logarithm
    ``log(1 + x) = x - x^2/2 + ... +- x^s/s (mod p^(s+1))`` turns it into ``m (p-1) log(1 + n)``;
    dividing both logarithms by ``p`` and by ``p - 1`` leaves ``m mod p^s``. For ``s = 1`` this is
    python-paillier's ``L_p(c^(p-1) mod p^2) * h_p mod p``.
    """

    def __init__(self, prime: mpz, other: mpz, s: int) -> None:
        self.prime, self.s = prime, s
        self.modulus = prime ** (s + 1)
        self.plaintext_modulus = prime**s
        self._inverses = [gmpy2.invert(k, self.modulus) for k in range(1, s + 1)]
        log_g = self._log_over_p(mpz(1) + prime * other)
        self._scale = gmpy2.invert(log_g * (prime - 1), self.plaintext_modulus)

    def _log_over_p(self, y: mpz) -> mpz:
        """``log(y) / p mod p^s`` for ``y = 1 mod p``."""
        x = y - 1
        if self.s == 1:
            return x // self.prime
        total, power = mpz(0), mpz(1)
        for k, inverse in enumerate(self._inverses, start=1):
            power = gmpy2.f_mod(power * x, self.modulus)
            term = power * inverse
            total = total + term if k % 2 else total - term
        return gmpy2.f_mod(total, self.modulus) // self.prime

    def plaintexts(self, powered: Sequence[mpz]) -> list[mpz]:
        """``m mod p^s`` from each ``c^(p-1) mod p^(s+1)``."""
        scale, modulus = self._scale, self.plaintext_modulus
        return [gmpy2.f_mod(self._log_over_p(y) * scale, modulus) for y in powered]


def _powmod_all(bases: list[mpz], exponent: mpz, modulus: mpz) -> list[mpz]:
    """``b^exponent mod modulus`` for every base, on all cores (gmpy2 releases the GIL here)."""
    workers = min(len(os.sched_getaffinity(0)), max(len(bases) // 8, 1))
    if workers == 1:
        return list(gmpy2.powmod_base_list(bases, exponent, modulus))
    step = -(-len(bases) // workers)
    chunks = [bases[i : i + step] for i in range(0, len(bases), step)]
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda chunk: gmpy2.powmod_base_list(chunk, exponent, modulus), chunks)
        return [value for chunk in results for value in chunk]


class PrivateKey:
    """The factors of ``n``: decrypts (at the public key's level). Never give it to the server."""

    def __init__(self, public: PublicKey, p: int, q: int) -> None:
        p, q = mpz(min(p, q)), mpz(max(p, q))
        if p * q != public.n or p == q:
            raise PaillierError("p and q do not factor the public key's n")
        self.public = public
        self.p, self.q = p, q
        self._p_part = _PrimePart(p, q, public.s)
        self._q_part = _PrimePart(q, p, public.s)
        self._p_inverse = gmpy2.invert(self._p_part.plaintext_modulus, self._q_part.plaintext_modulus)

    def at_level(self, s: int) -> PrivateKey:
        """The same key at Damgard-Jurik level ``s``."""
        return PrivateKey(self.public.at_level(s), self.p, self.q)

    def decrypt(self, ciphertexts: Iterable[mpz]) -> list[mpz]:
        """Plaintexts in ``[0, n^s)``; the exponentiations run on all cores."""
        ciphertexts = list(ciphertexts)
        halves = []
        for part in (self._p_part, self._q_part):
            reduced = [gmpy2.f_mod(c, part.modulus) for c in ciphertexts]
            halves.append(part.plaintexts(_powmod_all(reduced, part.prime - 1, part.modulus)))
        p_power, q_power = self._p_part.plaintext_modulus, self._q_part.plaintext_modulus
        inverse = self._p_inverse
        return [mp + p_power * gmpy2.f_mod((mq - mp) * inverse, q_power) for mp, mq in zip(*halves)]

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
