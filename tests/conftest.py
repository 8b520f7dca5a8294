"""Test-wide settings: datasets come from ../shared/data and nothing may touch the network."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
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


@contextmanager
def _listening(arguments: list[str]) -> Iterator[str]:
    """Run ``fedcrypt ARGUMENTS --port 0`` (board, serve) and yield the http://127.0.0.1:PORT it
    prints once listening; the process is stopped afterwards."""
    command = [sys.executable, "-m", "fedcrypt.cli", *arguments, "--port", "0"]
    env = {**os.environ, "COLUMNS": "300"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        try:
            line = process.stdout.readline()  # type: ignore[union-attr]
            url = re.search(r"http://127\.0\.0\.1:\d+", line)
            assert url, f"{line}{process.stderr.read() if process.poll() is not None else ''}"  # type: ignore[union-attr]
            yield url.group()
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture
def fedcrypt_listening() -> Callable[[list[str]], AbstractContextManager[str]]:
    """Starts a listening ``fedcrypt`` command: ``with fedcrypt_listening(["serve", run]) as url``."""
    return _listening
