"""A Paillier worker process: computes encryption obfuscators for its parent.

Started by :meth:`fedcrypt.crypto.paillier.PublicKey.obfuscators`; reads one JSON line (public
key, level, count) from stdin, writes the obfuscators as fixed-width little-endian integers to
stdout and exits. It holds only the public key.
"""

from __future__ import annotations

import json
import sys

from gmpy2 import mpz

from fedcrypt.crypto.paillier import PublicKey


def main() -> None:
    request = json.loads(sys.stdin.buffer.readline())
    public = PublicKey(mpz(int(request["n"], 16)), mpz(int(request["h"], 16)), int(request["s"]))
    width = public.ciphertext_bytes
    out = sys.stdout.buffer
    for _ in range(int(request["count"])):
        out.write(int(public.obfuscator()).to_bytes(width, "little"))
    out.flush()


if __name__ == "__main__":
    main()
