"""BatchCrypt's encoding (Zhang et al., USENIX ATC 2020): quantize floats to small signed integers
and pack many of them into one additively homomorphic plaintext.

* **Clipping threshold (dACIQ).** Clients share only each tensor's max and min. From the global
  range the Gaussian scale is estimated as ``sigma = (max - min) / (2 sqrt(2 ln N))`` (the
  expected range of ``N`` Gaussian samples), and the threshold ``alpha`` minimizes clipping plus
  quantization error for ``N(0, sigma^2)`` (ACIQ, Banner et al. 2019), capped at the largest
  magnitude seen. Segments of fewer than ``MIN_ACIQ_COUNT`` values are not clipped.
* **Quantization.** ``x`` is clipped to ``[-alpha, alpha]`` and mapped to an integer in
  ``[-H, H]`` with ``H = 2^(bits-1) - 1`` by *stochastic* rounding (round up with probability
  equal to the fraction), so the quantized sum is an unbiased estimate of the true sum.
  Randomness comes from ``os.urandom``.
* **Slots.** The sum of ``c`` clients' values lies in ``[-c H, c H]``, inside ``bits + p``
  signed bits with ``p = ceil(log2 c)`` zero padding bits. Each slot is ``W = bits + p + 1``
  bits wide: the extra bit makes the top *two* bits of every valid slot's two's complement
  equal (two sign bits), so a slot that overflowed shows differing sign bits and is reported.
* **Packing.** A plaintext holds ``K = floor((plaintext_bits - 1) / W)`` slots as the signed
  integer ``P = sum_k v_k 2^(k W)``, stored modulo the plaintext modulus. Adding plaintexts
  adds slot-wise with carries and borrows cancelling exactly, since each slot's sum fits; the
  decoder adds ``2^(W-1)`` to every slot (a constant), after which the base-``2^W`` digits are
  the slots' offset values.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_CHUNK_ROWS = 256
_NEGLIGIBLE = 1e-30
#: Fewer values than this are never clipped (e.g. the sample-count weight).
MIN_ACIQ_COUNT = 64


class OverflowDetected(ValueError):
    """A packed slot's two sign bits differ: the sum left its range (never silently wrapped)."""


def levels(bits: int) -> int:
    """``H``: quantized values lie in ``[-H, H]``."""
    return (1 << (bits - 1)) - 1


@lru_cache(maxsize=None)
def _gaussian_alpha(bits: int) -> float:
    """The ACIQ clipping threshold for ``N(0, 1)`` quantized to ``bits`` bits."""
    from scipy.optimize import minimize_scalar  # scipy comes with scikit-learn

    step_scale = 1.0 / (12.0 * levels(bits) ** 2)

    def mse(alpha: float) -> float:
        clipping = (1 + alpha**2) * math.erfc(alpha / math.sqrt(2)) - math.sqrt(2 / math.pi) * alpha * math.exp(
            -(alpha**2) / 2
        )
        return clipping + alpha**2 * step_scale

    return float(minimize_scalar(mse, bounds=(0.1, 40.0), method="bounded", options={"xatol": 1e-6}).x)


def clip_threshold(low: float, high: float, count: int, bits: int) -> float:
    """dACIQ's ``alpha`` for values whose global min/max are ``low``/``high`` over ``count`` values."""
    peak = max(abs(low), abs(high))
    if peak < _NEGLIGIBLE:
        return 1.0  # zeros (or nearly): any scale encodes them to within 1e-30
    if count < MIN_ACIQ_COUNT or high <= low:
        return peak  # too few values for a range-based scale estimate: never clip
    sigma = (high - low) / (2.0 * math.sqrt(2.0 * math.log(count)))
    return max(min(_gaussian_alpha(bits) * sigma, peak), peak * 1e-9)


def quantize(values: np.ndarray, alphas: np.ndarray, bits: int) -> np.ndarray:
    """Clip each value to ``[-alpha, alpha]`` (``alphas`` per value or scalar) and round it
    stochastically to an integer in ``[-H, H]``; returns int64."""
    high = levels(bits)
    scaled = np.clip(np.asarray(values, dtype=np.float64), -alphas, alphas) * (high / alphas)
    floor = np.floor(scaled)
    uniform = np.frombuffer(os.urandom(4 * scaled.size), dtype=np.uint32) * (1.0 / 2**32)
    floor += uniform.reshape(scaled.shape) < (scaled - floor)
    return np.clip(floor, -high, high).astype(np.int64)


