"""In-process simulation: every client runs in this process over :class:`InProcessTransport`,
through the same server/client code and message bytes as a deployment."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedcrypt.aggregator import start_helpers
from fedcrypt.config.job import JobConfig, load_job
from fedcrypt.core.client import Client
from fedcrypt.core.mechanism import BudgetSpent, Mechanism
from fedcrypt.core.params import ParamSpec, unflatten
from fedcrypt.core.server import RoundRecord, Server
from fedcrypt.data import Dataset, load_dataset, partition
from fedcrypt.mechanisms import helpers_of, simulation_mechanisms
from fedcrypt.mechanisms.dp import DpMechanism
from fedcrypt.models.training import ClientData, LocalTrainer, TrainConfig
from fedcrypt.models.zoo import ModelSpec
from fedcrypt.strategies import STRATEGIES, Strategy
from fedcrypt.tracking.rundir import RunDirectory
from fedcrypt.transport.inprocess import InProcessTransport

log = logging.getLogger(__name__)

ModelFactory = Callable[[], nn.Module]


@dataclass
class SimulationResult:
    job: JobConfig
    history: list[RoundRecord]
    params: np.ndarray
    spec: ParamSpec
    out_dir: Path | None
    stopped: str = ""  # why the job ended before its last round (e.g. its DP budget was spent)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The final global model as a PyTorch state_dict."""
        return unflatten(self.params, self.spec)

    @property
    def final_accuracy(self) -> float:
        return self.history[-1].accuracy if self.history else float("nan")


def build_strategy(job: JobConfig) -> Strategy:
    settings = job.strategy.model_dump(exclude={"name"})
    return STRATEGIES[job.strategy.name](**settings)


def with_dp(mechanism: Mechanism, job: JobConfig) -> Mechanism:
    """``mechanism`` with the job's differential privacy around it, if it has a ``[dp]`` section."""
    settings = job.dp_settings()
    if settings is None:
        return mechanism
    return DpMechanism(
        mechanism,
        settings,
        clients=job.data.num_clients,
        sampled=job.sampled_clients,
        min_clients=job.strategy.min_fit_clients,
        rounds=job.job.rounds,
    )


def client_names(num_clients: int) -> list[str]:
    width = max(3, len(str(num_clients - 1)))
    return [f"client-{i:0{width}d}" for i in range(num_clients)]


def simulate(
    job: JobConfig | str | Path,
    *,
    rounds: int | None = None,
    seed: int | None = None,
    out_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    model_factory: ModelFactory | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> SimulationResult:
    """Run a federated job in this process.

    ``job`` is a :class:`JobConfig` or the path of a TOML job file; ``rounds`` and ``seed``
    override the file. ``model_factory`` replaces the job's named model with any ``nn.Module``.
    With ``out_dir`` the run writes ``job.toml``, ``metrics.jsonl`` and ``model.pt`` there.
    """
    config = job if isinstance(job, JobConfig) else load_job(job)
    overrides = {k: v for k, v in (("rounds", rounds), ("seed", seed)) if v is not None}
    if overrides:
        config = config.with_overrides(job=overrides)
    run_dir = RunDirectory(out_dir) if out_dir is not None else None
    if run_dir:
        run_dir.write_job(config.to_toml())

    dataset = load_dataset(config.data.dataset, data_dir or config.data.data_dir)
    trainer = build_trainer(config, dataset, model_factory)
    server = _build(config, dataset, trainer)
    history: list[RoundRecord] = []
    stopped = ""
    try:
        for server_round in range(1, config.job.rounds + 1):
            try:
                record = server.run_round(server_round)
            except BudgetSpent as exc:
                stopped = str(exc)
                log.info("stopping: %s", exc)
                break
            history.append(record)
            if run_dir:
                run_dir.append_round(record)
            if on_round:
                on_round(record)
        server.shutdown()
    finally:
        if server.helpers is not None:
            server.helpers.close()
    result = SimulationResult(config, history, server.params, trainer.spec, run_dir.path if run_dir else None, stopped)
    if run_dir:
        run_dir.write_model(result.state_dict(), None if model_factory else model_spec(config, dataset))
    return result


def model_spec(config: JobConfig, dataset: Dataset) -> ModelSpec:
    """What rebuilds the job's built-in model (written beside model.pt for ``fedcrypt serve``)."""
    return ModelSpec(config.model.name, dataset.input_shape, dataset.num_classes, dataset.class_names,
                     tuple(config.model.hidden), dataset.name)


def partition_clients(config: JobConfig, dataset: Dataset) -> list[np.ndarray]:
    """Each client's training-set indices, as the job's partitioner assigns them.

    With ``data.train_samples`` only a seeded random subset of that many training examples is
    partitioned; the indices still point into the full training set.
    """
    available = len(dataset.y_train)
    wanted = config.data.train_samples
    if wanted is None:
        subset = np.arange(available, dtype=np.int64)
    elif wanted > available:
        raise ValueError(
            f"data.train_samples ({wanted}) exceeds the {available} training examples of {dataset.name}"
        )
    else:
        # its own stream (not the partitioner's), so the subset does not echo the partition's draws
        rng = np.random.default_rng(np.random.SeedSequence([config.job.seed, _SUBSET_STREAM]))
        subset = np.sort(rng.choice(available, size=wanted, replace=False)).astype(np.int64)
    parts = partition(
        dataset.y_train[subset],
        config.data.num_clients,
        config.data.partition,
        seed=config.job.seed,
        alpha=config.data.alpha,
        shards_per_client=config.data.shards_per_client,
    )
    return parts if wanted is None else [subset[part] for part in parts]


_SUBSET_STREAM = 0x7375627365  # "subse": tags the train_samples subset's random stream


def build_trainer(config: JobConfig, dataset: Dataset, model_factory: ModelFactory | None = None) -> LocalTrainer:
    """The job's model (initialized from the job seed) with its local training settings."""
    torch.manual_seed(config.job.seed)
    if model_factory is not None:
        model = model_factory()
    else:
        model = model_spec(config, dataset).build()
    return LocalTrainer(model, TrainConfig(**config.train.model_dump()))


def train_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.array(dataset.x_train)), torch.from_numpy(np.array(dataset.y_train))


