"""Paillier aggregation, per value and BatchCrypt-packed: fedcrypt against python-paillier, one run.

For ``--values`` values (default 2,000) and ``--updates`` clients (default 10), with ``--bits``
keys (default 2048):

* ``phe`` (one core; it has no parallelism): ``EncryptedNumber`` encryption of floats (its own
  encoding), summing with ``+``, decryption; its randomness ``r^n`` is a full 2048-bit exponentiation per value. It encrypts
  one update (timed); the server sum adds that update ``--updates`` times (same cost);
* fedcrypt ``paillier``: the mechanism's ``protect`` (fixed-point encoding, DJN fixed-base
  randomness on all cores), ``fold`` through the real wire encoding, ``recover`` (all cores);
  plus the core's time per value to precompute randomness offline and to encrypt online with it.

Times per 1M values are extrapolated linearly from the measured values (per-value encryption
is hopeless at 1M: the point of the table), and said so.

BatchCrypt rows, for ``--batch-values`` values (default 1M) and the same clients, 16 bits:

* BatchCrypt done plainly with ``phe``: quantize, pack 97 slots of 21 bits per 2048-bit plaintext
  with Python integers (as BatchCrypt's own code does), ``raw_encrypt`` each on one core,
  ``raw_decrypt`` and unpack; timed on ``--plain-plaintexts`` plaintexts (default 1,000, ~97,000
  values) and extrapolated to 1M;
* fedcrypt ``batchcrypt``: the mechanism's two stages for real on all ``--batch-values`` values
  (stats, then quantize, pack 194 slots per Damgard-Jurik plaintext, encrypt on all cores);
  randomness precomputed (offline) and encryption with it (online) timed separately; the server
  folds the update ``--updates`` times (same cost as distinct updates); one client decrypts the
  whole aggregate, and (as a round does) one of ``--updates`` pieces of it.

Requires ``phe`` (the test extra).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import phe
from common import RESULTS_DIR, command_line, machine_info, write_json

from fedcrypt.core.mechanism import RoundContext
from fedcrypt.core.messages import FitRes, Payload, from_bytes, to_bytes
from fedcrypt.crypto.batching import SlotLayout, levels, quantize
from fedcrypt.crypto.paillier import generate_keypair
from fedcrypt.mechanisms import BatchCryptMechanism, PaillierMechanism
from fedcrypt.mechanisms.batchcrypt import PROTECT_STAGE, STATS_STAGE

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


def bench_phe_packed(values: int, updates: int, bits: int, plaintexts: int) -> dict[str, float]:
    """BatchCrypt with phe's raw Paillier and Python-integer packing, on ``plaintexts`` plaintexts."""
    public, private = phe.generate_paillier_keypair(n_length=bits)
    layout = SlotLayout(16, updates, bits - 1)  # Paillier plaintexts: |n| - 1 bits
    width, slots = layout.width, layout.slots
    count = min(values, plaintexts * slots)
    vector = np.random.default_rng(1).normal(0, 0.01, count)
    started = time.perf_counter()
    quantized = quantize(vector, np.float64(np.abs(vector).max()), 16).tolist()
    packed = []
    for start in range(0, count, slots):
        value = 0
        for q in reversed(quantized[start : start + slots]):
            value = (value << width) + (q % (1 << width))  # two's complement in the slot
        packed.append(value)
    ciphertexts = [public.raw_encrypt(m) for m in packed]
    encrypt = time.perf_counter() - started
    started = time.perf_counter()
    nsquare = public.nsquare
    total = ciphertexts
    for _ in range(updates - 1):
        total = [a * b % nsquare for a, b in zip(total, ciphertexts)]
    aggregate = time.perf_counter() - started
    started = time.perf_counter()
    sums = []
    mask = (1 << width) - 1
    for c in total:
        m = private.raw_decrypt(c)
        for _ in range(slots):
            sums.append(m & mask)  # each slot: updates x (q mod 2^W), carries kept by the padding
            m >>= width
    decrypt = time.perf_counter() - started
    scale = values / count
    return {"measured_values": count, "encrypt_s": encrypt * scale, "aggregate_s": aggregate * scale,
            "decrypt_s": decrypt * scale, "bytes_per_value": bits // 4 / slots, "cores": 1}


def bench_batchcrypt(values: int, updates: int, bits: int) -> dict[str, float]:
    public, private = generate_keypair(bits)
    server_side = BatchCryptMechanism(public)
    client_side = BatchCryptMechanism(public, private, background_randomness=False)  # timed below instead
    rng = np.random.default_rng(2)
    vector = np.concatenate([rng.normal(0, 0.01, values), [100.0]]).astype(np.float32)  # [w * delta, w]
    names = tuple(map(str, range(updates)))
    ctx = RoundContext("bench", 1, names, vector.size)
    aggregator = server_side.server_round(ctx)
    protector = client_side.client_round(ctx, "0")
    stats, _ = _wire(protector.respond(STATS_STAGE, Payload(), vector))
    for name in names:
        aggregator.fold(STATS_STAGE, name, stats)
    aggregator.close_stage(STATS_STAGE, names)
    plan, _ = _wire(aggregator.request(PROTECT_STAGE, "0"))
    count = client_side.layout(updates).plaintexts(vector.size)
    client_side.public.obfuscator()  # the fixed-base table, once per key
    started = time.perf_counter()
    client_side.precompute(count)
    offline = time.perf_counter() - started
    started = time.perf_counter()
    protected, sent = _wire(protector.respond(PROTECT_STAGE, plan, vector))
    online = time.perf_counter() - started
    started = time.perf_counter()
    for name in names:
        aggregator.fold(PROTECT_STAGE, name, protected)
    result = aggregator.finish()
    aggregate = time.perf_counter() - started
    received, _ = _wire(result)
    started = time.perf_counter()
    summed = client_side.recover(received, ctx)
    decrypt = time.perf_counter() - started
    pieces = server_side.split(received, ctx, updates)  # recovery shared by the round's key holders
    piece = max(pieces, key=lambda p: p.stop - p.start)
    started = time.perf_counter()
    client_side.recover(_wire(piece.payload)[0], ctx)
    decrypt_piece = time.perf_counter() - started
    step = float(received.arrays["alpha"][0]) / levels(16)
    error = float(np.abs(summed[:-1] - updates * vector[:-1].astype(np.float64)).max())
    return {"encrypt_s": offline + online, "offline_s": offline, "online_s": online, "aggregate_s": aggregate,
            "decrypt_s": decrypt, "decrypt_piece_s": decrypt_piece, "pieces": len(pieces),
            "bytes_per_value": sent / values, "max_abs_error": error,
            "error_in_steps": error / step, "ciphertexts": count}


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


def batch_table(result: dict[str, Any]) -> str:
    scale = result["batch_values"] / result["values"]
    per_value_phe = result["phe"]["encrypt_s"] * scale
    plain, ours = result["phe_packed"], result["batchcrypt"]
    lines = [
        f"| system ({result['batch_values']:,} values, {result['updates']} clients) | cores | client encrypt | of which online | server aggregate | "
        "client decrypt | bytes / value |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| python-paillier per value (extrapolated) | 1 | {per_value_phe:,.0f} s | | "
        f"{result['phe']['aggregate_s'] * scale:.0f} s | "
        f"{result['phe']['decrypt_s'] * scale:,.0f} s | {result['phe']['bytes_per_value']:.0f} |",
        f"| BatchCrypt plainly with `phe` (extrapolated from {plain['measured_values']:,} values) | 1 | "
        f"{plain['encrypt_s']:.1f} s | | {plain['aggregate_s']:.1f} s | {plain['decrypt_s']:.1f} s | "
        f"{plain['bytes_per_value']:.2f} |",
        f"| fedcrypt `batchcrypt` (measured) | {result['cores']} | {ours['encrypt_s']:.1f} s | {ours['online_s']:.2f} s | "
        f"{ours['aggregate_s']:.1f} s | {ours['decrypt_s']:.1f} s | {ours['bytes_per_value']:.2f} |",
        f"| fedcrypt `batchcrypt`, decryption shared by the {ours['pieces']} key holders (each, measured) | "
        f"{result['cores']} | | | | {ours['decrypt_piece_s']:.1f} s | |",
        f"| **per-value phe / fedcrypt** | | **{per_value_phe / ours['encrypt_s']:,.0f}x** | "
        f"**{per_value_phe / ours['online_s']:,.0f}x** | | | |",
        f"| **plain packing / fedcrypt** | | **{plain['encrypt_s'] / ours['encrypt_s']:.1f}x** | "
        f"**{plain['encrypt_s'] / ours['online_s']:.0f}x** | **{plain['aggregate_s'] / ours['aggregate_s']:.1f}x** | "
        f"**{plain['decrypt_s'] / ours['decrypt_s']:.1f}x** | |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=2000)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--bits", type=int, default=2048)
    parser.add_argument("--batch-values", type=int, default=MILLION, help="values of the BatchCrypt rows")
    parser.add_argument("--plain-plaintexts", type=int, default=1000,
                        help="plaintexts the phe BatchCrypt row times before extrapolating")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "paillier.json")
    args = parser.parse_args()
    vectors = _vectors(args.values, args.updates)
    result: dict[str, Any] = {"values": args.values, "updates": args.updates, "bits": args.bits,
                              "batch_values": args.batch_values, "cores": len(os.sched_getaffinity(0))}
    for name, bench in (
        ("phe", lambda: bench_phe(vectors, args.bits)),
        ("fedcrypt", lambda: bench_fedcrypt(vectors, args.bits)),
        ("phe_packed", lambda: bench_phe_packed(args.batch_values, args.updates, args.bits, args.plain_plaintexts)),
        ("batchcrypt", lambda: bench_batchcrypt(args.batch_values, args.updates, args.bits)),
    ):
        print(f"running {name} ...", flush=True)
        result[name] = bench()
    write_json(args.out, {"benchmark": "paillier", "command": command_line(),
                          "machine": machine_info(("fedcrypt", "phe", "gmpy2")), "result": result})
    print(table(result))
    print()
    print(batch_table(result))
    print(f"\nResults: {args.out}")


if __name__ == "__main__":
    main()
