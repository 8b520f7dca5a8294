"""End-to-end simulations through the public Python API."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from torch import nn

import fedcrypt
from fedcrypt.core.server import Server
from fedcrypt.mechanisms.plaintext import PlaintextMechanism
from fedcrypt.strategies import FedAvg
from fedcrypt.transport.inprocess import InProcessTransport

from core.test_server import ScriptedClient

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.toml"


def test_quickstart_reaches_its_accuracy_target() -> None:
    result = fedcrypt.simulate(QUICKSTART)
    assert len(result.history) == 20
    assert all(r.status == "ok" and r.succeeded == 10 for r in result.history)
    assert result.final_accuracy >= 0.93


def test_same_seed_same_model_other_seed_other_model() -> None:
    job = fedcrypt.load_job(QUICKSTART).with_overrides(job={"rounds": 2})
    first, again, other = fedcrypt.simulate(job), fedcrypt.simulate(job), fedcrypt.simulate(job, seed=7)
    np.testing.assert_array_equal(first.params, again.params)
    assert not np.array_equal(first.params, other.params)


@pytest.mark.parametrize(
    "strategy",
    [
        {"name": "fedprox", "proximal_mu": 0.01},
        {"name": "fedadam", "server_lr": 0.01},
        {"name": "fedyogi", "server_lr": 0.01},
        {"name": "fedavg", "fraction_fit": 0.5, "min_fit_clients": 3, "weighting": "uniform"},
    ],
    ids=lambda s: str(s["name"]) + ("-sampled" if "fraction_fit" in s else ""),
)
def test_every_strategy_learns(strategy: dict[str, object]) -> None:
    job = fedcrypt.load_job(QUICKSTART).with_overrides(job={"rounds": 8}, strategy=strategy)
    result = fedcrypt.simulate(job)
    sampled = {r.sampled for r in result.history}
    assert sampled == ({5} if "fraction_fit" in strategy else {10})
    assert result.final_accuracy > 0.8


def test_any_module_factory_can_be_trained() -> None:
    def factory() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    job = fedcrypt.load_job(QUICKSTART).with_overrides(job={"rounds": 5})
    result = fedcrypt.simulate(job, model_factory=factory)
    assert result.spec.size == 64 * 32 + 32 + 32 * 10 + 10
    assert set(result.state_dict()) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert result.final_accuracy > 0.8


def test_mnist_cnn_round_on_real_data() -> None:
    job = fedcrypt.JobConfig().with_overrides(
        job={"rounds": 1},
        data={"dataset": "mnist", "num_clients": 100, "partition": "iid"},
        model={"name": "cnn"},
        strategy={"fraction_fit": 0.02},
    )
    result = fedcrypt.simulate(job)
    (record,) = result.history
    assert record.status == "ok" and record.succeeded == 2
    assert record.bytes_up > 2 * 4 * 1_663_370
    assert record.accuracy > 0.3  # chance is 0.1; two clients with 600 examples each, one epoch


def test_aggregation_memory_is_one_update_not_one_per_client() -> None:
    """The server folds each reply in as it arrives, so its peak memory does not grow with clients."""
    size = 250_000  # 1 MB per float32 update
    mechanism = PlaintextMechanism()

    def peak_bytes(num_clients: int) -> int:
        rng = np.random.default_rng(0)
        clients = {
            f"c{i}": ScriptedClient(f"c{i}", rng.normal(size=size).astype(np.float32), 5, mechanism)
            for i in range(num_clients)
        }
        server = Server(
            job="test-job",
            strategy=FedAvg(),
            mechanism=mechanism,
            params=np.zeros(size, dtype=np.float32),
            transport=InProcessTransport(clients),  # type: ignore[arg-type]
        )
        tracemalloc.start()
        record = server.run_round(1)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert record.succeeded == num_clients
        return peak

    few, many = peak_bytes(3), peak_bytes(30)
    assert many < few + 2 * 4 * size  # 27 more clients cost less than two more updates
    assert many < 12 * 4 * size
