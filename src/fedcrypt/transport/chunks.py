"""Splitting fedcrypt messages into gRPC chunks and reassembling them with a size limit.

gRPC caps one message at about 2 GB (and servers default to 4 MB); streaming chunks removes the
cap. The first chunk announces the total size, so the receiver allocates once, refuses an
oversize message before reading it, and notices truncation. A message larger than the receiver's
``spool_bytes`` goes to an unlinked temporary file as it arrives instead of memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from fedcrypt.core.wire import SpooledMessage
from fedcrypt.transport.proto import fedcrypt_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_SPOOL_BYTES = 16 << 20


class ChunkError(ValueError):
    """A chunk stream that is oversize, truncated or inconsistent."""


def to_chunks(
    data: bytes | bytearray | memoryview | Sequence[memoryview], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.Chunk]:
    """Chunks of ``data``, or of several buffers sent back to back (one chunk copy at a time)."""
    parts = [memoryview(data).cast("B")] if isinstance(data, (bytes, bytearray, memoryview)) else data
    views = [memoryview(part).cast("B") for part in parts]
    total = sum(len(view) for view in views)
    if total == 0:
        yield pb.Chunk(data=b"", total_size=0)
        return
    first = True
    pending = bytearray()
    for view in views:
        offset = 0
        while offset < len(view):
            take = min(chunk_bytes - len(pending), len(view) - offset)
            pending += view[offset : offset + take]
            offset += take
            if len(pending) == chunk_bytes:
                yield pb.Chunk(data=bytes(pending), total_size=total if first else 0)
                first, pending = False, bytearray()
    if pending:
        yield pb.Chunk(data=bytes(pending), total_size=total if first else 0)


def from_chunks(
    chunks: Iterable[pb.Chunk],
    max_bytes: int,
    *,
    spool_bytes: int | None = None,
) -> bytearray | SpooledMessage | None:
    """Reassemble one message; ``None`` if the stream had no chunks at all.

    A message of more than ``spool_bytes`` bytes (``None``: never) is written to a
    :class:`SpooledMessage` (in the system's temporary directory: ``TMPDIR``).
    """
    buffer: bytearray | SpooledMessage | None = None
    total = filled = 0
    try:
        for chunk in chunks:
            if buffer is None:
                total = chunk.total_size
                if total > max_bytes:
                    raise ChunkError(f"message of {total} bytes exceeds the limit of {max_bytes}")
                spool = spool_bytes is not None and total > spool_bytes
                buffer = SpooledMessage() if spool else bytearray(total)
            elif chunk.total_size:
                raise ChunkError("total_size set on a chunk after the first")
            end = filled + len(chunk.data)
            if end > total:
                raise ChunkError(f"chunks carry more than the announced {total} bytes")
            if isinstance(buffer, SpooledMessage):
                buffer.write(chunk.data)
            else:
                buffer[filled:end] = chunk.data
            filled = end
        if buffer is not None and filled != total:
            raise ChunkError(f"stream ended after {filled} of {total} bytes")
    except BaseException:
        if isinstance(buffer, SpooledMessage):
            buffer.close()
        raise
    return buffer