def evaluation_data(dataset: Dataset) -> ClientData:
    return ClientData.whole(torch.from_numpy(np.array(dataset.x_test)), torch.from_numpy(np.array(dataset.y_test)))


def _build(config: JobConfig, dataset: Dataset, trainer: LocalTrainer) -> Server:
    """Wire clients, transport and server for one simulation."""
    x_train, y_train = train_tensors(dataset)
    test = evaluation_data(dataset)
    parts = partition_clients(config, dataset)
    data = {
        name: ClientData(x_train, y_train, torch.from_numpy(indices))
        for name, indices in zip(client_names(config.data.num_clients), parts)
    }
    return build_server(config, trainer, data, evaluate=lambda params: trainer.evaluate(params, test))


#: Wraps the server's mechanism instance, given the clients' instance (the privacy audit's tap).
MechanismTap = Callable[[Mechanism, Mechanism], Mechanism]


def build_server(
    config: JobConfig,
    trainer: LocalTrainer,
    client_data: Mapping[str, ClientData],
    *,
    evaluate: Callable[[np.ndarray], tuple[float, float]] | None = None,
    dp_job: JobConfig | None = None,
    tap: MechanismTap | None = None,
) -> Server:
    """A server over in-process clients holding ``client_data``, protected by the job's
    mechanism with the DP of ``dp_job`` (default: the job's own)."""
    privacy = config.privacy
    key_dir = Path(privacy.keys) if privacy.keys else None
    helpers, helper_keys = start_helpers(config, key_dir) if helpers_of(privacy.mechanism, privacy.options) else (None, None)
    try:
        server_side, client_side = simulation_mechanisms(
            privacy.mechanism, key_dir=key_dir, spec=trainer.spec, options=privacy.options, helper_keys=helper_keys
        )
        server_side, client_side = with_dp(server_side, dp_job or config), with_dp(client_side, dp_job or config)
        if tap is not None:
            server_side = tap(server_side, client_side)
        clients = {
            name: Client(name, config.job.name, trainer, data, client_side, seed=config.job.seed)
            for name, data in client_data.items()
        }
        return Server(
            job=config.job.name,
            strategy=build_strategy(config),
            mechanism=server_side,
            params=trainer.initial_params(),
            transport=InProcessTransport(clients),
            seed=config.job.seed,
            evaluate=evaluate,
            helpers=helpers,
        )
    except BaseException:
        if helpers is not None:
            helpers.close()  # do not leave the helper processes behind a failed set-up
        raise
