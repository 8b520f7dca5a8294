"""Split a labelled dataset across federated clients: IID and the common non-IID schemes.

Every method returns a disjoint exact cover of all sample indices (one sorted int64 array per
client), is deterministic for a given seed and gives each client at least ``min_size`` samples.
Simulation randomness, not cryptographic randomness, so numpy's generator is appropriate.
"""

import logging
import operator

import numpy as np

log = logging.getLogger(__name__)

PARTITION_METHODS: tuple[str, ...] = ("iid", "dirichlet", "shards", "quantity")
MAX_DIRICHLET_ATTEMPTS = 100


def _check_alpha(alpha: float) -> None:
    """Dirichlet concentration must be a positive finite number."""
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha}")


def _group(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Turn a per-sample client id array into per-client (sorted) index arrays."""
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owner, minlength=num_clients))[:-1])


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and cut into near-equal parts (sizes differ by at most one)."""
    return np.array_split(rng.permutation(n), num_clients)


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label skew: each class is spread over clients by proportions ~ Dirichlet(alpha).

    As in Hsu et al. 2019 / FedML / Flower's DirichletPartitioner; resampled until every
    client has ``min_size`` samples (bounded number of attempts).
    """
    _check_alpha(alpha)
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    clients = np.arange(num_clients)
    owner = np.empty(len(labels), dtype=np.int64)
    for attempt in range(1, MAX_DIRICHLET_ATTEMPTS + 1):
        for members in classes:
            counts = rng.multinomial(len(members), rng.dirichlet(np.full(num_clients, alpha)))
            owner[members] = rng.permutation(np.repeat(clients, counts))
        if np.bincount(owner, minlength=num_clients).min() >= min_size:
            log.debug("dirichlet partition found after %d attempt(s)", attempt)
            return _group(owner, num_clients)
    raise ValueError(
        f"dirichlet partition: no split giving all {num_clients} clients at least {min_size} "
        f"samples in {MAX_DIRICHLET_ATTEMPTS} attempts with alpha={alpha}; "
        "raise alpha or lower num_clients"
    )


def _shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut into shards, deal each client random shards.

    Shards are near-equal (sizes differ by at most one) so that every sample is used.
    """
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    n, num_shards = len(labels), num_clients * shards_per_client
    if num_shards > n:
        raise ValueError(
            f"shards: {num_clients} clients x {shards_per_client} shards = {num_shards} shards, "
            f"but only {n} samples; lower num_clients or shards_per_client"
        )
    base, small_shards = n // num_shards, num_shards - n % num_shards
    smallest_client = shards_per_client * base + max(0, shards_per_client - small_shards)
    if smallest_client < min_size:
        raise ValueError(
            f"shards: {num_shards} shards of ~{base} samples cannot give each client "
            f"{min_size} samples; lower min_size or num_clients, or raise shards_per_client"
        )
    shuffled = rng.permutation(n)  # random order within each label
    shards = np.array_split(shuffled[np.argsort(labels[shuffled], kind="stable")], num_shards)
    deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]) for row in deal]


def _quantity(
    n: int, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Quantity skew: client sizes ~ min_size + Dirichlet(alpha) share of the rest; IID labels."""
    _check_alpha(alpha)
    extra = rng.multinomial(n - num_clients * min_size, rng.dirichlet(np.full(num_clients, alpha)))
    return np.split(rng.permutation(n), np.cumsum(extra + min_size)[:-1])


def partition(
    labels: np.ndarray,
    num_clients: int,
    method: str = "iid",
    *,
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split sample indices ``0..len(labels)-1`` over ``num_clients`` clients.

    ``method`` is one of `PARTITION_METHODS`; ``alpha`` drives "dirichlet" and "quantity"
    (smaller = more skewed), ``shards_per_client`` drives "shards". Bad arguments raise
    ValueError with a message saying what to change.
    """
    if method not in PARTITION_METHODS:
        raise ValueError(
            f"unknown partition method {method!r}; choose one of: {', '.join(PARTITION_METHODS)}"
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iub":
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    num_clients, min_size, n = operator.index(num_clients), operator.index(min_size), len(labels)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(
            f"num_clients ({num_clients}) exceeds the number of samples ({n}); lower num_clients"
        )
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    if num_clients * min_size > n:
        raise ValueError(
            f"cannot give {num_clients} clients at least {min_size} samples each from {n} samples; "
            "lower num_clients or min_size"
        )
    rng = np.random.default_rng(seed)
    match method:
        case "iid":
            parts = _iid(n, num_clients, rng)
        case "dirichlet":
            parts = _dirichlet(labels, num_clients, alpha, min_size, rng)
        case "shards":
            parts = _shards(labels, num_clients, operator.index(shards_per_client), min_size, rng)
        case _:
            parts = _quantity(n, num_clients, alpha, min_size, rng)
    return [np.sort(part).astype(np.int64) for part in parts]
