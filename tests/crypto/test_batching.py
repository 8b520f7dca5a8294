"""BatchCrypt's encoding: packing against plaintext sums, overflow detection, quantization, dACIQ."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrypt.crypto.batching import (
    OverflowDetected,
    SlotLayout,
    clip_threshold,
    dequantize,
    levels,
    quantize,
)

MODULUS = (1 << 4095) + 1357  # any odd modulus works for the packing arithmetic; a plaintext space's stand-in


@st.composite
def contributions(draw: st.DrawFn) -> tuple[SlotLayout, list[np.ndarray]]:
    bits = draw(st.integers(2, 20))
    clients = draw(st.integers(1, 40))
    size = draw(st.integers(0, 700))
    layout = SlotLayout(bits, clients, draw(st.sampled_from([600, 2047, 4095])))
    high = levels(bits)
    seeds = draw(st.lists(st.integers(0, 2**32 - 1), min_size=clients, max_size=clients))
    vectors = [np.random.default_rng(seed).integers(-high, high + 1, size) for seed in seeds]
    if size and draw(st.booleans()):  # the extremes every slot must survive
        vectors = [np.full(size, draw(st.sampled_from([-high, high]))) for _ in range(clients)]
    return layout, vectors


@given(contributions())
@settings(max_examples=60, deadline=None)
def test_packed_sums_modulo_the_plaintext_space_unpack_to_the_slot_sums(case: tuple[SlotLayout, list[np.ndarray]]) -> None:
    layout, vectors = case
    size = vectors[0].size
    totals = [0] * layout.plaintexts(size)
    for vector in vectors:
        for index, packed in enumerate(layout.pack(vector)):
            totals[index] = (totals[index] + packed) % MODULUS  # what the homomorphic sum decrypts to
    signed = [t if t <= MODULUS // 2 else t - MODULUS for t in totals]
    np.testing.assert_array_equal(layout.unpack(signed, size), np.sum(vectors, axis=0))


@given(st.integers(2, 32), st.integers(1, 10_000), st.integers(100, 8192))
def test_the_layout_leaves_room_for_every_clients_sum_and_two_sign_bits(bits: int, clients: int, plaintext_bits: int) -> None:
    try:
        layout = SlotLayout(bits, clients, plaintext_bits)
    except ValueError:
        assert bits + (clients - 1).bit_length() + 1 > plaintext_bits - 1  # only refused when nothing fits
        return
    assert clients * levels(bits) < 2 ** (layout.width - 2)  # the sum's magnitude fits below the sign pair
    assert layout.slots * layout.width <= plaintext_bits - 1


def test_a_slot_that_overflowed_is_reported_not_wrapped() -> None:
    layout = SlotLayout(8, 2, 600)
    packed = layout.pack(np.array([127, -127, 5]))
    too_big = packed[0] + 2 ** (layout.width - 2)  # slot 0 (127) now beyond its sign pair
    with pytest.raises(OverflowDetected, match="two sign bits differ"):
        layout.unpack([too_big], 3)
    with pytest.raises(OverflowDetected, match="plaintext's range"):
        layout.unpack([packed[0] + (1 << (layout.slots * layout.width))], 3)


def test_packing_refuses_values_beyond_the_quantized_range() -> None:
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        SlotLayout(8, 3, 600).pack(np.array([128]))
    with pytest.raises(ValueError, match="bits must be in 2..32"):
        SlotLayout(40, 3, 600)


def test_stochastic_rounding_is_unbiased_and_in_range() -> None:
    values = np.full(200_000, 0.3)
    quantized = quantize(values, np.float64(1.0), 4)  # 0.3 * 7 = 2.1: 2 w.p. 0.9, 3 w.p. 0.1
    assert set(np.unique(quantized)) == {2, 3}
    assert abs(dequantize(quantized, np.float64(1.0), 4).mean() - 0.3) < 3e-3
    assert abs(quantize(np.array([5.0, -5.0]), np.float64(1.0), 4)).max() == 7  # clipped to alpha


@given(st.floats(-1e3, 1e3), st.floats(0, 1e3), st.integers(2, 10**9), st.integers(2, 32))
@settings(deadline=None)  # the first call fits the threshold table
def test_the_clip_threshold_is_positive_and_never_beyond_the_largest_magnitude(low: float, spread: float, count: int, bits: int) -> None:
    alpha = clip_threshold(low, low + spread, count, bits)
    peak = max(abs(low), abs(low + spread))
    assert 0 < alpha <= max(peak, 1.0)
    assert np.isfinite(levels(bits) / alpha)  # usable as a quantization scale


def test_dACIQ_threshold_minimizes_the_gaussian_quantization_error_numerically() -> None:
    """Oracle: a grid search of clipping + quantization error for N(0, 1) by direct integration."""
    rng = np.random.default_rng(0)
    samples = rng.standard_normal(400_000)
    count = samples.size
    low, high = -2 * math.sqrt(2 * math.log(count)), 2 * math.sqrt(2 * math.log(count))  # sigma = 2
    alpha = clip_threshold(low, high, count, 4)

    def error(a: float) -> float:
        step = a / levels(4)
        clipped = np.clip(2 * samples, -a, a)
        return float(np.mean((np.round(clipped / step) * step - 2 * samples) ** 2))

    grid = np.linspace(1.0, 8.0, 141)
    best = grid[np.argmin([error(a) for a in grid])]
    assert abs(alpha - best) < 0.25
    assert clip_threshold(-0.5, 0.5, 10**6, 16) == 0.5  # at 16 bits clipping never pays
    assert clip_threshold(-0.5, 7.0, 10, 4) == 7.0  # too few values to estimate a scale: no clipping