def dequantize(sums: np.ndarray, alphas: np.ndarray, bits: int) -> np.ndarray:
    """Floats from (summed) quantized integers."""
    return sums.astype(np.float64) * (alphas / levels(bits))


@dataclass(frozen=True)
class SlotLayout:
    """How ``bits``-bit values of up to ``clients`` contributors pack into plaintexts of
    ``plaintext_bits`` bits."""

    bits: int
    clients: int
    plaintext_bits: int

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 32:
            raise ValueError(f"quantization bits must be in 2..32, got {self.bits}")
        if self.clients < 1:
            raise ValueError(f"need at least one client, got {self.clients}")
        if self.slots < 1:
            raise ValueError("a plaintext cannot hold even one slot")

    @property
    def padding(self) -> int:
        return max(self.clients - 1, 0).bit_length()

    @property
    def width(self) -> int:
        """``W``: value bits, padding bits and the second sign bit."""
        return self.bits + self.padding + 1

    @property
    def slots(self) -> int:
        """``K``: slots per plaintext (the signed packed integer stays below half the modulus)."""
        return (self.plaintext_bits - 1) // self.width

    def plaintexts(self, values: int) -> int:
        return -(-values // self.slots)

    def pack(self, quantized: np.ndarray) -> list[int]:
        """Signed packed integers, one per ``K`` values (the last padded with zeros)."""
        quantized = np.asarray(quantized, dtype=np.int64)
        high = levels(self.bits)
        if quantized.size and int(np.abs(quantized).max()) > high:
            raise ValueError(f"quantized values must lie in [-{high}, {high}]")
        k, w = self.slots, self.width
        rows = self.plaintexts(quantized.size)
        offset = np.zeros(rows * k, dtype=np.uint64)
        offset[: quantized.size] = quantized + high  # in [0, 2H]: no borrows while packing
        offset = offset.reshape(rows, k, 1)
        shifts = np.arange(w, dtype=np.uint64)
        correction = high * self._ones
        out: list[int] = []
        for start in range(0, rows, _CHUNK_ROWS):  # bounded temporaries for large updates
            bit_rows = ((offset[start : start + _CHUNK_ROWS] >> shifts) & np.uint64(1)).astype(np.uint8)
            packed = np.packbits(bit_rows.reshape(-1, k * w), axis=1, bitorder="little")
            out.extend(int.from_bytes(row.tobytes(), "little") - correction for row in packed)
        return out

    def unpack(self, packed: list[int], count: int) -> np.ndarray:
        """The slot sums (int64) of signed packed integers; raises :class:`OverflowDetected`."""
        k, w = self.slots, self.width
        if len(packed) * k < count:
            raise ValueError(f"{len(packed)} plaintexts hold fewer than {count} values")
        bias = (1 << (w - 1)) * self._ones
        limit = 1 << (k * w)
        nbytes = (k * w + 7) // 8
        weights = np.left_shift(np.int64(1), np.arange(w, dtype=np.int64))
        quarter = 1 << (w - 2)
        out = np.empty(len(packed) * k, dtype=np.int64)
        for start in range(0, len(packed), _CHUNK_ROWS):
            digits = bytearray()
            for value in packed[start : start + _CHUNK_ROWS]:
                shifted = value + bias
                if not 0 <= shifted < limit:
                    raise OverflowDetected("a packed sum left its plaintext's range")
                digits += shifted.to_bytes(nbytes, "little")
            rows = np.frombuffer(bytes(digits), dtype=np.uint8).reshape(-1, nbytes)
            bits = np.unpackbits(rows, axis=1, bitorder="little")[:, : k * w].reshape(-1, w)
            slots = bits.astype(np.int64) @ weights - (1 << (w - 1))
            bad = np.flatnonzero((slots < -quarter) | (slots >= quarter))
            if bad.size:
                raise OverflowDetected(
                    f"{bad.size} packed slots overflowed (their two sign bits differ), "
                    f"first at value {start * k + int(bad[0])}"
                )
            out[start * k : start * k + slots.size] = slots
        return out[:count]

    @property
    def _ones(self) -> int:
        """``sum_k 2^(k W)``: a 1 in every slot."""
        return sum(1 << (i * self.width) for i in range(self.slots))
