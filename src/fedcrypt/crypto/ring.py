"""Fixed-point vectors in the ring ``Z_2^64`` and AES-CTR masks over it, for secret sharing.

Masking (SecAgg+) and additive sharing both hide a float vector by adding pseudorandom words
mod 2^64, so the server's sum of masked vectors (or the aggregators' sum of shares) is the sum of
the encoded vectors. Values are encoded as ``round(x * 2^FRAC_BITS) mod 2^64`` (two's
complement), so a sum decodes exactly as long as it stays within ``2^(63 - FRAC_BITS)`` in
magnitude, which :func:`encode` checks for the number of parties that will add.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: Fixed-point scale: values are ``round(x * 2^FRAC_BITS) mod 2^64``; resolution 6e-8.
FRAC_BITS = 24
#: Bytes of a PRG seed (an AES-256 key).
SEED_BYTES = 32


class RingOverflow(ValueError):
    """A value is too large for its sum over the parties to stay in the ring's range."""


def encode(values: np.ndarray, parties: int) -> np.ndarray:
    """``round(x * 2^FRAC_BITS) mod 2^64`` as uint64, refusing NaN/Inf and values whose sum over
    ``parties`` vectors could wrap."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise RingOverflow("the vector contains NaN/Inf")
    bound = 2.0 ** (62 - FRAC_BITS) / max(parties, 1)
    peak = float(np.abs(values).max()) if values.size else 0.0
    if peak >= bound:
        raise RingOverflow(f"values up to {peak:.3g} could overflow the ring's sum (limit {bound:.3g} for {parties})")
    return np.rint(values * 2.0**FRAC_BITS).astype(np.int64).view(np.uint64)


def decode(total: np.ndarray) -> np.ndarray:
    """The float32 values of a (summed) ring vector, read as two's complement."""
    return (np.asarray(total).view(np.int64).astype(np.float64) / 2.0**FRAC_BITS).astype(np.float32)


class Keystream:
    """AES-256-CTR keystreams of ``count`` words into one reused buffer (no allocation per mask)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._zeros = bytes(8 * count)
        self._out = bytearray(8 * count + 16)  # update_into wants a block of slack

    def words(self, seed: bytes) -> np.ndarray:
        """The keystream of the 32-byte ``seed`` as uint64 words; valid until the next call."""
        Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update_into(self._zeros, self._out)
        return np.frombuffer(self._out, dtype=np.uint64, count=self.count)
