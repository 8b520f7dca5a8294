"""SecureBoost on scikit-learn's breast cancer data split by columns: fedcrypt against a per-value
python-paillier version of the same algorithm, in one run.

Data: 70/30 stratified train/test split (seed 0); the guest holds the label and the first 10
features, the host the other 20, rows aligned. Model (both, and scikit-learn's
``HistGradientBoostingClassifier`` on the joined data with the matching settings): ``--trees``
trees (default 10) of depth 3, learning rate 0.3, 32 quantile bins, l2 1, min_samples_leaf 20,
min_child_weight 1e-3 (scikit-learn's fixed min_hessian_to_split).

* fedcrypt (``fedcrypt.vertical.secureboost``): g and h packed into one ciphertext per sample,
  ``--bits`` keys (default 2048), randomness on all cores, histograms compressed ~22 per ciphertext;
  every payload goes through fedcrypt's wire encoding (bytes counted). Host compute time is timed
  separately; the guest's is the rest. Its CPU seconds (all threads and worker processes) are
  reported too, since the baseline runs on one core.
* baseline (``phe``, one core, as python-paillier has no parallelism): the same algorithm (same
  bins, cumulative bucket sums, histogram subtraction, split finding and gains), but g and h
  encrypted separately per sample with ``EncryptedNumber`` (fixed precision 2^-32, so sums need no
  exponent alignment), summed with ``+``, and every candidate's two sums decrypted; counts sent in
  the clear, no re-randomization of sums (which favours it), no serialization. It runs
  ``--baseline-trees`` trees (default 3) and its 10-tree time is extrapolated linearly from the
  mean time per tree (plus key generation), and labelled so.

Timings are wall clock on a machine other jobs may share; compare the ratio from the same run.
"""

from __future__ import annotations

import argparse
import resource
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import phe
from common import RESULTS_DIR, command_line, machine_info, write_json
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from fedcrypt.core.messages import Payload, StageIns, StageRes, from_bytes, to_bytes
from fedcrypt.vertical.secureboost import (
    BoostParams,
    GradientPacker,
    Guest,
    Host,
    Node,
    Sums,
    bin_features,
    candidate_sums,
    predict_scores,
    sigmoid,
    split_gains,
    train,
)

GUEST_FEATURES = 10


