"""Built-in datasets: embedded scikit-learn sets, real MNIST/Fashion-MNIST, caching, data dir."""

from pathlib import Path

import numpy as np
import platformdirs
import pytest
from sklearn.datasets import load_digits

from fedcrypt.data import DATASETS, Dataset, DatasetError, load_dataset, resolve_data_dir
from fedcrypt.data import datasets as datasets_module

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def test_names() -> None:
    assert DATASETS == ("digits", "breast_cancer", "mnist", "fashion_mnist")


def test_unknown_name_lists_available() -> None:
    expected = "unknown dataset 'cifar10'; available: digits, breast_cancer, mnist, fashion_mnist"
    with pytest.raises(DatasetError, match=expected):
        load_dataset("cifar10")


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDCRYPT_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_dir(str(tmp_path / "explicit")) == tmp_path / "explicit"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("FEDCRYPT_DATA")
    assert resolve_data_dir() == Path(platformdirs.user_cache_dir("fedcrypt")) / "data"


def assert_read_only(dataset: Dataset) -> None:
    for array in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        assert not array.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        dataset.x_train[0] = 0


def test_digits() -> None:
    dataset = load_dataset("digits")
    assert dataset.x_train.shape == (1437, 1, 8, 8) and dataset.x_test.shape == (360, 1, 8, 8)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int64
    assert dataset.input_shape == (1, 8, 8) and dataset.num_features == 64
    assert dataset.num_classes == 10 and dataset.class_names == tuple("0123456789")
    assert 0.0 <= dataset.x_train.min() and dataset.x_train.max() == 1.0
    # stratified: every class has ~20% of its samples in the test split
    test_share = np.bincount(dataset.y_test) / (np.bincount(dataset.y_test) + np.bincount(dataset.y_train))
    assert np.all(np.abs(test_share - 0.2) < 0.01)
    assert_read_only(dataset)
    assert load_dataset("digits") is dataset


def test_digits_split_is_fixed() -> None:
    """The test split must not depend on any global or job randomness."""
    datasets_module._load_embedded.cache_clear()
    np.random.seed(123)
    first = load_dataset("digits")
    datasets_module._load_embedded.cache_clear()
    np.random.seed(456)
    second = load_dataset("digits")
    assert first is not second
    np.testing.assert_array_equal(first.x_test, second.x_test)
    np.testing.assert_array_equal(first.y_train, second.y_train)
    # train + test together are exactly the 1797 original images (nothing lost or duplicated)
    both = np.concatenate([first.x_train, first.x_test]).reshape(-1, 64) * 16
    np.testing.assert_array_equal(np.unique(both, axis=0), np.unique(load_digits().data, axis=0))
    assert len(both) == len(load_digits().data)


def test_breast_cancer() -> None:
    dataset = load_dataset("breast_cancer")
    assert dataset.x_train.shape == (455, 30) and dataset.x_test.shape == (114, 30)
    assert dataset.x_train.dtype == np.float32 and dataset.y_test.dtype == np.int64
    assert dataset.class_names == ("malignant", "benign") and dataset.num_features == 30
    np.testing.assert_allclose(dataset.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(dataset.x_train.std(axis=0), 1.0, atol=1e-4)
    # test data is scaled with the train statistics, so its mean is near but not exactly zero
    assert 0 < np.abs(dataset.x_test.mean(axis=0)).max() < 1.0
    assert_read_only(dataset)


def test_dataset_rejects_inconsistent_shapes() -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    y = np.zeros(4, dtype=np.int64)
    with pytest.raises(ValueError, match="do not match input_shape"):
        Dataset("t", x, y, x, y[:3], 2, (3,), ("a", "b"))
    with pytest.raises(ValueError, match="1 class names for 2 classes"):
        Dataset("t", x, y, x, y, 2, (3,), ("a",))


@pytest.fixture(scope="module")
def mnist(shared_data_dir: Path) -> Dataset:
    return load_dataset("mnist", shared_data_dir, download=False)


@pytest.fixture(scope="module")
def fashion(shared_data_dir: Path) -> Dataset:
    return load_dataset("fashion_mnist", shared_data_dir, download=False)


def test_mnist(mnist: Dataset) -> None:
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.x_train.dtype == np.float32 and mnist.y_train.dtype == np.int64
    assert mnist.x_train.min() == 0.0 and mnist.x_train.max() == 1.0
    assert np.bincount(mnist.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(mnist.y_test).tolist() == MNIST_TEST_COUNTS
    assert mnist.num_classes == 10 and mnist.num_features == 784
    assert_read_only(mnist)


def test_fashion_mnist(fashion: Dataset) -> None:
    assert fashion.x_train.shape == (60000, 1, 28, 28) and fashion.x_test.shape == (10000, 1, 28, 28)
    assert fashion.x_test.dtype == np.float32 and fashion.y_test.dtype == np.int64
    assert fashion.x_test.min() == 0.0 and fashion.x_test.max() == 1.0
    assert np.bincount(fashion.y_train).tolist() == [6000] * 10
    assert np.bincount(fashion.y_test).tolist() == [1000] * 10
    assert fashion.class_names == FASHION_NAMES
    assert_read_only(fashion)


def test_cache_is_keyed_by_resolved_path(
    mnist: Dataset, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDCRYPT_DATA", str(shared_data_dir / "mnist" / ".."))
    assert load_dataset("mnist") is mnist
    assert load_dataset("mnist", shared_data_dir, download=False) is mnist
