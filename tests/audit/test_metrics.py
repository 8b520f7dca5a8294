"""Scores against their textbook definitions, and the pairing of an unordered batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrypt.audit.metrics import PSNR_CAP, label_recovery, pair_images, score_image


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.01, 0.3))
def test_mse_and_psnr_match_their_definitions(seed: int, noise: float) -> None:
    rng = np.random.default_rng(seed)
    true = rng.random((1, 28, 28)).astype(np.float32)
    rebuilt = np.clip(true + noise * rng.standard_normal(true.shape), 0, 1).astype(np.float32)
    score = score_image(true, rebuilt, 1.0)
    mse = float(np.mean((true.astype(np.float64) - rebuilt) ** 2))
    assert score.mse == pytest.approx(mse, rel=1e-9)
    assert score.psnr == pytest.approx(10 * math.log10(1 / mse), rel=1e-9)
    assert -1 <= score.ssim < 1


def test_perfect_and_unrelated_images() -> None:
    rng = np.random.default_rng(0)
    true = rng.random((3, 16, 16))
    perfect = score_image(true, true.copy(), 1.0)
    assert perfect.mse == 0 and perfect.psnr == PSNR_CAP and perfect.ssim == pytest.approx(1.0)
    unrelated = score_image(true, rng.random((3, 16, 16)), 1.0)
    assert unrelated.psnr < 12 and abs(unrelated.ssim) < 0.1


def test_out_of_range_reconstructions_are_clipped_before_scoring() -> None:
    true = np.zeros((1, 8, 8))
    assert score_image(true, np.full((1, 8, 8), 5.0), 1.0).mse == pytest.approx(1.0)


def test_pairing_undoes_a_shuffle() -> None:
    rng = np.random.default_rng(1)
    true = rng.random((6, 1, 8, 8))
    order = rng.permutation(6)
    rebuilt = true[order] + 0.01 * rng.standard_normal(true.shape)
    pairing = pair_images(true, rebuilt)
    np.testing.assert_array_equal(order[pairing], np.arange(6))


def test_label_recovery_counts_multisets() -> None:
    assert label_recovery(np.array([1, 1, 2]), np.array([2, 1, 1])) == 1.0
    assert label_recovery(np.array([1, 1, 2]), np.array([1, 2, 2])) == pytest.approx(2 / 3)
    assert label_recovery(np.array([3]), np.array([4])) == 0.0
