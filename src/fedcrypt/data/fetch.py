"""Find dataset files on disk, download missing ones, and verify all of them by SHA-256."""

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from fedcrypt.data.errors import DatasetError

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_NOT_SET = frozenset({"", "0", "false", "no", "off"})


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so large files don't sit in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, expected: str) -> None:
    """Raise `DatasetError` naming the file and both digests if its SHA-256 differs."""
    actual = sha256_file(path)
    if actual != expected:
        raise DatasetError(
            f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}; "
            "replace it with the original file (or delete it to download it again)"
        )


def downloads_disabled_reason(download: bool) -> str | None:
    """Why downloading is off (``download=False`` or ``FEDCRYPT_OFFLINE``), or None if allowed."""
    if not download:
        return "downloads are off (download=False)"
    if os.environ.get("FEDCRYPT_OFFLINE", "").strip().lower() not in _NOT_SET:
        return "downloads are off (FEDCRYPT_OFFLINE is set)"
    return None


def download_file(url: str, dest: Path, sha256: str) -> None:
    """Download ``url`` to ``dest`` atomically: temp file beside it, verify, then rename.

    A failed or corrupt download never leaves a partial file behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp,
        ):
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise DatasetError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest.hexdigest()}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _download_missing(
    folder: Path, missing: list[str], files: Mapping[str, str], base_url: str
) -> str | None:
    """Download each missing file; return why it failed, or None on success."""
    for name in missing:
        url = base_url + name
        log.info("Downloading %s to %s", url, folder)
        try:
            download_file(url, folder / name, files[name])
        except (OSError, http.client.HTTPException, DatasetError) as exc:
            return f"download from {url} failed: {exc}"
    return None


def ensure_files(
    folder: Path, files: Mapping[str, str], base_url: str, *, download: bool, title: str
) -> dict[str, Path]:
    """Make sure every file (name -> sha256) is in ``folder`` and intact; return their paths.

    Missing files are downloaded from ``base_url`` unless downloads are off; if that is not
    possible one `DatasetError` explains where the files are expected and how to provide them.
    """
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        reason = downloads_disabled_reason(download) or _download_missing(folder, missing, files, base_url)
        if reason is not None:
            raise DatasetError(
                f"{title} files missing in {folder} (missing: {', '.join(missing)}; "
                f"expected: {', '.join(files)}); {reason}. To fix: put the files there, "
                f"or set FEDCRYPT_DATA / pass --data-dir to a folder containing {folder.name}/"
            )
    for name, digest in files.items():
        verify_file(folder / name, digest)
    return {name: folder / name for name in files}
