"""data.train_samples: a job that trains on a seeded random subset of its dataset's training set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fedcrypt
from fedcrypt.config.job import JobConfig, JobError, load_job, parse_job
from fedcrypt.data import load_dataset, partition
from fedcrypt.simulation import partition_clients



def _job(seed: int = 0, **data: object) -> JobConfig:
    return parse_job({"job": {"rounds": 1, "seed": seed}, "data": {"dataset": "digits", "num_clients": 4, **data}})


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards", "quantity"])
def test_clients_share_exactly_train_samples_disjoint_examples(method: str) -> None:
    dataset = load_dataset("digits")
    parts = partition_clients(_job(train_samples=200, partition=method, alpha=5.0), dataset)
    joined = np.concatenate(parts)
    assert len(parts) == 4 and all(len(part) > 0 for part in parts)
    assert len(joined) == 200 and len(np.unique(joined)) == 200  # disjoint, and 200 in all
    assert joined.min() >= 0 and joined.max() < len(dataset.y_train)  # indices into the full training set
    assert all(np.array_equal(part, np.sort(part)) for part in parts)


def test_the_subset_is_seeded_random_and_deterministic() -> None:
    dataset = load_dataset("digits")
    first = partition_clients(_job(train_samples=100), dataset)
    again = partition_clients(_job(train_samples=100), dataset)
    other = partition_clients(_job(seed=1, train_samples=100), dataset)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    chosen, chosen_other = np.concatenate(first), np.concatenate(other)
    assert set(chosen) != set(chosen_other)
    assert chosen.max() > 1000 and not np.array_equal(np.sort(chosen), np.arange(100))  # not the first rows


def test_all_training_examples_is_the_partition_without_a_subset() -> None:
    dataset = load_dataset("digits")
    n = len(dataset.y_train)
    plain = partition_clients(_job(), dataset)
    assert all(np.array_equal(a, b) for a, b in zip(plain, partition(dataset.y_train, 4, seed=0)))
    everything = np.concatenate(partition_clients(_job(train_samples=n), dataset))
    assert np.array_equal(np.sort(everything), np.arange(n))


def test_more_than_the_training_set_is_a_one_line_error() -> None:
    expected = r"^data\.train_samples \(5000\) exceeds the 1437 training examples of digits$"
    with pytest.raises(ValueError, match=expected):
        partition_clients(_job(train_samples=5000), load_dataset("digits"))


def test_fewer_samples_than_clients_is_the_partitioners_error() -> None:
    with pytest.raises(ValueError, match=r"num_clients \(4\) exceeds the number of samples \(3\)"):
        partition_clients(_job(train_samples=3), load_dataset("digits"))


@pytest.mark.parametrize(("value", "message"), [(0, "greater than or equal to 1"), ("ten", "valid integer")])
def test_bad_values_name_the_key(value: object, message: str) -> None:
    with pytest.raises(JobError, match=rf"^job: data\.train_samples: .*{message}"):
        parse_job({"data": {"train_samples": value}})


def test_round_trips_through_toml_and_is_left_out_when_unset(tmp_path: Path) -> None:
    for job in (_job(), _job(train_samples=123)):
        path = tmp_path / "job.toml"
        path.write_text(job.to_toml())
        assert load_job(path) == job
    assert "train_samples" not in _job().to_toml()
    assert "train_samples = 123" in _job(train_samples=123).to_toml()


def test_a_job_on_a_subset_trains() -> None:
    job = _job(train_samples=80).with_overrides(job={"rounds": 3}, train={"local_epochs": 20, "momentum": 0.9})
    result = fedcrypt.simulate(job)
    assert [r.status for r in result.history] == ["ok"] * 3
    assert result.final_accuracy > 0.5  # 80 digits are enough to beat chance (0.1) by far
