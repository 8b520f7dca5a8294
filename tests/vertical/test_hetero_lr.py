"""Hetero LR on the breast cancer split: the encrypted protocol against a plaintext numpy oracle of
the same algorithm, against scikit-learn, what the arbiter sees, and refused inputs and payloads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler

from fedcrypt.core.messages import Payload, StageIns, from_bytes, to_bytes
from fedcrypt.crypto.paillier import generate_keypair
from fedcrypt.vertical.data import PartyData, VerticalDataError, align, breast_cancer_split, load_party_csv
from fedcrypt.vertical.hetero_lr import (
    FEATURE_BITS,
    GRADIENT_BITS,
    Arbiter,
    Guest,
    HeteroLR,
    Host,
    ProtocolError,
    _linear_combinations,
    _Slots,
    batch_plan,
)

BITS = 1024  # the smallest key: tests are about the protocol, the benchmark uses 2048
HYPER: dict[str, Any] = {"lr": 0.1, "epochs": 10, "batch_size": 64, "l2": 0.0, "decay": 0.5}


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> tuple[PartyData, PartyData]:
    """Guest and host rows on their common IDs (done directly here; PSI is tested on its own)."""
    guest_csv, host_csv = breast_cancer_split(tmp_path_factory.mktemp("bc"))
    guest, host = load_party_csv(guest_csv, "id", "label"), load_party_csv(host_csv, "id")
    common = sorted(set(guest.ids) & set(host.ids))
    return align(guest, common), align(host, common)


@pytest.fixture(scope="module")
def split(aligned: tuple[PartyData, PartyData]) -> dict[str, PartyData]:
    guest, host = aligned
    assert guest.labels is not None
    train, test = train_test_split(np.array(guest.ids), test_size=0.25, random_state=0, stratify=guest.labels)
    return {"guest": align(guest, train), "host": align(host, train),
            "guest_test": align(guest, test), "host_test": align(host, test)}


@pytest.fixture(scope="module")
def fitted(split: dict[str, PartyData]) -> HeteroLR:
    return HeteroLR(key_bits=BITS, random_state=0, **HYPER).fit(split["guest"], [split["host"]])


def _features(party: PartyData, standardize_on: PartyData | None = None) -> np.ndarray:
    """What a party trains on: its columns standardized with its own training statistics and
    rounded to the fixed point the protocol uses as exponents."""
    train = (standardize_on or party).features
    scale = train.std(axis=0)
    z = (party.features - train.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    rounded: np.ndarray = np.rint(z * 2.0**FEATURE_BITS) / 2.0**FEATURE_BITS
    return rounded


def oracle(guest: PartyData, hosts: Sequence[PartyData], random_state: int, *, lr: float, epochs: int,
           batch_size: int, l2: float, decay: float) -> tuple[np.ndarray, list[float]]:
    """The same algorithm in plaintext numpy: Taylor residual, mini-batches, decayed learning rate.
    Weights ``[w_guest, intercept, w_host_0, ...]`` and each epoch's Taylor loss."""
    assert guest.labels is not None
    x = np.hstack([_features(guest), np.ones((len(guest), 1)), *(_features(h) for h in hosts)])
    y = 2 * guest.labels - 1
    intercept = len(guest.feature_names)
    w = np.zeros(x.shape[1])
    losses = []
    for epoch, batches in enumerate(batch_plan(len(x), batch_size, epochs, random_state)):
        total = 0.0
        for rows in batches:
            wx = x[rows] @ w
            penalty = l2 * w
            penalty[intercept] = 0.0
            total += float(np.sum(np.log(2) - 0.5 * y[rows] * wx + 0.125 * wx**2) + len(rows) * (penalty @ w) / 2)
            w = w - lr / (1 + decay * epoch) * (x[rows].T @ (0.25 * wx - 0.5 * y[rows]) / len(rows) + penalty)
        losses.append(total / len(x))
    return w, losses


def _weights(model: HeteroLR) -> np.ndarray:
    return np.concatenate([model.guest_.weights, [model.guest_.intercept], *(h.weights for h in model.hosts_)])


# --- the two homomorphic building blocks -----------------------------------------------------------


