"""Finding, downloading and verifying dataset files, all without touching the network."""

import hashlib
import http.client
import io
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedcrypt.data import DatasetError, load_dataset
from fedcrypt.data.fetch import DOWNLOAD_TIMEOUT_S, downloads_disabled_reason, ensure_files

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


class FakeMirror:
    """Stands in for urllib.request.urlopen: serves bytes by file name and records calls."""

    def __init__(self, files: dict[str, bytes], error: Exception | None = None) -> None:
        self.files = files
        self.error = error
        self.calls: list[tuple[str, float | None]] = []

    def __call__(self, url: str, timeout: float | None = None) -> io.BytesIO:
        self.calls.append((url, timeout))
        name = url.rsplit("/", 1)[-1]
        if self.error is not None:
            raise self.error
        if name not in self.files:
            raise urllib.error.URLError(f"404 for {name}")
        return io.BytesIO(self.files[name])


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sure downloads are allowed by the environment for this test."""
    monkeypatch.delenv("FEDCRYPT_OFFLINE", raising=False)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_ensure_files_accepts_intact_files(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"alpha")
    (tmp_path / "b.bin").write_bytes(b"beta")
    paths = ensure_files(
        tmp_path, {"a.bin": sha(b"alpha"), "b.bin": sha(b"beta")}, "http://x/", download=False, title="T"
    )
    assert paths == {"a.bin": tmp_path / "a.bin", "b.bin": tmp_path / "b.bin"}


def test_checksum_mismatch_names_file_and_digests(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in MNIST_FILES:
        (folder / name).write_bytes(b"not the real thing")
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", tmp_path, download=False)
    message = str(info.value)
    assert str(folder.resolve() / "train-images-idx3-ubyte.gz") in message
    assert "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609" in message
    assert sha(b"not the real thing") in message


@pytest.mark.parametrize(("name", "subdir"), [("mnist", "mnist"), ("fashion_mnist", "fashion-mnist")])
def test_missing_files_without_download(tmp_path: Path, name: str, subdir: str) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset(name, tmp_path, download=False)
    message = str(info.value)
    assert str((tmp_path / subdir).resolve()) in message
    assert all(file in message for file in MNIST_FILES)
    assert "download=False" in message
    assert "FEDCRYPT_DATA" in message and "--data-dir" in message
    assert "\n" not in message


def test_offline_env_forbids_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        pytest.fail("urlopen called although FEDCRYPT_OFFLINE is set")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    monkeypatch.setenv("FEDCRYPT_OFFLINE", "1")
    with pytest.raises(DatasetError, match="FEDCRYPT_OFFLINE is set") as info:
        load_dataset("mnist", tmp_path, download=True)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)


@pytest.mark.parametrize(
    ("value", "disabled"), [("", False), ("0", False), ("false", False), ("1", True), ("yes", True)]
)
def test_offline_env_values(monkeypatch: pytest.MonkeyPatch, value: str, disabled: bool) -> None:
    monkeypatch.setenv("FEDCRYPT_OFFLINE", value)
    assert (downloads_disabled_reason(True) is not None) is disabled
    assert downloads_disabled_reason(False) is not None


@pytest.mark.usefixtures("online")
@pytest.mark.parametrize(
    "error",
    [
        urllib.error.URLError("name resolution failed"),
        TimeoutError("timed out"),
        http.client.IncompleteRead(b""),
    ],
)
@pytest.mark.parametrize(
    ("name", "subdir", "base_url"),
    [("mnist", "mnist", MNIST_URL), ("fashion_mnist", "fashion-mnist", FASHION_URL)],
)
def test_failed_download_explains_and_leaves_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    name: str,
    subdir: str,
    base_url: str,
) -> None:
    mirror = FakeMirror({}, error=error)
    monkeypatch.setattr(urllib.request, "urlopen", mirror)
    with pytest.raises(DatasetError) as info:
        load_dataset(name, tmp_path)
    message = str(info.value)
    assert f"download from {base_url}train-images-idx3-ubyte.gz failed" in message
    assert str((tmp_path / subdir).resolve()) in message and "--data-dir" in message
    assert mirror.calls == [(base_url + "train-images-idx3-ubyte.gz", DOWNLOAD_TIMEOUT_S)]
    assert list((tmp_path / subdir).iterdir()) == []


@pytest.mark.usefixtures("online")
def test_corrupt_download_is_discarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", FakeMirror({name: b"garbage" for name in MNIST_FILES}))
    with pytest.raises(DatasetError, match=r"failed: checksum mismatch.*expected sha256 440fcabf"):
        load_dataset("mnist", tmp_path)
    assert list((tmp_path / "mnist").iterdir()) == []


@pytest.mark.usefixtures("online")
def test_download_fills_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    content = {"a.bin": b"alpha" * 1000, "b.bin": b"beta"}
    (tmp_path / "b.bin").write_bytes(content["b.bin"])
    mirror = FakeMirror(content)
    monkeypatch.setattr(urllib.request, "urlopen", mirror)
    ensure_files(tmp_path, {k: sha(v) for k, v in content.items()}, "https://m/", download=True, title="T")
    assert mirror.calls == [("https://m/a.bin", DOWNLOAD_TIMEOUT_S)]
    assert (tmp_path / "a.bin").read_bytes() == content["a.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


@pytest.mark.usefixtures("online")
def test_download_real_mnist_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_data_dir: Path
) -> None:
    mirror = FakeMirror({name: (shared_data_dir / "mnist" / name).read_bytes() for name in MNIST_FILES})
    monkeypatch.setattr(urllib.request, "urlopen", mirror)
    dataset = load_dataset("mnist", tmp_path)
    assert [url for url, _ in mirror.calls] == [MNIST_URL + name for name in MNIST_FILES]
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(MNIST_FILES)
    assert dataset.x_train.shape == (60000, 1, 28, 28)
    assert dataset.y_test.shape == (10000,)