class TimedHost:
    """A host behind the wire encoding: times its own compute and counts bytes each way."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.seconds = 0.0
        self.bytes_down = self.bytes_up = 0

    def _down(self, payload: Payload) -> Payload:
        data = to_bytes(StageIns(0, "secureboost", payload), job="bench", sender="guest")
        self.bytes_down += len(data)
        message = from_bytes(data).message
        assert isinstance(message, StageIns)
        return message.payload

    def _up(self, payload: Payload) -> Payload:
        data = to_bytes(StageRes(0, "secureboost", payload), job="bench", sender="host")
        self.bytes_up += len(data)
        message = from_bytes(data).message
        assert isinstance(message, StageRes)
        return message.payload

    def _timed(self, method: Any, payload: Payload, *args: Any) -> Any:
        started = time.perf_counter()
        result = method(self._down(payload), *args)
        self.seconds += time.perf_counter() - started
        return result

    def setup(self, payload: Payload) -> None:
        self._timed(self.host.setup, payload)

    def receive_gradients(self, payload: Payload) -> None:
        self._timed(self.host.receive_gradients, payload)

    def histograms(self, payload: Payload) -> Payload:
        return self._up(self._timed(self.host.histograms, payload))

    def split(self, payload: Payload) -> Payload:
        return self._up(self._timed(self.host.split, payload))

    def route(self, payload: Payload, X: np.ndarray) -> Payload:
        return self._up(self._timed(self.host.route, payload, X))


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (the worker processes)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_fedcrypt(data: tuple[np.ndarray, ...], params: BoostParams, bits: int) -> dict[str, Any]:
    X_train, X_test, y_train, y_test = data
    cpu = _cpu_seconds()
    started = time.perf_counter()
    guest = Guest(X_train[:, :GUEST_FEATURES], y_train, 1, params, key_bits=bits)
    host = TimedHost(Host(X_train[:, GUEST_FEATURES:], params.n_bins))
    train(guest, [host])
    fit_seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu
    host_fit_seconds = host.seconds
    started = time.perf_counter()
    scores = predict_scores(guest, X_test[:, :GUEST_FEATURES], [partial(host.route, X=X_test[:, GUEST_FEATURES:])])
    return {
        "fit_seconds": fit_seconds,
        "fit_cpu_seconds": cpu,
        "guest_seconds": fit_seconds - host_fit_seconds,
        "host_seconds": host_fit_seconds,
        "predict_seconds": time.perf_counter() - started,
        "decryptions": guest.decryptions,
        "bytes_guest_to_host": host.bytes_down,
        "bytes_host_to_guest": host.bytes_up,
        "host_splits": host.host.records,
        "auc": float(roc_auc_score(y_test, scores)),
    }


class PheSecureBoost:
    """The same algorithm with per-value python-paillier, both roles in one object (see the module
    docstring); the host's part is :meth:`_host_histogram`."""

    def __init__(self, params: BoostParams, bits: int) -> None:
        self.params, self.bits = params, bits
        self.seconds = {"keygen": 0.0, "encrypt": 0.0, "host": 0.0, "decrypt": 0.0, "trees": 0.0}
        self.decryptions = 0

    def fit(self, Xg: np.ndarray, y: np.ndarray, Xh: np.ndarray) -> None:
        started = time.perf_counter()
        self.public, self.private = phe.generate_paillier_keypair(n_length=self.bits)
        self.seconds["keygen"] = time.perf_counter() - started
        started = time.perf_counter()
        self.packer = GradientPacker(len(y))  # quantize() is phe's encoding at precision 2^-32
        self.guest_bins, self.guest_thresholds = bin_features(Xg, self.params.n_bins)
        self.host_bins, self.host_thresholds = bin_features(Xh, self.params.n_bins)
        self.guest_sizes = np.array([t.size + 1 for t in self.guest_thresholds])
        rate = y.mean()
        self.base = float(np.log(rate / (1 - rate)))
        scores = np.full(len(y), self.base)
        self.trees: list[list[tuple[Node, int, int, float]]] = []  # (node, owner 0 guest/1 host, feature, threshold)
        for _ in range(self.params.n_trees):
            p = sigmoid(scores)
            self.g, self.h = self.packer.quantize(p - y, np.clip(p * (1 - p), 0, 0.25))
            t0 = time.perf_counter()
            unit = self.packer.unit
            self.enc_g = [self.public.encrypt(float(v) * unit, precision=unit) for v in self.g]
            self.enc_h = [self.public.encrypt(float(v) * unit, precision=unit) for v in self.h]
            self.seconds["encrypt"] += time.perf_counter() - t0
            tree, positions = self._tree(len(y))
            scores += np.array([node.weight for node, *_ in tree])[positions]
            self.trees.append(tree)
        self.seconds["trees"] = time.perf_counter() - started

    def decision_function(self, Xg: np.ndarray, Xh: np.ndarray) -> np.ndarray:
        """Plain lookup (prediction is not what is compared)."""
        scores = np.full(len(Xg), self.base)
        for tree in self.trees:
            at = np.zeros(len(Xg), dtype=np.int64)
            for index, (node, owner, feature, threshold) in enumerate(tree):
                if not node.is_leaf:
                    rows = np.flatnonzero(at == index)
                    column = (Xg if owner == 0 else Xh)[rows, feature]
                    at[rows] = np.where(column <= threshold, node.left, node.right)
            scores += np.array([node.weight for node, *_ in tree])[at]
        return scores

    def _node(self, depth: int, rows: np.ndarray, parent: int) -> Node:
        unit = self.packer.unit
        return Node(depth, int(self.g[rows].sum()) * unit, int(self.h[rows].sum()) * unit, int(rows.sum()), parent=parent)

    def _splittable(self, node: Node) -> bool:
        p = self.params
        return node.depth < p.max_depth and node.count >= 2 * p.min_samples_leaf and node.hess >= 2 * p.min_child_weight

    def _tree(self, n: int) -> tuple[list[tuple[Node, int, int, float]], np.ndarray]:
        """One tree, level by level, as fedcrypt's guest grows it."""
        tree = [self._node(0, np.ones(n, dtype=bool), -1)]
        positions = np.zeros(n, dtype=np.int64)
        splits: dict[int, tuple[int, int, float]] = {}
        histograms: dict[int, Sums] = {}
        frontier = [0] if self._splittable(tree[0]) else []
        while frontier:
            siblings = {i: (tree[tree[i].parent].left + tree[tree[i].parent].right - i if i else -1) for i in frontier}
            compute = [i for i in frontier if siblings[i] not in frontier
                       or (tree[i].count, i) < (tree[siblings[i]].count, siblings[i])]  # the subtraction trick
            for index in compute:
                histograms[index] = self._host_histogram(np.flatnonzero(positions == index))
            for index in set(frontier) - set(compute):
                histograms[index] = histograms[tree[index].parent] - histograms[siblings[index]]
            next_frontier = []
            for index in frontier:
                best = self._best_split(tree[index], np.flatnonzero(positions == index), histograms[index])
                if best is None:
                    continue
                owner, feature, bucket = best
                bins, thresholds = (self.guest_bins, self.guest_thresholds) if owner == 0 else (self.host_bins, self.host_thresholds)
                while bucket > 0 and not np.any(bins[feature, positions == index] == bucket):
                    bucket -= 1  # the lowest threshold of the same partition, as fedcrypt's host
                splits[index] = (owner, feature, float(thresholds[feature][bucket]))
                inside = positions == index
                left = inside & (bins[feature] <= bucket)
                tree[index].left, tree[index].right = len(tree), len(tree) + 1
                for rows in (left, inside & ~left):
                    child = self._node(tree[index].depth + 1, rows, index)
                    positions[rows] = len(tree)
                    if self._splittable(child):
                        next_frontier.append(len(tree))
                    tree.append(child)
            frontier = next_frontier
        for node in tree:
            if node.is_leaf:
                node.weight = -self.params.learning_rate * node.grad / (node.hess + self.params.l2)
        return [(node, *splits.get(i, (-1, -1, 0.0))) for i, node in enumerate(tree)], positions

    def _best_split(self, node: Node, rows: np.ndarray, host_sums: Sums) -> tuple[int, int, int] | None:
        """(owner, feature, bucket) of the largest positive gain, the guest's first on ties."""
        best: tuple[float, int, int, int] | None = None
        own = candidate_sums(self.guest_bins, self.guest_sizes, self.g, self.h, rows)
        for owner, sums, thresholds in ((0, own, self.guest_thresholds), (1, host_sums, self.host_thresholds)):
            gains = split_gains(sums, node, self.params, self.packer.unit)
            if not gains.size:
                continue
            j = int(np.argmax(gains))
            if gains[j] > 0 and (best is None or gains[j] > best[0]):
                feature, bucket = [(f, b) for f, t in enumerate(thresholds) for b in range(t.size)][j]
                best = (float(gains[j]), owner, feature, bucket)
        return None if best is None else best[1:]

    def _host_histogram(self, rows: np.ndarray) -> Sums:
        """Host: cumulative encrypted bucket sums of g and h (counts in the clear); guest: decrypt
        every candidate's two sums back to integers in units of 2^-32."""
        started = time.perf_counter()
        out_g: list[Any] = []
        out_h: list[Any] = []
        counts: list[int] = []
        for f, t in enumerate(self.host_thresholds):
            bucket_g: list[Any] = [None] * (t.size + 1)
            bucket_h: list[Any] = [None] * (t.size + 1)
            for i, b in zip(rows.tolist(), self.host_bins[f, rows].tolist()):
                bucket_g[b] = self.enc_g[i] if bucket_g[b] is None else bucket_g[b] + self.enc_g[i]
                bucket_h[b] = self.enc_h[i] if bucket_h[b] is None else bucket_h[b] + self.enc_h[i]
            run_g = run_h = None
            for b in range(t.size):
                if bucket_g[b] is not None:
                    run_g = bucket_g[b] if run_g is None else run_g + bucket_g[b]
                    run_h = bucket_h[b] if run_h is None else run_h + bucket_h[b]
                out_g.append(run_g)
                out_h.append(run_h)
            counts.extend(np.cumsum(np.bincount(self.host_bins[f, rows], minlength=t.size + 1))[:-1].tolist())
        self.seconds["host"] += time.perf_counter() - started
        started = time.perf_counter()
        unit, private = self.packer.unit, self.private
        decrypted = [np.array([0 if v is None else round(private.decrypt(v) / unit) for v in values], dtype=np.int64)
                     for values in (out_g, out_h)]
        self.decryptions += 2 * len(out_g)
        self.seconds["decrypt"] += time.perf_counter() - started
        return Sums(decrypted[0], decrypted[1], np.array(counts, dtype=np.int64))


