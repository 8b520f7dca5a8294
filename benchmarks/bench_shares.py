"""Additive sharing at scale: ``--clients`` clients (default 100), ``--values`` values each
(default 1M), ``--dropout`` of them (default 10 %) dropping after sealing their seeds and before
sending their share, for ``k`` = 2 and 3 aggregators.

fedcrypt's ``shares`` runs its four stages in one process through the real wire encoding, the
helpers in process too (so their seconds are compute, not transport); reported: mean client time
per round, the server's time to fold shares and partial sums, each helper's time (the slowest),
bytes per client and per helper, and whether the sum equals the exact fixed-point sum.

Baseline in the same run: PySyft-style full shares, where each client draws ``k - 1`` uniformly
random uint64 vectors from ``os.urandom``, computes the last share as ``x`` minus their sum, and
sends one whole vector to each of the ``k`` aggregators, which add what they receive. Same ring,
same encoding; the difference is that fedcrypt sends each helper a 60-byte sealed seed and lets
the helper expand it with AES-CTR.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS_DIR, command_line, machine_info, write_json
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcrypt.core.mechanism import RoundContext
from fedcrypt.core.messages import Payload, StageIns, StageRes, from_bytes, to_bytes
from fedcrypt.crypto import ring
from fedcrypt.crypto.agreement import public_bytes
from fedcrypt.mechanisms.shares import PROTECT, STAGES, SharesMechanism, helper_names


def _through_wire(message: StageIns | StageRes) -> tuple[Payload, int]:
    data = to_bytes(message, job="bench", sender="x")
    received = from_bytes(data).message
    assert isinstance(received, (StageIns, StageRes))
    return received.payload, len(data)


def run(clients: int, values: int, dropout: float, aggregators: int) -> dict[str, Any]:
    helpers = helper_names(aggregators)
    keys = {helper: X25519PrivateKey.generate() for helper in helpers}
    server = SharesMechanism(helpers)
    client = SharesMechanism(helpers, helper_keys={h: public_bytes(k) for h, k in keys.items()})
    helper_side = {h: SharesMechanism(helpers, helper_key=k, min_clients=2) for h, k in keys.items()}
    names = [f"client-{i:03d}" for i in range(clients)]
    ctx = RoundContext("bench", 1, tuple(names), values)
    vector = np.random.default_rng(0).normal(0, 1, values).astype(np.float32)
    dropped = set(names[:: max(1, round(1 / dropout))][: round(dropout * clients)]) if dropout else set()
    aggregator = server.server_round(ctx)
    protectors = {name: client.client_round(ctx, name) for name in names}
    helper_rounds = {h: m.helper_round("bench", 1, h) for h, m in helper_side.items()}
    client_seconds = dict.fromkeys(names, 0.0)
    helper_seconds = dict.fromkeys(helpers, 0.0)
    helper_down = dict.fromkeys(helpers, 0)
    helper_up = dict.fromkeys(helpers, 0)
    up = dict.fromkeys(names, 0)
    server_seconds = 0.0
    alive = names
    for stage in STAGES:
        answered = []
        if stage in aggregator.helper_stages:
            for helper, helper_round in helper_rounds.items():
                request, size = _through_wire(StageIns(1, stage, aggregator.request(stage, helper)))
                helper_down[helper] += size
                started = time.perf_counter()
                reply = helper_round.respond(stage, request)
                helper_seconds[helper] += time.perf_counter() - started
                payload, size = _through_wire(StageRes(1, stage, reply))
                helper_up[helper] += size
                started = time.perf_counter()
                aggregator.fold(stage, helper, payload)
                server_seconds += time.perf_counter() - started
                answered.append(helper)
            aggregator.close_stage(stage, answered)
            continue
        for name in alive:
            if stage == PROTECT and name in dropped:
                continue
            request, _ = _through_wire(StageIns(1, stage, aggregator.request(stage, name)))
            started = time.perf_counter()
            reply = protectors[name].respond(stage, request, vector)
            client_seconds[name] += time.perf_counter() - started
            payload, size = _through_wire(StageRes(1, stage, reply))
            up[name] += size
            started = time.perf_counter()
            aggregator.fold(stage, name, payload)
            server_seconds += time.perf_counter() - started
            answered.append(name)
        aggregator.close_stage(stage, answered)
        alive = answered
    total = server.recover(aggregator.finish(), ctx)
    finished = [name for name in names if name not in dropped]
    exact = ring.decode(ring.encode(vector, clients) * np.uint64(len(finished)))
    return {
        "aggregators": aggregators,
        "clients": clients,
        "values": values,
        "dropped": len(dropped),
        "client_seconds_mean": float(np.mean([client_seconds[n] for n in finished])),
        "server_seconds": server_seconds,
        "helper_seconds_max": max(helper_seconds.values()),
        "bytes_up_per_client": float(np.mean([up[n] for n in finished])),
        "bytes_to_each_helper": max(helper_down.values()),
        "bytes_from_each_helper": max(helper_up.values()),
        "exact": bool(np.array_equal(total, exact)),
        "baseline": full_shares(clients - len(dropped), values, aggregators, vector),
    }


def full_shares(clients: int, values: int, aggregators: int, vector: np.ndarray) -> dict[str, Any]:
    """PySyft-style sharing: every aggregator receives a whole random-looking vector per client."""
    sums = [np.zeros(values, dtype=np.uint64) for _ in range(aggregators)]
    client_seconds = aggregator_seconds = 0.0
    up = 0
    for _ in range(clients):
        started = time.perf_counter()
        encoded = ring.encode(vector, clients)
        shares = [np.frombuffer(os.urandom(8 * values), dtype=np.uint64) for _ in range(aggregators - 1)]
        last = encoded.copy()
        for share in shares:
            last -= share
        shares.append(last)
        client_seconds += time.perf_counter() - started
        for index, share in enumerate(shares):
            payload, size = _through_wire(StageRes(1, "protect", Payload(arrays={"share": share})))
            up += size
            started = time.perf_counter()
            sums[index] += np.asarray(payload.arrays["share"])
            aggregator_seconds += time.perf_counter() - started
    total = sums[0]
    for partial in sums[1:]:
        total += partial
    exact = ring.decode(ring.encode(vector, clients) * np.uint64(clients))
    return {
        "client_seconds_mean": client_seconds / clients,
        "aggregator_seconds_max": aggregator_seconds / aggregators,
        "bytes_up_per_client": up / clients,
        "exact": bool(np.array_equal(ring.decode(total), exact)),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| k | clients | values | dropped | client s (mean) | server s | slowest helper s | MB up / client "
        "| KB to each helper | MB from each helper | sum exact |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['aggregators']} | {r['clients']} | {r['values']:,} | {r['dropped']} | {r['client_seconds_mean']:.3f} "
            f"| {r['server_seconds']:.2f} | {r['helper_seconds_max']:.2f} | {r['bytes_up_per_client'] / 1e6:.2f} "
            f"| {r['bytes_to_each_helper'] / 1e3:.1f} | {r['bytes_from_each_helper'] / 1e6:.2f} | {r['exact']} |"
        )
    lines += [
        "",
        "| k | PySyft-style full shares: client s | MB up / client | fedcrypt: client s | MB up / client "
        "| client time ratio | upload ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        b = r["baseline"]
        lines.append(
            f"| {r['aggregators']} | {b['client_seconds_mean']:.3f} | {b['bytes_up_per_client'] / 1e6:.2f} "
            f"| {r['client_seconds_mean']:.3f} | {r['bytes_up_per_client'] / 1e6:.2f} "
            f"| **{b['client_seconds_mean'] / r['client_seconds_mean']:.1f}x** "
            f"| **{b['bytes_up_per_client'] / r['bytes_up_per_client']:.1f}x** |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--values", type=int, default=1_000_000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--aggregators", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "shares.json")
    args = parser.parse_args()
    results = [run(args.clients, args.values, args.dropout, k) for k in args.aggregators]
    write_json(args.out, {"benchmark": "shares", "command": command_line(),
                          "machine": machine_info(("fedcrypt", "cryptography", "numpy")), "results": results})
    print(table(results))
    print(f"\nResults: {args.out}")


if __name__ == "__main__":
    main()
