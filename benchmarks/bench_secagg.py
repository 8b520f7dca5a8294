"""SecAgg+ at scale: ``--clients`` clients (default 100), ``--values`` values each (default 1M),
``--dropout`` of them (default 10 %) dropping after they shared their keys and before sending
their masked vector (the costliest case for the server: it must rebuild their mask keys and
remove their pairwise masks).

Runs the ``secagg`` mechanism's four stages in one process through the real wire encoding and
reports the mean client time per round, the server's time to fold the masked vectors and to
unmask, bytes per client each way, and checks the unmasked sum against the exact fixed-point sum.
The comparison with Flower's SecAgg+ is still to be added (issue 6).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS_DIR, command_line, machine_info, write_json

from fedcrypt.core.mechanism import RoundContext
from fedcrypt.core.messages import Payload, StageIns, StageRes, from_bytes, to_bytes
from fedcrypt.mechanisms import SecAggMechanism
from fedcrypt.mechanisms.secagg import FRAC_BITS, MASK, STAGES, UNMASK


def _through_wire(message: StageIns | StageRes) -> tuple[Payload, int]:
    data = to_bytes(message, job="bench", sender="x")
    received = from_bytes(data).message
    assert isinstance(received, (StageIns, StageRes))
    return received.payload, len(data)


def run(clients: int, values: int, dropout: float, neighbors: int | None) -> dict[str, Any]:
    mechanism = SecAggMechanism(neighbors=neighbors)
    names = [f"client-{i:03d}" for i in range(clients)]
    ctx = RoundContext("bench", 1, tuple(names), values)
    rng = np.random.default_rng(0)
    vector = rng.normal(0, 1, values).astype(np.float32)  # every client sends the same values: same cost
    dropped = set(names[:: max(1, round(1 / dropout))][: round(dropout * clients)]) if dropout else set()
    aggregator = mechanism.server_round(ctx)
    protectors = {name: mechanism.client_round(ctx, name) for name in names}
    client_seconds = dict.fromkeys(names, 0.0)
    server_fold = server_close = 0.0
    up = dict.fromkeys(names, 0)
    down = dict.fromkeys(names, 0)
    alive = names
    for stage in STAGES:
        survivors = []
        for name in alive:
            if stage == MASK and name in dropped:
                continue
            request, size = _through_wire(StageIns(1, stage, aggregator.request(stage, name)))
            down[name] += size
            started = time.perf_counter()
            reply = protectors[name].respond(stage, request, vector)
            client_seconds[name] += time.perf_counter() - started
            payload, size = _through_wire(StageRes(1, stage, reply))
            up[name] += size
            started = time.perf_counter()
            aggregator.fold(stage, name, payload)
            server_fold += time.perf_counter() - started
            survivors.append(name)
        started = time.perf_counter()
        aggregator.close_stage(stage, survivors)
        elapsed = time.perf_counter() - started
        if stage == UNMASK:
            unmask = elapsed
        server_close += elapsed
        alive = survivors
    total = mechanism.recover(aggregator.finish(), ctx)
    contributors = clients - len(dropped)
    exact = (np.rint(vector.astype(np.float64) * 2.0**FRAC_BITS).astype(np.int64) * contributors) / 2.0**FRAC_BITS
    finished = [name for name in names if name not in dropped]
    return {
        "clients": clients,
        "values": values,
        "dropped": len(dropped),
        "neighbors": aggregator.metrics()["secagg_neighbors"],
        "threshold": aggregator.metrics()["secagg_threshold"],
        "client_seconds_mean": float(np.mean([client_seconds[n] for n in finished])),
        "server_fold_seconds": server_fold,
        "server_unmask_seconds": unmask,
        "server_stage_close_seconds": server_close,
        "bytes_up_per_client": float(np.mean([up[n] for n in finished])),
        "bytes_down_per_client": float(np.mean([down[n] for n in finished])),
        "exact": bool(np.array_equal(total, exact.astype(np.float32))),
    }


def table(r: dict[str, Any]) -> str:
    return "\n".join([
        "| clients | values | dropped after sharing | neighbours / threshold | client s (mean) | server fold s "
        "| server unmask s | MB up / client | MB down / client | sum exact |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {r['clients']} | {r['values']:,} | {r['dropped']} | {r['neighbors']:.0f} / {r['threshold']:.0f} | "
        f"{r['client_seconds_mean']:.2f} | {r['server_fold_seconds']:.2f} | {r['server_unmask_seconds']:.2f} | "
        f"{r['bytes_up_per_client'] / 1e6:.2f} | {r['bytes_down_per_client'] / 1e6:.3f} | {r['exact']} |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--values", type=int, default=1_000_000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--neighbors", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "secagg.json")
    args = parser.parse_args()
    result = run(args.clients, args.values, args.dropout, args.neighbors)
    write_json(args.out, {"benchmark": "secagg", "command": command_line(),
                          "machine": machine_info(("fedcrypt", "cryptography", "numpy")), "result": result})
    print(table(result))
    print(f"\nResults: {args.out}")


if __name__ == "__main__":
    main()
