"""The task every system in ``bench_overhead.py`` runs, and the Flower client that runs it.

This lives in its own importable module (not in the benchmark script) so that Flower's Ray
workers import it by name: each worker then builds its data and model once and keeps them,
instead of unpickling them with every message.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import Context, NDArrays, Scalar

from fedcrypt import JobConfig
from fedcrypt.core.client import client_seed
from fedcrypt.data import load_dataset
from fedcrypt.models.training import ClientData, LocalTrainer, TrainConfig
from fedcrypt.models.zoo import build_model
from fedcrypt.simulation import client_names, partition_clients

NUM_CLIENTS = 10


def make_job(rounds: int = 5) -> JobConfig:
    """Digits, 10 IID clients, MLP 64-64-10, one local epoch of SGD (batch 32, lr 0.1, momentum
    0.9), FedAvg over every client each round."""
    return JobConfig().with_overrides(
        job={"name": "bench-overhead", "rounds": rounds, "seed": 0},
        data={"dataset": "digits", "num_clients": NUM_CLIENTS, "partition": "iid"},
        model={"name": "mlp", "hidden": (64, 64)},
        train={"local_epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
        strategy={"name": "fedavg", "fraction_fit": 1.0, "min_fit_clients": NUM_CLIENTS},
    )


@dataclass(frozen=True)
class Task:
    """Everything a system needs: one shared trainer, the clients' data and the test split."""

    job: JobConfig
    trainer: LocalTrainer
    names: list[str]
    clients: list[ClientData]
    test: ClientData
    initial_params: np.ndarray


def build_task(job: JobConfig) -> Task:
    """Build the task as ``fedcrypt.simulate`` does (same seed, model init and partition)."""
    dataset = load_dataset(job.data.dataset)
    torch.manual_seed(job.job.seed)
    model = build_model(
        job.model.name, dataset.input_shape, dataset.num_classes, hidden=job.model.hidden
    )
    trainer = LocalTrainer(model, TrainConfig(**job.train.model_dump()))
    x_train = torch.from_numpy(np.array(dataset.x_train))
    y_train = torch.from_numpy(np.array(dataset.y_train))
    clients = [
        ClientData(x_train, y_train, torch.from_numpy(indices))
        for indices in partition_clients(job, dataset)
    ]
    test = ClientData.whole(
        torch.from_numpy(np.array(dataset.x_test)), torch.from_numpy(np.array(dataset.y_test))
    )
    names = client_names(job.data.num_clients)
    return Task(job, trainer, names, clients, test, trainer.initial_params())


@functools.cache
def worker_task() -> Task:
    """The task as seen by one Ray worker process, built on its first message."""
    torch.set_num_threads(1)
    return build_task(make_job())


class BenchClient(NumPyClient):
    """Trains one client's partition with ``LocalTrainer.fit``; the model is one flat array."""

    def __init__(self, partition_id: int) -> None:
        self.partition_id = partition_id

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        task = worker_task()
        name = task.names[self.partition_id]
        data = task.clients[self.partition_id]
        seed = client_seed(task.job.job.seed, int(config["server_round"]), name)
        result = task.trainer.fit(parameters[0], data, seed=seed)
        return [result.params], data.num_examples, {"train_seconds": result.seconds}


def client_fn(context: Context) -> Client:
    """Flower's per-message client factory: the node's partition id picks the data."""
    return BenchClient(int(context.node_config["partition-id"])).to_client()


client_app = ClientApp(client_fn=client_fn)
