"""CKKS aggregation: fedcrypt's ``ckks`` (full and selective) against TenSEAL used plainly, in one run.

For each vector size (default 1M and 11M values, ResNet-18 size) and ``--updates`` clients
(default 10), each system runs in its own child process, so its peak memory is its own:

* plaintext (``none``): server fold of the updates;
* TenSEAL plainly (N=8192, coeff [60, 40, 40, 60], scale 2^40, public-key context, one
  process: the issue's baseline): client encrypt + serialize, server deserialize + sum, client
  decrypt;
* fedcrypt ``ckks`` (preset ``fast``) on all cores, and on one process for comparison;
* fedcrypt selective ``ckks`` with ``encrypt_ratio`` 0.3 and 0.1: the mask is agreed first (one
  round of encrypted sensitivity maps, timed separately), then a normal round is measured.

Updates stream as in a real round: client i encrypts, its payload goes through the real wire
encoding, the server folds it, and it is dropped. Times: client encrypt is per update (mean),
server aggregate is the total for all updates, client decrypt is once. Peak memory is the child's
peak RSS (``VmHWM``, reset after setup) above its RSS before the first update: client and server
in one process; fedcrypt's worker processes are reported separately (one worker's peak). fedcrypt's worker processes start on a client's first
encryption and live as long as its key; that first call is timed separately. Values are
uniform in [-1, 1].
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS_DIR, command_line, machine_info, write_json

SYSTEMS = ("none", "tenseal", "ckks", "ckks-1proc", "ckks-0.3", "ckks-0.1")
LABELS = {
    "none": "plaintext (`none`)",
    "tenseal": "TenSEAL plainly (1 process)",
    "ckks": "fedcrypt `ckks`, all cores",
    "ckks-1proc": "fedcrypt `ckks`, 1 process",
    "ckks-0.3": "fedcrypt selective 30 %",
    "ckks-0.1": "fedcrypt selective 10 %",
}


def _vector(size: int, client: int) -> np.ndarray:
    return np.random.default_rng([size, client]).uniform(-1, 1, size).astype(np.float32)


def _rss() -> int:
    """Current RSS; also restarts the peak count (``VmHWM``), so setup does not count."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * 4096


