"""Shamir secret sharing of 32-byte secrets over the prime field ``GF(P)``, ``P = 2^256 + 297``.

A secret ``s`` becomes the constant term of a random polynomial ``f`` of degree ``t - 1``; party
``x`` (a nonzero field element) gets ``f(x)``. Any ``t`` shares give ``s`` back by Lagrange
interpolation at 0; fewer reveal nothing about it. Coefficients come from :mod:`secrets`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

#: The smallest prime above 2^256, so every 32-byte secret is a field element.
P = (1 << 256) + 297
SHARE_BYTES = 33


class ShamirError(ValueError):
    """Too few or inconsistent shares, or bad parameters."""


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares ``f(x)`` of a 32-byte ``secret`` for each party ``x`` in ``xs``; any ``threshold`` of
    them reconstruct it."""
    if len(secret) != 32:
        raise ShamirError("secrets are 32 bytes")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold {threshold} must be in 1..{len(xs)} (the number of shares)")
    if len(set(xs)) != len(xs) or not all(0 < x < P for x in xs):
        raise ShamirError("share points must be distinct and nonzero")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(P) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        value = 0
        for coefficient in reversed(coefficients):  # Horner
            value = (value * x + coefficient) % P
        shares[x] = value
    return shares


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares. With more, every extra share must lie on the
    same polynomial, so a wrong share is detected, never turned into a wrong secret."""
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, {threshold} needed")
    points = sorted(shares.items())
    if not all(0 < x < P and 0 <= y < P for x, y in points):
        raise ShamirError("share out of the field")
    basis, extra = points[:threshold], points[threshold:]
    secret = _interpolate(basis, 0)
    for x, y in extra:
        if _interpolate(basis, x) != y:
            raise ShamirError("shares are inconsistent (a share is wrong)")
    if secret >> 256:
        raise ShamirError("shares are inconsistent (not a 32-byte secret)")
    return secret.to_bytes(32, "big")


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """``f(at)`` for the polynomial of degree ``len(points) - 1`` through ``points``."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (at - xj) % P
                denominator = denominator * (xi - xj) % P
        total = (total + yi * numerator * pow(denominator, -1, P)) % P
    return total


def to_bytes(share: int) -> bytes:
    return share.to_bytes(SHARE_BYTES, "big")


def from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ShamirError(f"a share is {SHARE_BYTES} bytes")
    value = int.from_bytes(data, "big")
    if value >= P:
        raise ShamirError("share out of the field")
    return value
