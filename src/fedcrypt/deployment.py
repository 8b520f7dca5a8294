"""Real deployment: ``fedcrypt server``, ``fedcrypt client`` and (for additive sharing)
``fedcrypt aggregator`` as separate processes over gRPC.

They run the same :class:`~fedcrypt.core.server.Server`, :class:`~fedcrypt.core.client.Client`
and :class:`~fedcrypt.core.helper.HelperAggregator` as the simulation, on the same message bytes;
only the transport differs. Helper aggregators connect to the server like clients (their
certificates name them ``aggregator-1`` ...), and the server asks them through their own view of
its transport. The server
checkpoints after every round and can resume; rounds that fail (too few clients before the
deadline) are retried, and a job that cannot proceed stops with a clear error.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedcrypt.config.job import JobConfig, parse_job
from fedcrypt.core.client import Client
from fedcrypt.core.helper import HelperAggregator
from fedcrypt.core.mechanism import BudgetSpent
from fedcrypt.core.messages import JobSpec, from_bytes, to_bytes
from fedcrypt.core.params import unflatten
from fedcrypt.core.server import SERVER_NAME, RoundRecord, Server
from fedcrypt.core.transport import Inbound, Subset, Transport
from fedcrypt.core.wire import WireError
from fedcrypt.data import load_dataset
from fedcrypt.mechanisms import client_mechanism, helper_mechanism, helpers_of, server_mechanism
from fedcrypt.models.training import ClientData
from fedcrypt.simulation import (
    build_strategy,
    build_trainer,
    evaluation_data,
    model_spec,
    partition_clients,
    train_tensors,
    with_dp,
)
from fedcrypt.tracking.checkpoint import Checkpoint, job_digest, load_checkpoint, save_checkpoint
from fedcrypt.tracking.rundir import RunDirectory
from fedcrypt.transport.certs import TlsFiles
from fedcrypt.transport.grpc_client import ClientLimits, ConnectionRefused, GrpcClientConnection, answer_until_finished
from fedcrypt.transport.grpc_server import GrpcServerTransport, ServerLimits

log = logging.getLogger(__name__)


class DeploymentError(Exception):
    """The job cannot go on (too few clients, rounds failing, refused connection)."""


@dataclass
class ServeResult:
    history: list[RoundRecord]
    resumed_from: int
    stopped: str = ""  # why the job ended before its last round (e.g. its DP budget was spent)


def serve(
    job: JobConfig,
    *,
    address: str,
    out_dir: Path,
    tls: TlsFiles | None,
    resume: bool = False,
    revoked: tuple[str, ...] = (),
    key_dir: Path | None = None,
    data_dir: Path | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_listening: Callable[[int], None] | None = None,
) -> ServeResult:
    """Run the job's rounds with remote clients; writes the same run directory as a simulation."""
    limit_allocator_fragmentation()
    dataset = load_dataset(job.data.dataset, data_dir or job.data.data_dir)
    trainer = build_trainer(job, dataset)
    test = evaluation_data(dataset)
    deploy = job.deploy
    transport = GrpcServerTransport(
        job=job.job.name,
        address=address,
        welcome=to_bytes(JobSpec(job.to_toml()), job=job.job.name, sender=SERVER_NAME),
        tls=tls,
        limits=ServerLimits(
            round_timeout=deploy.round_timeout,
            liveness_timeout=deploy.liveness_timeout,
            max_message_bytes=deploy.max_message_mb << 20,
            chunk_bytes=deploy.chunk_kb << 10,
            spool_bytes=deploy.spool_mb << 20,
            parallel_downloads=deploy.parallel_downloads,
        ),
        revoked=revoked,
    )
    helpers = helpers_of(job.privacy.mechanism, job.privacy.options)
    server = Server(
        job=job.job.name,
        strategy=build_strategy(job),
        mechanism=with_dp(
            server_mechanism(
                job.privacy.mechanism, key_dir=_key_dir(key_dir, job), spec=trainer.spec, options=job.privacy.options
            ),
            job,
        ),
        params=trainer.initial_params(),
        transport=Subset(transport, lambda name: name not in helpers) if helpers else transport,
        seed=job.job.seed,
        evaluate=lambda params: trainer.evaluate(params, test),
        helpers=Subset(transport, lambda name: name in helpers) if helpers else None,
    )
    run_dir = RunDirectory(out_dir, resume=resume)
    digest = job_digest(job.to_toml())
    start = 1
    if resume:
        checkpoint = load_checkpoint(run_dir.checkpoint_path, digest)
        server.restore(checkpoint.params, checkpoint.strategy_state, checkpoint.sampler_state, checkpoint.mechanism_state)
        run_dir.keep_rounds(checkpoint.round)
        start = checkpoint.round + 1
        log.info("resuming %s after round %d", job.job.name, checkpoint.round)
    else:
        run_dir.write_job(job.to_toml())
    port = transport.start()
    if on_listening:
        on_listening(port)
    history: list[RoundRecord] = []
    try:
        if server.helpers is not None:
            ready = _wait_for(server.helpers, len(helpers), deploy.wait_timeout)
            if len(ready) < len(helpers):
                missing = ", ".join(sorted(set(helpers) - set(ready)))
                raise DeploymentError(
                    f"helper aggregator(s) {missing} did not connect within {deploy.wait_timeout:g} s; "
                    "start each with `fedcrypt aggregator`"
                )
        wanted = deploy.min_clients or job.strategy.min_fit_clients
        connected = _wait_for(server.transport, wanted, deploy.wait_timeout)
        log.info("%d clients connected: %s", len(connected), ", ".join(connected))
        stopped = ""
        for server_round in range(start, job.job.rounds + 1):
            try:
                record = _round_with_retries(server, server_round, job, deploy.max_retries)
            except BudgetSpent as exc:
                stopped = str(exc)
                log.warning("stopping: %s", exc)
                break
            run_dir.append_round(record)
            params, strategy_state, sampler_state, mechanism_state = server.snapshot()
            checkpoint = Checkpoint(server_round, params, strategy_state, sampler_state, digest, mechanism_state)
            save_checkpoint(run_dir.checkpoint_path, checkpoint)
            history.append(record)
            if on_round:
                on_round(record)
        _shut_down_clients(server, transport, job.deploy.liveness_timeout)
    finally:
        transport.close()
    run_dir.write_model(unflatten(server.params, trainer.spec), model_spec(job, dataset))
    return ServeResult(history, start - 1, stopped)