def _peak(pid: int | str = "self") -> int:
    """Peak RSS (``VmHWM``) of a process since its last reset, in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")


def _wire(payload: Any) -> tuple[Any, int]:
    from fedcrypt.core.messages import FitRes, from_bytes, to_bytes

    data = to_bytes(FitRes(1, 1, {}, payload), job="bench", sender="c")
    message = from_bytes(data).message
    return message.payload, len(data)  # type: ignore[union-attr]


def run_tenseal(size: int, updates: int) -> dict[str, Any]:
    import tenseal as ts

    context = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    context.global_scale = 2**40
    baseline = _rss()
    encrypt = aggregate = 0.0
    total = None
    for client in range(updates):
        vector = _vector(size, client)
        started = time.perf_counter()
        blob = ts.ckks_vector(context, vector.tolist()).serialize()
        encrypt += time.perf_counter() - started
        del vector
        started = time.perf_counter()
        received = ts.ckks_vector_from(context, blob)
        total = received if total is None else total + received
        aggregate += time.perf_counter() - started
        sent, blob, received = len(blob), None, None
    started = time.perf_counter()
    summed = np.array(total.decrypt())  # type: ignore[union-attr]
    decrypt = time.perf_counter() - started
    return _row(encrypt / updates, aggregate, decrypt, sent, summed, baseline, size, updates)


def run_fedcrypt(system: str, size: int, updates: int) -> dict[str, Any]:
    from fedcrypt.core.mechanism import RoundContext
    from fedcrypt.core.messages import Payload
    from fedcrypt.core.params import ParamSpec, TensorSpec
    from fedcrypt.crypto.ckks import PRESETS, SecretKey
    from fedcrypt.mechanisms import CkksMechanism, PlaintextMechanism, SelectiveCkksMechanism
    from fedcrypt.mechanisms.selective import PROTECT_STAGE

    names = tuple(map(str, range(updates)))
    ctx = RoundContext("bench", 2, names, size)
    secret = None
    agree = start = 0.0
    if system == "none":
        server_side = client_side = PlaintextMechanism()
    else:
        secret = SecretKey(PRESETS["fast"], processes=1 if system == "ckks-1proc" else None)
        started = time.perf_counter()
        secret.encrypt(np.zeros(size))  # starts the worker processes, once per client process
        start = time.perf_counter() - started
        if system.startswith("ckks-0"):
            ratio = float(system.removeprefix("ckks-"))
            spec = ParamSpec((TensorSpec("w", (size - 1,), "float32"),))
            server_side = SelectiveCkksMechanism(secret.public, spec=spec, encrypt_ratio=ratio)
            client_side = SelectiveCkksMechanism(secret.public, secret, spec=spec, encrypt_ratio=ratio)
            agree = _agree_mask(server_side, client_side, ctx, size)
        else:
            server_side, client_side = CkksMechanism(secret.public), CkksMechanism(secret.public, secret)
    for worker in (getattr(secret, "_workers", None) or ()):
        with open(f"/proc/{worker._process.pid}/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
    baseline = _rss()
    aggregator = server_side.server_round(ctx)
    assert aggregator.stages == (PROTECT_STAGE,)
    encrypt = aggregate = 0.0
    for client, name in enumerate(names):
        vector = _vector(size, client)
        started = time.perf_counter()
        payload = client_side.client_round(ctx, name).respond(PROTECT_STAGE, Payload(), vector)
        encrypt += time.perf_counter() - started
        del vector
        received, sent = _wire(payload)
        del payload
        started = time.perf_counter()
        aggregator.fold(PROTECT_STAGE, name, received)
        aggregate += time.perf_counter() - started
        del received
    started = time.perf_counter()
    result, _ = _wire(aggregator.finish())
    aggregate += time.perf_counter() - started
    started = time.perf_counter()
    summed = client_side.recover(result, ctx)
    decrypt = time.perf_counter() - started
    row = _row(encrypt / updates, aggregate, decrypt, sent, summed, baseline, size, updates)
    row["agree_s"] = agree
    row["first_encrypt_s"] = start
    row["worker_peak_mib"] = _worker_peak_mib(secret)
    if system.startswith("ckks-0"):
        row["encrypted_fraction"] = aggregator.metrics()["encrypted_fraction"]
    return row


def _agree_mask(server_side: Any, client_side: Any, ctx: Any, size: int) -> float:
    """Round 1 of selective encryption: encrypted sensitivity maps in, the global map out."""
    from fedcrypt.core.mechanism import RoundContext

    class Scores:
        def __init__(self, client: int) -> None:
            self.client = client

        def sensitivity(self) -> np.ndarray:
            return np.abs(_vector(size - 1, self.client))

    first = RoundContext(ctx.job, 1, ctx.participants, ctx.vector_size)
    started = time.perf_counter()
    aggregator = server_side.server_round(first)
    protectors = {name: client_side.client_round(first, name, Scores(i)) for i, name in enumerate(ctx.participants)}
    for stage in aggregator.stages:
        for i, (name, protector) in enumerate(protectors.items()):
            reply = protector.respond(stage, aggregator.request(stage, name), _vector(size, i))
            aggregator.fold(stage, name, _wire(reply)[0])
        aggregator.close_stage(stage, list(protectors))
    return time.perf_counter() - started


def _worker_peak_mib(secret: Any) -> float:
    workers = getattr(secret, "_workers", None) or ()
    return max((_peak(worker._process.pid) for worker in workers), default=0) / 2**20


def _row(encrypt: float, aggregate: float, decrypt: float, sent: int, summed: np.ndarray, baseline: int,
         size: int, updates: int) -> dict[str, Any]:
    peak = _peak()
    exact = np.zeros(size, dtype=np.float64)
    for client in range(updates):
        exact += _vector(size, client)
    return {
        "encrypt_s": encrypt,
        "aggregate_s": aggregate,
        "decrypt_s": decrypt,
        "bytes_per_client": sent,
        "bytes_per_value": sent / size,
        "peak_above_baseline_mib": (peak - baseline) / 2**20,
        "max_abs_error": float(np.abs(np.asarray(summed[:size], dtype=np.float64) - exact).max()),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| values | system | client encrypt s | server aggregate s | client decrypt s | MB per client "
        "| bytes / value | peak MiB | max abs error | HE time vs full | HE bytes vs full |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group in results:
        rows, size = group["rows"], group["values"]
        plain, full, base = rows["none"], rows["ckks"], rows["tenseal"]
        full_time = _he_time(full, plain)
        full_bytes = full["bytes_per_client"] - plain["bytes_per_client"]
        for system in SYSTEMS:
            r = rows[system]
            he_time = _he_time(r, plain)
            vs_time = f"{full_time / he_time:.1f}x less" if system.startswith("ckks-0") else ""
            extra = r["bytes_per_client"] - plain["bytes_per_client"]
            vs_bytes = f"{full_bytes / extra:.1f}x less" if system.startswith("ckks-0") else ""
            encrypt = "–" if system == "none" else f"{r['encrypt_s']:.3f}"
            decrypt = "–" if system == "none" else f"{r['decrypt_s']:.3f}"
            workers = f" (+{r['worker_peak_mib']:.0f} worker)" if r.get("worker_peak_mib") else ""
            lines.append(
                f"| {size:,} | {LABELS[system]} | {encrypt} | {r['aggregate_s']:.3f} | {decrypt} | "
                f"{r['bytes_per_client'] / 1e6:.1f} | {r['bytes_per_value']:.1f} | "
                f"{r['peak_above_baseline_mib']:.0f}{workers} | {r['max_abs_error']:.1e} | {vs_time} | {vs_bytes} |"
            )
        lines.append(
            f"| {size:,} | **TenSEAL / fedcrypt all cores** | **{base['encrypt_s'] / full['encrypt_s']:.2f}x** | "
            f"**{base['aggregate_s'] / full['aggregate_s']:.2f}x** | **{base['decrypt_s'] / full['decrypt_s']:.2f}x** | "
            f"| **{base['bytes_per_value'] / full['bytes_per_value']:.2f}x** | | | | |"
        )
    return "\n".join(lines)


def _he_time(row: dict[str, Any], plain: dict[str, Any]) -> float:
    """Time HE adds to a round: encrypt + decrypt + aggregate beyond the plaintext fold."""
    return row["encrypt_s"] + row["decrypt_s"] + row["aggregate_s"] - plain["aggregate_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: int(float(s)), nargs="+", default=[1_000_000, 11_000_000])
    parser.add_argument("--updates", type=int, default=10, help="client updates aggregated (default 10)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "ckks.json")
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        system, size = args.child[0], int(args.child[1])
        row = run_tenseal(size, args.updates) if system == "tenseal" else run_fedcrypt(system, size, args.updates)
        print(json.dumps(row))
        return
    results = []
    for size in args.sizes:
        rows = {}
        for system in args.systems:
            print(f"{size:,} values x {args.updates} updates: {system}", flush=True)
            child = subprocess.run(
                [sys.executable, __file__, "--child", system, str(size), "--updates", str(args.updates)],
                capture_output=True, text=True, check=True,
            )
            rows[system] = json.loads(child.stdout.strip().splitlines()[-1])
        results.append({"values": size, "updates": args.updates, "rows": rows})
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