def test_linear_combinations_are_products_of_powers() -> None:
    """Pippenger's bucket method against one exponentiation per value, signed exponents and zeros."""
    public, private = generate_keypair(BITS)
    messages = [5, 0, int(public.n) - 7, 123456789]  # the third is -7
    ciphertexts = public.encrypt(messages)
    exponents = np.array([[3, 0, -(2**20), 1], [1, 0, 7, -1], [2, 0, 1, 65535], [-1, 0, 0, 4096]], dtype=np.int64)
    combined = _linear_combinations(ciphertexts, exponents, public)
    signed = [5, 0, -7, 123456789]
    expected = [sum(m * int(e) for m, e in zip(signed, column)) % int(public.n) for column in exponents.T]
    assert [int(m) for m in private.decrypt(combined)] == expected


def test_packed_gradients_round_trip_and_corruption_is_caught() -> None:
    public, private = generate_keypair(BITS)
    slots = _Slots(public, rows=73, max_exponent=2**16, parties=2)
    bound = 2 ** (slots.bits - 2) - 1
    values = [bound, -bound, 0, 1, -1, *np.random.default_rng(0).integers(-(2**60), 2**60, 20).tolist()]
    packed = slots.pack(public.encrypt([v % int(public.n) for v in values]))
    assert len(packed) == slots.count(len(values)) == 2
    encodings = [int(m) for m in private.decrypt(packed)]
    np.testing.assert_array_equal(slots.unpack(encodings, len(values)), np.array(values) / 2.0**GRADIENT_BITS)
    with pytest.raises(ProtocolError, match="out of its slot"):
        slots.unpack([encodings[0] | 1 << (slots.bits - 1), encodings[1]], len(values))  # a guard bit set
    with pytest.raises(ProtocolError, match="beyond their slots"):  # the second holds 25 - 13 = 12 values
        slots.unpack([encodings[0], encodings[1] + (1 << (slots.bits * 12))], len(values))


# --- the encrypted protocol computes exactly the plaintext algorithm -----------------------------


def test_encrypted_training_equals_the_plaintext_oracle(fitted: HeteroLR, split: dict[str, PartyData]) -> None:
    expected, losses = oracle(split["guest"], [split["host"]], 0, **HYPER)
    np.testing.assert_allclose(_weights(fitted), expected, rtol=0, atol=1e-9)  # wx rounds at 2^-32 per row
    assert fitted.loss_history_ is not None and len(fitted.loss_history_) == HYPER["epochs"]
    np.testing.assert_allclose(fitted.loss_history_, losses, rtol=0, atol=1e-5)  # loss coefficients at 2^-12
    assert fitted.loss_history_[-1] < fitted.loss_history_[0] < np.log(2)


def _wire(payload: Payload) -> Payload:
    """What a transport does to a payload: encode it to bytes and decode it again."""
    received = from_bytes(to_bytes(StageIns(1, "hetero-lr", payload), job="test", sender="x")).message
    assert isinstance(received, StageIns)
    return received.payload


def test_one_batch_over_the_wire_gives_the_plaintext_gradients(split: dict[str, PartyData]) -> None:
    """Step methods by hand, every payload through the wire encoding, from nonzero host weights
    with an l2 penalty: each party's step is exactly -lr times its plaintext gradient."""
    guest_data, host_data = split["guest"], split["host"]
    hyper = {**HYPER, "l2": 0.05, "epochs": 1}
    arbiter = Arbiter(BITS)
    key = _wire(arbiter.public_key())
    host = Host(host_data, key, "host-0")
    guest = Guest(guest_data, key, ["host-0"], random_state=3, **hyper)
    host.weights = np.random.default_rng(1).normal(0, 0.3, host.weights.shape)
    start = np.concatenate([np.zeros(len(guest_data.feature_names) + 1), host.weights])
    host.setup(_wire(guest.setup()))
    batch = _wire(guest.batch(0, 0))
    residual, own = guest.residual([_wire(host.forward(batch))])
    host.update(_wire(arbiter.decrypt(_wire(host.masked_gradient(_wire(residual))))))
    assert own is not None
    guest.update(_wire(arbiter.decrypt(_wire(own))))

    rows = batch_plan(len(guest_data), hyper["batch_size"], 1, 3)[0][0]
    x = np.hstack([_features(guest_data), np.ones((len(guest_data), 1)), _features(host_data)])[rows]
    assert guest_data.labels is not None
    d = 0.25 * x @ start - 0.5 * (2 * guest_data.labels[rows] - 1)
    gradient = x.T @ d / len(rows) + 0.05 * start
    gradient[len(guest_data.feature_names)] -= 0.05 * start[len(guest_data.feature_names)]  # intercept: no l2
    encrypted = -(np.concatenate([guest.weights, [guest.intercept], host.weights]) - start) / hyper["lr"]
    np.testing.assert_allclose(encrypted, gradient, rtol=0, atol=1e-9)
    assert np.abs(gradient).min() > 0  # a real gradient, not a trivial one