def limit_allocator_fragmentation() -> None:
    """Keep glibc from growing one heap per gRPC thread and keeping freed chunk buffers.

    Measured with 20 clients and 41 MB updates: server peak memory fell from 14.5 to 8.4 updates.
    The environment (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_) still wins if set. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold, m_arena_max = -3, -8  # mallopt parameters from glibc's malloc.h
    if "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(m_arena_max, 2)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(m_mmap_threshold, 256 << 10)


def _shut_down_clients(server: Server, transport: GrpcServerTransport, grace: float) -> None:
    """Tell every client the job is over, also those reconnecting right now (up to ``grace`` s)."""
    remaining = set(transport.known()) - set(server.shutdown())
    deadline = time.monotonic() + grace
    while remaining and time.monotonic() < deadline:
        ready = [name for name in transport.available() if name in remaining]
        if ready:
            remaining -= set(server.shutdown(ready))
        else:
            time.sleep(0.2)
    if remaining:
        log.warning("clients not told that the job ended: %s", ", ".join(sorted(remaining)))


def _wait_for(peers: Transport, count: int, timeout: float) -> list[str]:
    """Block until ``count`` peers of a group are connected or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while len(peers.available()) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return peers.available()


def _round_with_retries(server: Server, server_round: int, job: JobConfig, retries: int) -> RoundRecord:
    """Run a round; if it fails, wait for enough clients and try again, ``retries`` times."""
    for attempt in range(retries + 1):
        if attempt:
            _wait_for(server.transport, job.strategy.min_fit_clients, job.deploy.wait_timeout)
        record = server.run_round(server_round)
        if record.status == "ok":
            return record
        log.warning("round %d attempt %d/%d failed: %s", server_round, attempt + 1, retries + 1, record.error)
    raise DeploymentError(f"round {server_round} failed {retries + 1} times; last error: {record.error}")


