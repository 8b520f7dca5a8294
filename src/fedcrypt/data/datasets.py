"""Built-in datasets: embedded scikit-learn sets and the MNIST-style IDX sets.

Loaded datasets are cached in-process (simulations load the same data repeatedly) and their
arrays are read-only, so no caller can corrupt the cached copy.
"""

import logging
import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import platformdirs
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split

from fedcrypt.data.errors import DatasetError
from fedcrypt.data.fetch import ensure_files
from fedcrypt.data.idx import read_idx_pair

log = logging.getLogger(__name__)

# The embedded sets get a fixed split so the test set never depends on a job's seed.
_SPLIT_SEED = 0
_TEST_FRACTION = 0.2

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split with float32 inputs of shape (N, *input_shape) and int64 labels."""

    name: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        """Reject inconsistent shapes early instead of failing deep inside training."""
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if tuple(x.shape[1:]) != self.input_shape or len(x) != len(y):
                raise ValueError(
                    f"{self.name} {split}: x {x.shape} / y {y.shape} "
                    f"do not match input_shape {self.input_shape}"
                )
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes"
            )

    @property
    def num_features(self) -> int:
        """Number of input values per sample (product of ``input_shape``)."""
        return math.prod(self.input_shape)


@dataclass(frozen=True)
class _IdxSource:
    """Where an IDX dataset lives locally and remotely, and the digests of its four files."""

    title: str
    subdir: str
    base_url: str
    sha256: Mapping[str, str]
    class_names: tuple[str, ...]


_IDX_SOURCES: dict[str, _IdxSource] = {
    "mnist": _IdxSource(
        title="MNIST",
        subdir="mnist",
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        sha256={
            TRAIN_IMAGES: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            TRAIN_LABELS: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            TEST_IMAGES: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            TEST_LABELS: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        class_names=tuple(str(d) for d in range(10)),
    ),
    "fashion_mnist": _IdxSource(
        title="Fashion-MNIST",
        subdir="fashion-mnist",
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        sha256={
            TRAIN_IMAGES: "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            TRAIN_LABELS: "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            TEST_IMAGES: "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            TEST_LABELS: "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
    ),
}


def _make(
    name: str,
    split: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    class_names: tuple[str, ...],
) -> Dataset:
    """Build a `Dataset` from (x_train, x_test, y_train, y_test), making every array read-only."""
    x_train, x_test, y_train, y_test = split
    for array in split:
        array.setflags(write=False)
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=len(class_names),
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
        class_names=class_names,
    )


def _fixed_split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 80/20 split with a fixed seed: (x_train, x_test, y_train, y_test)."""
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=_TEST_FRACTION, stratify=y, random_state=_SPLIT_SEED
    )
    return x_train, x_test, y_train, y_test


def _load_digits() -> Dataset:
    """scikit-learn's 8x8 digits, scaled to [0, 1] as (N, 1, 8, 8)."""
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    return _make("digits", _fixed_split(x, y), tuple(str(c) for c in bunch.target_names))


def _load_breast_cancer() -> Dataset:
    """scikit-learn's breast-cancer table (N, 30), standardized with the train statistics."""
    bunch = load_breast_cancer()
    x_train, x_test, y_train, y_test = _fixed_split(bunch.data, bunch.target.astype(np.int64))
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    split = (
        ((x_train - mean) / std).astype(np.float32),
        ((x_test - mean) / std).astype(np.float32),
        y_train,
        y_test,
    )
    return _make("breast_cancer", split, tuple(str(c) for c in bunch.target_names))


_EMBEDDED: dict[str, Callable[[], Dataset]] = {
    "digits": _load_digits,
    "breast_cancer": _load_breast_cancer,
}

DATASETS: tuple[str, ...] = (*_EMBEDDED, *_IDX_SOURCES)

_idx_cache: dict[tuple[str, Path], Dataset] = {}
_idx_cache_lock = threading.Lock()


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Data root: the explicit argument, else ``$FEDCRYPT_DATA``, else the user cache dir."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("FEDCRYPT_DATA")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("fedcrypt")) / "data"


@lru_cache(maxsize=None)
def _load_embedded(name: str) -> Dataset:
    """Load (once per process) one of the scikit-learn datasets."""
    return _EMBEDDED[name]()


def _read_idx_split(images: Path, labels: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """IDX images -> float32 (N, 1, H, W) in [0, 1]; labels -> int64."""
    raw_x, raw_y = read_idx_pair(images, labels, num_classes=num_classes)
    x = raw_x.astype(np.float32)[:, None]
    x /= 255.0
    return x, raw_y.astype(np.int64)


def _load_idx(name: str, source: _IdxSource, folder: Path, download: bool) -> Dataset:
    """Fetch/verify the four IDX files of ``source`` in ``folder`` and parse them."""
    paths = ensure_files(folder, source.sha256, source.base_url, download=download, title=source.title)
    num_classes = len(source.class_names)
    x_train, y_train = _read_idx_split(paths[TRAIN_IMAGES], paths[TRAIN_LABELS], num_classes)
    x_test, y_test = _read_idx_split(paths[TEST_IMAGES], paths[TEST_LABELS], num_classes)
    log.info("Loaded %s from %s: %d train, %d test samples", name, folder, len(y_train), len(y_test))
    return _make(name, (x_train, x_test, y_train, y_test), source.class_names)


def load_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = True) -> Dataset:
    """Load a built-in dataset by name (see `DATASETS`), cached per process.

    ``data_dir`` only matters for the file-based sets (see `resolve_data_dir`); ``download=False``
    (or ``FEDCRYPT_OFFLINE``) forbids fetching missing files.
    """
    if name in _EMBEDDED:
        return _load_embedded(name)
    source = _IDX_SOURCES.get(name)
    if source is None:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    folder = (resolve_data_dir(data_dir) / source.subdir).resolve()
    with _idx_cache_lock:
        dataset = _idx_cache.get((name, folder))
        if dataset is None:
            dataset = _idx_cache[(name, folder)] = _load_idx(name, source, folder, download)
    return dataset
