"""SecureBoost (Cheng et al. 2019, FATE's HeteroSecureBoost): gradient boosted trees over parties
that hold different features of the same samples, with the labels on one of them.

Roles. The **guest** holds the labels, its own features and the Paillier private key; it grows the
trees. Each **host** holds other features only; it builds encrypted histograms and keeps the
thresholds of its splits in a private lookup table. Roles exchange
:class:`~fedcrypt.core.messages.Payload` objects only (validated on receipt: :class:`ProtocolError`),
so a transport can carry them; :func:`train` and :func:`predict_scores` drive them in one process,
and :class:`SecureBoost` wraps it all in a scikit-learn-style estimator.

Per tree (binary classification, logistic loss, raw score ``F``, ``p = sigmoid(F)``):

1. The guest computes ``g_i = p_i - y_i`` in ``[-1, 1]`` and ``h_i = p_i (1 - p_i)`` in ``[0, 1/4]``
   and packs each sample into one plaintext (:class:`GradientPacker`, FATE's gradient packing):
   ``P_i = (g_i + 1) 2^f << (Wh + Wc)  |  h_i 2^f << Wc  |  1`` in fixed point with ``f`` fraction
   bits. The fields are wide enough for sums over all ``N`` samples, so adding plaintexts adds each
   field without carries, and the last field counts the samples; a sum decodes to
   ``G = g_field / 2^f - count`` (the offset removed), ``H = h_field / 2^f``. One ciphertext per
   sample instead of two, and the ``1``-field gives the bucket counts for free.
2. Each host bins its features into quantile buckets (scikit-learn's binning) and, for every node
   the guest asks about, sums the ciphertexts of each bucket and then the buckets cumulatively
   (``N + B`` ciphertext multiplications per feature), giving ``Enc(sum P_i over x_i <= t_b)`` for
   every candidate threshold ``t_b``, in a per-tree random order. It compresses ``K`` of them into
   one ciphertext by Horner's rule, ``C = (...(c_1^(2^W) c_2)^(2^W) ...) c_K``, i.e.
   ``Dec(C) = sum_j S_j 2^(W (K - j))`` (FATE's cipher compression), re-randomizes each result
   with a fresh ``Enc(0)`` and returns them: ``K`` times fewer decryptions for the guest.
3. The guest decrypts, unpacks ``(G_L, H_L, n_L)`` for every candidate, its own candidates in the
   clear, and takes the split of largest XGBoost gain
   ``G_L^2 / (H_L + l2) + G_R^2 / (H_R + l2) - G^2 / (H + l2)`` with both children holding at
   least ``min_samples_leaf`` samples and ``min_child_weight`` hessian (it needs gain > 0).
   Only the smaller child of a split parent is asked for; its sibling is ``parent - child``.
4. For a host's split the guest names ("host k, candidate j"); the host records the threshold
   under a new record id in its lookup table and answers which samples of the node go left.
   Leaves get ``-learning_rate * G / (H + l2)``.

Ties. Candidates that cut a node the same way have equal sums; the host reports the lowest
feature and threshold among them (scikit-learn's choice). Candidates that cut it differently but
with equal sums (common in the first trees, where every sample of a class has the same gradient)
tie too, and the guest takes the first in the tree's random candidate order, so two runs can
choose different host features there: equal training loss, slightly different models.

Prediction walks the trees a layer at a time: the guest routes samples through its own nodes and
asks each host, for (record id, sample) pairs, which way they go.

What each party learns. The guest: the decrypted per-candidate sums of ``g``, ``h`` and counts
of every host (in a random order per tree, without feature names or thresholds), which samples go
left at the hosts' chosen splits, and which host record each of its tree nodes refers to. A host:
the samples in every node (the instance space, inherent to SecureBoost), which of its candidates
were chosen, and ciphertexts under a key it does not hold. No party sees another's feature values;
hosts never see labels, gradients or the model's leaf values.

Randomness for keys, encryption and the candidate order comes from :mod:`secrets`; the random
state seeds only the quantile subsample of more than 200,000 rows (as scikit-learn's).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Protocol

import gmpy2
import numpy as np
from gmpy2 import mpz

from fedcrypt.core.messages import Payload
from fedcrypt.crypto.paillier import PaillierError, PublicKey, generate_keypair

log = logging.getLogger(__name__)

#: Fraction bits of the fixed-point gradients: each sample is off by at most 2^-33, finer than the
#: float32 gradients of scikit-learn and XGBoost; every bit widens each of the K slots.
FRAC_BITS = 32
#: Quantile thresholds come from at most this many rows (scikit-learn's subsample).
_BINNING_SUBSAMPLE = 200_000
#: Obfuscators computed in one batch (spreading worker start-up over several trees).
_OBFUSCATOR_BATCH = 1 << 16
#: A host's re-randomizers are computed this many at a time (enough to use the worker processes).
_HOST_OBFUSCATOR_BATCH = 512
GUEST = -1
_SECURE = secrets.SystemRandom()

SETUP, GRADIENTS = "secureboost.setup", "secureboost.gradients"
HISTOGRAM_REQUEST, HISTOGRAMS = "secureboost.histogram_request", "secureboost.histograms"
SPLIT_REQUEST, SPLIT_RESULT = "secureboost.split_request", "secureboost.split_result"
ROUTE_REQUEST, ROUTE_RESULT = "secureboost.route_request", "secureboost.route_result"


class ProtocolError(ValueError):
    """A received payload is malformed, out of order or inconsistent with what was asked."""


# --- parameters, packing, binning ----------------------------------------------------------------


@dataclass(frozen=True)
class BoostParams:
    """Tree-growing settings shared by the guest's split finding and the estimator."""

    n_trees: int = 10
    max_depth: int = 3
    learning_rate: float = 0.3
    n_bins: int = 32
    l2: float = 1.0
    min_child_weight: float = 1.0
    min_samples_leaf: int = 1

    def __post_init__(self) -> None:
        if self.n_trees < 1 or self.max_depth < 1 or self.min_samples_leaf < 1:
            raise ValueError("n_trees, max_depth and min_samples_leaf must be >= 1")
        if not 2 <= self.n_bins <= 256:
            raise ValueError(f"n_bins must be in 2..256, got {self.n_bins}")
        if not (self.learning_rate > 0 and self.l2 >= 0 and self.min_child_weight >= 0):
            raise ValueError("need learning_rate > 0, l2 >= 0 and min_child_weight >= 0")