def run_phe(data: tuple[np.ndarray, ...], params: BoostParams, bits: int) -> dict[str, Any]:
    X_train, X_test, y_train, y_test = data
    model = PheSecureBoost(params, bits)
    model.fit(X_train[:, :GUEST_FEATURES], y_train.astype(np.float64), X_train[:, GUEST_FEATURES:])
    scores = model.decision_function(X_test[:, :GUEST_FEATURES], X_test[:, GUEST_FEATURES:])
    seconds = model.seconds
    return {
        "trees": params.n_trees,
        "keygen_seconds": seconds["keygen"],
        "fit_seconds": seconds["keygen"] + seconds["trees"],
        "seconds_per_tree": seconds["trees"] / params.n_trees,
        "encrypt_seconds": seconds["encrypt"],
        "host_seconds": seconds["host"],
        "decrypt_seconds": seconds["decrypt"],
        "decryptions": model.decryptions,
        "bytes_host_to_guest_estimate": model.decryptions * (bits // 4 + 4),  # 2 ciphertexts + one 8-byte count per candidate
        "auc": float(roc_auc_score(y_test, scores)),
    }


def run_sklearn(data: tuple[np.ndarray, ...], params: BoostParams) -> dict[str, Any]:
    X_train, X_test, y_train, y_test = data
    started = time.perf_counter()
    model = HistGradientBoostingClassifier(
        max_iter=params.n_trees, max_depth=params.max_depth, learning_rate=params.learning_rate,
        max_bins=params.n_bins, l2_regularization=params.l2, min_samples_leaf=params.min_samples_leaf,
        max_leaf_nodes=None, early_stopping=False, random_state=0).fit(X_train, y_train)
    return {"fit_seconds": time.perf_counter() - started,
            "auc": float(roc_auc_score(y_test, model.decision_function(X_test)))}


def table(result: dict[str, Any]) -> str:
    fed, base, trees = result["fedcrypt"], result["phe_baseline"], result["trees"]
    extrapolated = result["phe_extrapolated_fit_seconds"]
    lines = ["| system | trees run | fit s | host s | decryptions | MB host->guest | test AUC |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| fedcrypt (packed g/h, compressed, all cores) | {trees} | {fed['fit_seconds']:.1f} "
                 f"| {fed['host_seconds']:.1f} | {fed['decryptions']:,} | {fed['bytes_host_to_guest'] / 1e6:.2f} "
                 f"| {fed['auc']:.4f} |")
    lines.append(f"| phe per value (one core) | {base['trees']} | {base['fit_seconds']:.1f} | {base['host_seconds']:.1f} "
                 f"| {base['decryptions']:,} | ~{base['bytes_host_to_guest_estimate'] / 1e6:.2f} | {base['auc']:.4f} |")
    lines.append(f"| phe per value, **extrapolated** to {trees} trees | {trees} | {extrapolated:.1f} | | | | |")
    lines.append(f"| fedcrypt, CPU seconds (all threads and worker processes) | {trees} | {fed['fit_cpu_seconds']:.1f} "
                 "| | | | |")
    lines.append(f"| scikit-learn HistGradientBoosting (joined, plaintext) | {trees} "
                 f"| {result['sklearn']['fit_seconds']:.2f} | | | | {result['sklearn']['auc']:.4f} |")
    lines.append(f"| scikit-learn, {base['trees']} trees (the baseline's count) | {base['trees']} | | | | "
                 f"| {result['sklearn_baseline_trees']['auc']:.4f} |")
    lines.append("")
    lines.append(f"fedcrypt {trees} trees: {fed['fit_seconds']:.1f} s (guest {fed['guest_seconds']:.1f} s, host "
                 f"{fed['host_seconds']:.1f} s) vs phe extrapolated {extrapolated:.1f} s: "
                 f"**{extrapolated / fed['fit_seconds']:.1f}x** faster; target < 60 s with {result['bits']}-bit keys: "
                 f"{'met' if fed['fit_seconds'] < 60 else 'NOT met'}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", type=int, default=10)
    parser.add_argument("--baseline-trees", type=int, default=3)
    parser.add_argument("--bits", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "secureboost.json")
    args = parser.parse_args()
    X, y = load_breast_cancer(return_X_y=True)
    data = tuple(train_test_split(X, y, test_size=0.3, stratify=y, random_state=0))
    settings = {"max_depth": 3, "learning_rate": 0.3, "n_bins": 32, "l2": 1.0, "min_child_weight": 1e-3,
                "min_samples_leaf": 20}
    params = BoostParams(n_trees=args.trees, **settings)
    baseline_params = BoostParams(n_trees=args.baseline_trees, **settings)
    result: dict[str, Any] = {"trees": args.trees, "bits": args.bits, "settings": settings,
                              "rows_train": len(data[2]), "rows_test": len(data[3])}
    result["fedcrypt"] = run_fedcrypt(data, params, args.bits)
    result["phe_baseline"] = base = run_phe(data, baseline_params, args.bits)
    result["phe_extrapolated_fit_seconds"] = base["keygen_seconds"] + base["seconds_per_tree"] * args.trees
    result["speedup"] = result["phe_extrapolated_fit_seconds"] / result["fedcrypt"]["fit_seconds"]
    result["sklearn"] = run_sklearn(data, params)
    result["sklearn_baseline_trees"] = run_sklearn(data, baseline_params)
    write_json(args.out, {"benchmark": "secureboost", "command": command_line(),
                          "machine": machine_info(("fedcrypt", "gmpy2", "phe", "scikit-learn", "numpy")),
                          "result": result})
    print(table(result))
    print(f"\nResults: {args.out}")


if __name__ == "__main__":
    main()
