"""MNIST FedAvg with plaintext, CKKS, selective CKKS, BatchCrypt, SecAgg+ and additive-share updates:
accuracy and cost.

Runs ``examples/mnist.toml``, ``examples/mnist_ckks.toml``, ``examples/mnist_ckks_selective.toml``
``examples/mnist_batchcrypt.toml`` at 16 and 8 bits, ``examples/mnist_secagg.toml`` and
``examples/mnist_shares.toml`` (the same data split, model, seeds and rounds) in simulation and
reports final accuracy, its difference to plaintext FedAvg, bytes uploaded and the time split per
phase. Needs the MNIST IDX files (``FEDCRYPT_DATA``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, command_line, machine_info, write_json

import fedcrypt

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
JOBS: dict[str, tuple[str, dict[str, Any]]] = {
    "plaintext": ("mnist.toml", {}),
    "ckks": ("mnist_ckks.toml", {}),
    "ckks 10 %": ("mnist_ckks_selective.toml", {}),
    "batchcrypt 16 bits": ("mnist_batchcrypt.toml", {}),
    "batchcrypt 8 bits": ("mnist_batchcrypt.toml", {"bits": 8}),
    "secagg": ("mnist_secagg.toml", {}),
    "shares": ("mnist_shares.toml", {}),
}


def run(name: str, rounds: int | None) -> dict[str, Any]:
    path, privacy = JOBS[name]
    job = fedcrypt.load_job(EXAMPLES / path)
    if privacy:
        job = job.with_overrides(privacy=privacy)
    if rounds is not None:
        job = job.with_overrides(job={"rounds": rounds})
    started = time.perf_counter()
    result = fedcrypt.simulate(job)
    seconds = time.perf_counter() - started
    history = result.history
    return {
        "rounds": len(history),
        "final_accuracy": result.final_accuracy,
        "accuracy_per_round": [r.accuracy for r in history],
        "failed_rounds": sum(r.status != "ok" for r in history),
        "seconds": seconds,
        "bytes_up": sum(r.bytes_up for r in history),
        "bytes_down": sum(r.bytes_down for r in history),
        **{key: sum(getattr(r, key) for r in history) for key in
           ("train_seconds", "protect_seconds", "aggregate_seconds", "recover_seconds")},
        "encrypted_fraction": history[-1].mechanism.get(
            "encrypted_fraction", 0.0 if name == "plaintext" else 1.0
        ),
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    plain = rows["plaintext"]
    lines = [
        "| job | rounds | final accuracy | vs plaintext (points) | encrypted | up (MB) | protect s | aggregate s | recover s | total s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['rounds']} | {r['final_accuracy']:.4f} | "
            f"{100 * (r['final_accuracy'] - plain['final_accuracy']):+.2f} | {100 * r['encrypted_fraction']:.0f} % | "
            f"{r['bytes_up'] / 1e6:,.0f} | {r['protect_seconds']:.0f} | {r['aggregate_seconds']:.0f} | "
            f"{r['recover_seconds']:.0f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="override the examples' 20 rounds")
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "mnist_he.json")
    args = parser.parse_args()
    rows = {}
    for name in args.jobs:
        print(f"running {name} ...", flush=True)
        rows[name] = run(name, args.rounds)
        print(f"  final accuracy {rows[name]['final_accuracy']:.4f} in {rows[name]['seconds']:.0f} s", flush=True)
    write_json(args.out, {"benchmark": "mnist_he", "command": command_line(),
                          "machine": machine_info(("fedcrypt", "torch", "tenseal")), "results": rows})
    if "plaintext" in rows:
        print("\n" + table(rows))
    print(f"\nResults: {args.out}")


if __name__ == "__main__":
    main()
