"""Shared pieces of the audit tests: a LeNet-on-MNIST job and its dataset."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fedcrypt.config.job import JobConfig, parse_job
from fedcrypt.data import Dataset, load_dataset


def _lenet_job(**sections: dict[str, Any]) -> JobConfig:
    """A LeNet job on MNIST with updates in the clear, sections replaced by ``sections``."""
    raw: dict[str, Any] = {
        "job": {"name": "audit-test", "seed": 0},
        "data": {"dataset": "mnist", "num_clients": 4},
        "model": {"name": "lenet"},
        "train": {"lr": 0.1, "batch_size": 1},
    }
    raw.update(sections)
    return parse_job(raw)


@pytest.fixture(scope="session")
def lenet_job() -> Callable[..., JobConfig]:
    return _lenet_job


@pytest.fixture(scope="session")
def mnist() -> Dataset:
    return load_dataset("mnist")
