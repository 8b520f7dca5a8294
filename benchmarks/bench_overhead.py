"""Framework overhead per round: a plain Python loop, Flower's simulation and fedcrypt, one task.

All three run the task of ``overhead_task.py`` (digits, 10 IID clients, MLP 64-64-10, one local
epoch) with the same initial weights, the same ``LocalTrainer.fit`` and per-client seeds, and the
same central evaluation on the test split after every round. Per round::

    overhead = round wall time - sum of client training seconds - central evaluation seconds

averaged over rounds 2..R (round 1 is warm-up and is reported separately, together with the
start-up before it). Every system runs ``--repeats`` times, interleaved; medians are reported.
torch uses one thread everywhere (the driver and every Ray worker).
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported

import argparse  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RESULTS_DIR, command_line, machine_info, write_json  # noqa: E402
from flwr.common import (  # noqa: E402
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
)
from flwr.server import ServerApp, ServerAppComponents, ServerConfig  # noqa: E402
from flwr.server.client_manager import ClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from overhead_task import NUM_CLIENTS, Task, build_task, client_app, make_job  # noqa: E402

from fedcrypt import JobConfig, simulate  # noqa: E402
from fedcrypt.core.client import client_seed  # noqa: E402
from fedcrypt.core.server import RoundRecord  # noqa: E402

ACCURACY_TOLERANCE = 0.01


@dataclass
class RoundTiming:
    """One round as the benchmark sees it (seconds)."""

    round: int
    started: float  # since the system was called
    seconds: float
    train_seconds: float
    eval_seconds: float
    accuracy: float

    @property
    def overhead(self) -> float:
        return self.seconds - self.train_seconds - self.eval_seconds


@dataclass
class RunResult:
    """One run of one system: its rounds and its total wall time from call to return."""

    rounds: list[RoundTiming]
    total_seconds: float

    @property
    def startup_seconds(self) -> float:
        """From calling the system to the start of round 1."""
        return self.rounds[0].started

    def steady_overhead(self) -> float:
        """Mean overhead per round over rounds 2..R."""
        return statistics.fmean(r.overhead for r in self.rounds[1:])

    def between_rounds(self) -> float:
        """Mean time from the end of one round to the start of the next (outside every round)."""
        pairs = itertools.pairwise(self.rounds)
        return statistics.fmean(nxt.started - cur.started - cur.seconds for cur, nxt in pairs)

    def to_json(self) -> dict[str, Any]:
        return {
            "startup_seconds": self.startup_seconds,
            "total_seconds": self.total_seconds,
            "steady_overhead_seconds": self.steady_overhead(),
            "between_rounds_seconds": self.between_rounds(),
            "round1_overhead_seconds": self.rounds[0].overhead,
            "final_accuracy": self.rounds[-1].accuracy,
            "rounds": [asdict(r) | {"overhead": r.overhead} for r in self.rounds],
        }


def run_loop(job: JobConfig) -> RunResult:
    """The baseline: train each client in turn, weighted-average the models, evaluate."""
    called = time.perf_counter()
    task = build_task(job)
    params = task.initial_params
    total_examples = sum(data.num_examples for data in task.clients)
    rounds: list[RoundTiming] = []
    for server_round in range(1, job.job.rounds + 1):
        started = time.perf_counter()
        summed = np.zeros_like(params)
        train_seconds = 0.0
        for name, data in zip(task.names, task.clients, strict=True):
            seed = client_seed(job.job.seed, server_round, name)
            result = task.trainer.fit(params, data, seed=seed)
            summed += data.num_examples * result.params
            train_seconds += result.seconds
        params = (summed / total_examples).astype(np.float32)
        eval_started = time.perf_counter()
        _, accuracy = task.trainer.evaluate(params, task.test)
        ended = time.perf_counter()
        wall, eval_seconds = ended - started, ended - eval_started
        rounds.append(
            RoundTiming(server_round, started - called, wall, train_seconds, eval_seconds, accuracy)
        )
    return RunResult(rounds, time.perf_counter() - called)


def run_fedcrypt(job: JobConfig) -> RunResult:
    """``fedcrypt.simulate``: its own round records give wall, training and evaluation time."""
    records: list[tuple[float, RoundRecord]] = []
    called = time.perf_counter()
    simulate(job, on_round=lambda record: records.append((time.perf_counter(), record)))
    total = time.perf_counter() - called
    rounds = [
        RoundTiming(
            r.round,
            ended - r.seconds - called,
            r.seconds,
            r.train_seconds,
            r.eval_seconds,
            r.accuracy,
        )
        for ended, r in records
    ]
    return RunResult(rounds, total)


class TimedFedAvg(FedAvg):
    """Flower's FedAvg with timestamps: a round runs from ``configure_fit`` to the end of
    ``evaluate`` (central evaluation); clients report their ``LocalTrainer.fit`` seconds."""

    def __init__(self, task: Task) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=NUM_CLIENTS,
            min_available_clients=NUM_CLIENTS,
            evaluate_fn=self._evaluate,
            on_fit_config_fn=lambda server_round: {"server_round": server_round},
            fit_metrics_aggregation_fn=_sum_train_seconds,
            initial_parameters=ndarrays_to_parameters([task.initial_params]),
        )
        self.task = task
        self.started: dict[int, float] = {}
        self.ended: dict[int, float] = {}
        self.train_seconds: dict[int, float] = {}
        self.eval_seconds: dict[int, float] = {}
        self.accuracy: dict[int, float] = {}

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.started[server_round] = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if failures or len(results) != NUM_CLIENTS:
            raise RuntimeError(f"round {server_round}: {len(results)} results, failures {failures}")
        aggregated, metrics = super().aggregate_fit(server_round, results, failures)
        self.train_seconds[server_round] = float(metrics["train_seconds"])
        return aggregated, metrics

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        result = super().evaluate(server_round, parameters)
        if server_round > 0:
            self.ended[server_round] = time.perf_counter()
        return result

    def _evaluate(
        self, server_round: int, ndarrays: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        if server_round == 0:  # Flower evaluates the initial model; the other systems do not
            return None
        started = time.perf_counter()
        loss, accuracy = self.task.trainer.evaluate(ndarrays[0], self.task.test)
        self.eval_seconds[server_round] = time.perf_counter() - started
        self.accuracy[server_round] = accuracy
        return loss, {"accuracy": accuracy}

    def timings(self, called: float) -> list[RoundTiming]:
        """The rounds, with start times relative to ``called``."""
        return [
            RoundTiming(
                r,
                self.started[r] - called,
                self.ended[r] - self.started[r],
                self.train_seconds[r],
                self.eval_seconds[r],
                self.accuracy[r],
            )
            for r in sorted(self.ended)
        ]


def _sum_train_seconds(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    return {"train_seconds": sum(float(m["train_seconds"]) for _, m in metrics)}


def run_flower(job: JobConfig) -> RunResult:
    """``flwr.simulation.run_simulation`` on Ray, one client at a time (each takes every CPU)."""
    cpus = os.cpu_count() or 1
    called = time.perf_counter()
    strategy = TimedFedAvg(build_task(job))
    server_app = ServerApp(
        server_fn=lambda _: ServerAppComponents(
            strategy=strategy, config=ServerConfig(num_rounds=job.job.rounds)
        )
    )
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config={
            "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus},
        },
    )
    total = time.perf_counter() - called
    rounds = strategy.timings(called)
    if len(rounds) != job.job.rounds:
        raise RuntimeError(f"Flower finished {len(rounds)} of {job.job.rounds} rounds")
    return RunResult(rounds, total)


SYSTEMS: dict[str, Callable[[JobConfig], RunResult]] = {
    "plain loop": run_loop,
    "Flower": run_flower,
    "fedcrypt": run_fedcrypt,
}


def summarize(runs: list[RunResult]) -> dict[str, float]:
    """Medians over repeats of the per-run figures (per-round means over rounds 2..R)."""

    def steady(field: str) -> float:
        return statistics.median(
            statistics.fmean(getattr(r, field) for r in run.rounds[1:]) for run in runs
        )

    return {
        "steady_overhead_seconds": statistics.median(run.steady_overhead() for run in runs),
        "round_seconds": steady("seconds"),
        "train_seconds": steady("train_seconds"),
        "eval_seconds": steady("eval_seconds"),
        "between_rounds_seconds": statistics.median(run.between_rounds() for run in runs),
        "startup_and_round1_overhead_seconds": statistics.median(
            run.startup_seconds + run.rounds[0].overhead for run in runs
        ),
        "final_accuracy": statistics.median(run.rounds[-1].accuracy for run in runs),
    }


def markdown_table(summaries: dict[str, dict[str, float]]) -> str:
    """One row per system; the ratio column is Flower's overhead over the row's."""
    flower = summaries["Flower"]["steady_overhead_seconds"]
    lines = [
        "| system | round s | train s | eval s | overhead s/round | Flower / system "
        "| between rounds s | start-up + round-1 overhead s | final accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in summaries.items():
        cells = [
            name,
            f"{s['round_seconds']:.4f}",
            f"{s['train_seconds']:.4f}",
            f"{s['eval_seconds']:.4f}",
            f"{s['steady_overhead_seconds']:.4f}",
            f"{flower / s['steady_overhead_seconds']:.1f}x",
            f"{s['between_rounds_seconds']:.4f}",
            f"{s['startup_and_round1_overhead_seconds']:.2f}",
            f"{s['final_accuracy']:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run, >= 2 (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per system (default 3)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "overhead.json", help="JSON results file"
    )
    args = parser.parse_args()
    if args.rounds < 2 or args.repeats < 1:
        parser.error("--rounds must be >= 2 and --repeats >= 1")

    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    machine = machine_info(("fedcrypt", "torch", "flwr", "ray", "numpy"))
    job = make_job(args.rounds)
    runs: dict[str, list[RunResult]] = {name: [] for name in SYSTEMS}
    for repeat in range(1, args.repeats + 1):
        for name, run in SYSTEMS.items():
            result = run(job)
            runs[name].append(result)
            print(
                f"repeat {repeat} {name}: overhead {result.steady_overhead():.4f} s/round, "
                f"accuracy {result.rounds[-1].accuracy:.4f}",
                flush=True,
            )

    summaries = {name: summarize(results) for name, results in runs.items()}
    accuracies = [s["final_accuracy"] for s in summaries.values()]
    overhead = {name: s["steady_overhead_seconds"] for name, s in summaries.items()}
    ratio = overhead["Flower"] / overhead["fedcrypt"]
    write_json(
        args.out,
        {
            "benchmark": "overhead",
            "command": command_line(),
            "machine": machine,
            "settings": {
                "job": job.model_dump(mode="json"),
                "repeats": args.repeats,
                "measured_rounds": f"2..{args.rounds} (round 1 is warm-up)",
                "torch_threads": 1,
                "flower": {
                    "api": "run_simulation + ServerApp/ClientApp, legacy FedAvg + NumPyClient",
                    "client_resources": {"num_cpus": os.cpu_count(), "num_gpus": 0.0},
                    "round_window": "configure_fit start -> end of strategy.evaluate (central)",
                    "telemetry": os.environ["FLWR_TELEMETRY_ENABLED"],
                },
            },
            "summary": summaries,
            "flower_over_fedcrypt_overhead": ratio,
            "final_accuracy_spread": max(accuracies) - min(accuracies),
            "final_accuracies_match": max(accuracies) - min(accuracies) <= ACCURACY_TOLERANCE,
            "runs": {name: [run.to_json() for run in results] for name, results in runs.items()},
        },
    )
    print()
    print(markdown_table(summaries))
    print(f"\nFlower / fedcrypt overhead: {ratio:.1f}x (goal >= 8x). Results: {args.out}")


if __name__ == "__main__":
    main()
