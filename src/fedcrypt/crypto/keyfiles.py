"""Key files of every scheme: secrets are created 0600 and never overwritten."""

from __future__ import annotations

import os
from pathlib import Path


def write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data`` (never widens or replaces an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_key_pair(
    key_dir: Path, public: tuple[str, str], secret: tuple[str, bytes], error: type[Exception]
) -> None:
    """Write a key authority's pair: ``(name, text)`` public (0644) and ``(name, bytes)`` secret (0600)."""
    key_dir.mkdir(parents=True, exist_ok=True)
    for name in (public[0], secret[0]):
        if (key_dir / name).exists():
            raise error(f"{key_dir / name} exists; refusing to overwrite keys")
    write_secret(key_dir / secret[0], secret[1])
    (key_dir / public[0]).write_text(public[1] + "\n")


def read_key_file(path: Path, scheme: str, error: type[Exception]) -> str:
    """The text of a key file, or ``error`` saying how to make one."""
    try:
        return path.read_text()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror} (create keys with `fedcrypt keys {scheme}`)") from None
