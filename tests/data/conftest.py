"""Fixtures for the data tests: a hard network guard and the shared real-data folder."""

import os
import urllib.request
from pathlib import Path
from typing import NoReturn

import pytest


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any data test that tries to open a URL; download tests patch in a local fake."""

    def refuse(url: object, *args: object, **kwargs: object) -> NoReturn:
        pytest.fail(f"network access attempted: {url}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Folder holding the real mnist/ and fashion-mnist/ IDX files ($FEDCRYPT_DATA or ../shared/data)."""
    path = Path(os.environ.get("FEDCRYPT_DATA") or Path(__file__).parents[3] / "shared" / "data")
    if not path.is_dir():
        pytest.fail(f"real-data folder {path} not found; set FEDCRYPT_DATA to the shared data folder")
    return path
