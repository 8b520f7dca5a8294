"""A CKKS worker process: encrypts and decrypts ciphertext ranges for its parent client.

Started by :class:`fedcrypt.crypto.ckks.SecretKey` with pipes on stdin/stdout; receives the key
over stdin, answers requests until stdin closes (the parent is done or gone), then exits.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from fedcrypt.crypto.ckks import _HELLO, PRESETS, REPLY, REQUEST, SecretKey, read_exact


def _answer(out, status: bytes, data: bytes | np.ndarray) -> None:  # type: ignore[no-untyped-def]
    view = memoryview(data).cast("B")
    out.write(REPLY.pack(status, view.nbytes))
    out.write(view)
    out.flush()


def main() -> None:
    stdin = sys.stdin.buffer
    stdout = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # nothing but frames may reach the parent's pipe
    try:
        name_size, key_size = _HELLO.unpack(read_exact(stdin, _HELLO.size))
        name = read_exact(stdin, name_size).decode()
        key = SecretKey(PRESETS[name], key_bytes=read_exact(stdin, key_size), processes=1)
    except (EOFError, KeyError, ValueError) as exc:
        _answer(stdout, b"X", str(exc).encode())
        return
    _answer(stdout, b"K", key.public.fingerprint.encode())
    k, n = key.public.shape
    while True:
        try:
            op, first, blocks, values, seed, size = REQUEST.unpack(read_exact(stdin, REQUEST.size))
            payload = read_exact(stdin, size)
        except EOFError:
            return
        try:
            if op == b"E":
                out = np.empty((blocks, k, n), dtype=np.uint32)
                key.encrypt_blocks(np.frombuffer(payload, dtype=np.float64, count=values), seed, first, out)
            elif op == b"D":
                polys = np.frombuffer(payload, dtype=np.uint32).reshape(2, blocks, k, n)
                out = np.empty(values, dtype=np.float64)
                key.decrypt_blocks(polys[0], polys[1], out)
            else:
                raise ValueError(f"unknown request {op!r}")
        except (ValueError, RuntimeError) as exc:
            _answer(stdout, b"X", str(exc).encode())
            continue
        _answer(stdout, b"K", out)


if __name__ == "__main__":
    main()
