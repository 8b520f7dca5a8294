"""Reader for the IDX format of MNIST-style datasets (gzip-compressed or plain).

Only unsigned-byte IDX files are supported, which is all MNIST and Fashion-MNIST use.
Every structural problem is reported as a `DatasetError` rather than a numpy/gzip error.
"""

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from fedcrypt.data.errors import DatasetError

_UBYTE = 0x08


def _read_bytes(path: Path) -> bytes:
    """Return the (decompressed, for ``.gz``) bytes of ``path``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DatasetError(f"{path} does not exist") from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"cannot read {path}: corrupt or truncated file ({exc}); delete it and fetch it again"
        ) from exc


def read_idx(path: str | Path, *, ndim: int | None = None) -> np.ndarray:
    """Parse an unsigned-byte IDX file into a read-only uint8 array.

    ``ndim`` (3 for images, 1 for labels) additionally pins the magic to ``0x0800 + ndim``.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path} is not an IDX file: only {len(data)} bytes")
    magic = int.from_bytes(data[:4], "big")
    dims = data[3]
    if data[:2] != b"\0\0" or data[2] != _UBYTE or dims == 0 or ndim not in (None, dims):
        wanted = f"0x{0x0800 + ndim:08x}" if ndim is not None else "0x000008NN"
        raise DatasetError(
            f"{path} has bad IDX magic 0x{magic:08x}, expected {wanted} (unsigned bytes)"
        )
    header = 4 + 4 * dims
    if len(data) < header:
        raise DatasetError(f"{path} is truncated: IDX header needs {header} bytes, file has {len(data)}")
    shape = struct.unpack(f">{dims}I", data[4:header])
    payload, expected = len(data) - header, math.prod(shape)
    if payload != expected:
        raise DatasetError(
            f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes) "
            f"but the payload has {payload} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_pair(
    images_path: str | Path, labels_path: str | Path, *, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read matching image (N, H, W) and label (N,) IDX files and check they agree."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise DatasetError(
            f"{Path(images_path).name} has {len(images)} images but "
            f"{Path(labels_path).name} has {len(labels)} labels"
        )
    if labels.size and int(labels.max()) >= num_classes:
        raise DatasetError(
            f"{labels_path} contains label {int(labels.max())}, expected 0..{num_classes - 1}"
        )
    return images, labels
