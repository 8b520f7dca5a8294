"""Test-wide settings: datasets come from ../shared/data and nothing may touch the network."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("FEDCRYPT_DATA", str(_SHARED_DATA))
os.environ["FEDCRYPT_OFFLINE"] = "1"
# runs recorded by tests go to a store of their own, never the user's
os.environ["FEDCRYPT_STORE"] = str(Path(tempfile.mkdtemp(prefix="fedcrypt-test-store-")) / "runs.sqlite")
