"""Peak memory of a fedcrypt simulation of the MNIST CNN with many clients.

The simulation runs in a fresh Python subprocess, which reports its peak resident set size
(``ru_maxrss``), its resident size after importing torch and loading MNIST (the baseline), the
round times and the bytes sent each way. MNIST comes from ``--data-dir``, else
``$FEDCRYPT_DATA``, else fedcrypt's cache folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS_DIR, command_line, figure_table, machine_info, peak_rss_bytes, write_json

from fedcrypt import JobConfig, simulate
from fedcrypt.data import load_dataset, resolve_data_dir
from fedcrypt.simulation import partition_clients

GOAL_BYTES = 2 * 1024**3
MIB = 1024**2


def current_rss_bytes() -> int | None:
    """This process's resident set size now (Linux only)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def make_job(clients: int, rounds: int, partition: str, alpha: float) -> JobConfig:
    """The MNIST CNN job of ``examples/mnist.toml`` with every client training each round."""
    return JobConfig().with_overrides(
        job={"name": "bench-memory", "rounds": rounds, "seed": 0},
        data={"dataset": "mnist", "num_clients": clients, "partition": partition, "alpha": alpha},
        model={"name": "cnn"},
        train={"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        strategy={"name": "fedavg", "fraction_fit": 1.0, "min_fit_clients": 2},
    )


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the simulation in this process and return its figures."""
    dataset = load_dataset("mnist", args.data_dir)
    baseline = {"rss_bytes": current_rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
    partition, note = args.partition, ""
    try:
        job = make_job(args.clients, args.rounds, partition, args.alpha)
        sizes = [len(part) for part in partition_clients(job, dataset)]
    except ValueError as exc:
        if partition != "dirichlet":
            raise
        partition, note = "iid", f"dirichlet failed ({exc}); fell back to iid"
        job = make_job(args.clients, args.rounds, partition, args.alpha)
        sizes = [len(part) for part in partition_clients(job, dataset)]
    started = time.perf_counter()
    result = simulate(job, data_dir=args.data_dir)
    return {
        "job": job.model_dump(mode="json"),
        "data_dir": str(resolve_data_dir(args.data_dir)),
        "partition_used": partition,
        "partition_note": note,
        "client_sizes": {"min": min(sizes), "max": max(sizes), "mean": sum(sizes) / len(sizes)},
        "torch_threads": torch.get_num_threads(),
        "baseline_after_torch_and_mnist": baseline,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_at_end_bytes": current_rss_bytes(),
        "simulate_seconds": time.perf_counter() - started,
        "final_accuracy": result.final_accuracy,
        "rounds": [record.to_json() for record in result.history],
    }


def markdown_table(figures: dict[str, Any]) -> str:
    """The headline figures as one markdown table."""
    rounds = figures["rounds"]
    baseline = figures["baseline_after_torch_and_mnist"]["rss_bytes"]
    rows = [
        ("clients / rounds", f"{figures['job']['data']['num_clients']} / {len(rounds)}"),
        ("partition", figures["partition_used"]),
        ("baseline RSS (torch + MNIST loaded)", f"{baseline / MIB:.0f} MiB"),
        ("peak RSS", f"{figures['peak_rss_bytes'] / MIB:.0f} MiB"),
        ("goal", f"< {GOAL_BYTES / MIB:.0f} MiB: {'met' if figures['goal_met'] else 'NOT met'}"),
        ("round time (mean)", f"{sum(r['seconds'] for r in rounds) / len(rounds):.1f} s"),
        ("training time (mean)", f"{sum(r['train_seconds'] for r in rounds) / len(rounds):.1f} s"),
        ("bytes up per round", f"{rounds[-1]['bytes_up'] / MIB:.1f} MiB"),
        ("bytes down per round", f"{rounds[-1]['bytes_down'] / MIB:.1f} MiB"),
        ("final accuracy", f"{figures['final_accuracy']:.4f}"),
    ]
    return figure_table(rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200, help="number of clients (default 200)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (default 1)")
    parser.add_argument(
        "--partition", default="dirichlet", help="partition (default dirichlet; iid if that fails)"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha (default 0.5)")
    parser.add_argument("--data-dir", type=Path, default=None, help="data root (has mnist/)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "memory.json", help="JSON results file"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    machine = machine_info(("fedcrypt", "torch", "numpy"))
    child = [sys.executable, __file__, "--child", *sys.argv[1:]]
    completed = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True)
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    figures["goal_met"] = figures["peak_rss_bytes"] < GOAL_BYTES
    payload = {
        "benchmark": "memory",
        "command": command_line(),
        "machine": machine,
        "goal_peak_rss_bytes": GOAL_BYTES,
        "measurement": "ru_maxrss of a fresh subprocess that runs only this simulation",
        **figures,
    }
    write_json(args.out, payload)
    print(markdown_table(figures))
    print(f"\nResults: {args.out}")


if __name__ == "__main__":
    main()
