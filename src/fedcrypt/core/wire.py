"""The byte format of every fedcrypt message, shared by simulation and deployment.

A message is ``MAGIC | u32 header length | JSON header | blob bytes``. The header names the
message type, the job, the round and the sender, carries small JSON metadata, and lists each
binary blob as ``[name, dtype, shape]``; the blobs follow back to back in that order. Large
arrays (model parameters, ciphertexts) travel as blobs, so decoding is a bounds check plus
``numpy.frombuffer`` views into the received bytes: no copies, no pickle.

Decoding trusts nothing: a wrong magic, a header that is not the expected JSON shape, an unknown
dtype, or blob sizes that do not add up to the message length raise :class:`WireError`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"FCM1"
_HEADER_LEN = struct.Struct("<I")
_PREFIX = len(MAGIC) + _HEADER_LEN.size
MAX_HEADER_BYTES = 1 << 20
ALLOWED_DTYPES = frozenset({"float32", "float64", "int32", "int64", "uint8", "uint32", "uint64"})


class WireError(ValueError):
    """A message that cannot be decoded; the reason says what is wrong."""


@dataclass(frozen=True)
class Envelope:
    """A decoded message: routing fields, JSON metadata and named arrays."""

    type: str
    job: str
    round: int
    sender: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    blobs: Mapping[str, np.ndarray] = field(default_factory=dict)


def encode_parts(envelope: Envelope) -> list[memoryview]:
    """Serialize to a list of buffers (header first), so a transport can send them without joining."""
    blob_index = []
    buffers = []
    for name, array in envelope.blobs.items():
        array = np.ascontiguousarray(array)
        dtype = array.dtype.name
        if dtype not in ALLOWED_DTYPES:
            raise WireError(f"blob {name!r} has unsupported dtype {dtype}")
        blob_index.append([name, dtype, list(array.shape)])
        buffers.append(memoryview(array).cast("B"))
    header = json.dumps(
        {
            "type": envelope.type,
            "job": envelope.job,
            "round": envelope.round,
            "sender": envelope.sender,
            "meta": dict(envelope.meta),
            "blobs": blob_index,
        },
        separators=(",", ":"),
        allow_nan=False,
    ).encode()
    prefix = MAGIC + _HEADER_LEN.pack(len(header)) + header
    return [memoryview(prefix), *buffers]


def encode(envelope: Envelope) -> bytes:
    return b"".join(encode_parts(envelope))


def decode(data: bytes | bytearray | memoryview) -> Envelope:
    """Parse and validate a message; blobs are read-only views into ``data``."""
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX or bytes(view[: len(MAGIC)]) != MAGIC:
        raise WireError("not a fedcrypt message (bad magic or too short)")
    (header_len,) = _HEADER_LEN.unpack_from(view, len(MAGIC))
    if header_len > MAX_HEADER_BYTES or _PREFIX + header_len > len(view):
        raise WireError(f"header length {header_len} does not fit the message")
    try:
        header = json.loads(bytes(view[_PREFIX : _PREFIX + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not valid JSON: {exc}") from exc
    _check_header(header)
    blobs: dict[str, np.ndarray] = {}
    offset = _PREFIX + header_len
    for name, dtype, shape in header["blobs"]:
        count = math.prod(shape)
        nbytes = count * np.dtype(dtype).itemsize
        if offset + nbytes > len(view):
            raise WireError(f"blob {name!r} is truncated")
        array = np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)
        array.flags.writeable = False
        blobs[name] = array
        offset += nbytes
    if offset != len(view):
        raise WireError(f"{len(view) - offset} trailing bytes after the last blob")
    return Envelope(header["type"], header["job"], header["round"], header["sender"], header["meta"], blobs)


def _check_header(header: Any) -> None:
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    expected = {"type": str, "job": str, "round": int, "sender": str, "meta": dict, "blobs": list}
    for key, kind in expected.items():
        value = header.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise WireError(f"header field {key!r} missing or not {kind.__name__}")
    if header["round"] < 0:
        raise WireError("negative round number")
    seen = set()
    for entry in header["blobs"]:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise WireError("blob index entries must be [name, dtype, shape]")
        name, dtype, shape = entry
        if not isinstance(name, str) or name in seen:
            raise WireError(f"blob name {name!r} is invalid or repeated")
        seen.add(name)
        if dtype not in ALLOWED_DTYPES:
            raise WireError(f"blob {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise WireError(f"blob {name!r} has an invalid shape")
