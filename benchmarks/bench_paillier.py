"""Per-value Paillier: fedcrypt's gmpy2 core against python-paillier (``phe``), in one run.

For ``--values`` values (default 2,000) and ``--updates`` clients (default 10), with ``--bits``
keys (default 2048), one process each:

* ``phe``: ``EncryptedNumber`` encryption of floats (its own encoding), summing with ``+``,
  decryption; its randomness ``r^n`` is a full 2048-bit exponentiation per value. It encrypts
  one update (timed); the server sum adds that update ``--updates`` times (same cost);
* fedcrypt ``paillier``: the mechanism's ``protect`` (fixed-point encoding, DJN fixed-base
  randomness), ``fold`` through the real wire encoding, ``recover``; plus the core's time per
  value to precompute randomness offline and to encrypt online with it.

Times per 1M values are extrapolated linearly from the measured values (per-value encryption
is hopeless at 1M: the point of the table), and said so. Requires ``phe`` (the test extra).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import phe
from common import RESULTS_DIR, command_line, machine_info, write_json

from fedcrypt.core.mechanism import RoundContext
from fedcrypt.core.messages import FitRes, Payload, from_bytes, to_bytes
from fedcrypt.crypto.paillier import generate_keypair
from fedcrypt.mechanisms import PaillierMechanism

MILLION = 1_000_000


def _vectors(values: int, updates: int) -> list[np.ndarray]:
    rng = np.random.default_rng(values)
    return [rng.uniform(-1, 1, values).astype(np.float32) for _ in range(updates)]


def bench_phe(vectors: list[np.ndarray], bits: int) -> dict[str, float]:
    public, private = phe.generate_paillier_keypair(n_length=bits)
    started = time.perf_counter()
    first = [public.encrypt(float(v)) for v in vectors[0]]
    encrypt = time.perf_counter() - started
    started = time.perf_counter()
    total = first
    for _ in vectors[1:]:  # phe encrypts at ~100 values/s: the first update stands in for the others
        total = [a + b for a, b in zip(total, first)]
    aggregate = time.perf_counter() - started
    started = time.perf_counter()
    summed = np.array([private.decrypt(c) for c in total])
    decrypt = time.perf_counter() - started
    size = len(vectors[0])
    return _row(encrypt, aggregate, decrypt, bits // 4 * size, summed, [vectors[0]] * len(vectors))


def bench_fedcrypt(vectors: list[np.ndarray], bits: int) -> dict[str, float]:
    public, private = generate_keypair(bits)
    server_side, client_side = PaillierMechanism(public), PaillierMechanism(public, private)
    size = len(vectors[0])
    ctx = RoundContext("bench", 1, tuple(map(str, range(len(vectors)))), size)
    public.obfuscator()  # builds the fixed-base table once per key
    started = time.perf_counter()
    obfuscators = public.obfuscators(size)
    offline = time.perf_counter() - started
    encoded = client_side.encoding.encode(vectors[0])
    started = time.perf_counter()
    public.encrypt(encoded, obfuscators)
    online = time.perf_counter() - started
    started = time.perf_counter()
    first = client_side.protect(vectors[0], ctx)
    encrypt = time.perf_counter() - started
    payloads = [_wire(first)] + [_wire(client_side.protect(v, ctx)) for v in vectors[1:]]
    started = time.perf_counter()
    aggregator = server_side.server_round(ctx)
    for i, (payload, _) in enumerate(payloads):
        aggregator.fold("protect", str(i), payload)
    result = aggregator.finish()
    aggregate = time.perf_counter() - started
    received, _ = _wire(result)
    started = time.perf_counter()
    summed = client_side.recover(received, ctx)
    decrypt = time.perf_counter() - started
    row = _row(encrypt, aggregate, decrypt, payloads[0][1], summed, vectors)
    row["offline_s"], row["online_s"] = offline, online
    return row


def _wire(payload: Payload) -> tuple[Payload, int]:
    data = to_bytes(FitRes(1, 1, {}, payload), job="bench", sender="c")
    message = from_bytes(data).message
    assert isinstance(message, FitRes)
    return message.payload, len(data)


def _row(encrypt: float, aggregate: float, decrypt: float, sent: int, summed: np.ndarray,
         vectors: list[np.ndarray]) -> dict[str, float]:
    size = len(vectors[0])
    exact = np.sum(np.array(vectors, dtype=np.float64), axis=0)
    return {
        "encrypt_s": encrypt,
        "aggregate_s": aggregate,
        "decrypt_s": decrypt,
        "bytes_per_value": sent / size,
        "values_per_s": size / encrypt,
        "max_abs_error": float(np.abs(np.asarray(summed, dtype=np.float64) - exact).max()),
    }


def table(result: dict[str, Any]) -> str:
    scale = MILLION / result["values"]
    base, ours = result["phe"], result["fedcrypt"]
    lines = [
        "| system | encrypt / value | encrypt 1M (extrapolated) | aggregate 10 x 1M (extr.) | decrypt 1M (extr.) "
        "| bytes / value | max abs error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in (("python-paillier (`phe`)", base), ("fedcrypt `paillier`", ours)):
        lines.append(
            f"| {name} | {1e3 * r['encrypt_s'] / result['values']:.3f} ms | {r['encrypt_s'] * scale / 3600:.2f} h | "
            f"{r['aggregate_s'] * scale:.0f} s | {r['decrypt_s'] * scale / 60:.1f} min | {r['bytes_per_value']:.0f} | "
            f"{r['max_abs_error']:.1e} |"
        )
    lines.append(
        f"| fedcrypt, randomness precomputed offline | online {1e6 * ours['online_s'] / result['values']:.1f} us "
        f"(offline {1e3 * ours['offline_s'] / result['values']:.3f} ms) | online {ours['online_s'] * scale:.0f} s | | | | |"
    )
    lines.append(
        f"| **phe / fedcrypt** | **{base['encrypt_s'] / ours['encrypt_s']:.1f}x** | | "
        f"**{base['aggregate_s'] / ours['aggregate_s']:.1f}x** | **{base['decrypt_s'] / ours['decrypt_s']:.1f}x** | | |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=2000)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--bits", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "paillier.json")
    args = parser.parse_args()
    vectors = _vectors(args.values, args.updates)
    result = {"values": args.values, "updates": args.updates, "bits": args.bits,
              "phe": bench_phe(vectors, args.bits), "fedcrypt": bench_fedcrypt(vectors, args.bits)}
    write_json(args.out, {"benchmark": "paillier", "command": command_line(),
                          "machine": machine_info(("fedcrypt", "phe", "gmpy2")), "result": result})
    print(table(result))
    print(f"\nResults: {args.out}")


if __name__ == "__main__":
    main()