def test_the_arbiter_sees_only_uniformly_masked_values(monkeypatch: pytest.MonkeyPatch,
                                                       split: dict[str, PartyData]) -> None:
    seen: list[tuple[str, list[int]]] = []
    decrypt: Callable[[Arbiter, Payload], Payload] = Arbiter.decrypt

    def recording(self: Arbiter, masked: Payload) -> Payload:
        reply = decrypt(self, masked)
        values = np.asarray(reply.arrays["values"])
        seen.append((masked.meta["party"], [int.from_bytes(row.tobytes(), "little") for row in values]))
        return reply

    monkeypatch.setattr(Arbiter, "decrypt", recording)
    model = HeteroLR(key_bits=BITS, random_state=0, **{**HYPER, "epochs": 2}).fit(split["guest"], [split["host"]])
    n = int(model.arbiter_.public.n)
    assert {party for party, _ in seen} == {"guest", "host-0"}
    assert len(seen) == 2 * 2 * model.guest_.batches_per_epoch
    # Per batch: the host's 20 gradients packed in two plaintexts (13 slots of 77 bits fit a 1024-bit
    # key; one at 2048 bits), the guest's 11 in one, and the guest's loss.
    assert [len(vs) for party, vs in seen[:2]] == [2, 2]
    values = [v for _, vs in seen for v in vs]
    # Unmasked, each would be a fixed-point number (packed gradients below 2^950, the loss below
    # 2^100 or above n - 2^100); a uniform pad lands there with probability 2^-73 per value.
    assert all(2**950 < v < n - 2**950 for v in values)
    assert 0.25 < np.mean([v / n for v in values]) < 0.75  # spread over Z_n (mean of 30 uniforms)


def test_the_guest_as_key_holder_trains_the_same_model(split: dict[str, PartyData]) -> None:
    model = HeteroLR(key_bits=BITS, random_state=0, arbiter="guest", **HYPER).fit(split["guest"], [split["host"]])
    expected, losses = oracle(split["guest"], [split["host"]], 0, **HYPER)
    np.testing.assert_allclose(_weights(model), expected, rtol=0, atol=1e-9)
    assert model.loss_history_ is not None
    np.testing.assert_allclose(model.loss_history_, losses, rtol=0, atol=1e-9)


def test_two_hosts_train_the_model_of_one_host_with_their_columns(fitted: HeteroLR,
                                                                  split: dict[str, PartyData]) -> None:
    def columns(party: PartyData, part: slice) -> PartyData:
        return PartyData(party.ids, party.features[:, part], party.feature_names[part])

    hosts = [columns(split["host"], slice(0, 8)), columns(split["host"], slice(8, None))]
    model = HeteroLR(key_bits=BITS, random_state=0, **HYPER).fit(split["guest"], hosts)
    assert model.loss_history_ is None  # cross-host terms of the loss cannot be formed (as in FATE)
    np.testing.assert_allclose(_weights(model), _weights(fitted), rtol=0, atol=1e-9)
    test_hosts = [columns(split["host_test"], slice(0, 8)), columns(split["host_test"], slice(8, None))]
    np.testing.assert_allclose(model.predict_proba(split["guest_test"], test_hosts),
                               fitted.predict_proba(split["guest_test"], [split["host_test"]]), atol=1e-9)


