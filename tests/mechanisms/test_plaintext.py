from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedcrypt.core.mechanism import PayloadRejected, RecoveryError, RoundContext
from fedcrypt.core.messages import Payload, from_bytes, FitRes, to_bytes
from fedcrypt.core import wire
from fedcrypt.core.wire import FileArray, SpooledMessage
from fedcrypt.mechanisms import build_mechanism, plaintext
from fedcrypt.mechanisms.plaintext import PlaintextMechanism

CTX = RoundContext("job", 1, ("a", "b", "c"), 6)


def _round_trip(payload: Payload) -> Payload:
    """Send a payload through the real wire format, as the server receives it."""
    message = from_bytes(to_bytes(FitRes(1, 1, {}, payload), job="job", sender="a")).message
    assert isinstance(message, FitRes)
    return message.payload


@given(st.lists(arrays(np.float32, 6, elements=st.floats(-1e6, 1e6, width=32)), min_size=1, max_size=8))
@settings(max_examples=100, deadline=None)
def test_aggregate_equals_plaintext_sum(vectors: list[np.ndarray]) -> None:
    mechanism = PlaintextMechanism()
    server = mechanism.server_round(CTX)
    for i, vector in enumerate(vectors):
        payload = mechanism.client_round(CTX, str(i)).respond("protect", Payload(), vector)
        server.fold("protect", str(i), _round_trip(payload))
    total = mechanism.recover(server.finish(), CTX)
    exact = np.sum(np.array(vectors, dtype=np.float64), axis=0)
    # Recursive float32 summation: |error| <= (n - 1) * 2**-24 * sum(|x_i|) (Higham, ch. 4).
    bound = (len(vectors) - 1) * 2.0**-24 * np.sum(np.abs(np.array(vectors, dtype=np.float64)), axis=0)
    assert np.all(np.abs(total - exact) <= bound * 1.000001 + 1e-30)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (Payload(), "no 'vector'"),
        (Payload(arrays={"vector": np.zeros(5, dtype=np.float32)}), "shape"),
        (Payload(arrays={"vector": np.zeros(6, dtype=np.float64)}), "dtype"),
        (Payload(arrays={"vector": np.array([0, 0, np.nan, 0, np.inf, 0], dtype=np.float32)}), "2 NaN/Inf"),
    ],
)
def test_bad_payloads_are_rejected_without_touching_the_sum(payload: Payload, reason: str) -> None:
    mechanism = PlaintextMechanism()
    server = mechanism.server_round(CTX)
    server.fold("protect", "a", Payload(arrays={"vector": np.ones(6, dtype=np.float32)}))
    with pytest.raises(PayloadRejected, match=reason):
        server.fold("protect", "b", payload)
    np.testing.assert_array_equal(mechanism.recover(server.finish(), CTX), np.ones(6, dtype=np.float32))


def test_nothing_aggregated_cannot_be_recovered() -> None:
    with pytest.raises(RecoveryError, match="no payload"):
        PlaintextMechanism().server_round(CTX).finish()


def test_registry_names_the_choices() -> None:
    assert isinstance(build_mechanism("none"), PlaintextMechanism)
    with pytest.raises(ValueError, match="available: none"):
        build_mechanism("rot13")


def _spooled_payload(vector: np.ndarray) -> tuple[Payload, SpooledMessage]:
    """The payload as a server receives a large upload: spooled to a file, read window by window."""
    spooled = SpooledMessage()
    spooled.write(to_bytes(FitRes(1, 1, {}, Payload(arrays={"vector": vector})), job="job", sender="a"))
    message = from_bytes(spooled).message
    assert isinstance(message, FitRes) and isinstance(message.payload.arrays["vector"], FileArray)
    return message.payload, spooled


def test_spooled_uploads_fold_window_by_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "LAZY_BLOB_BYTES", 16)
    monkeypatch.setattr(plaintext, "WINDOW", 4)
    rng = np.random.default_rng(0)
    vectors = [rng.normal(size=CTX.vector_size).astype(np.float32) for _ in range(3)]
    mechanism = PlaintextMechanism()
    server = mechanism.server_round(CTX)
    for i, vector in enumerate(vectors):
        payload, spooled = _spooled_payload(vector)
        server.fold("protect", str(i), payload)
        spooled.close()
    bad = vectors[0].copy()
    bad[5] = np.nan  # in the last window: the earlier windows must not have been added
    payload, spooled = _spooled_payload(bad)
    with pytest.raises(PayloadRejected, match="1 NaN/Inf"):
        server.fold("protect", "bad", payload)
    np.testing.assert_array_equal(mechanism.recover(server.finish(), CTX), vectors[0] + vectors[1] + vectors[2])
