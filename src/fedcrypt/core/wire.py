"""The byte format of every fedcrypt message, shared by simulation and deployment.

A message is ``MAGIC | u32 header length | JSON header | blob bytes``. The header names the
message type, the job, the round and the sender, carries small JSON metadata, and lists each
binary blob as ``[name, dtype, shape]``; the blobs follow back to back in that order. Large
arrays (model parameters, ciphertexts) travel as blobs, so decoding is a bounds check plus
``numpy.frombuffer`` views into the received bytes: no copies, no pickle.

Decoding trusts nothing: a wrong magic, a header that is not the expected JSON shape, an unknown
dtype, or blob sizes that do not add up to the message length raise :class:`WireError`.

A large received message need not sit in memory: a transport may write it to a
:class:`SpooledMessage` (an unlinked temporary file) as it arrives. Decoding that gives
:class:`FileArray` blobs, read window by window on demand, so a server folding an upload into its
sum holds the sum and one window, not the sum and the whole upload.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

MAGIC = b"FCM1"
_HEADER_LEN = struct.Struct("<I")
_PREFIX = len(MAGIC) + _HEADER_LEN.size
MAX_HEADER_BYTES = 1 << 20
ALLOWED_DTYPES = frozenset({"float32", "float64", "int32", "int64", "uint8", "uint32", "uint64"})


#: Blobs at least this large stay in the file when a spooled message is decoded.
LAZY_BLOB_BYTES = 1 << 20
#: Elements per step when code walks a large vector (a few MB: no update-sized temporaries).
WINDOW = 1 << 20


class WireError(ValueError):
    """A message that cannot be decoded; the reason says what is wrong."""


class SpooledMessage:
    """A received message kept in an unlinked temporary file (mode 0600) instead of memory.

    Written once, front to back, by the transport; then read at offsets by :func:`decode` and the
    :class:`FileArray` blobs it hands out. The file disappears when closed or garbage-collected.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # in TMPDIR
        self._size = 0

    def write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._size += len(data)

    def __len__(self) -> int:
        return self._size

    def read_at(self, offset: int, size: int) -> bytes:
        self._file.flush()
        data = os.pread(self._file.fileno(), size, offset)
        if len(data) != size:
            raise WireError(f"spooled message ends before byte {offset + size}")
        return data

    def readinto_at(self, offset: int, buffer: memoryview) -> None:
        self._file.flush()
        done = 0
        while done < len(buffer):
            count = os.preadv(self._file.fileno(), [buffer[done:]], offset + done)
            if count == 0:
                raise WireError(f"spooled message ends before byte {offset + len(buffer)}")
            done += count

    def close(self) -> None:
        self._file.close()


class FileArray:
    """A read-only array that stays in a :class:`SpooledMessage` until sliced.

    Supports what windowed code needs: ``shape``, ``dtype``, ``ndim``, ``size``, ``nbytes``,
    ``len()``, 1-D slicing with step 1 (each slice is read from the file into a new array) and
    ``numpy.asarray`` (reads everything: avoid for large blobs).
    """

    def __init__(self, source: SpooledMessage, offset: int, dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
        self._source = source
        self._offset = offset
        self.dtype = dtype
        self.shape = shape
        self.ndim = len(shape)
        self.size = math.prod(shape)
        self.nbytes = self.size * dtype.itemsize

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def __getitem__(self, key: slice) -> np.ndarray:
        if self.ndim != 1 or not isinstance(key, slice):
            raise TypeError("a FileArray supports only slices of a 1-D array; use numpy.asarray for more")
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            raise TypeError("a FileArray slice must have step 1")
        return self._read(start, max(stop - start, 0))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self._read(0, self.size).reshape(self.shape)
        return array if dtype is None else array.astype(dtype, copy=False)

    def _read(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=self.dtype)
        self._source.readinto_at(self._offset + start * self.dtype.itemsize, memoryview(out).cast("B"))
        return out


Blob = Union[np.ndarray, FileArray]


def add_windowed(total: np.ndarray, blob: Blob) -> None:
    """``total += blob`` window by window, so a spooled blob is never read whole (integer
    dtypes wrap: uint64 adds mod 2^64)."""
    for start in range(0, total.shape[0], WINDOW):
        total[start : start + WINDOW] += blob[start : start + WINDOW]


@dataclass(frozen=True)
class Envelope:
    """A decoded message: routing fields, JSON metadata and named arrays."""

    type: str
    job: str
    round: int
    sender: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    blobs: Mapping[str, Blob] = field(default_factory=dict)


def encode_parts(envelope: Envelope) -> list[memoryview]:
    """Serialize to a list of buffers (header first), so a transport can send them without joining."""
    blob_index = []
    buffers = []
    for name, blob in envelope.blobs.items():
        array = np.ascontiguousarray(blob)
        dtype = array.dtype.name
        if dtype not in ALLOWED_DTYPES:
            raise WireError(f"blob {name!r} has unsupported dtype {dtype}")
        blob_index.append([name, dtype, list(array.shape)])
        buffers.append(memoryview(array.reshape(-1)).cast("B"))  # flat: empty arrays of any shape too
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


def decode(data: bytes | bytearray | memoryview | SpooledMessage) -> Envelope:
    """Parse and validate a message; blobs are read-only views into ``data``, or, for a spooled
    message, :class:`FileArray` blobs when at least :data:`LAZY_BLOB_BYTES` long."""
    spooled = data if isinstance(data, SpooledMessage) else None
    view = memoryview(b"") if spooled else memoryview(data).cast("B")
    length = len(spooled) if spooled else len(view)

    def read(offset: int, size: int) -> bytes | memoryview:
        return spooled.read_at(offset, size) if spooled else view[offset : offset + size]

    if length < _PREFIX or bytes(read(0, len(MAGIC))) != MAGIC:
        raise WireError("not a fedcrypt message (bad magic or too short)")
    (header_len,) = _HEADER_LEN.unpack_from(read(len(MAGIC), _HEADER_LEN.size))
    if header_len > MAX_HEADER_BYTES or _PREFIX + header_len > length:
        raise WireError(f"header length {header_len} does not fit the message")
    try:
        header = json.loads(bytes(read(_PREFIX, header_len)))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not valid JSON: {exc}") from exc
    _check_header(header)
    blobs: dict[str, Blob] = {}
    offset = _PREFIX + header_len
    for name, dtype, shape in header["blobs"]:
        count = math.prod(shape)
        nbytes = count * np.dtype(dtype).itemsize
        if offset + nbytes > length:
            raise WireError(f"blob {name!r} is truncated")
        if spooled and nbytes >= LAZY_BLOB_BYTES:
            blobs[name] = FileArray(spooled, offset, np.dtype(dtype), tuple(shape))
        else:
            array = np.frombuffer(read(offset, nbytes), dtype=dtype, count=count).reshape(shape)
            array.flags.writeable = False
            blobs[name] = array
        offset += nbytes
    if offset != length:
        raise WireError(f"{length - offset} trailing bytes after the last blob")
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
