from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrypt.core.messages import (
    ErrorReply,
    FitIns,
    FitRes,
    Payload,
    Shutdown,
    StageIns,
    StageRes,
    from_bytes,
    to_bytes,
)
from fedcrypt.core import wire
from fedcrypt.core.wire import LAZY_BLOB_BYTES, MAGIC, Envelope, FileArray, SpooledMessage, WireError, decode, encode


def _fit_ins() -> FitIns:
    params = np.linspace(-1, 1, 17, dtype=np.float32)
    payload = Payload({"note": "x"}, {"mask": np.arange(6, dtype=np.uint8).reshape(2, 3)})
    return FitIns(3, params, {"lr": 0.1, "weighting": "samples", "flag": True}, ("a", "b"), payload)


@pytest.mark.parametrize(
    "message",
    [
        _fit_ins(),
        FitIns(1, None, {}, ()),
        FitRes(2, 40, {"train_loss": 0.5}, Payload(arrays={"vector": np.ones(5, dtype=np.float32)})),
        StageIns(4, "unmask", Payload({"dropped": ["c"]})),
        StageRes(4, "unmask", Payload(arrays={"shares": np.arange(4, dtype=np.uint64)}), 0.25),
        StageRes(4, "unmask", Payload({"dropped": []}, {"s": np.zeros((0, 33), dtype=np.uint8)})),  # empty, 2-D
        ErrorReply(7, "no"),
        Shutdown(9),
    ],
)
def test_messages_round_trip(message: object) -> None:
    received = from_bytes(to_bytes(message, job="job-1", sender="client-7"))  # type: ignore[arg-type]
    assert (received.job, received.sender) == ("job-1", "client-7")
    got = received.message
    assert type(got) is type(message)
    for key, value in vars(message).items():
        other = getattr(got, key)
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(other, value)
        elif isinstance(value, Payload):
            assert other.meta == value.meta and other.arrays.keys() == value.arrays.keys()
            for name, array in value.arrays.items():
                np.testing.assert_array_equal(other.arrays[name], array)
                assert other.arrays[name].dtype == array.dtype
        else:
            assert other == value, key


def test_decoded_blobs_are_read_only_views() -> None:
    data = to_bytes(_fit_ins(), job="j", sender="s")
    params = from_bytes(data).message.params  # type: ignore[union-attr]
    assert params is not None and not params.flags.writeable
    assert params.base is not None  # a view into the message, not a copy


def test_wire_size_is_payload_plus_small_header() -> None:
    params = np.zeros(1_000_000, dtype=np.float32)
    size = len(to_bytes(FitIns(1, params, {}, ("a",)), job="j", sender="server"))
    assert 4_000_000 < size < 4_000_400


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_decode_silently(data: bytes) -> None:
    try:
        from_bytes(data)
    except WireError:
        return
    pytest.fail("random bytes decoded as a message")


@given(st.integers(0, 200))
@settings(max_examples=100, deadline=None)
def test_any_truncation_is_rejected(cut: int) -> None:
    data = to_bytes(_fit_ins(), job="j", sender="s")
    with pytest.raises(WireError):
        from_bytes(data[: min(cut, len(data) - 1)])


def _raw(header: object, tail: bytes = b"") -> bytes:
    body = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(body)) + body + tail


GOOD = {"type": "shutdown", "job": "j", "round": 0, "sender": "s", "meta": {}, "blobs": []}