def test_prediction_is_the_sigmoid_of_the_joint_score(fitted: HeteroLR, split: dict[str, PartyData]) -> None:
    guest, host = split["guest_test"], split["host_test"]
    w, _ = oracle(split["guest"], [split["host"]], 0, **HYPER)
    x = np.hstack([_features(guest, split["guest"]), np.ones((len(guest), 1)), _features(host, split["host"])])
    proba = fitted.predict_proba(guest, [host])
    assert proba.shape == (len(guest), 2)
    np.testing.assert_allclose(proba[:, 1], 1 / (1 + np.exp(-x @ w)), rtol=0, atol=1e-9)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(fitted.predict(guest, [host]), (x @ w > 0).astype(int))


def test_accuracy_is_within_one_point_of_scikit_learn(aligned: tuple[PartyData, PartyData]) -> None:
    """5-fold cross-validation over the 455 common rows: every row predicted once by each model."""
    guest, host = aligned
    assert guest.labels is not None
    y = guest.labels
    joined = np.hstack([guest.features, host.features])
    ours = theirs = 0
    ids = np.array(guest.ids)
    for fold, (train, test) in enumerate(StratifiedKFold(5, shuffle=True, random_state=0).split(joined, y)):
        model = HeteroLR(key_bits=BITS, random_state=fold, **HYPER)
        model.fit(align(guest, ids[train]), [align(host, ids[train])])
        ours += int((model.predict(align(guest, ids[test]), [align(host, ids[test])]) == y[test]).sum())
        scaler = StandardScaler().fit(joined[train])
        reference = LogisticRegression(max_iter=1000).fit(scaler.transform(joined[train]), y[train])
        theirs += int((reference.predict(scaler.transform(joined[test])) == y[test]).sum())
    assert theirs / len(y) > 0.95
    assert ours / len(y) >= theirs / len(y) - 0.01, (ours, theirs)


# --- refused inputs -------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(split: dict[str, PartyData]) -> None:
    guest, host = split["guest"], split["host"]
    model = HeteroLR(key_bits=BITS, random_state=0, epochs=1)
    with pytest.raises(VerticalDataError, match="host 0 is not aligned with the guest"):
        model.fit(guest, [split["host_test"]])
    with pytest.raises(VerticalDataError, match="the guest's data has no labels"):
        model.fit(PartyData(guest.ids, guest.features, guest.feature_names), [host])
    assert guest.labels is not None
    with pytest.raises(VerticalDataError, match="labels must be 0 or 1"):
        model.fit(PartyData(guest.ids, guest.features, guest.feature_names, 2 * guest.labels), [host])
    with pytest.raises(VerticalDataError, match="host-0 carries labels"):
        model.fit(guest, [PartyData(host.ids, host.features, host.feature_names, guest.labels)])
    with pytest.raises(VerticalDataError, match="at least one host"):
        model.fit(guest, [])
    with pytest.raises(VerticalDataError, match="guest's gradient would reveal the hosts' scores"):
        HeteroLR(key_bits=BITS, batch_size=8, epochs=1).fit(guest, [host])
    with pytest.raises(ProtocolError, match="host-0 refuses batches of 16 rows: with 20 features"):
        HeteroLR(key_bits=BITS, batch_size=16, epochs=1).fit(guest, [host])
    with pytest.raises(OverflowError, match="training diverged"):
        HeteroLR(key_bits=BITS, lr=100.0, epochs=3).fit(guest, [host])
    with pytest.raises(ValueError, match="arbiter must be"):
        HeteroLR(arbiter="host")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr > 0"):
        HeteroLR(lr=0.0)
    with pytest.raises(ValueError, match="not fitted"):
        HeteroLR().predict(guest, [host])
    bad = np.array(guest.features)
    bad[3, 2] = np.nan
    with pytest.raises(VerticalDataError, match="finite"):
        model.fit(PartyData(guest.ids, bad, guest.feature_names, guest.labels), [host])


def test_prediction_refuses_other_columns_and_unaligned_rows(fitted: HeteroLR, split: dict[str, PartyData]) -> None:
    guest, host = split["guest_test"], split["host_test"]
    renamed = PartyData(host.ids, host.features, tuple(f"x{i}" for i in range(20)))
    with pytest.raises(VerticalDataError, match="differ from the training columns"):
        fitted.predict(guest, [renamed])
    with pytest.raises(VerticalDataError, match="not aligned"):
        fitted.predict(guest, [align(host, host.ids[::-1])])
    with pytest.raises(VerticalDataError, match="fitted with 1 hosts, got 2"):
        fitted.predict(guest, [host, host])


