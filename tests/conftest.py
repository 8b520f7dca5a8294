"""Test-wide settings: datasets come from ../shared/data and nothing may touch the network."""

from __future__ import annotations

import os
from pathlib import Path

_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("FEDCRYPT_DATA", str(_SHARED_DATA))
os.environ["FEDCRYPT_OFFLINE"] = "1"
