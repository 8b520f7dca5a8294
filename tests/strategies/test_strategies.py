from __future__ import annotations

import numpy as np
import pytest

from fedcrypt.core import contribution
from fedcrypt.core.mechanism import RecoveryError
from fedcrypt.strategies import FedAdam, FedAvg, FedProx, FedYogi


def test_weighted_average_via_contributions() -> None:
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=7).astype(np.float32) for _ in range(4)]
    weights = [10.0, 1.0, 5.0, 100.0]
    summed = np.sum([contribution.pack(d, w).astype(np.float64) for d, w in zip(deltas, weights)], axis=0)
    average, total = contribution.unpack_average(summed)
    assert total == sum(weights)
    np.testing.assert_allclose(average, np.average(deltas, axis=0, weights=weights), rtol=1e-5)


def test_zero_total_weight_is_an_error() -> None:
    with pytest.raises(RecoveryError, match="total weight"):
        contribution.unpack_average(np.zeros(4))


def test_fedavg_steps_by_the_average_delta() -> None:
    params = np.ones(3, dtype=np.float32)
    out = FedAvg(server_lr=0.5).apply(params, np.array([2.0, -2.0, 0.0]))
    np.testing.assert_allclose(out, [2.0, 0.0, 1.0])
    assert out.dtype == np.float32


def test_fedprox_sends_mu_to_clients() -> None:
    config = FedProx(proximal_mu=0.3, weighting="uniform").fit_config(1)
    assert config == {"weighting": "uniform", "proximal_mu": 0.3}


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_adaptive_strategies_match_reddi_et_al(cls: type[FedAdam]) -> None:
    strategy = cls(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x = np.zeros(2, dtype=np.float32)
    for delta in (np.array([1.0, -0.5]), np.array([0.2, 0.3])):
        x = strategy.apply(x, delta)
    np.testing.assert_allclose(x, _replay(cls), rtol=1e-6)


def test_fedyogi_second_moment_differs_from_adam() -> None:
    assert not np.allclose(_replay(FedYogi), _replay(FedAdam))


def _replay(cls: type[FedAdam]) -> np.ndarray:
    """The same two steps computed by hand, for Adam or Yogi."""
    x, m, v = np.zeros(2), np.zeros(2), np.full(2, 1e-6)
    for delta in (np.array([1.0, -0.5]), np.array([0.2, 0.3])):
        m = 0.9 * m + 0.1 * delta
        if cls is FedYogi:
            v = v - 0.01 * delta**2 * np.sign(v - delta**2)
        else:
            v = 0.99 * v + 0.01 * delta**2
        x = x + 0.1 * m / (np.sqrt(v) + 1e-3)
    return x


def test_sampling_respects_fraction_and_minimum() -> None:
    clients = [f"c{i}" for i in range(10)]
    rng = np.random.default_rng(1)
    assert len(FedAvg(fraction_fit=0.3, min_fit_clients=2).sample(clients, rng)) == 3
    assert len(FedAvg(fraction_fit=0.05, min_fit_clients=2).sample(clients, rng)) == 2
    picked = FedAvg(fraction_fit=0.5).sample(clients, rng)
    assert len(set(picked)) == 5 and set(picked) <= set(clients)
    with pytest.raises(ValueError, match="only 1 clients available"):
        FedAvg(min_fit_clients=2).sample(["c0"], rng)


def test_sampling_is_deterministic_by_seed_and_varies_by_round() -> None:
    clients = [f"c{i}" for i in range(20)]
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    strategy = FedAvg(fraction_fit=0.25)
    first = [strategy.sample(clients, a) for _ in range(3)]
    assert first == [strategy.sample(clients, b) for _ in range(3)]
    assert len({tuple(s) for s in first}) > 1


@pytest.mark.parametrize(
    "kwargs", [{"fraction_fit": 0.0}, {"fraction_fit": 1.5}, {"min_fit_clients": 0}, {"weighting": "votes"}]
)
def test_invalid_strategy_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FedAvg(**kwargs)  # type: ignore[arg-type]
