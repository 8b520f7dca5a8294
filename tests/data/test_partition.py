"""Client partitioners: exact cover, minimum sizes, determinism, skew and argument checks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedcrypt.data import PARTITION_METHODS, partition

# Samples per client each method needs so that the property tests never hit a legitimate
# "cannot partition" error (dirichlet needs slack to find a split within its attempts).
_SLACK = {"iid": 1, "quantity": 1, "shards": 3, "dirichlet": 20}


@st.composite
def problems(draw: st.DrawFn, methods: tuple[str, ...] = PARTITION_METHODS) -> dict:
    """A labels array plus valid partition arguments for one method."""
    method = draw(st.sampled_from(methods))
    num_clients = draw(st.integers(1, 20))
    min_size = draw(st.integers(1, 3))
    lowest = num_clients * min_size * _SLACK[method]
    n = draw(st.integers(lowest, max(lowest, 400)))
    labels = draw(arrays(np.int64, n, elements=st.integers(0, draw(st.integers(0, 9)))))
    return {
        "labels": labels,
        "num_clients": num_clients,
        "method": method,
        "seed": draw(st.integers(0, 2**32 - 1)),
        "alpha": draw(st.floats(1.0, 100.0)) if method == "dirichlet" else draw(st.floats(0.05, 100.0)),
        "shards_per_client": draw(st.integers(1, 3)),
        "min_size": min_size,
    }


@settings(max_examples=200, deadline=None)
@given(problems())
def test_exact_cover_and_min_size(problem: dict) -> None:
    parts = partition(**problem)
    n = len(problem["labels"])
    assert len(parts) == problem["num_clients"]
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no duplicates within a client
        assert len(part) >= problem["min_size"]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(0, 2**32 - 1))
def test_deterministic_by_seed(problem: dict, other_seed: int) -> None:
    first = partition(**problem)
    again = partition(**problem)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    if other_seed != problem["seed"] and problem["num_clients"] >= 2 and len(problem["labels"]) >= 60:
        other = partition(**{**problem, "seed": other_seed})
        assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def mean_label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Average Shannon entropy (bits) of the per-client label distributions."""
    entropies = []
    for part in parts:
        p = np.bincount(labels[part], minlength=labels.max() + 1) / len(part)
        p = p[p > 0]
        entropies.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(entropies))


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_small_alpha_is_more_skewed(seed: int) -> None:
    labels = np.repeat(np.arange(10), 200)
    skewed = mean_label_entropy(partition(labels, 10, "dirichlet", seed=seed, alpha=0.05), labels)
    mild = mean_label_entropy(partition(labels, 10, "dirichlet", seed=seed, alpha=100.0), labels)
    iid = mean_label_entropy(partition(labels, 10, "iid", seed=seed), labels)
    assert skewed < 1.5 < 3.0 < mild <= iid + 0.05


@settings(max_examples=100, deadline=None)
@given(
    num_classes=st.integers(1, 10),
    shards_per_class=st.integers(1, 4),
    shard_size=st.integers(1, 10),
    data=st.data(),
)
def test_shards_limit_distinct_labels(
    num_classes: int, shards_per_class: int, shard_size: int, data: st.DataObject
) -> None:
    num_shards = num_classes * shards_per_class
    divisors = [d for d in range(1, num_shards + 1) if num_shards % d == 0]
    shards_per_client = data.draw(st.sampled_from(divisors))
    labels = np.random.default_rng(data.draw(st.integers(0, 1000))).permutation(
        np.repeat(np.arange(num_classes), shards_per_class * shard_size)
    )
    parts = partition(
        labels, num_shards // shards_per_client, "shards", seed=data.draw(st.integers(0, 1000)),
        shards_per_client=shards_per_client,
    )
    for part in parts:
        assert len(part) == shards_per_client * shard_size
        assert len(np.unique(labels[part])) <= shards_per_client


def test_iid_sizes_are_near_equal() -> None:
    sizes = [len(p) for p in partition(np.zeros(1003, dtype=np.int64), 10, "iid", seed=3)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003


def test_quantity_small_alpha_spreads_sizes() -> None:
    labels = np.repeat(np.arange(10), 500)
    skewed = [len(p) for p in partition(labels, 20, "quantity", seed=1, alpha=0.1, min_size=5)]
    even = [len(p) for p in partition(labels, 20, "quantity", seed=1, alpha=1000.0, min_size=5)]
    assert min(skewed) >= 5 and min(even) >= 5
    assert np.std(skewed) > 5 * np.std(even)


def test_dirichlet_impossible_split_says_what_to_change() -> None:
    with pytest.raises(ValueError, match="raise alpha or lower num_clients"):
        partition(np.zeros(10, dtype=np.int64), 10, "dirichlet", alpha=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, "num_clients must be >= 1"),
        ({"num_clients": 11}, r"num_clients \(11\) exceeds the number of samples \(10\)"),
        (
            {"method": "pathological"},
            "unknown partition method 'pathological'; choose one of: iid, dirichlet, shards, quantity",
        ),
        ({"method": "dirichlet", "alpha": 0.0}, "alpha must be a positive number"),
        ({"method": "quantity", "alpha": -1.0}, "alpha must be a positive number"),
        ({"method": "dirichlet", "alpha": float("nan")}, "alpha must be a positive number"),
        ({"method": "shards", "num_clients": 6}, r"6 clients x 2 shards = 12 shards, but only 10 samples"),
        ({"method": "shards", "shards_per_client": 0}, "shards_per_client must be >= 1"),
        ({"method": "shards", "shards_per_client": 3, "min_size": 5}, "cannot give each client 5 samples"),
        ({"min_size": 0}, "min_size must be >= 1"),
        ({"num_clients": 4, "min_size": 3}, "cannot give 4 clients at least 3 samples each from 10 samples"),
        ({"labels": np.zeros((5, 2), dtype=np.int64)}, "1-D integer array"),
        ({"labels": np.zeros(10, dtype=np.float32)}, "1-D integer array"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    args = {"labels": np.arange(10) % 3, "num_clients": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        partition(**args)