@dataclass(frozen=True)
class GradientPacker:
    """One plaintext per sample holding ``g + 1``, ``h`` (fixed point) and a count of 1, in fields
    wide enough for the sum over ``n_samples`` samples (see the module docstring)."""

    n_samples: int
    frac_bits: int = FRAC_BITS

    def __post_init__(self) -> None:
        if self.n_samples < 1 or not 8 <= self.frac_bits <= 56:
            raise ValueError("need n_samples >= 1 and 8 <= frac_bits <= 56")
        if self.g_bits > 63:  # sums are exact in int64
            raise ValueError(f"gradient sums of {self.n_samples} samples need {self.g_bits} > 63 bits: use fewer frac_bits")

    @property
    def g_max(self) -> int:
        """The largest encoded ``g + 1`` of one sample (``g = 1``)."""
        return 2 << self.frac_bits

    @property
    def h_max(self) -> int:
        """The largest encoded ``h`` of one sample (``h = 1/4``)."""
        return 1 << (self.frac_bits - 2)

    @property
    def count_bits(self) -> int:
        return self.n_samples.bit_length()

    @property
    def h_bits(self) -> int:
        return (self.n_samples * self.h_max).bit_length()

    @property
    def g_bits(self) -> int:
        return (self.n_samples * self.g_max).bit_length()

    @property
    def width(self) -> int:
        """``W``: bits of one packed (summed) sample."""
        return self.g_bits + self.h_bits + self.count_bits

    def slots(self, plaintext_bits: int) -> int:
        """``K``: packed sums per compressed plaintext (``K W <= plaintext_bits``, below ``n``)."""
        return plaintext_bits // self.width

    @property
    def unit(self) -> float:
        """The value of one fixed-point step, ``2^-f``."""
        return 2.0**-self.frac_bits

    def quantize(self, g: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``round(g 2^f)`` and ``round(h 2^f)`` (int64) for ``g`` in ``[-1, 1]``, ``h`` in ``[0, 1/4]``."""
        g, h = np.asarray(g, dtype=np.float64), np.asarray(h, dtype=np.float64)
        if g.shape != h.shape or g.ndim != 1 or g.size > self.n_samples:
            raise ValueError(f"need g and h of equal length <= {self.n_samples}")
        if not (np.all(np.abs(g) <= 1.0) and np.all((h >= 0.0) & (h <= 0.25))):
            raise ValueError("g must lie in [-1, 1] and h in [0, 1/4] (and neither be NaN)")
        scale = float(1 << self.frac_bits)
        return np.rint(g * scale).astype(np.int64), np.rint(h * scale).astype(np.int64)

    def pack(self, g: np.ndarray, h: np.ndarray) -> list[int]:
        """One plaintext per sample: ``(round(g 2^f) + 2^f) << (Wh + Wc) | round(h 2^f) << Wc | 1``."""
        g_int, h_int = self.quantize(g, h)
        offset, g_shift, h_shift = 1 << self.frac_bits, self.h_bits + self.count_bits, self.count_bits
        return [((a + offset) << g_shift) | (b << h_shift) | 1 for a, b in zip(g_int.tolist(), h_int.tolist())]

    def unpack(self, sums: Sequence[int]) -> Sums:
        """The :class:`Sums` of summed plaintexts (the offset removed); refuses fields no
        ``n_samples`` samples can produce (a corrupted or foreign ciphertext)."""
        count_mask, h_mask = (1 << self.count_bits) - 1, (1 << self.h_bits) - 1
        g_shift = self.h_bits + self.count_bits
        fields = np.empty((3, len(sums)), dtype=np.int64)
        for i, value in enumerate(sums):
            value = int(value)
            c, h_sum, g_sum = value & count_mask, (value >> self.count_bits) & h_mask, value >> g_shift
            if c > self.n_samples or h_sum > c * self.h_max or g_sum > c * self.g_max:
                raise ProtocolError("a packed gradient sum does not decode: corrupted or not built from our gradients")
            fields[:, i] = g_sum - (c << self.frac_bits), h_sum, c
        return Sums(*fields)

    def split_slots(self, plaintexts: Sequence[int], slots: int, count: int) -> list[int]:
        """The first ``count`` packed sums of compressed plaintexts (slot 0 in the top bits)."""
        width, mask = self.width, (1 << self.width) - 1
        out: list[int] = []
        for value in plaintexts:
            value = int(value)
            if value >> (slots * width):
                raise ProtocolError("a compressed histogram does not decode: corrupted or not built from our gradients")
            out.extend((value >> (width * (slots - 1 - j))) & mask for j in range(slots))
        if len(out) < count:
            raise ProtocolError(f"compressed histograms hold {len(out)} sums, expected {count}")
        return out[:count]


@dataclass(frozen=True)
class Sums:
    """Per candidate, over the samples going left: sums of ``round(g 2^f)`` and ``round(h 2^f)``
    and the count (int64). Whoever sums a set of samples gets the same integers, so equal
    partitions give equal gains, and a sibling's sums (parent minus child) are exact."""

    grad: np.ndarray
    hess: np.ndarray
    count: np.ndarray

    def __sub__(self, other: Sums) -> Sums:
        return Sums(self.grad - other.grad, self.hess - other.hess, self.count - other.count)


def bin_thresholds(column: np.ndarray, n_bins: int) -> np.ndarray:
    """scikit-learn's ``HistGradientBoosting`` thresholds: midpoints of the distinct values if there
    are at most ``n_bins``, else the ``n_bins``-quantiles; ``x`` falls in bucket ``b`` iff
    ``t_(b-1) < x <= t_b``."""
    distinct = np.unique(column)
    if distinct.size <= 1:
        return np.empty(0)
    if distinct.size <= n_bins:
        return (distinct[:-1] + distinct[1:]) / 2.0
    percentiles = np.linspace(0.0, 100.0, n_bins + 1)[1:-1]
    return np.unique(np.percentile(column, percentiles, method="averaged_inverted_cdf"))


def bin_features(X: np.ndarray, n_bins: int, seed: int | np.random.SeedSequence | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Bucket indices, shape ``(features, samples)`` (uint8), and each feature's thresholds."""
    sample = X
    if X.shape[0] > _BINNING_SUBSAMPLE:
        sample = X[np.random.default_rng(seed).choice(X.shape[0], _BINNING_SUBSAMPLE, replace=False)]
    thresholds = [bin_thresholds(sample[:, f], n_bins) for f in range(X.shape[1])]
    bins = np.empty((X.shape[1], X.shape[0]), dtype=np.uint8)
    for f, t in enumerate(thresholds):
        bins[f] = np.searchsorted(t, X[:, f], side="left")
    return bins, thresholds


def candidate_sums(bins: np.ndarray, sizes: np.ndarray, g_int: np.ndarray, h_int: np.ndarray, rows: np.ndarray) -> Sums:
    """In the clear: for every feature ``f`` and bucket ``b < sizes[f] - 1`` (feature-major), the
    sums over ``rows`` with bucket ``<= b`` of quantized ``g`` and ``h`` (exact int64 sums)."""
    if not sizes.size:
        return Sums(*np.empty((3, 0), dtype=np.int64))
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    flat = (bins[:, rows] + starts[:, None]).ravel()
    total = int(sizes.sum())
    histogram = np.zeros((3, total), dtype=np.int64)
    for k, weights in enumerate((g_int[rows], h_int[rows], np.ones(rows.size, dtype=np.int64))):
        np.add.at(histogram[k], flat, np.tile(weights, sizes.size))
    cumulative = np.cumsum(histogram, axis=1)
    before = np.concatenate((np.zeros((3, 1), dtype=np.int64), cumulative), axis=1)[:, starts]
    keep = np.ones(total, dtype=bool)
    keep[starts + sizes - 1] = False  # the last bucket sends every sample left: no split
    return Sums(*(cumulative - np.repeat(before, sizes, axis=1))[:, keep])  # per-feature running sums


def split_gains(left: Sums, node: Node, params: BoostParams, unit: float) -> np.ndarray:
    """XGBoost's gain of each candidate of ``node`` (``unit``: one fixed-point step); ``-inf``
    where a child would be too small."""
    g_left, h_left = left.grad * unit, left.hess * unit
    g_right, h_right, n_right = node.grad - g_left, node.hess - h_left, node.count - left.count
    l2 = params.l2
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = g_left**2 / (h_left + l2) + g_right**2 / (h_right + l2) - node.grad**2 / (node.hess + l2)
    valid = ((left.count >= params.min_samples_leaf) & (n_right >= params.min_samples_leaf)
             & (h_left >= params.min_child_weight) & (h_right >= params.min_child_weight))
    return np.where(valid & np.isfinite(gain), gain, -np.inf)


def sigmoid(scores: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * scores))  # no overflow for large |scores|


# --- payload validation ---------------------------------------------------------------------------


def _meta(payload: object, kind: str, **expected: int) -> dict[str, Any]:
    """The payload's metadata, after checking its kind and integer fields such as the tree."""
    if not isinstance(payload, Payload) or not isinstance(payload.meta, dict):
        raise ProtocolError(f"expected a {kind} Payload, got {type(payload).__name__}")
    meta = payload.meta
    if meta.get("kind") != kind:
        raise ProtocolError(f"expected a {kind} payload, got kind {meta.get('kind')!r}")
    for key, value in expected.items():
        if _int(meta, key) != value:
            raise ProtocolError(f"{kind}: {key} is {meta[key]}, expected {value}")
    return meta


def _int(meta: dict[str, Any], key: str, low: int = 0, high: int | None = None) -> int:
    value = meta.get(key)
    if type(value) is not int or value < low or (high is not None and value > high):
        raise ProtocolError(f"field {key!r} must be an integer in [{low}, {high if high is not None else 'inf'}], got {value!r}")
    return value


def _int_list(meta: dict[str, Any], key: str) -> list[int]:
    value = meta.get(key)
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise ProtocolError(f"field {key!r} must be a list of integers")
    return value


def _array(payload: Payload, name: str, dtype: type, shape: tuple[int | None, ...]) -> np.ndarray:
    """A named array of the given dtype and shape (``None``: any length)."""
    raw = payload.arrays.get(name)
    if raw is None:
        raise ProtocolError(f"{payload.meta.get('kind')}: array {name!r} is missing")
    array = np.asarray(raw)
    if array.dtype != dtype or array.ndim != len(shape) or any(
            want is not None and got != want for got, want in zip(array.shape, shape)):
        raise ProtocolError(f"{payload.meta.get('kind')}: array {name!r} must be {np.dtype(dtype).name} "
                            f"of shape {shape}, got {array.dtype.name} {array.shape}")
    return array


def _ciphertexts(public: PublicKey, payload: Payload, name: str, rows: int) -> list[mpz]:
    array = _array(payload, name, np.uint8, (rows, public.ciphertext_bytes))
    try:
        return public.from_array(array)
    except PaillierError as exc:
        raise ProtocolError(f"{payload.meta.get('kind')}: {exc}") from None


def _bits(payload: Payload, name: str, shape: tuple[int, ...]) -> np.ndarray:
    array = _array(payload, name, np.uint8, shape)
    if array.size and array.max() > 1:
        raise ProtocolError(f"{payload.meta.get('kind')}: {name!r} must hold 0/1 flags")
    return array.astype(bool)


# --- ciphertext arithmetic on all cores --------------------------------------------------------------


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _horner(groups: list[list[mpz]], slots: int, shift: mpz, modulus: mpz) -> list[mpz]:
    acc = [group[0] for group in groups]
    for j in range(1, slots):
        acc = gmpy2.powmod_base_list(acc, shift, modulus)  # the W squarings, without the GIL
        acc = [a * group[j] % modulus if j < len(group) else a for a, group in zip(acc, groups)]
    return acc


def compress(public: PublicKey, groups: list[list[mpz]], slots: int, width: int, obfuscators: list[mpz]) -> list[mpz]:
    """Horner's rule on each group of at most ``slots`` ciphertexts ``c_j``:
    ``Dec(out) = sum_j m_j 2^(W (K-1-j))`` (short groups zero-padded at the end), then each
    re-randomized by one of ``obfuscators`` (a fresh ``Enc(0)``), so the key holder cannot relate
    the result's randomness to the summands'. The groups are shared among threads, one per core."""
    if len(obfuscators) != len(groups):
        raise ValueError(f"{len(obfuscators)} obfuscators for {len(groups)} groups")
    if not groups:
        return []
    modulus, shift = public.modulus, mpz(1) << width
    workers = min(_cores(), len(groups))
    step = -(-len(groups) // workers)
    with ThreadPoolExecutor(workers) as pool:
        parts = pool.map(lambda i: _horner(groups[i : i + step], slots, shift, modulus), range(0, len(groups), step))
        acc = [value for part in parts for value in part]
    return [a * r % modulus for a, r in zip(acc, obfuscators)]


# --- the guest ----------------------------------------------------------------------------------------


@dataclass
class Node:
    """A tree node on the guest. A host's split is only ``(owner, record)``: its threshold stays
    with the host."""

    depth: int
    grad: float
    hess: float
    count: int
    owner: int = GUEST  # GUEST or the index of the host whose feature splits the node
    feature: int = -1  # guest splits only
    threshold: float = float("nan")  # guest splits only
    record: int = -1  # host splits: the id in the host's lookup table
    parent: int = -1
    left: int = -1
    right: int = -1
    weight: float = 0.0  # leaves: the shrunk leaf value

    @property
    def is_leaf(self) -> bool:
        return self.left < 0


def _json_node(node: Node) -> dict[str, Any]:
    """A node as JSON values: the threshold of a host split or a leaf (NaN) becomes null."""
    fields = asdict(node)
    if np.isnan(fields["threshold"]):
        fields["threshold"] = None
    return fields


@dataclass
class _Choice:
    """The best split of a node: whose, which candidate (index in that party's list), and how
    many samples go left (a host's answer must match it)."""

    owner: int
    candidate: int
    gain: float
    count: int


class Guest:
    """The active party: labels, its own features and the Paillier private key; grows the trees.

    Step methods, in order: :meth:`setup` once; per tree :meth:`start_tree`, then while
    :meth:`histogram_request` returns a request: :meth:`choose_splits` with every host's
    histograms, :meth:`apply_splits` with every host's split answer.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, n_hosts: int, params: BoostParams,
                 key_bits: int = 2048, seed: int | np.random.SeedSequence | None = None) -> None:
        X, y = _rows(X, [])[0], np.asarray(y, dtype=np.float64)
        if y.shape != (X.shape[0],) or not np.all((y == 0) | (y == 1)) or y.min() == y.max():
            raise ValueError("y must hold one 0/1 label per row, both classes present")
        self.params, self.n_hosts = params, n_hosts
        self.n_samples = X.shape[0]
        self._y = y
        self._bins, self._thresholds = bin_features(X, params.n_bins, seed)
        self._sizes = np.array([t.size + 1 for t in self._thresholds], dtype=np.int64)
        self._candidates = [(f, b) for f, t in enumerate(self._thresholds) for b in range(t.size)]
        self.public, self._private = generate_keypair(key_bits)
        self.packer = GradientPacker(self.n_samples)
        self.slots = self.packer.slots(self.public.plaintext_bits)
        if self.slots < 1:
            raise ValueError(f"a {key_bits}-bit key cannot hold one packed gradient sum of {self.n_samples} samples")
        rate = self._y.mean()
        self.base_score = float(np.log(rate / (1.0 - rate)))
        self.trees: list[list[Node]] = []
        self._scores = np.full(self.n_samples, self.base_score)
        self._obfuscators: list[mpz] = []
        self._host_candidates: list[int | None] = [None] * n_hosts
        self._tree: list[Node] = []
        self._positions = np.zeros(self.n_samples, dtype=np.int64)
        self._g = self._h = np.empty(0, dtype=np.int64)  # this tree's quantized gradients
        self._frontier: list[int] = []
        self._compute: list[int] = []
        self._histograms: dict[int, list[Sums]] = {}
        self._chosen: dict[int, _Choice] = {}
        self._host_splits: list[list[int]] = []
        self.decryptions = 0  # ciphertexts decrypted so far

    # --- steps ---------------------------------------------------------------------------------

    def setup(self) -> Payload:
        """The public key and the packing layout, for every host."""
        return Payload(meta={"kind": SETUP, "public_key": json.loads(self.public.to_json()),
                             "n_samples": self.n_samples, "frac_bits": self.packer.frac_bits})

    def start_tree(self) -> Payload:
        """Gradients of the current model, packed and encrypted, for every host."""
        if len(self.trees) >= self.params.n_trees:
            raise RuntimeError(f"all {self.params.n_trees} trees are grown")
        p = sigmoid(self._scores)
        g, h = p - self._y, np.clip(p * (1.0 - p), 0.0, 0.25)
        self._g, self._h = self.packer.quantize(g, h)
        root = self._node(0, np.ones(self.n_samples, dtype=bool), -1)
        self._tree, self._positions = [root], np.zeros(self.n_samples, dtype=np.int64)
        self._frontier = [0] if self._splittable(root) else []
        self._histograms = {}
        ciphertexts = self.public.encrypt(self.packer.pack(g, h), self._take_obfuscators())
        return Payload(meta={"kind": GRADIENTS, "tree": len(self.trees)},
                       arrays={"gradients": self.public.to_array(ciphertexts)})

    def histogram_request(self) -> Payload | None:
        """Which node each sample is in, and the nodes whose histograms hosts must build; ``None``
        when the tree is finished (its leaves are then set and the model updated)."""
        if not self._frontier:
            self._finish_tree()
            return None
        frontier = set(self._frontier)
        self._compute = []
        for index in self._frontier:
            node = self._tree[index]
            sibling = self._sibling(index)
            if sibling < 0 or sibling not in frontier:
                self._compute.append(index)
            else:
                other = self._tree[sibling]
                if node.count < other.count or (node.count == other.count and index < sibling):
                    self._compute.append(index)  # the sibling is the parent's minus this one
        positions = np.where(np.isin(self._positions, self._frontier), self._positions, -1).astype(np.int32)
        return Payload(meta={"kind": HISTOGRAM_REQUEST, "tree": len(self.trees), "depth": self._depth,
                             "nodes": list(self._frontier), "compute": list(self._compute)},
                       arrays={"positions": positions})

    def decrypt_histograms(self, host: int, payload: Payload) -> dict[int, Sums]:
        """Validate, decrypt and unpack one host's histograms: node -> its candidates' left sums."""
        meta = _meta(payload, HISTOGRAMS, tree=len(self.trees), depth=self._depth)
        if _int_list(meta, "nodes") != self._compute:
            raise ProtocolError(f"host {host} sent histograms for nodes {meta['nodes']}, asked for {self._compute}")
        known = self._host_candidates[host]
        candidates = _int(meta, "candidates", 0, 1 << 24)
        if known is not None and candidates != known:
            raise ProtocolError(f"host {host} changed its candidate count from {known} to {candidates}")
        slots = min(self.slots, max(candidates, 1))  # the host packs no more slots than candidates
        _int(meta, "slots", slots, slots)
        per_node = -(-candidates // slots)
        ciphertexts = _ciphertexts(self.public, payload, "histograms", per_node * len(self._compute))
        plaintexts = self._private.decrypt(ciphertexts)
        self.decryptions += len(plaintexts)
        out = {}
        for k, index in enumerate(self._compute):
            packed = self.packer.split_slots(plaintexts[k * per_node : (k + 1) * per_node], slots, candidates)
            sums = self.packer.unpack(packed)
            if sums.count.size and sums.count.max() > self._tree[index].count:
                raise ProtocolError(f"host {host}: a candidate of node {index} counts more samples than the node holds")
            out[index] = sums
        self._host_candidates[host] = candidates
        return out

    def choose_splits(self, replies: Sequence[Payload]) -> list[Payload]:
        """Best split of every frontier node over all parties' candidates; one split request per
        host (possibly empty) naming the chosen candidates of that host."""
        if len(replies) != self.n_hosts:
            raise ProtocolError(f"expected histograms from {self.n_hosts} hosts, got {len(replies)}")
        decrypted = [self.decrypt_histograms(host, reply) for host, reply in enumerate(replies)]
        for index in self._compute:
            self._histograms[index] = [sums[index] for sums in decrypted]
        for index in set(self._frontier) - set(self._compute):
            parent, sibling = self._tree[index].parent, self._sibling(index)
            self._histograms[index] = [p - s for p, s in zip(self._histograms[parent], self._histograms[sibling])]
        for index in self._frontier:
            self._histograms.pop(self._tree[index].parent, None)  # children done: the parent is not needed
        self._chosen, self._host_splits = {}, [[] for _ in range(self.n_hosts)]
        for index in self._frontier:
            choice = self._best_split(index)
            if choice is None:
                continue
            self._chosen[index] = choice
            if choice.owner != GUEST:
                self._host_splits[choice.owner].append(index)
        return [Payload(meta={"kind": SPLIT_REQUEST, "tree": len(self.trees), "depth": self._depth,
                              "splits": [[index, self._chosen[index].candidate] for index in nodes]})
                for nodes in self._host_splits]

    def apply_splits(self, replies: Sequence[Payload]) -> None:
        """Split the chosen nodes: guest splits by its own thresholds, host splits by the hosts'
        answers (checked against the counts the histograms gave); the children form the next layer."""
        if len(replies) != self.n_hosts:
            raise ProtocolError(f"expected split answers from {self.n_hosts} hosts, got {len(replies)}")
        lefts: dict[int, np.ndarray] = {}
        records: dict[int, int] = {}
        for host, (reply, nodes) in enumerate(zip(replies, self._host_splits)):
            meta = _meta(reply, SPLIT_RESULT, tree=len(self.trees), depth=self._depth)
            ids = _int_list(meta, "records")
            if len(ids) != len(nodes) or any(r < 0 for r in ids):
                raise ProtocolError(f"host {host} sent {len(ids)} record ids for {len(nodes)} splits")
            left = _bits(reply, "left", (len(nodes), self.n_samples))
            for index, record, goes_left in zip(nodes, ids, left):
                inside = self._positions == index
                if np.any(goes_left & ~inside) or int(goes_left.sum()) != self._chosen[index].count:
                    raise ProtocolError(f"host {host}'s split of node {index} does not match its histogram")
                records[index], lefts[index] = record, goes_left
        frontier = []
        for index, choice in self._chosen.items():
            node = self._tree[index]
            node.owner, node.record = choice.owner, records.get(index, -1)
            if choice.owner == GUEST:
                feature, bucket = self._candidates[choice.candidate]
                node.feature, node.threshold = feature, float(self._thresholds[feature][bucket])
                lefts[index] = (self._positions == index) & (self._bins[feature] <= bucket)
            right = (self._positions == index) & ~lefts[index]
            node.left, node.right = len(self._tree), len(self._tree) + 1
            for rows in (lefts[index], right):
                child = self._node(node.depth + 1, rows, index)
                self._positions[rows] = len(self._tree)
                if self._splittable(child):
                    frontier.append(len(self._tree))
                self._tree.append(child)
        self._frontier = frontier
        log.debug("tree %d depth %d: %d splits (%d on hosts)", len(self.trees), self._depth,
                  len(self._chosen), sum(map(len, self._host_splits)))

    def model(self) -> dict[str, Any]:
        """The guest's part of the model: every tree's nodes (host splits as record ids only)."""
        return {"role": "guest", "base_score": self.base_score,
                "trees": [[_json_node(node) for node in tree] for tree in self.trees]}

    def prediction(self, X: np.ndarray) -> GuestPrediction:
        """Start routing the guest's rows ``X`` through the trees."""
        if X.ndim != 2 or X.shape[1] != len(self._thresholds):
            raise ValueError(f"the guest's rows must have {len(self._thresholds)} features")
        return GuestPrediction(self.trees, X, self.n_hosts, self.base_score)

    # --- internals ------------------------------------------------------------------------------

    @property
    def _depth(self) -> int:
        return self._tree[self._frontier[0]].depth if self._frontier else 0

    def _sibling(self, index: int) -> int:
        """The other child of the node's parent; -1 for the root."""
        if index == 0:
            return -1
        parent = self._tree[self._tree[index].parent]
        return parent.right if parent.left == index else parent.left

    def _node(self, depth: int, rows: np.ndarray, parent: int) -> Node:
        """A node over ``rows`` (a mask), its totals from the quantized gradients as hosts see them."""
        unit = self.packer.unit
        return Node(depth, int(self._g[rows].sum()) * unit, int(self._h[rows].sum()) * unit, int(rows.sum()),
                    parent=parent)

    def _splittable(self, node: Node) -> bool:
        p = self.params
        return (node.depth < p.max_depth and node.count >= 2 * p.min_samples_leaf
                and node.hess >= 2 * p.min_child_weight)

    def _best_split(self, index: int) -> _Choice | None:
        """The candidate of largest positive gain (ties: the guest's, then lower host index)."""
        node = self._tree[index]
        rows = np.flatnonzero(self._positions == index)
        options = [(GUEST, candidate_sums(self._bins, self._sizes, self._g, self._h, rows))]
        options += list(enumerate(self._histograms[index]))
        best: _Choice | None = None
        for owner, sums in options:
            if not sums.count.size:
                continue
            gains = split_gains(sums, node, self.params, self.packer.unit)
            j = int(np.argmax(gains))
            if gains[j] > 0.0 and (best is None or gains[j] > best.gain):
                best = _Choice(owner, j, float(gains[j]), int(sums.count[j]))
        return best

    def _finish_tree(self) -> None:
        lr, l2 = self.params.learning_rate, self.params.l2
        for node in self._tree:
            if node.is_leaf:
                node.weight = -lr * node.grad / (node.hess + l2)
        self._scores += np.array([node.weight for node in self._tree])[self._positions]
        self.trees.append(self._tree)
        self._histograms = {}
        log.info("tree %d: %d nodes, %d split on hosts", len(self.trees) - 1, len(self._tree),
                 sum(1 for node in self._tree if not node.is_leaf and node.owner != GUEST))

    def _take_obfuscators(self) -> list[mpz]:
        """This tree's obfuscators, from batches covering several trees (one start-up of the
        worker processes per batch)."""
        n = self.n_samples
        if len(self._obfuscators) < n:
            trees_left = self.params.n_trees - len(self.trees)
            count = max(n, min(trees_left * n, _OBFUSCATOR_BATCH // n * n))
            self._obfuscators = self.public.obfuscators(count)
        taken, self._obfuscators = self._obfuscators[:n], self._obfuscators[n:]
        return taken


class GuestPrediction:
    """Routes rows through all trees a layer at a time: through the guest's nodes locally; for host
    nodes, :meth:`requests` asks each host about (record, sample) pairs and :meth:`receive` moves
    the samples by the answers. Done when :meth:`requests` returns ``None``."""

    def __init__(self, trees: list[list[Node]], X: np.ndarray, n_hosts: int, base_score: float) -> None:
        self._trees, self._X, self.n_hosts, self._base = trees, X, n_hosts, base_score
        self._positions = np.zeros((len(trees), X.shape[0]), dtype=np.int64)
        self._asked: list[list[tuple[int, int, np.ndarray]]] = []

    def requests(self) -> list[Payload] | None:
        """Per host, the (record, sample) pairs it must answer; ``None`` when all rows are in leaves."""
        self._advance_guest_nodes()
        self._asked = [[] for _ in range(self.n_hosts)]
        for t, tree in enumerate(self._trees):
            for index, node in enumerate(tree):
                if not node.is_leaf and node.owner != GUEST:
                    samples = np.flatnonzero(self._positions[t] == index)
                    if samples.size:
                        self._asked[node.owner].append((t, index, samples))
        if not any(self._asked):
            return None
        out = []
        for asked in self._asked:
            records = [np.full(s.size, self._trees[t][i].record, dtype=np.int64) for t, i, s in asked]
            samples = [s.astype(np.int64) for _, _, s in asked]
            out.append(Payload(meta={"kind": ROUTE_REQUEST, "n_samples": self._X.shape[0]},
                               arrays={"records": np.concatenate(records or [np.empty(0, np.int64)]),
                                       "samples": np.concatenate(samples or [np.empty(0, np.int64)])}))
        return out

    def receive(self, replies: Sequence[Payload]) -> None:
        """Move the asked samples one level down by the hosts' answers."""
        if len(replies) != self.n_hosts:
            raise ProtocolError(f"expected routing answers from {self.n_hosts} hosts, got {len(replies)}")
        answers = []
        for reply, asked in zip(replies, self._asked):  # every answer checked before any is used
            queries = sum(s.size for _, _, s in asked)
            _meta(reply, ROUTE_RESULT, queries=queries)
            answers.append(_bits(reply, "left", (queries,)))
        for left, asked in zip(answers, self._asked):
            start = 0
            for t, index, samples in asked:
                node = self._trees[t][index]
                goes_left = left[start : start + samples.size]
                self._positions[t, samples] = np.where(goes_left, node.left, node.right)
                start += samples.size
        self._asked = []

    def scores(self) -> np.ndarray:
        """Raw scores (log-odds) once every row is in a leaf."""
        if any(not tree[index].is_leaf for t, tree in enumerate(self._trees) for index in np.unique(self._positions[t])):
            raise RuntimeError("rows are still waiting for hosts' answers")
        total = np.full(self._X.shape[0], self._base)
        for t, tree in enumerate(self._trees):
            total += np.array([node.weight for node in tree])[self._positions[t]]
        return total

    def _advance_guest_nodes(self) -> None:
        for t, tree in enumerate(self._trees):
            for index, node in enumerate(tree):  # children come after parents: one pass suffices
                if not node.is_leaf and node.owner == GUEST:
                    samples = np.flatnonzero(self._positions[t] == index)
                    goes_left = self._X[samples, node.feature] <= node.threshold
                    self._positions[t, samples] = np.where(goes_left, node.left, node.right)


# --- a host -------------------------------------------------------------------------------------------


class Host:
    """A passive party: features only. Builds encrypted histograms and keeps its split
    thresholds in a private lookup table (``record id -> (feature, threshold)``).

    Step methods: :meth:`setup`; per tree :meth:`receive_gradients`, then per layer
    :meth:`histograms` and :meth:`split`; for prediction :meth:`route`.
    """

    def __init__(self, X: np.ndarray, n_bins: int = 32, seed: int | np.random.SeedSequence | None = None) -> None:
        X = _rows(X, [])[0]
        self.n_samples, self.n_features = X.shape
        self._bins, self._thresholds = bin_features(X, n_bins, seed)
        self._candidates = [(f, b) for f, t in enumerate(self._thresholds) for b in range(t.size)]
        self._records: list[tuple[int, float]] = []  # never sent: the guest knows record ids only
        self.public: PublicKey | None = None
        self.packer: GradientPacker | None = None
        self.slots = 0
        self._tree = -1
        self._gradients: list[mpz] = []
        self._obfuscators: list[mpz] = []
        self._order: list[int] = []
        self._depth = -1
        self._positions = np.empty(0, dtype=np.int32)
        self._nodes: set[int] = set()

    def setup(self, payload: Payload) -> None:
        """Take the guest's public key and packing layout."""
        meta = _meta(payload, SETUP, n_samples=self.n_samples)
        try:
            public = PublicKey.from_json(json.dumps(meta.get("public_key")))
            packer = GradientPacker(self.n_samples, _int(meta, "frac_bits", 8, 64))
        except (PaillierError, ValueError, TypeError) as exc:
            raise ProtocolError(f"{SETUP}: {exc}") from None
        if packer.slots(public.plaintext_bits) < 1:
            raise ProtocolError(f"{SETUP}: the key is too small for the packing layout")
        self.public, self.packer, self.slots = public, packer, packer.slots(public.plaintext_bits)
        self._tree, self._obfuscators = -1, []

    def receive_gradients(self, payload: Payload) -> None:
        """The next tree's encrypted packed gradients; draws the tree's candidate order."""
        public = self._public()
        _meta(payload, GRADIENTS, tree=self._tree + 1)
        self._gradients = _ciphertexts(public, payload, "gradients", self.n_samples)
        self._tree += 1
        self._order = list(range(len(self._candidates)))
        _SECURE.shuffle(self._order)
        self._depth = -1

    def histograms(self, payload: Payload) -> Payload:
        """Encrypted cumulative bucket sums of every candidate of the requested nodes, compressed."""
        public = self._public()
        meta = _meta(payload, HISTOGRAM_REQUEST, tree=self._tree)
        depth = _int(meta, "depth", self._depth + 1, 1 << 16)
        nodes, compute = _int_list(meta, "nodes"), _int_list(meta, "compute")
        positions = _array(payload, "positions", np.int32, (self.n_samples,))
        if not set(compute) <= set(nodes) or len(set(compute)) != len(compute):
            raise ProtocolError(f"{HISTOGRAM_REQUEST}: nodes to compute {compute} are not distinct nodes of {nodes}")
        if not set(np.unique(positions).tolist()) <= set(nodes) | {-1}:
            raise ProtocolError(f"{HISTOGRAM_REQUEST}: positions name nodes outside {nodes}")
        self._depth, self._positions, self._nodes = depth, positions, set(nodes)
        started = time.perf_counter()
        count = len(self._candidates)
        slots = min(self.slots, max(count, 1))
        groups: list[list[mpz]] = []
        for index in compute:
            cumulative = self._cumulative(np.flatnonzero(positions == index))
            shuffled = [cumulative[j] for j in self._order]
            groups += [shuffled[i : i + slots] for i in range(0, count, slots)]
        packed = compress(public, groups, slots, self._packer().width, self._take_obfuscators(len(groups)))
        log.debug("host: %d nodes x %d candidates -> %d ciphertexts in %.2f s", len(compute), count,
                  len(packed), time.perf_counter() - started)
        return Payload(meta={"kind": HISTOGRAMS, "tree": self._tree, "depth": depth, "nodes": compute,
                             "candidates": count, "slots": slots},
                       arrays={"histograms": public.to_array(packed)})

    def split(self, payload: Payload) -> Payload:
        """Record the chosen candidates in the lookup table; say which samples of each node go left."""
        meta = _meta(payload, SPLIT_REQUEST, tree=self._tree, depth=self._depth)
        splits = meta.get("splits")
        if not isinstance(splits, list) or not all(
                isinstance(s, list) and len(s) == 2 and all(type(v) is int for v in s) for s in splits):
            raise ProtocolError(f"{SPLIT_REQUEST}: splits must be [node, candidate] pairs")
        if len({node for node, _ in splits}) != len(splits):
            raise ProtocolError(f"{SPLIT_REQUEST}: a node is split twice")
        for node, candidate in splits:
            if node not in self._nodes or not 0 <= candidate < len(self._candidates):
                raise ProtocolError(f"{SPLIT_REQUEST}: node {node} or candidate {candidate} was not offered")
        left = np.zeros((len(splits), self.n_samples), dtype=np.uint8)
        records = []
        for k, (node, candidate) in enumerate(splits):
            feature, bucket = self._canonical(node, *self._candidates[self._order[candidate]])
            records.append(len(self._records))
            self._records.append((feature, float(self._thresholds[feature][bucket])))
            left[k] = (self._positions == node) & (self._bins[feature] <= bucket)
        return Payload(meta={"kind": SPLIT_RESULT, "tree": self._tree, "depth": self._depth, "records": records},
                       arrays={"left": left})

    def _canonical(self, node: int, feature: int, bucket: int) -> tuple[int, int]:
        """The first ``(feature, bucket)`` that cuts the node's samples exactly as the chosen one.

        Candidates that split a node the same way tie in gain, and the guest breaks ties in the
        tree's random candidate order; taking the lowest feature and threshold among them (as
        scikit-learn does) keeps the model independent of that order. ``bucket b`` sends left
        exactly the rows of bin ``<= b``, so feature ``f`` reproduces the partition iff every left
        row's bin is below every right row's: then ``b = max(left bins)``.
        """
        in_node = self._bins[:, self._positions == node]
        goes_left = in_node[feature] <= bucket
        left, right = in_node[:, goes_left], in_node[:, ~goes_left]
        highest_left = left.max(axis=1).astype(np.int64)
        lowest_right = right.min(axis=1).astype(np.int64) if right.shape[1] else np.full(len(in_node), 1 << 16)
        first = int(np.flatnonzero(highest_left < lowest_right)[0])  # ``feature`` itself qualifies
        return first, int(highest_left[first])

    def route(self, payload: Payload, X: np.ndarray) -> Payload:
        """For prediction on this host's rows ``X``: whether each asked sample goes left at each
        asked record."""
        meta = _meta(payload, ROUTE_REQUEST, n_samples=X.shape[0])
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"the host's rows must have {self.n_features} features")
        records = _array(payload, "records", np.int64, (None,))
        samples = _array(payload, "samples", np.int64, (records.size,))
        if records.size and (records.min() < 0 or records.max() >= len(self._records)):
            raise ProtocolError(f"{ROUTE_REQUEST}: unknown record id")
        if samples.size and (samples.min() < 0 or samples.max() >= meta["n_samples"]):
            raise ProtocolError(f"{ROUTE_REQUEST}: sample index out of range")
        table = np.array(self._records, dtype=np.float64).reshape(-1, 2)
        features, thresholds = table[records, 0].astype(np.int64), table[records, 1]
        left = (X[samples, features] <= thresholds).astype(np.uint8)
        return Payload(meta={"kind": ROUTE_RESULT, "queries": int(records.size)}, arrays={"left": left})

    def model(self) -> dict[str, Any]:
        """This host's lookup table, ``record id -> (feature column, threshold)``: it stays with the host."""
        return {"role": "host", "records": [[feature, threshold] for feature, threshold in self._records]}

    @property
    def records(self) -> int:
        """How many splits this host holds (their thresholds never leave it)."""
        return len(self._records)

    def _public(self) -> PublicKey:
        if self.public is None:
            raise RuntimeError("the host has not received the guest's setup")
        return self.public

    def _packer(self) -> GradientPacker:
        assert self.packer is not None
        return self.packer

    def _take_obfuscators(self, count: int) -> list[mpz]:
        """Re-randomizers for ``count`` ciphertexts, from batches computed on all cores."""
        if len(self._obfuscators) < count:
            self._obfuscators += self._public().obfuscators(max(count, _HOST_OBFUSCATOR_BATCH))
        taken, self._obfuscators = self._obfuscators[:count], self._obfuscators[count:]
        return taken

    def _cumulative(self, rows: np.ndarray) -> list[mpz]:
        """``Enc(sum P_i over bucket <= b)`` for every candidate (feature-major): bucket products,
        then running products over the buckets, ``|rows| + B`` multiplications per feature.
        An empty prefix is ``1``, the trivial encryption of 0 (re-randomized by :func:`compress`)."""
        gradients, modulus, one = self._gradients, self._public().modulus, mpz(1)
        row_list = rows.tolist()
        out: list[mpz] = []
        for f, thresholds in enumerate(self._thresholds):
            buckets: list[mpz | None] = [None] * (thresholds.size + 1)
            for i, b in zip(row_list, self._bins[f, rows].tolist()):
                current = buckets[b]
                buckets[b] = gradients[i] if current is None else current * gradients[i] % modulus
            running: mpz | None = None
            for bucket in buckets[:-1]:
                if bucket is not None:
                    running = bucket if running is None else running * bucket % modulus
                out.append(one if running is None else running)
        return out


# --- in-process drivers and the estimator ------------------------------------------------------------------


class HostRole(Protocol):
    """What :func:`train` needs of a host: a :class:`Host`, or a proxy reaching one over a transport."""

    def setup(self, payload: Payload) -> None: ...
    def receive_gradients(self, payload: Payload) -> None: ...
    def histograms(self, payload: Payload) -> Payload: ...
    def split(self, payload: Payload) -> Payload: ...


#: Answers a host's route requests for the rows being scored (``Host.route`` with its rows bound).
Router = Callable[[Payload], Payload]


def train(guest: Guest, hosts: Sequence[HostRole], progress: Callable[[int], None] | None = None) -> None:
    """Run the whole training protocol, one party after another; ``progress(tree)`` after each tree."""
    setup = guest.setup()
    for host in hosts:
        host.setup(setup)
    for tree in range(guest.params.n_trees):
        gradients = guest.start_tree()
        for host in hosts:
            host.receive_gradients(gradients)
        while (request := guest.histogram_request()) is not None:
            split_requests = guest.choose_splits([host.histograms(request) for host in hosts])
            guest.apply_splits([host.split(r) for host, r in zip(hosts, split_requests)])
        if progress is not None:
            progress(tree)


def predict_scores(guest: Guest, guest_X: np.ndarray, routers: Sequence[Router]) -> np.ndarray:
    """Raw scores of the guest's rows ``guest_X``, walking the trees across parties; ``routers[k]``
    answers host ``k`` for the same rows."""
    walk = guest.prediction(guest_X)
    while (requests := walk.requests()) is not None:
        walk.receive([route(r) for route, r in zip(routers, requests)])
    return walk.scores()


class SecureBoost:
    """Vertical SecureBoost for binary classification, every role in this process.

    ``fit(guest_X, y, hosts_X)`` with the guest's features and labels and each host's features
    (rows aligned: row ``i`` is the same sample everywhere). Hyper-parameters as XGBoost's:
    ``l2`` is lambda, ``min_child_weight`` the least hessian sum of a child.
    """

    def __init__(self, n_trees: int = 10, max_depth: int = 3, learning_rate: float = 0.3, n_bins: int = 32,
                 l2: float = 1.0, min_child_weight: float = 1.0, min_samples_leaf: int = 1,
                 key_bits: int = 2048, random_state: int | None = None) -> None:
        self.params = BoostParams(n_trees, max_depth, learning_rate, n_bins, l2, min_child_weight, min_samples_leaf)
        self.key_bits, self.random_state = key_bits, random_state

    def fit(self, guest_X: np.ndarray, y: np.ndarray, hosts_X: Sequence[np.ndarray]) -> SecureBoost:
        guest_X, hosts_X = _rows(guest_X, hosts_X)
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        if y.shape != (guest_X.shape[0],) or self.classes_.size != 2:
            raise ValueError("y must hold one label per row and exactly two classes")
        seeds = np.random.SeedSequence(self.random_state).spawn(1 + len(hosts_X))
        started = time.perf_counter()
        self.guest_ = Guest(guest_X, y == self.classes_[1], len(hosts_X), self.params, self.key_bits, seeds[0])
        self.hosts_ = [Host(X, self.params.n_bins, seed) for X, seed in zip(hosts_X, seeds[1:])]
        train(self.guest_, self.hosts_)
        self.fit_seconds_ = time.perf_counter() - started
        log.info("SecureBoost: %d trees in %.1f s", self.params.n_trees, self.fit_seconds_)
        return self

    def decision_function(self, guest_X: np.ndarray, hosts_X: Sequence[np.ndarray]) -> np.ndarray:
        guest_X, hosts_X = _rows(guest_X, hosts_X)
        routers = [partial(host.route, X=X) for host, X in zip(self.hosts_, hosts_X)]
        return predict_scores(self.guest_, guest_X, routers)

    def predict_proba(self, guest_X: np.ndarray, hosts_X: Sequence[np.ndarray]) -> np.ndarray:
        p = sigmoid(self.decision_function(guest_X, hosts_X))
        return np.column_stack([1.0 - p, p])

    def predict(self, guest_X: np.ndarray, hosts_X: Sequence[np.ndarray]) -> np.ndarray:
        return self.classes_[(self.decision_function(guest_X, hosts_X) > 0).astype(int)]


def _rows(guest_X: np.ndarray, hosts_X: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Float64 2-D arrays of equal row counts without NaN/Inf (missing values are not supported)."""
    arrays = [np.asarray(X, dtype=np.float64) for X in [guest_X, *hosts_X]]
    for X in arrays:
        if X.ndim != 2 or X.shape[0] != arrays[0].shape[0] or not np.isfinite(X).all():
            raise ValueError("every party's X must be 2-D, finite and have the same rows")
    return arrays[0], arrays[1:]