def join(
    address: str,
    name: str,
    *,
    tls: TlsFiles | None,
    partition: int,
    key_dir: Path | None = None,
    data_dir: Path | None = None,
    limits: ClientLimits | None = None,
) -> int:
    """Take part in the server's job until it ends; returns the number of requests answered."""
    connection = GrpcClientConnection(address, name, tls=tls, limits=limits)
    try:
        job = _job_from_welcome(connection.hello())
        connection.job = job.job.name
        connection.limits.spool_bytes = job.deploy.spool_mb << 20
        dataset = load_dataset(job.data.dataset, data_dir or job.data.data_dir)
        parts = partition_clients(job, dataset)
        if not 0 <= partition < len(parts):
            raise DeploymentError(f"--partition must be in 0..{len(parts) - 1} for this job, got {partition}")
        x, y = train_tensors(dataset)
        trainer = build_trainer(job, dataset)
        mechanism = with_dp(
            client_mechanism(
                job.privacy.mechanism, key_dir=_key_dir(key_dir, job), spec=trainer.spec, options=job.privacy.options
            ),
            job,
        )
        client = Client(
            name,
            job.job.name,
            trainer,
            ClientData(x, y, torch.from_numpy(parts[partition])),
            mechanism,
            seed=job.job.seed,
        )
        log.info("joined job %s as %s with %d examples", job.job.name, name, client.data.num_examples)
        return answer_until_finished(connection, client)
    except ConnectionRefused as exc:
        raise DeploymentError(str(exc)) from None
    finally:
        connection.close()


def assist(
    address: str,
    name: str,
    *,
    tls: TlsFiles | None,
    key_dir: Path | None = None,
    limits: ClientLimits | None = None,
) -> int:
    """Serve the job as helper aggregator ``name`` until it ends; returns the requests answered.

    The helper needs its secret key (``--keys``, from ``fedcrypt keys aggregator``), no data.
    """
    connection = GrpcClientConnection(address, name, tls=tls, limits=limits)
    try:
        job = _job_from_welcome(connection.hello())
        connection.job = job.job.name
        connection.limits.spool_bytes = job.deploy.spool_mb << 20
        key_dir = _key_dir(key_dir, job)
        if key_dir is None:
            raise DeploymentError(
                f"a helper aggregator needs --keys DIR with its secret file (`fedcrypt keys aggregator --name {name}`)"
            )
        mechanism = helper_mechanism(
            job.privacy.mechanism,
            helper=name,
            key_dir=key_dir,
            options=job.privacy.options,
            min_clients=job.strategy.min_fit_clients,
        )
        log.info("serving job %s as helper aggregator %s", job.job.name, name)
        return answer_until_finished(connection, HelperAggregator(name, job.job.name, mechanism))
    except ConnectionRefused as exc:
        raise DeploymentError(str(exc)) from None
    finally:
        connection.close()


def _key_dir(given: Path | None, job: JobConfig) -> Path | None:
    """``--keys``, else the job's ``[privacy] keys`` (a path on this machine)."""
    return given if given is not None else (Path(job.privacy.keys) if job.privacy.keys else None)


def _job_from_welcome(data: Inbound) -> JobConfig:
    try:
        message = from_bytes(data).message
        if not isinstance(message, JobSpec):
            raise WireError(f"expected a job description, got {type(message).__name__}")
        return parse_job(tomllib.loads(message.toml), source="job from server")
    except (WireError, tomllib.TOMLDecodeError) as exc:
        raise DeploymentError(f"the server's job description is unusable: {exc}") from None
