"""CKKS aggregation: fedcrypt's ``ckks`` mechanism against TenSEAL used plainly, in one run.

For each vector size (default 1M values) and ``--updates`` clients (default 10) it measures, in
this process (one core: SEAL's Python bindings hold the GIL):

* plaintext (``none``): server fold of the updates;
* TenSEAL plainly (N=8192, coeff [60, 40, 40, 60], scale 2^40, public-key context, the issue's
  baseline): client encrypt, serialize/deserialize, server sum, client decrypt, bytes per value;
* fedcrypt ``ckks`` (preset ``fast``): client encrypt (``protect``), server fold of the updates
  through the real wire encoding, client decrypt (``recover``), bytes per value, and the maximum
  absolute error of the decrypted sum against the float64 plaintext sum.

Values are uniform in [-1, 1]. Ratios are baseline / fedcrypt from the same run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS_DIR, command_line, machine_info, write_json

from fedcrypt.core.mechanism import RoundContext
from fedcrypt.core.messages import FitRes, Payload, from_bytes, to_bytes
from fedcrypt.crypto.ckks import PRESETS, SecretKey
from fedcrypt.mechanisms import CkksMechanism, PlaintextMechanism


def _wire(payload: Payload) -> tuple[Payload, int]:
    data = to_bytes(FitRes(1, 1, {}, payload), job="bench", sender="c")
    message = from_bytes(data).message
    assert isinstance(message, FitRes)
    return message.payload, len(data)


def bench_plaintext(vectors: list[np.ndarray]) -> dict[str, float]:
    mechanism = PlaintextMechanism()
    ctx = RoundContext("bench", 1, tuple(map(str, range(len(vectors)))), vectors[0].shape[0])
    payloads = [_wire(mechanism.protect(v, ctx)) for v in vectors]
    started = time.perf_counter()
    aggregator = mechanism.server_round(ctx)
    for i, (payload, _) in enumerate(payloads):
        aggregator.fold("protect", str(i), payload)
    aggregator.finish()
    return {"aggregate_s": time.perf_counter() - started, "bytes_per_value": payloads[0][1] / vectors[0].size}


def bench_tenseal(vectors: list[np.ndarray]) -> dict[str, float]:
    import tenseal as ts

    context = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    context.global_scale = 2**40
    started = time.perf_counter()
    blobs = [ts.ckks_vector(context, vectors[0].tolist()).serialize()]
    encrypt = time.perf_counter() - started
    blobs += [ts.ckks_vector(context, v.tolist()).serialize() for v in vectors[1:]]
    started = time.perf_counter()
    total = ts.ckks_vector_from(context, blobs[0])
    for blob in blobs[1:]:
        total += ts.ckks_vector_from(context, blob)
    aggregate = time.perf_counter() - started
    started = time.perf_counter()
    summed = np.array(total.decrypt())
    decrypt = time.perf_counter() - started
    return _figures(encrypt, aggregate, decrypt, len(blobs[0]) / vectors[0].size, summed, vectors)


def bench_fedcrypt(vectors: list[np.ndarray], preset: str) -> dict[str, float]:
    secret = SecretKey(PRESETS[preset])
    server_side, client_side = CkksMechanism(secret.public), CkksMechanism(secret.public, secret)
    ctx = RoundContext("bench", 1, tuple(map(str, range(len(vectors)))), vectors[0].shape[0])
    started = time.perf_counter()
    first = client_side.protect(vectors[0], ctx)
    encrypt = time.perf_counter() - started
    payloads = [_wire(first)] + [_wire(client_side.protect(v, ctx)) for v in vectors[1:]]
    started = time.perf_counter()
    aggregator = server_side.server_round(ctx)
    for i, (payload, _) in enumerate(payloads):
        aggregator.fold("protect", str(i), payload)
    aggregate_payload = aggregator.finish()
    aggregate = time.perf_counter() - started
    received, _ = _wire(aggregate_payload)
    started = time.perf_counter()
    summed = client_side.recover(received, ctx)
    decrypt = time.perf_counter() - started
    return _figures(encrypt, aggregate, decrypt, payloads[0][1] / vectors[0].size, summed, vectors)


def _figures(
    encrypt: float, aggregate: float, decrypt: float, bytes_per_value: float, summed: np.ndarray,
    vectors: list[np.ndarray],
) -> dict[str, float]:
    exact = np.sum(np.array(vectors, dtype=np.float64), axis=0)
    return {
        "encrypt_s": encrypt,
        "aggregate_s": aggregate,
        "decrypt_s": decrypt,
        "bytes_per_value": bytes_per_value,
        "max_abs_error": float(np.abs(summed.astype(np.float64) - exact).max()),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| values | system | client encrypt s | server aggregate s | client decrypt s | bytes / value | max abs error |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        size = f"{row['values']:,}"
        plain, base, ours = row["plaintext"], row["tenseal"], row["fedcrypt"]
        lines.append(f"| {size} | plaintext (`none`) | – | {plain['aggregate_s']:.3f} | – | {plain['bytes_per_value']:.1f} | 0 |")
        for name, r in (("TenSEAL plainly", base), (f"fedcrypt `ckks` ({row['preset']})", ours)):
            lines.append(
                f"| {size} | {name} | {r['encrypt_s']:.3f} | {r['aggregate_s']:.3f} | {r['decrypt_s']:.3f} | "
                f"{r['bytes_per_value']:.1f} | {r['max_abs_error']:.1e} |"
            )
        lines.append(
            f"| {size} | **TenSEAL / fedcrypt** | **{base['encrypt_s'] / ours['encrypt_s']:.2f}x** | "
            f"**{base['aggregate_s'] / ours['aggregate_s']:.2f}x** | **{base['decrypt_s'] / ours['decrypt_s']:.2f}x** | "
            f"**{base['bytes_per_value'] / ours['bytes_per_value']:.2f}x** | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: int(float(s)), nargs="+", default=[1_000_000])
    parser.add_argument("--updates", type=int, default=10, help="client updates aggregated (default 10)")
    parser.add_argument("--preset", default="fast", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "ckks.json")
    args = parser.parse_args()
    results = []
    for size in args.sizes:
        rng = np.random.default_rng(size)
        vectors = [rng.uniform(-1, 1, size).astype(np.float32) for _ in range(args.updates)]
        print(f"{size:,} values x {args.updates} updates", flush=True)
        results.append(
            {
                "values": size,
                "updates": args.updates,
                "preset": args.preset,
                "plaintext": bench_plaintext(vectors),
                "tenseal": bench_tenseal(vectors),
                "fedcrypt": bench_fedcrypt(vectors, args.preset),
            }
        )
    write_json(
        args.out,
        {
            "benchmark": "ckks",
            "command": command_line(),
            "machine": machine_info(("fedcrypt", "tenseal", "numpy")),
            "results": results,
        },
    )
    print("\n" + table(results))
    print(f"\nResults: {args.out}")


if __name__ == "__main__":
    main()
