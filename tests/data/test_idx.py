"""IDX parsing: round trips and every kind of corrupt input."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from fedcrypt.data import DatasetError, read_idx
from fedcrypt.data.idx import read_idx_pair


def idx_bytes(array: np.ndarray, *, type_code: int = 0x08) -> bytes:
    """Encode a uint8 array as IDX (magic 0x0000 <type> <ndim>, big-endian dims, payload)."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


@settings(max_examples=40, deadline=None)
@given(arrays(np.uint8, array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6)), st.booleans())
def test_round_trip(tmp_path_factory: pytest.TempPathFactory, array: np.ndarray, compressed: bool) -> None:
    folder = tmp_path_factory.mktemp("idx")
    if compressed:
        path = write_gz(folder / "a-idx.gz", idx_bytes(array))
    else:
        path = folder / "a-idx"
        path.write_bytes(idx_bytes(array))
    result = read_idx(path, ndim=array.ndim)
    assert result.dtype == np.uint8
    assert result.shape == array.shape
    np.testing.assert_array_equal(result, array)
    assert not result.flags.writeable


def test_pair_reads_images_and_labels(tmp_path: Path) -> None:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([0, 9, 4], dtype=np.uint8)
    x, y = read_idx_pair(
        write_gz(tmp_path / "img.gz", idx_bytes(images)),
        write_gz(tmp_path / "lab.gz", idx_bytes(labels)),
        num_classes=10,
    )
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (bytes([0, 0, 0x0D, 3]), "float type code"),
        (bytes([1, 0, 0x08, 3]), "non-zero leading bytes"),
        (bytes([0, 0, 0x08, 1]), "labels magic where images are expected"),
        (bytes([0, 0, 0x08, 0]), "zero dimensions"),
    ],
)
def test_bad_magic(tmp_path: Path, header: bytes, reason: str) -> None:
    path = write_gz(tmp_path / "x.gz", header + struct.pack(">3I", 1, 2, 2) + bytes(4))
    with pytest.raises(DatasetError, match="bad IDX magic"):
        read_idx(path, ndim=3)


def test_truncated_payload(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((4, 3, 3), dtype=np.uint8))
    path = write_gz(tmp_path / "x.gz", data[:-5])
    with pytest.raises(DatasetError, match=r"truncated.*36 bytes.*31 bytes"):
        read_idx(path)


def test_trailing_bytes(tmp_path: Path) -> None:
    path = write_gz(tmp_path / "x.gz", idx_bytes(np.zeros(4, dtype=np.uint8)) + b"extra")
    with pytest.raises(DatasetError, match="payload has 9 bytes"):
        read_idx(path)


def test_truncated_header(tmp_path: Path) -> None:
    path = write_gz(tmp_path / "x.gz", bytes([0, 0, 8, 3]) + b"\0\0\0\1")
    with pytest.raises(DatasetError, match="header needs 16 bytes"):
        read_idx(path)


def test_too_short(tmp_path: Path) -> None:
    path = write_gz(tmp_path / "x.gz", b"\0\0")
    with pytest.raises(DatasetError, match="not an IDX file"):
        read_idx(path)


def test_non_gzip_garbage(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(b"this is not gzip at all" * 10)
    with pytest.raises(DatasetError, match=r"x\.gz: corrupt or truncated"):
        read_idx(path)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    compressed = gzip.compress(idx_bytes(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)))
    path = tmp_path / "x.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        read_idx(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_idx(tmp_path / "nope.gz")


def test_pair_count_mismatch(tmp_path: Path) -> None:
    images = write_gz(tmp_path / "img.gz", idx_bytes(np.zeros((3, 2, 2), dtype=np.uint8)))
    labels = write_gz(tmp_path / "lab.gz", idx_bytes(np.zeros(2, dtype=np.uint8)))
    with pytest.raises(DatasetError, match="3 images but lab.gz has 2 labels"):
        read_idx_pair(images, labels, num_classes=10)


def test_pair_label_out_of_range(tmp_path: Path) -> None:
    images = write_gz(tmp_path / "img.gz", idx_bytes(np.zeros((2, 2, 2), dtype=np.uint8)))
    labels = write_gz(tmp_path / "lab.gz", idx_bytes(np.array([3, 10], dtype=np.uint8)))
    with pytest.raises(DatasetError, match=r"label 10, expected 0\.\.9"):
        read_idx_pair(images, labels, num_classes=10)


def test_pair_rejects_swapped_files(tmp_path: Path) -> None:
    images = write_gz(tmp_path / "img.gz", idx_bytes(np.zeros((2, 2, 2), dtype=np.uint8)))
    labels = write_gz(tmp_path / "lab.gz", idx_bytes(np.zeros(2, dtype=np.uint8)))
    with pytest.raises(DatasetError, match="expected 0x00000803"):
        read_idx_pair(labels, images, num_classes=10)
