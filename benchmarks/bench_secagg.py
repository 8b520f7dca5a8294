"""SecAgg+ at scale: ``--clients`` clients (default 100), ``--values`` values each (default 1M),
``--dropout`` of them (default 10 %) dropping after they shared their keys and before sending
their masked vector (the costliest case for the server: it must rebuild their mask keys and
remove their pairwise masks).

Runs the ``secagg`` mechanism's four stages in one process through the real wire encoding and
reports the mean client time per round, the server's time to fold the masked vectors and to
unmask, bytes per client each way, and checks the unmasked sum against the exact fixed-point sum.

Flower's side (``flwr`` from the bench extra): the server half of the unmask stage of
``SecAggPlusWorkflow.unmask_stage`` (Flower 1.41), run with Flower's own functions on the same
setting: for every sampled client ``combine_shares`` of the shares its neighbours returned, then
``pseudo_rand_gen`` and ``parameters_subtraction`` of its self mask (survivors), or
``generate_shared_key`` with each neighbour and the pairwise masks (dropped clients), then
``parameters_mod``. Keys, shares and the masked sum are prepared untimed; only that loop is
timed, as fedcrypt's ``close_stage("unmask")`` is.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS_DIR, command_line, machine_info, write_json

from fedcrypt.core.mechanism import RoundContext
from fedcrypt.core.messages import Payload, StageIns, StageRes, from_bytes, to_bytes
from fedcrypt.mechanisms import SecAggMechanism
from fedcrypt.crypto.ring import FRAC_BITS
from fedcrypt.mechanisms.secagg import MASK, STAGES, UNMASK


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


def flower_unmask(clients: int, values: int, dropped: int, degree: int, threshold: int) -> dict[str, Any]:
    """Flower 1.41's server-side unmask loop, on its own primitives, timed."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    mod_range = 4294967296  # SecAggPlusWorkflow's default modulus_range
    half = degree // 2
    neighbours = {i: {(i + d) % clients for d in range(-half, half + 1)} for i in range(clients)}  # incl. itself
    keys = [generate_key_pairs() for _ in range(clients)]
    public = {i: public_key_to_bytes(pk) for i, (_, pk) in enumerate(keys)}
    dead = set(range(0, clients, max(1, clients // max(dropped, 1))))
    dead = set(sorted(dead)[:dropped])
    collected: dict[int, list[bytes]] = {}
    for i in range(clients):
        secret = private_key_to_bytes(keys[i][0]) if i in dead else os.urandom(32)
        shares = create_shares(secret, threshold, len(neighbours[i]))
        holders = [j for j in sorted(neighbours[i]) if j not in dead]
        collected[i] = shares[: len(holders)]
    masked = [np.zeros(values, dtype=np.int64)]
    started = time.perf_counter()
    for nid, share_list in collected.items():
        secret = combine_shares(share_list)
        if nid not in dead:
            private_mask = pseudo_rand_gen(secret, mod_range, get_parameters_shape(masked))
            masked = parameters_subtraction(masked, private_mask)
        else:
            for neighbor in sorted(neighbours[nid] - {nid}):
                shared_key = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(public[neighbor]))
                pairwise = pseudo_rand_gen(shared_key, mod_range, get_parameters_shape(masked))
                masked = parameters_addition(masked, pairwise) if nid > neighbor else parameters_subtraction(masked, pairwise)
    parameters_mod(masked, mod_range)
    return {"server_unmask_seconds": time.perf_counter() - started, "neighbors": degree, "threshold": threshold}


def table(r: dict[str, Any]) -> str:
    lines = [
        "| clients | values | dropped after sharing | neighbours / threshold | client s (mean) | server fold s "
        "| server unmask s | MB up / client | MB down / client | sum exact |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {r['clients']} | {r['values']:,} | {r['dropped']} | {r['neighbors']:.0f} / {r['threshold']:.0f} | "
        f"{r['client_seconds_mean']:.2f} | {r['server_fold_seconds']:.2f} | {r['server_unmask_seconds']:.2f} | "
        f"{r['bytes_up_per_client'] / 1e6:.2f} | {r['bytes_down_per_client'] / 1e6:.3f} | {r['exact']} |",
    ]
    flower = r.get("flower")
    if flower:
        lines += [
            "",
            "| server unmask, same setting | seconds | Flower ÷ fedcrypt |",
            "|---|---:|---:|",
            f"| Flower 1.41 SecAgg+ (its unmask loop and primitives) | {flower['server_unmask_seconds']:.2f} | |",
            f"| fedcrypt `secagg` | {r['server_unmask_seconds']:.2f} | "
            f"**{flower['server_unmask_seconds'] / r['server_unmask_seconds']:.1f}x** |",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--values", type=int, default=1_000_000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--neighbors", type=int, default=None)
    parser.add_argument("--no-flower", action="store_true", help="skip Flower's side (needs flwr, the bench extra)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "secagg.json")
    args = parser.parse_args()
    result = run(args.clients, args.values, args.dropout, args.neighbors)
    if not args.no_flower:
        result["flower"] = flower_unmask(
            args.clients, args.values, result["dropped"], int(result["neighbors"]), int(result["threshold"])
        )
    write_json(args.out, {"benchmark": "secagg", "command": command_line(),
                          "machine": machine_info(("fedcrypt", "cryptography", "numpy", "flwr")), "result": result})
    print(table(result))
    print(f"\nResults: {args.out}")


if __name__ == "__main__":
    main()
