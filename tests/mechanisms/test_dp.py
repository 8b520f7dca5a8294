"""DP around a mechanism: clipping, where the noise goes and how much, the budget stop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedcrypt.core.mechanism import BudgetSpent, PayloadRejected, RoundContext
from fedcrypt.core.messages import Payload
from fedcrypt.dp import DpSettings, epsilon_after
from fedcrypt.mechanisms import PlaintextMechanism, SecAggMechanism
from fedcrypt.mechanisms.dp import DpMechanism
from fedcrypt.tracking.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

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
    assert mechanism.privatize(big, 2.0) is False and mechanism.privatize(small, 2.0) is True
    assert np.linalg.norm(big[:-1].astype(np.float64)) == pytest.approx(2.0, rel=1e-5) and big[-1] == 1
    np.testing.assert_array_equal(small, kept)
    with pytest.raises(ValueError, match="uniform client weights"):
        mechanism.privatize(np.append(np.ones(3), 7.0).astype(np.float32), 2.0)


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


def test_adaptive_clipping_moves_the_bound_to_the_target_quantile_of_norms() -> None:
    settings = DpSettings("central", clip_norm=100.0, noise_multiplier=0.0, delta=1e-5,
                          adaptive=True, target_quantile=0.5, clip_lr=0.5, count_noise=0.01)
    mechanism = DpMechanism(PlaintextMechanism(), settings, clients=10, sampled=10, min_clients=10, rounds=100)
    names = tuple(map(str, range(10)))
    bounds = []
    for server_round in range(1, 41):
        ctx = RoundContext("job", server_round, names, SIZE)
        aggregator = mechanism.server_round(ctx)
        for name in names:
            request = aggregator.request("protect", name)
            assert request.meta["dp_clip_norm"] == pytest.approx(mechanism.clip_norm)
            reply = mechanism.client_round(ctx, name).respond("protect", request, _contribution(1.0 + int(name)))
            assert reply.meta["dp_clip_bit"] in (0, 1)
            aggregator.fold("protect", name, reply)
        aggregator.finish()
        bounds.append(mechanism.clip_norm)
    assert bounds[0] < 100 and 4.0 <= bounds[-1] <= 7.0  # norms are 1..10: the median is 5.5
    aggregator = mechanism.server_round(RoundContext("job", 41, names, SIZE))
    with pytest.raises(PayloadRejected, match="clip bit"):
        aggregator.fold("protect", "0", Payload(arrays={"vector": np.zeros(SIZE, np.float32)}))


def test_the_adaptive_bound_survives_a_checkpoint_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    settings = DpSettings("central", clip_norm=100.0, noise_multiplier=0.0, delta=1e-5, adaptive=True)
    mechanism = DpMechanism(PlaintextMechanism(), settings, clients=10, sampled=10, min_clients=10, rounds=100)
    mechanism.adapt(unclipped=10, clients=10)  # every update was under the bound: it shrinks
    assert mechanism.clip_norm < 100.0
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, Checkpoint(3, np.zeros(2, np.float32), {}, {}, "d", mechanism.state()))
    resumed = DpMechanism(PlaintextMechanism(), settings, clients=10, sampled=10, min_clients=10, rounds=100)
    resumed.load_state(load_checkpoint(path, "d").mechanism_state)
    assert resumed.clip_norm == mechanism.clip_norm
    with pytest.raises(ValueError, match="not a positive number"):
        resumed.load_state({"dp_clip_norm": -1.0})
    with pytest.raises(ValueError, match="keeps no state across rounds"):
        PlaintextMechanism().load_state({"dp_clip_norm": 1.0})  # a checkpoint of another mechanism


def test_the_count_query_takes_its_share_of_the_noise() -> None:
    settings = DpSettings("central", 1.0, 1.0, 1e-5, adaptive=True, count_noise=1.0)
    assert settings.update_noise_multiplier == pytest.approx((1.0 - 0.25) ** -0.5)
    with pytest.raises(ValueError, match="count_noise > noise_multiplier / 2"):
        DpSettings("central", 1.0, 1.0, 1e-5, adaptive=True, count_noise=0.4)
