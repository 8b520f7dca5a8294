"""Privacy accounting with Google's ``dp-accounting`` (Renyi DP), client-level.

Each round releases the noised sum of the sampled clients' clipped updates: a Gaussian
mechanism with noise multiplier ``z`` (sensitivity ``clip_norm``, neighbouring = one client added
or removed). Sampling ``m`` of ``n`` clients is accounted as Poisson sampling with ``q = m / n``,
as TensorFlow Federated and Flower do (fedcrypt samples a fixed number); with ``local`` noise
each client's own update is the release, so no amplification by sampling is claimed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import dp_accounting
from dp_accounting import rdp

NoisePlacement = Literal["central", "distributed", "local"]


@dataclass(frozen=True)
class DpSettings:
    """A job's ``[dp]`` section, resolved: ``noise_multiplier`` is known (calibrated if needed).

    With ``adaptive`` clipping (Andrew et al. 2021) ``clip_norm`` is only the starting bound: each
    round the clients report whether their update was within it, the server counts the bits
    with Gaussian noise of standard deviation ``count_noise`` and moves the bound geometrically
    toward the ``target_quantile`` of update norms with rate ``clip_lr``. The two noisy queries
    together keep the accountant's ``noise_multiplier``: the update gets
    ``(z^-2 - (2 count_noise)^-2)^-1/2`` (their Theorem 1).
    """

    noise: NoisePlacement
    clip_norm: float
    noise_multiplier: float
    delta: float
    target_epsilon: float | None = None
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.clip_norm <= 0 or self.noise_multiplier < 0 or not 0 < self.delta < 1:
            raise ValueError("DP needs clip_norm > 0, noise_multiplier >= 0 and 0 < delta < 1")
        if self.adaptive and self.noise_multiplier > 0 and 2 * self.count_noise <= self.noise_multiplier:
            raise ValueError(
                f"adaptive clipping needs count_noise > noise_multiplier / 2 ({self.noise_multiplier / 2:.3g}): "
                "the clip-count query takes part of the privacy budget"
            )

    @property
    def update_noise_multiplier(self) -> float:
        """The noise multiplier on the updates (smaller than ``noise_multiplier`` by the count query's share)."""
        if not self.adaptive or self.noise_multiplier == 0:
            return self.noise_multiplier
        return float((self.noise_multiplier**-2 - (2 * self.count_noise) ** -2) ** -0.5)


def _event(noise_multiplier: float, sampling: float, noise: NoisePlacement) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if noise == "local" or sampling >= 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(sampling, gaussian)


def epsilon_after(rounds: int, noise_multiplier: float, sampling: float, delta: float,
                  noise: NoisePlacement = "central") -> float:
    """``epsilon`` after ``rounds`` rounds (``inf`` without noise)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # the library warns about RDP orders it skips; the bound stays valid
    try:
        accountant = rdp.RdpAccountant()
        accountant.compose(_event(noise_multiplier, sampling, noise), rounds)
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def rounds_within(target_epsilon: float, noise_multiplier: float, sampling: float, delta: float,
                  noise: NoisePlacement, limit: int) -> int:
    """The most rounds (up to ``limit``) whose ``epsilon`` stays within ``target_epsilon``."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if epsilon_after(middle, noise_multiplier, sampling, delta, noise) <= target_epsilon:
            low = middle
        else:
            high = middle - 1
    return low


def calibrate_noise(target_epsilon: float, rounds: int, sampling: float, delta: float,
                    noise: NoisePlacement) -> float:
    """The smallest noise multiplier (to 0.1 %) with ``epsilon <= target_epsilon`` after ``rounds``."""
    low, high = 0.0, 1.0
    while epsilon_after(rounds, high, sampling, delta, noise) > target_epsilon:
        high *= 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} in {rounds} rounds")
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        if epsilon_after(rounds, middle, sampling, delta, noise) > target_epsilon:
            low = middle
        else:
            high = middle
    return high
