"""Gaussian noise from the operating system's CSPRNG (``os.urandom``), never a seeded PRNG:
predictable noise gives no privacy."""

from __future__ import annotations

import os

import numpy as np

_UNIT = 1.0 / 2.0**53


def _uniform(count: int) -> np.ndarray:
    """``count`` floats uniform in ``(0, 1]`` with 53 random bits each."""
    words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64) >> np.uint64(11)
    return (words.astype(np.float64) + 1.0) * _UNIT


def gaussian(count: int, std: float) -> np.ndarray:
    """``count`` samples of ``N(0, std^2)`` (Box-Muller on CSPRNG uniforms)."""
    if std < 0 or not np.isfinite(std):
        raise ValueError(f"noise standard deviation must be finite and >= 0, got {std}")
    if count == 0 or std == 0:
        return np.zeros(count)
    half = (count + 1) // 2
    radius = np.sqrt(-2.0 * np.log(_uniform(half)))
    angle = 2.0 * np.pi * _uniform(half)
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count] * std
