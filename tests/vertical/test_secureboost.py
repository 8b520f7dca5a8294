"""SecureBoost: the same model as scikit-learn's histogram GBDT on the joined data, gradient packing
(property-tested), encrypted histograms against plaintext ones, what the guest receives, and
rejection of bad payloads. Keys are 1024 bits (the smallest allowed) to keep the file fast."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import pytest
from gmpy2 import mpz
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from fedcrypt.core.messages import Payload, StageIns, StageRes, from_bytes, to_bytes
from fedcrypt.crypto.paillier import generate_keypair
from fedcrypt.vertical.secureboost import (
    GUEST,
    BoostParams,
    GradientPacker,
    Guest,
    Host,
    ProtocolError,
    SecureBoost,
    bin_features,
    candidate_sums,
    compress,
    predict_scores,
    sigmoid,
    train,
)

BITS = 1024
GUEST_FEATURES = 10  # the guest holds the label and the first 10 features, the host the other 20

# One setting for both models. scikit-learn's names on the right:
#   n_trees -> max_iter, max_depth -> max_depth (edges from root to the deepest leaf in both),
#   learning_rate -> learning_rate, n_bins -> max_bins (same quantile thresholds), l2 ->
#   l2_regularization (gain and leaf value -G/(H + l2) as XGBoost's), min_samples_leaf ->
#   min_samples_leaf, min_child_weight -> scikit-learn's fixed min_hessian_to_split of 1e-3;
#   max_leaf_nodes=None (depth-limited only, like SecureBoost) and no early stopping.
SETTINGS = {"n_trees": 10, "max_depth": 3, "learning_rate": 0.3, "n_bins": 32, "l2": 1.0,
            "min_child_weight": 1e-3, "min_samples_leaf": 20}
SKLEARN = {"max_iter": 10, "max_depth": 3, "learning_rate": 0.3, "max_bins": 32, "l2_regularization": 1.0,
           "min_samples_leaf": 20, "max_leaf_nodes": None, "early_stopping": False}


class WireHost:
    """A host reached through fedcrypt's wire encoding in both directions; keeps the bytes the
    guest receives."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.to_guest: list[bytes] = []
        self.to_guest_payloads: list[Payload] = []

    def _down(self, payload: Payload) -> Payload:
        message = from_bytes(to_bytes(StageIns(0, "secureboost", payload), job="sb", sender="guest")).message
        assert isinstance(message, StageIns)
        return message.payload

    def _up(self, payload: Payload) -> Payload:
        data = to_bytes(StageRes(0, "secureboost", payload), job="sb", sender="host")
        message = from_bytes(data).message
        assert isinstance(message, StageRes)
        self.to_guest.append(data)
        self.to_guest_payloads.append(message.payload)
        return message.payload

    def setup(self, payload: Payload) -> None:
        self.host.setup(self._down(payload))

    def receive_gradients(self, payload: Payload) -> None:
        self.host.receive_gradients(self._down(payload))

    def histograms(self, payload: Payload) -> Payload:
        return self._up(self.host.histograms(self._down(payload)))

    def split(self, payload: Payload) -> Payload:
        return self._up(self.host.split(self._down(payload)))

    def route(self, payload: Payload, X: np.ndarray) -> Payload:
        return self._up(self.host.route(self._down(payload), X))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = load_breast_cancer(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    return X_train, X_test, y_train, y_test


@pytest.fixture(scope="module")
def trained(data: tuple[np.ndarray, ...]) -> tuple[Guest, WireHost, np.ndarray]:
    """The breast cancer model trained over the wire; its raw scores on the test rows."""
    X_train, X_test, y_train, _ = data
    params = BoostParams(**SETTINGS)
    guest = Guest(X_train[:, :GUEST_FEATURES], y_train, 1, params, key_bits=BITS)
    host = WireHost(Host(X_train[:, GUEST_FEATURES:], params.n_bins))
    train(guest, [host])
    scores = predict_scores(guest, X_test[:, :GUEST_FEATURES], [partial(host.route, X=X_test[:, GUEST_FEATURES:])])
    return guest, host, scores


def test_auc_matches_scikit_learn_on_the_joined_data(data: tuple[np.ndarray, ...], trained: tuple[Guest, WireHost, np.ndarray]) -> None:
    X_train, X_test, y_train, y_test = data
    guest, host, scores = trained
    reference = HistGradientBoostingClassifier(**SKLEARN, random_state=0).fit(X_train, y_train)
    auc, reference_auc = roc_auc_score(y_test, scores), roc_auc_score(y_test, reference.decision_function(X_test))
    assert auc > 0.95 and abs(auc - reference_auc) <= 0.01, (auc, reference_auc)
    assert len(guest.trees) == 10 and host.host.records > 0  # the host's features were used
    assert max(node.depth for tree in guest.trees for node in tree) == 3


def test_two_hosts_through_the_estimator_api(data: tuple[np.ndarray, ...]) -> None:
    X_train, X_test, y_train, y_test = data
    model = SecureBoost(**{**SETTINGS, "n_trees": 3}, key_bits=BITS, random_state=0)
    model.fit(X_train[:, :GUEST_FEATURES], y_train, [X_train[:, 10:20], X_train[:, 20:]])
    hosts_test = [X_test[:, 10:20], X_test[:, 20:]]
    proba = model.predict_proba(X_test[:, :GUEST_FEATURES], hosts_test)
    reference = HistGradientBoostingClassifier(**{**SKLEARN, "max_iter": 3}, random_state=0).fit(X_train, y_train)
    assert proba.shape == (len(y_test), 2) and np.allclose(proba.sum(axis=1), 1.0)
    assert abs(roc_auc_score(y_test, proba[:, 1]) - roc_auc_score(y_test, reference.predict_proba(X_test)[:, 1])) <= 0.01
    labels = model.predict(X_test[:, :GUEST_FEATURES], hosts_test)
    assert set(labels) <= {0, 1} and (labels == y_test).mean() > 0.9
    assert sum(host.records for host in model.hosts_) > 0


def _no_floats(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_no_floats(v) for v in value.values())
    if isinstance(value, list):
        return all(_no_floats(v) for v in value)
    return not isinstance(value, float)


def test_the_guest_never_receives_host_thresholds(data: tuple[np.ndarray, ...], trained: tuple[Guest, WireHost, np.ndarray]) -> None:
    guest, host, _ = trained
    _, thresholds = bin_features(data[0][:, GUEST_FEATURES:], SETTINGS["n_bins"])
    secrets_ = {np.float64(t).tobytes() for column in thresholds for t in column}
    assert host.to_guest and len(secrets_) > 300
    for payload in host.to_guest_payloads:  # only integers, ciphertext bytes and 0/1 flags
        assert _no_floats(payload.meta)
        assert all(np.asarray(a).dtype == np.uint8 for a in payload.arrays.values())
    for data_ in host.to_guest:
        assert not any(secret in data_ for secret in secrets_)
    host_nodes = [node for tree in guest.trees for node in tree if not node.is_leaf and node.owner != GUEST]
    assert host_nodes and all(node.feature == -1 and np.isnan(node.threshold) and node.record >= 0 for node in host_nodes)


# --- gradient packing -----------------------------------------------------------------------------------


@st.composite
def gradient_sets(draw: st.DrawFn) -> tuple[GradientPacker, np.ndarray, np.ndarray, np.ndarray]:
    packer = GradientPacker(draw(st.integers(1, 100_000)), draw(st.integers(8, 40)))
    size = draw(st.integers(1, min(packer.n_samples, 400)))
    g = draw(arrays(np.float64, size, elements=st.floats(-1.0, 1.0)))
    h = draw(arrays(np.float64, size, elements=st.floats(0.0, 0.25)))
    chosen = draw(arrays(np.bool_, size))
    return packer, g, h, chosen


@given(gradient_sets())
@settings(max_examples=80, deadline=None)
def test_sums_of_packed_gradients_unpack_to_the_gradient_sums(case: tuple[GradientPacker, np.ndarray, np.ndarray, np.ndarray]) -> None:
    packer, g, h, chosen = case
    total = sum(p for p, keep in zip(packer.pack(g, h), chosen) if keep)  # what a homomorphic sum decrypts to
    sums = packer.unpack([total])
    g_int, h_int = packer.quantize(g, h)
    assert (sums.grad[0], sums.hess[0], sums.count[0]) == (g_int[chosen].sum(), h_int[chosen].sum(), chosen.sum())
    error = (chosen.sum() + 1) * packer.unit  # rounding of each sample to 2^-f
    assert abs(sums.grad[0] * packer.unit - g[chosen].sum()) <= error
    assert abs(sums.hess[0] * packer.unit - h[chosen].sum()) <= error


@given(st.integers(1, 1 << 20), st.integers(8, 40), st.sampled_from([-1.0, 1.0]))
def test_the_fields_hold_the_sum_over_every_sample_at_the_extremes(n: int, frac_bits: int, g: float) -> None:
    packer = GradientPacker(n, frac_bits)
    total = packer.pack(np.array([g]), np.array([0.25]))[0] * n  # n samples at the largest |g| and h
    sums = packer.unpack([total])
    assert (sums.grad[0], sums.hess[0], sums.count[0]) == (round(g * n * 2**frac_bits), n << (frac_bits - 2), n)


def test_packing_refuses_values_outside_the_offsets() -> None:
    packer = GradientPacker(10)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        packer.pack(np.array([1.5]), np.array([0.1]))
    with pytest.raises(ValueError, match=r"\[0, 1/4\]"):
        packer.pack(np.array([0.5]), np.array([0.3]))
    with pytest.raises(ValueError, match="63 bits"):
        GradientPacker(1 << 30, 40)


def test_encrypted_packed_sums_compress_and_decrypt_to_the_plaintext_sums() -> None:
    public, private = generate_keypair(BITS)
    packer = GradientPacker(300)
    rng = np.random.default_rng(3)
    g, h = rng.uniform(-1, 1, 300), rng.uniform(0, 0.25, 300)
    ciphertexts = public.encrypt(packer.pack(g, h), public.obfuscators(300))
    subsets = [rng.random(300) < rng.random() for _ in range(25)]
    sums = []
    for subset in subsets:
        total = mpz(1)
        for c in np.array(ciphertexts, dtype=object)[subset]:
            total = public.add(total, c)
        sums.append(total)
    slots = packer.slots(public.plaintext_bits)
    assert slots >= 8
    groups = [sums[i : i + slots] for i in range(0, len(sums), slots)]
    compressed = compress(public, groups, slots, packer.width, public.obfuscators(len(groups)))
    assert len(compressed) == -(-25 // slots)
    unpacked = packer.unpack(packer.split_slots(private.decrypt(compressed), slots, 25))
    g_int, h_int = packer.quantize(g, h)
    assert unpacked.grad.tolist() == [int(g_int[s].sum()) for s in subsets]
    assert unpacked.hess.tolist() == [int(h_int[s].sum()) for s in subsets]
    assert unpacked.count.tolist() == [int(s.sum()) for s in subsets]


# --- histograms -----------------------------------------------------------------------------------------------


def _sorted(sums: Any) -> np.ndarray:
    table = np.column_stack([sums.count, sums.grad, sums.hess])
    return table[np.lexsort(table.T[::-1])]


def test_encrypted_histograms_equal_plaintext_histograms(data: tuple[np.ndarray, ...]) -> None:
    X, y = data[0][:200], data[2][:200]
    guest = Guest(X[:, :GUEST_FEATURES], y, 1, BoostParams(n_trees=1, max_depth=3), key_bits=BITS)
    host = Host(X[:, GUEST_FEATURES:])
    host.setup(guest.setup())
    host.receive_gradients(guest.start_tree())
    bins, thresholds = bin_features(X[:, GUEST_FEATURES:], 32)
    sizes = np.array([t.size + 1 for t in thresholds])
    p = sigmoid(np.full(len(y), guest.base_score))
    g_int, h_int = guest.packer.quantize(p - y, p * (1 - p))
    for _ in range(2):  # the root, then the computed child of depth 1
        request = guest.histogram_request()
        assert request is not None
        reply = host.histograms(request)
        positions = np.asarray(request.arrays["positions"])
        decrypted = guest.decrypt_histograms(0, reply)
        assert decrypted and reply.meta["candidates"] == int((sizes - 1).sum())
        for node, sums in decrypted.items():  # the host's order is shuffled: compare as multisets
            expected = candidate_sums(bins, sizes, g_int, h_int, np.flatnonzero(positions == node))
            np.testing.assert_array_equal(_sorted(sums), _sorted(expected))
        guest.apply_splits([host.split(r) for r in guest.choose_splits([reply])])


# --- bad payloads ----------------------------------------------------------------------------------------------


def _with(payload: Payload, **meta: Any) -> Payload:
    arrays = meta.pop("arrays", {})
    return Payload({**payload.meta, **meta}, {**payload.arrays, **arrays})


@pytest.fixture
def parties(data: tuple[np.ndarray, ...]) -> tuple[Guest, Host, np.ndarray]:
    X, y = data[0][:120], data[2][:120]
    guest = Guest(X[:, :4], y, 1, BoostParams(n_trees=2, max_depth=2), key_bits=BITS)
    host = Host(X[:, 20:26])  # the strongest features: the root splits on the host
    host.setup(guest.setup())
    return guest, host, X[:, 20:26]


def test_a_host_refuses_bad_setup_and_gradients(parties: tuple[Guest, Host, np.ndarray]) -> None:
    guest, host, _ = parties
    setup = guest.setup()
    with pytest.raises(ProtocolError, match="n_samples"):
        host.setup(_with(setup, n_samples=119))
    key = dict(setup.meta["public_key"], n=hex(int(guest.public.n) + 2))
    with pytest.raises(ProtocolError, match="fingerprint"):
        host.setup(_with(setup, public_key=key))
    with pytest.raises(ProtocolError, match="expected a secureboost.setup"):
        host.setup(Payload({"kind": "secureboost.gradients"}))
    gradients = guest.start_tree()
    ciphertexts = np.asarray(gradients.arrays["gradients"])
    with pytest.raises(ProtocolError, match="tree is 1, expected 0"):
        host.receive_gradients(_with(gradients, tree=1))
    with pytest.raises(ProtocolError, match="shape"):
        host.receive_gradients(_with(gradients, arrays={"gradients": ciphertexts[:-1]}))
    with pytest.raises(ProtocolError, match="not invertible"):
        host.receive_gradients(_with(gradients, arrays={"gradients": np.full_like(ciphertexts, 255)}))
    with pytest.raises(ProtocolError, match="missing"):
        host.receive_gradients(Payload(gradients.meta))
    host.receive_gradients(gradients)  # the good one still works after the refusals


def test_a_host_refuses_bad_histogram_split_and_route_requests(parties: tuple[Guest, Host, np.ndarray]) -> None:
    guest, host, X = parties
    host.receive_gradients(guest.start_tree())
    request = guest.histogram_request()
    assert request is not None
    positions = np.asarray(request.arrays["positions"])
    with pytest.raises(ProtocolError, match="outside"):
        host.histograms(_with(request, arrays={"positions": np.where(positions == 0, 7, -1).astype(np.int32)}))
    with pytest.raises(ProtocolError, match="int32"):
        host.histograms(_with(request, arrays={"positions": positions.astype(np.int64)}))
    with pytest.raises(ProtocolError, match="not distinct nodes"):
        host.histograms(_with(request, compute=[0, 3]))
    with pytest.raises(ProtocolError, match="depth"):
        host.histograms(_with(request, depth=-1))
    split_requests = guest.choose_splits([host.histograms(request)])
    split = _with(split_requests[0], splits=[[0, 0]])
    with pytest.raises(ProtocolError, match="was not offered"):
        host.split(_with(split, splits=[[0, 10_000]]))
    with pytest.raises(ProtocolError, match="was not offered"):
        host.split(_with(split, splits=[[5, 0]]))
    with pytest.raises(ProtocolError, match="split twice"):
        host.split(_with(split, splits=[[0, 0], [0, 1]]))
    with pytest.raises(ProtocolError, match="pairs"):
        host.split(_with(split, splits=[[0, 0.5]]))
    assert host.records == 0  # nothing recorded from refused requests
    host.split(split)
    route = Payload({"kind": "secureboost.route_request", "n_samples": len(X)},
                    {"records": np.array([0]), "samples": np.array([3])})
    assert host.route(route, X).arrays["left"].shape == (1,)
    with pytest.raises(ProtocolError, match="unknown record"):
        host.route(_with(route, arrays={"records": np.array([1])}), X)
    with pytest.raises(ProtocolError, match="out of range"):
        host.route(_with(route, arrays={"samples": np.array([len(X)])}), X)
    with pytest.raises(ProtocolError, match="n_samples"):
        host.route(_with(route, n_samples=5), X)


def test_the_guest_refuses_bad_histograms_and_split_answers(parties: tuple[Guest, Host, np.ndarray]) -> None:
    guest, host, _ = parties
    host.receive_gradients(guest.start_tree())
    request = guest.histogram_request()
    assert request is not None
    reply = host.histograms(request)
    ciphertexts = np.asarray(reply.arrays["histograms"])
    with pytest.raises(ProtocolError, match="expected histograms from 1 hosts"):
        guest.choose_splits([reply, reply])
    with pytest.raises(ProtocolError, match="nodes"):
        guest.choose_splits([_with(reply, nodes=[1])])
    with pytest.raises(ProtocolError, match="slots"):
        guest.choose_splits([_with(reply, slots=reply.meta["slots"] - 1)])
    with pytest.raises(ProtocolError, match="shape"):
        guest.choose_splits([_with(reply, arrays={"histograms": ciphertexts[:-1]})])
    foreign = guest.public.to_array(guest.public.encrypt([int(guest.public.n) - 1] * len(ciphertexts)))  # valid, wrong contents
    with pytest.raises(ProtocolError, match="does not decode"):
        guest.choose_splits([_with(reply, arrays={"histograms": foreign})])
    with pytest.raises(ProtocolError, match="expected a secureboost.histograms"):
        guest.choose_splits([request])
    split_requests = guest.choose_splits([reply])
    assert split_requests[0].meta["splits"], "the data makes the host's feature the best split"
    answer = host.split(split_requests[0])
    left = np.asarray(answer.arrays["left"])
    with pytest.raises(ProtocolError, match="does not match its histogram"):
        guest.apply_splits([_with(answer, arrays={"left": 1 - left})])
    with pytest.raises(ProtocolError, match="0/1"):
        guest.apply_splits([_with(answer, arrays={"left": left * 2})])
    with pytest.raises(ProtocolError, match="record ids"):
        guest.apply_splits([_with(answer, records=[])])
    guest.apply_splits([answer])
    assert guest.histogram_request() is not None  # the tree goes on after the refusals


def test_prediction_refuses_bad_routing_answers(trained: tuple[Guest, WireHost, np.ndarray], data: tuple[np.ndarray, ...]) -> None:
    guest, host, _ = trained
    X_test = data[1]
    walk = guest.prediction(X_test[:, :GUEST_FEATURES])
    requests = walk.requests()
    assert requests is not None
    answer = host.host.route(requests[0], X_test[:, GUEST_FEATURES:])
    with pytest.raises(ProtocolError, match="queries"):
        walk.receive([_with(answer, queries=1)])
    with pytest.raises(ProtocolError, match="expected routing answers from 1 hosts"):
        walk.receive([])
    with pytest.raises(RuntimeError, match="waiting"):
        walk.scores()
