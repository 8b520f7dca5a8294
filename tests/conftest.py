"""Test-wide settings: datasets come from ../shared/data and nothing may touch the network."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("FEDCRYPT_DATA", str(_SHARED_DATA))
os.environ["FEDCRYPT_OFFLINE"] = "1"
# runs recorded by tests go to a store of their own, never the user's
os.environ["FEDCRYPT_STORE"] = str(Path(tempfile.mkdtemp(prefix="fedcrypt-test-store-")) / "runs.sqlite")



def _service(variable: str, what: str, default: str | None = None) -> str:
    """Where a test finds an outside service (``.ci/services`` exports it): the variable, else
    ``default``; missing, the test fails under ``FEDCRYPT_REQUIRE_SERVICES=1`` (CI) and skips otherwise."""
    found = os.environ.get(variable) or default
    if found:
        return found
    message = f"{what} is not available: set {variable}, or run `. .ci/services` first (CI does)"
    if os.environ.get("FEDCRYPT_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A PostgreSQL server's URL (a superuser, database ``postgres``)."""
    return _service("FEDCRYPT_TEST_POSTGRES", "a PostgreSQL server")


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Debian's Chromium and its ChromeDriver: (browser, driver)."""
    return (_service("FEDCRYPT_TEST_CHROMIUM", "Chromium", shutil.which("chromium")),
            _service("FEDCRYPT_TEST_CHROMEDRIVER", "ChromeDriver", shutil.which("chromedriver")))
