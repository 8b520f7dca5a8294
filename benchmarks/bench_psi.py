"""PSI at scale: ``--sizes`` IDs per side (default 10k and 100k; ``--million`` adds 1M), half of
each side's IDs common to both.

fedcrypt's ECDH-PSI (:mod:`fedcrypt.vertical.psi`: RFC 9380 hash to curve25519, X25519) runs both
parties in this process one step after the other, each step on ``--workers`` worker processes
(default: all cores); every message goes through the real wire encoding (``StageRes``), so bytes
are exact. Reported: wall time of the whole exchange (both parties, so in a deployment, where the
parties compute at the same time on their own machines, each waits roughly half of it, plus
network), each party's own compute time (the table shows the slower), microseconds per ID (wall
/ IDs per side), bytes exchanged both ways, and whether both parties got exactly
``set(a) & set(b)`` in the same order. The worker processes start (and are warmed up) before the
clock runs; that time is reported apart.

Baselines in the same run, on the same IDs:

* **per-ID loop**: the same protocol and code with ``workers=1``: one process, one ID at a time;
* **RSA blind signatures** (the RSA PSI of FATE's ``RsaIntersect``): the host signs
  ``SHA-256(y)`` with its RSA key (``--rsa-bits``, CRT) and sends the hashes of its signatures; the
  guest sends ``SHA-256(x) r^e`` for random ``r``, the host signs those, the guest unblinds and
  compares, then sends the common hashes back so the host learns the intersection too. gmpy2's
  exponentiations release the GIL, so it uses ``--workers`` threads: both sides get all cores.

Baselines run up to ``--baseline-max`` IDs per side; for larger sizes their time is extrapolated
linearly from the largest size they ran (cost per ID is constant for both) and marked so.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gmpy2
import numpy as np
from common import RESULTS_DIR, command_line, machine_info, write_json
from gmpy2 import mpz

from fedcrypt.core.messages import Payload, StageRes, from_bytes, to_bytes
from fedcrypt.core.wire import Blob
from fedcrypt.vertical.psi import PsiParty, intersect_ids


def _through_wire(payload: Payload) -> tuple[Payload, int]:
    data = to_bytes(StageRes(1, "psi", payload), job="bench", sender="x")
    received = from_bytes(data).message
    assert isinstance(received, StageRes)
    return received.payload, len(data)


def id_sets(n: int) -> tuple[list[str], list[str]]:
    """``n`` IDs per side, ``n // 2`` of them common, in unrelated orders (16 hex digits each)."""
    pool = list(dict.fromkeys(secrets.token_hex(8) for _ in range(2 * n - n // 2 + 16)))[: 2 * n - n // 2]
    a, b = pool[:n], pool[n - n // 2 :]
    secrets.SystemRandom().shuffle(b)
    return a, b


def _exact(a: Sequence[str], b: Sequence[str], common_a: list[str], common_b: list[str]) -> bool:
    return common_a == common_b and set(common_a) == set(a) & set(b) and len(common_a) == len(set(common_a))


def fedcrypt_psi(a: list[str], b: list[str], workers: int) -> dict[str, Any]:
    """Both parties' steps, timed one by one, messages through the wire."""
    seconds: dict[str, float] = {}

    def timed(name: str, step: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        out = step()
        seconds[name] = time.perf_counter() - started
        return out

    started = time.perf_counter()
    party_a = timed("a_setup", lambda: PsiParty(a, workers=workers))
    party_b = timed("b_setup", lambda: PsiParty(b, workers=workers))
    blinded_a, size_a = _through_wire(timed("a_blinded", party_a.blinded))
    blinded_b, size_b = _through_wire(timed("b_blinded", party_b.blinded))
    reply_to_a = timed("b_double_blind", lambda: party_b.double_blind(blinded_a))
    reply_to_b = timed("a_double_blind", lambda: party_a.double_blind(blinded_b))
    received_by_a, size_ra = _through_wire(reply_to_a)
    received_by_b, size_rb = _through_wire(reply_to_b)
    rows_a = timed("a_intersect", lambda: party_a.intersect(received_by_a, reply_to_b))
    rows_b = timed("b_intersect", lambda: party_b.intersect(received_by_b, reply_to_a))
    wall = time.perf_counter() - started
    common_a, common_b = [a[i] for i in rows_a], [b[i] for i in rows_b]
    return {
        "wall_seconds": wall,
        "party_a_seconds": sum(v for k, v in seconds.items() if k.startswith("a_")),
        "party_b_seconds": sum(v for k, v in seconds.items() if k.startswith("b_")),
        "steps_seconds": seconds,
        "bytes_exchanged": size_a + size_b + size_ra + size_rb,
        "common": len(common_a),
        "exact": _exact(a, b, common_a, common_b),
    }


def per_id_loop(a: list[str], b: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    rows_a, rows_b = intersect_ids(a, b, workers=1)
    wall = time.perf_counter() - started
    return {"wall_seconds": wall, "exact": _exact(a, b, [a[i] for i in rows_a], [b[i] for i in rows_b])}


def _prime(bits: int) -> mpz:
    while True:
        candidate = gmpy2.next_prime(mpz(secrets.randbits(bits)) | (mpz(3) << (bits - 2)))
        if candidate.bit_length() == bits:
            return candidate


def _threaded(values: list[mpz], fn: Callable[[list[mpz]], list[mpz]], workers: int) -> list[mpz]:
    step = -(-len(values) // workers)
    with ThreadPoolExecutor(workers) as pool:
        return [v for part in pool.map(fn, [values[i : i + step] for i in range(0, len(values), step)]) for v in part]


def rsa_psi(a: list[str], b: list[str], bits: int, workers: int) -> dict[str, Any]:
    """RSA blind-signature PSI (guest ``a``, host ``b`` with the key), messages through the wire."""
    started = time.perf_counter()
    p, q = _prime(bits // 2), _prime(bits // 2)
    n, e = p * q, mpz(65537)
    d = gmpy2.invert(e, (p - 1) * (q - 1))
    dp, dq, q_inv = d % (p - 1), d % (q - 1), gmpy2.invert(q, p)
    keygen = time.perf_counter() - started
    width = (bits + 7) // 8

    def sign(values: list[mpz]) -> list[mpz]:  # x^d mod n by CRT, exponentiations on all cores
        mp = _threaded(values, lambda part: list(gmpy2.powmod_base_list(part, dp, p)), workers)
        mq = _threaded(values, lambda part: list(gmpy2.powmod_base_list(part, dq, q)), workers)
        return [y + q * ((x - y) * q_inv % p) for x, y in zip(mp, mq, strict=True)]

    def fdh(value: str) -> mpz:
        return mpz(int.from_bytes(hashlib.sha256(value.encode()).digest(), "big"))

    def tag(signature: mpz) -> bytes:
        return hashlib.sha256(int(signature).to_bytes(width, "big")).digest()

    def as_array(values: list[mpz]) -> np.ndarray:
        data = b"".join(int(v).to_bytes(width, "big") for v in values)
        return np.frombuffer(data, dtype=np.uint8).reshape(len(values), width)

    def from_array(array: Blob) -> list[mpz]:
        return [mpz(int.from_bytes(row.tobytes(), "big")) for row in np.asarray(array)]

    sent = 0
    host_tags = np.frombuffer(b"".join(tag(s) for s in sign([fdh(y) for y in b])), dtype=np.uint8)
    message, size = _through_wire(Payload(arrays={"tags": host_tags.reshape(len(b), 32)}))
    sent += size
    rs = [mpz(secrets.randbelow(int(n) - 2) + 2) for _ in a]
    masks = _threaded(rs, lambda part: list(gmpy2.powmod_base_list(part, e, n)), workers)
    blinded = [fdh(x) * m % n for x, m in zip(a, masks, strict=True)]
    request, size = _through_wire(Payload(arrays={"blinded": as_array(blinded)}))
    sent += size
    reply, size = _through_wire(Payload(arrays={"signed": as_array(sign(from_array(request.arrays["blinded"])))}))
    sent += size
    signatures = [s * gmpy2.invert(r, n) % n for s, r in zip(from_array(reply.arrays["signed"]), rs, strict=True)]
    known = {row.tobytes() for row in np.asarray(message.arrays["tags"])}
    mine = [tag(s) for s in signatures]
    common_rows = [i for i, t in enumerate(mine) if t in known]
    common_tags = np.frombuffer(b"".join(mine[i] for i in common_rows), dtype=np.uint8)
    back, size = _through_wire(Payload(arrays={"common": common_tags}))
    sent += size
    received = np.asarray(back.arrays["common"]).reshape(-1, 32)
    host_index = {row.tobytes(): j for j, row in enumerate(host_tags.reshape(len(b), 32))}
    common_b = [b[host_index[row.tobytes()]] for row in received]
    wall = time.perf_counter() - started
    return {
        "wall_seconds": wall,
        "keygen_seconds": keygen,
        "bytes_exchanged": sent,
        "exact": _exact(a, b, [a[i] for i in common_rows], common_b),
    }


def run(
    n: int, workers: int, rsa_bits: int, baseline_max: int, extrapolate_from: dict[str, tuple[int, float]]
) -> dict[str, Any]:
    """fedcrypt's PSI and the two baselines on one pair of ID sets (baselines measured or extrapolated)."""
    a, b = id_sets(n)
    result: dict[str, Any] = {"ids_per_side": n, "fedcrypt": fedcrypt_psi(a, b, workers)}
    baselines: dict[str, Callable[[], dict[str, Any]]] = {
        "per_id_loop": lambda: per_id_loop(a, b),
        "rsa": lambda: rsa_psi(a, b, rsa_bits, workers),
    }
    for name, baseline in baselines.items():
        if n <= baseline_max:
            figures = baseline()
            figures["measured"] = True
            extrapolate_from[name] = (n, figures["wall_seconds"])
        else:
            size, seconds = extrapolate_from[name]
            figures = {"wall_seconds": seconds * n / size, "measured": False, "extrapolated_from_ids": size}
        result[name] = figures
    return result


def table(results: list[dict[str, Any]], rsa_bits: int) -> str:
    lines = [
        "| IDs per side | common | fedcrypt wall s | µs / ID | slower party s | MB exchanged | exact "
        f"| per-ID loop s | ratio | RSA-{rsa_bits} blind-signature s | ratio |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        f, loop, rsa = r["fedcrypt"], r["per_id_loop"], r["rsa"]

        def cell(b: dict[str, Any]) -> str:
            return f"{b['wall_seconds']:.1f}" + ("" if b["measured"] else " (extrapolated)")

        exact = f["exact"] and all(b.get("exact", True) for b in (loop, rsa))
        party = max(f["party_a_seconds"], f["party_b_seconds"])
        lines.append(
            f"| {r['ids_per_side']:,} | {f['common']:,} | {f['wall_seconds']:.1f} "
            f"| {f['wall_seconds'] / r['ids_per_side'] * 1e6:.0f} | {party:.1f} "
            f"| {f['bytes_exchanged'] / 1e6:.1f} | {exact} | {cell(loop)} "
            f"| **{loop['wall_seconds'] / f['wall_seconds']:.1f}x** | {cell(rsa)} "
            f"| **{rsa['wall_seconds'] / f['wall_seconds']:.1f}x** |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--million", action="store_true", help="add 1,000,000 IDs per side (minutes on 2 cores)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rsa-bits", type=int, default=2048)
    parser.add_argument("--baseline-max", type=int, default=100_000, help="largest size the baselines run at")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "psi.json")
    args = parser.parse_args()
    sizes = sorted(set(args.sizes + ([1_000_000] if args.million else [])))
    started = time.perf_counter()
    warm_a, warm_b = id_sets(4096)
    intersect_ids(warm_a, warm_b, workers=args.workers)  # starts the worker processes
    startup = time.perf_counter() - started
    extrapolate_from: dict[str, tuple[int, float]] = {}
    results = [run(n, args.workers, args.rsa_bits, max(args.baseline_max, min(sizes)), extrapolate_from) for n in sizes]
    write_json(
        args.out,
        {
            "benchmark": "psi",
            "command": command_line(),
            "machine": machine_info(("fedcrypt", "cryptography", "gmpy2", "numpy")),
            "workers": args.workers,
            "rsa_bits": args.rsa_bits,
            "startup_seconds": startup,
            "results": results,
        },
    )
    print(table(results, args.rsa_bits))
    print(f"\nWorker start-up and warm-up (4,096 IDs per side), not in the table: {startup:.1f} s")
    print(f"Results: {args.out}")


if __name__ == "__main__":
    main()
