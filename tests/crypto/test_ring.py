"""The Z_2^64 fixed-point ring of the secret-sharing mechanisms: exact sums, refusals, masks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedcrypt.crypto import ring

PARTIES = 50
BOUND = 2.0 ** (62 - ring.FRAC_BITS) / PARTIES
values = arrays(np.float32, st.integers(1, 64), elements=st.floats(-float(np.float32(BOUND / 2)), float(np.float32(BOUND / 2)), width=32))


@given(values)
def test_encoding_round_trips_to_the_nearest_fixed_point_value(x: np.ndarray) -> None:
    decoded = ring.decode(ring.encode(x, PARTIES)).astype(np.float64)
    expected = np.rint(x.astype(np.float64) * 2.0**ring.FRAC_BITS) / 2.0**ring.FRAC_BITS
    np.testing.assert_allclose(decoded, expected.astype(np.float32), rtol=0)


@given(st.lists(values, min_size=2, max_size=5).filter(lambda xs: len({x.shape for x in xs}) == 1))
def test_the_wrapping_sum_of_encodings_is_the_encoding_of_the_sum(xs: list[np.ndarray]) -> None:
    total = np.zeros(xs[0].shape, np.uint64)
    for x in xs:
        total += ring.encode(x, PARTIES)
    exact = sum(np.rint(x.astype(np.float64) * 2.0**ring.FRAC_BITS).astype(np.int64) for x in xs)
    np.testing.assert_array_equal(total.view(np.int64), exact)


@given(values, st.binary(min_size=32, max_size=32))
def test_adding_then_removing_a_mask_restores_the_vector(x: np.ndarray, seed: bytes) -> None:
    stream = ring.Keystream(x.shape[0])
    encoded = ring.encode(x, PARTIES)
    masked = encoded + stream.words(seed)
    np.testing.assert_array_equal(masked - stream.words(seed), encoded)


def test_masks_are_deterministic_per_seed_and_differ_across_seeds() -> None:
    stream = ring.Keystream(1000)
    first = stream.words(bytes(32)).copy()
    np.testing.assert_array_equal(stream.words(bytes(32)), first)
    assert (stream.words(bytes(31) + b"\x01") != first).mean() > 0.99
    assert abs(np.unpackbits(first.view(np.uint8)).mean() - 0.5) < 0.01


@pytest.mark.parametrize("bad", [np.nan, np.inf, BOUND * 1.01])
def test_values_that_could_overflow_or_are_not_finite_are_refused(bad: float) -> None:
    with pytest.raises(ring.RingOverflow):
        ring.encode(np.array([0.0, bad]), PARTIES)
