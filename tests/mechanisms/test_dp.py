"""DP around a mechanism: clipping, where the noise goes and how much, the budget stop."""

from __future__ import annotations

import numpy as np
import pytest

from fedcrypt.core.mechanism import BudgetSpent, RoundContext
from fedcrypt.core.messages import Payload
from fedcrypt.dp import DpSettings, epsilon_after
from fedcrypt.mechanisms import PlaintextMechanism, SecAggMechanism
from fedcrypt.mechanisms.dp import DpMechanism

SIZE = 40_001


def _dp(noise: str, multiplier: float = 0.0, target: float | None = None, inner=None) -> DpMechanism:  # type: ignore[no-untyped-def]
    settings = DpSettings(noise, clip_norm=2.0, noise_multiplier=multiplier, delta=1e-5, target_epsilon=target)  # type: ignore[arg-type]
    return DpMechanism(inner or PlaintextMechanism(), settings, clients=10, sampled=5, min_clients=4, rounds=50)


def _contribution(norm: float, seed: int = 0) -> np.ndarray:
    delta = np.random.default_rng(seed).normal(size=SIZE - 1)
    return np.append(delta * norm / np.linalg.norm(delta), 1.0).astype(np.float32)


def _sum(mechanism: DpMechanism, contributions: list[np.ndarray]) -> np.ndarray:
    names = tuple(map(str, range(len(contributions))))
    ctx = RoundContext("job", 1, names, SIZE)
    aggregator = mechanism.server_round(ctx)
    for name, vector in zip(names, contributions):
        aggregator.fold("protect", name, mechanism.client_round(ctx, name).respond("protect", Payload(), vector))
    return mechanism.finalize(mechanism.recover(aggregator.finish(), ctx), ctx)


def test_updates_are_clipped_to_the_norm_and_small_ones_left_alone() -> None:
    mechanism = _dp("central")
    big, small = _contribution(10.0), _contribution(0.5, seed=1)
    kept = small.copy()
    mechanism.privatize(big)
    mechanism.privatize(small)
    assert np.linalg.norm(big[:-1].astype(np.float64)) == pytest.approx(2.0, rel=1e-5) and big[-1] == 1
    np.testing.assert_array_equal(small, kept)
    with pytest.raises(ValueError, match="uniform client weights"):
        mechanism.privatize(np.append(np.ones(3), 7.0).astype(np.float32))


@pytest.mark.parametrize(("noise", "expected_std"), [("central", 0.8 * 2.0), ("distributed", 0.8 * 2.0), ("local", 0.8 * 2.0 * 2)])
def test_the_sum_carries_the_noise_the_accountant_assumes(noise: str, expected_std: float) -> None:
    mechanism = _dp(noise, multiplier=0.8)
    zeros = [np.append(np.zeros(SIZE - 1), 1.0).astype(np.float32) for _ in range(4)]  # min_clients survive
    total = _sum(mechanism, zeros)
    assert total[-1] == 4  # the weight slot (client count) is never noised
    assert np.std(total[:-1]) == pytest.approx(expected_std, rel=0.03)  # local: 4 clients x full noise


def test_noise_composes_with_secure_aggregation() -> None:
    mechanism = _dp("distributed", multiplier=0.5, inner=SecAggMechanism())
    assert mechanism.name == "secagg" and mechanism.server_can_recover
    assert mechanism.server_round(RoundContext("job", 1, ("a", "b", "c"), SIZE)).stages[0] == "advertise"


def test_epsilon_is_reported_per_round_and_the_budget_stops_the_job() -> None:
    mechanism = _dp("central", multiplier=1.0, target=4.0)
    limit = mechanism.round_limit
    assert limit is not None and epsilon_after(limit, 1.0, 0.5, 1e-5) <= 4.0 < epsilon_after(limit + 1, 1.0, 0.5, 1e-5)
    ctx = RoundContext("job", 3, ("a",), SIZE)
    aggregator = mechanism.server_round(ctx)
    aggregator.fold("protect", "a", mechanism.client_round(ctx, "a").respond("protect", Payload(), _contribution(1.0)))
    assert aggregator.metrics()["dp_epsilon"] == pytest.approx(epsilon_after(3, 1.0, 0.5, 1e-5))
    mechanism.check_budget(limit)
    with pytest.raises(BudgetSpent, match="privacy budget spent"):
        mechanism.check_budget(limit + 1)
