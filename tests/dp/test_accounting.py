"""The accountant against the dp-accounting library and the RDP closed form, and the CSPRNG noise."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from scipy import stats

from fedcrypt.dp import calibrate_noise, epsilon_after, gaussian, rounds_within


def test_epsilon_matches_the_reference_library_for_a_known_setting() -> None:
    ours = epsilon_after(100, 1.1, 0.1, 1e-5)
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 100)
    assert ours == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    # without sampling, k Gaussian releases have RDP k*a/(2 z^2): the classic conversion bounds epsilon
    k, z, delta = 20, 2.0, 1e-5
    classic = min(k * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 200, 20000))
    assert epsilon_after(k, z, 1.0, delta) <= classic + 1e-9
    assert epsilon_after(k, z, 1.0, delta) > 0.8 * classic
    assert epsilon_after(0, z, 1.0, delta) == 0 and epsilon_after(5, 0.0, 1.0, delta) == math.inf


def test_calibrated_noise_is_the_smallest_that_meets_the_target() -> None:
    z = calibrate_noise(8.0, 20, 0.1, 1e-5, "central")
    assert epsilon_after(20, z, 0.1, 1e-5) <= 8.0 < epsilon_after(20, 0.99 * z, 0.1, 1e-5)
    assert calibrate_noise(8.0, 20, 0.1, 1e-5, "local") > z  # no amplification by sampling for local noise
    allowed = rounds_within(8.0, z, 0.1, 1e-5, "central", 100)
    assert allowed >= 20 and epsilon_after(allowed + 1, z, 0.1, 1e-5) > 8.0


def test_noise_is_gaussian_with_the_requested_deviation() -> None:
    samples = gaussian(200_001, 3.0)
    assert samples.shape == (200_001,)
    assert abs(samples.mean()) < 0.03 and abs(samples.std() - 3.0) < 0.03
    assert stats.kstest(samples / 3.0, "norm").pvalue > 1e-4
    assert not np.array_equal(gaussian(10, 1.0), gaussian(10, 1.0))  # fresh CSPRNG draws
    assert (gaussian(5, 0.0) == 0).all()
    with pytest.raises(ValueError, match=">= 0"):
        gaussian(5, -1.0)