@pytest.mark.parametrize(
    ("header", "tail", "reason"),
    [
        ({**GOOD, "round": -1}, b"", "negative round"),
        ({**GOOD, "round": True}, b"", "'round'"),
        ({**GOOD, "type": "launch_missiles"}, b"", "unknown message type"),
        ({**GOOD, "blobs": [["a", "object", [1]]]}, b"", "unsupported dtype"),
        ({**GOOD, "blobs": [["a", "uint8", [-1]]]}, b"", "invalid shape"),
        ({**GOOD, "blobs": [["a", "uint8", [2]], ["a", "uint8", [2]]]}, b"abcd", "repeated"),
        ({**GOOD, "blobs": [["a", "uint8", [8]]]}, b"abcd", "truncated"),
        (GOOD, b"extra", "trailing bytes"),
        ([1, 2], b"", "not a JSON object"),
        ({**GOOD, "type": "fit_res", "meta": {"num_examples": "9", "metrics": {}}}, b"", "num_examples"),
        ({**GOOD, "type": "fit_ins", "meta": {"config": {"a": [1]}, "participants": []}}, b"", "scalars"),
        ({**GOOD, "type": "stage_res", "meta": {"stage": "s", "seconds": -1}}, b"", "stage seconds"),
    ],
)
def test_malformed_headers_name_the_problem(header: object, tail: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        from_bytes(_raw(header, tail))


def test_header_length_beyond_message_is_rejected() -> None:
    with pytest.raises(WireError, match="header length"):
        decode(MAGIC + struct.pack("<I", 10_000) + b"{}")


def test_encode_refuses_object_arrays() -> None:
    with pytest.raises(WireError, match="unsupported dtype"):
        encode(Envelope("x", "j", 0, "s", {}, {"a": np.array(["x"], dtype=object)}))


def _spool(data: bytes) -> SpooledMessage:
    spooled = SpooledMessage()
    for start in range(0, len(data), 1000):
        spooled.write(data[start : start + 1000])
    return spooled


@given(
    st.lists(st.integers(0, 3000), min_size=1, max_size=4),
    st.sampled_from(["float32", "int64", "uint8"]),
    st.integers(0, 2**32 - 1),
)
@settings(max_examples=40, deadline=None)
def test_a_spooled_message_decodes_to_the_same_arrays(sizes: list[int], dtype: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    blobs = {f"b{i}": rng.integers(0, 100, size).astype(dtype) for i, size in enumerate(sizes)}
    data = encode(Envelope("t", "job", 1, "me", {"k": [1, 2]}, blobs))
    spooled = _spool(data)
    assert len(spooled) == len(data)
    with pytest.MonkeyPatch.context() as patch:  # small threshold: both kinds of blob appear
        patch.setattr(wire, "LAZY_BLOB_BYTES", 4000)
        in_memory, from_file = decode(data), decode(spooled)
    assert (from_file.type, from_file.meta) == (in_memory.type, in_memory.meta)
    for name, array in in_memory.blobs.items():
        got = from_file.blobs[name]
        assert isinstance(got, FileArray) == (array.nbytes >= 4000)
        assert (got.shape, got.dtype) == (array.shape, array.dtype)
        np.testing.assert_array_equal(np.asarray(got), array)
        cut = int(rng.integers(0, array.shape[0] + 1))
        np.testing.assert_array_equal(got[cut:], array[cut:])
        np.testing.assert_array_equal(got[:cut], array[:cut])
    spooled.close()


def test_large_spooled_blobs_stay_in_the_file_until_sliced() -> None:
    vector = np.arange(LAZY_BLOB_BYTES // 4 + 10, dtype=np.float32)
    spooled = _spool(to_bytes(FitIns(2, vector, {}, ("a",)), job="j", sender="server"))
    params = from_bytes(spooled).message.params  # type: ignore[union-attr]
    assert isinstance(params, FileArray) and len(params) == vector.shape[0] and params.nbytes == vector.nbytes
    np.testing.assert_array_equal(params[5:-3], vector[5:-3])
    with pytest.raises(TypeError, match="step 1"):
        params[::2]
    with pytest.raises(TypeError, match="only slices"):
        params[3]  # type: ignore[index]
    spooled.close()
    with pytest.raises(ValueError):
        params[:10]


def test_truncated_spooled_messages_are_rejected() -> None:
    data = encode(Envelope("t", "job", 1, "me", {}, {"x": np.ones(300_000, dtype=np.float32)}))
    with pytest.raises(WireError, match="truncated"):
        decode(_spool(data[:-1]))
    with pytest.raises(WireError, match="bad magic"):
        decode(_spool(b"FCM2" + data[4:]))
    with pytest.raises(WireError, match="trailing"):
        decode(_spool(data + b"\0"))