# --- refused payloads -----------------------------------------------------------------------------


class _Job:
    """One guest, two hosts and an arbiter, set up by hand, for tampering with their messages."""

    def __init__(self, split: dict[str, PartyData]) -> None:
        guest, host = split["guest"], split["host"]
        self.arbiter = Arbiter(BITS)
        key = self.arbiter.public_key()
        halves = [PartyData(host.ids, host.features[:, part], host.feature_names[part])
                  for part in (slice(0, 10), slice(10, None))]
        self.hosts = [Host(data, key, f"host-{i}") for i, data in enumerate(halves)]
        self.guest = Guest(guest, key, ["host-0", "host-1"], random_state=0, **HYPER)
        setup = self.guest.setup()
        for h in self.hosts:
            h.setup(setup)
        self.batch = self.guest.batch(0, 0)
        self.forwards = [h.forward(self.batch) for h in self.hosts]


def _tampered(payload: Payload, meta: dict[str, Any] | None = None, **arrays: np.ndarray) -> Payload:
    return Payload({**payload.meta, **(meta or {})}, {**payload.arrays, **arrays})


def test_tampered_payloads_are_refused(split: dict[str, PartyData]) -> None:
    job = _Job(split)
    guest, (host0, host1), arbiter = job.guest, job.hosts, job.arbiter
    forward = job.forwards[0]
    other = Arbiter(BITS)
    stranger = Host(PartyData(split["host"].ids, split["host"].features[:, :10], split["host"].feature_names[:10]),
                    other.public_key(), "host-1")
    with pytest.raises(ProtocolError, match="under another Paillier key"):
        stranger.setup(guest.setup())
    with pytest.raises(ProtocolError, match="forwards missing from \\['host-1'\\]"):
        guest.residual([forward])
    with pytest.raises(ProtocolError, match="unknown or repeated host 'host-0'"):
        guest.residual([forward, forward])
    rows = forward.arrays["wx"].shape[0]
    with pytest.raises(ProtocolError, match=f"'wx' must be {rows} ciphertexts of 256 bytes"):
        guest.residual([_tampered(forward, wx=forward.arrays["wx"][:-1]), job.forwards[1]])
    with pytest.raises(ProtocolError, match="'wx' must be"):
        guest.residual([_tampered(forward, wx=np.asarray(forward.arrays["wx"]).view(np.uint64)), job.forwards[1]])
    zero = np.array(forward.arrays["wx"])
    zero[5] = 0
    with pytest.raises(ProtocolError, match="ciphertext out of range or not invertible"):
        guest.residual([_tampered(forward, wx=zero), job.forwards[1]])
    with pytest.raises(ProtocolError, match="batch = 1, expected 0"):
        guest.residual([_tampered(forward, {"batch": 1}), job.forwards[1]])
    with pytest.raises(ProtocolError, match="expected a 'residual' payload, got type 'forward'"):
        host0.masked_gradient(forward)

    residual, own = guest.residual(job.forwards)
    assert own is not None
    masked, masked1 = host0.masked_gradient(residual), host1.masked_gradient(residual)
    with pytest.raises(ProtocolError, match="expects a batch before a residual"):
        host0.masked_gradient(residual)  # one residual per batch
    decrypted = arbiter.decrypt(masked)
    with pytest.raises(ProtocolError, match="host-0 already had its gradient of epoch 0, batch 0 decrypted"):
        arbiter.decrypt(masked)
    with pytest.raises(ProtocolError, match="party = 'host-0', expected 'host-1'"):
        host1.update(decrypted)
    with pytest.raises(ProtocolError, match="decrypted values must be uint8"):
        host0.update(_tampered(decrypted, values=np.asarray(decrypted.arrays["values"])[:, 1:]))
    host0.update(decrypted)
    host1.update(arbiter.decrypt(masked1))
    values = np.asarray(masked1.arrays["values"])
    with pytest.raises(ProtocolError, match="host-1 asks to decrypt 3 values, 1 before"):
        arbiter.decrypt(_tampered(masked1, {"batch": 1}, values=np.vstack([values, values, values])))
    with pytest.raises(ProtocolError, match="batch = 0, expected 1"):
        host0.forward(job.batch)  # a replayed batch announcement
