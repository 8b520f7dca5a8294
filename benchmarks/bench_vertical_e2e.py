"""Whole vertical runs: the shipped examples in one process against one process per party.

``fedcrypt vertical examples/vertical/{hetero_lr,secureboost}.toml`` end to end (PSI on the
breast-cancer split, training, scoring both splits, model files), first with every party in this
process (``run_in_process``: the same message bytes, no network), then with the host and the
arbiter as child processes talking gRPC with mutual TLS over loopback (``run_processes``). The
ratio is what separate processes and the network cost; the in-process run is the baseline in
the same run. Both runs' test accuracies are reported (HeteroLR's are the same model; SecureBoost
may break tied host splits differently).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, command_line, figure_table, machine_info, write_json

from fedcrypt.config.vertical import load_vertical_job
from fedcrypt.vertical.network import run_in_process, run_processes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "vertical"


def measure(job_path: Path, scratch: Path) -> dict[str, Any]:
    job = load_vertical_job(job_path)
    started = time.perf_counter()
    one = run_in_process(job, scratch / "one")
    one_seconds = time.perf_counter() - started
    started = time.perf_counter()
    many = run_processes(job_path, scratch / "many")
    many_seconds = time.perf_counter() - started
    return {
        "in_process_seconds": one_seconds, "processes_seconds": many_seconds,
        "ratio": many_seconds / one_seconds,
        "phases_in_process": one.seconds, "phases_processes": many.seconds,
        "test_accuracy": {"in_process": one.metrics["test"]["accuracy"], "processes": many.metrics["test"]["accuracy"]},
        "megabytes": (many.bytes_sent + many.bytes_received) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "vertical_e2e.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("hetero_lr", "secureboost"):
            results[name] = measure(EXAMPLES / f"{name}.toml", Path(scratch) / name)
    rows = []
    for name, r in results.items():
        rows += [(f"{name}: one process (s)", f"{r['in_process_seconds']:.1f}"),
                 (f"{name}: process per party over gRPC+TLS (s)", f"{r['processes_seconds']:.1f}"),
                 (f"{name}: ratio", f"{r['ratio']:.2f}x"),
                 (f"{name}: test accuracy (one / per party)",
                  f"{r['test_accuracy']['in_process']:.4f} / {r['test_accuracy']['processes']:.4f}"),
                 (f"{name}: MB exchanged", f"{r['megabytes']:.1f}")]
    print(figure_table(rows))
    write_json(args.out, {"command": command_line(), "machine": machine_info(("grpcio", "gmpy2")), "results": results})


if __name__ == "__main__":
    main()
