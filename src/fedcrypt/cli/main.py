"""The ``fedcrypt`` command line. User errors print one line and exit with status 2."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedcrypt import __version__
from fedcrypt.config.job import JobConfig, JobError, load_job
from fedcrypt.core.server import RoundRecord
from fedcrypt.data import DatasetError, load_dataset, summarize, summary_table
from fedcrypt.cli.audit import audit
from fedcrypt.cli.certs import certs
from fedcrypt.cli.errors import err_console, user_errors
from fedcrypt.cli.keys import keys_app
from fedcrypt.cli.runs import StoreOpt, open_store, runs_app
from fedcrypt.cli.vertical import psi, vertical
from fedcrypt.cli.web import board, serve_run
from fedcrypt.deployment import DeploymentError, assist, join, serve
from fedcrypt.simulation import partition_clients, simulate
from fedcrypt.tracking.checkpoint import CheckpointError
from fedcrypt.tracking.rundir import RunDirectory
from fedcrypt.tracking.store import StoreError, recording
from fedcrypt.transport.certs import CertError, client_files, server_files, tls_or_insecure
from fedcrypt.transport.grpc_client import ClientLimits

app = typer.Typer(
    name="fedcrypt",
    help="Privacy-preserving federated learning: simulate and deploy protected FedAvg jobs, and vertical FL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

JobArg = Annotated[Path, typer.Argument(help="TOML job file.", show_default=False)]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Dataset folder (default: $FEDCRYPT_DATA, else a cache dir).")
]
KeysOpt = Annotated[
    Path | None,
    typer.Option("--keys", help="Key folder from `fedcrypt keys` (HE mechanisms; default: the job's \\[privacy] keys)."),
]


class UserError(Exception):
    """An error caused by input; shown as one line, exit status 2."""


# User errors: one ``error:`` line, exit status 2.
_user_errors = partial(user_errors, UserError, JobError, DatasetError, CertError, CheckpointError, DeploymentError,
                       StoreError)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )


def _load(path: Path, **overrides: dict[str, object]) -> JobConfig:
    job = load_job(path)
    overrides = {k: v for k, v in overrides.items() if v}
    return job.with_overrides(**overrides) if overrides else job


@app.command()
def run(
    job_file: JobArg,
    rounds: Annotated[int | None, typer.Option(min=1, help="Override job.rounds.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/<job>-<time>).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Override job.seed.")] = None,
    data_dir: DataDirOpt = None,
    store: StoreOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the final summary.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")] = False,
) -> None:
    """Run a job as an in-process simulation and write metrics.jsonl, model.pt, model.json and
    job.toml; the run is recorded in the run store (`fedcrypt runs`, `fedcrypt board`)."""
    _setup_logging(verbose)
    with _user_errors():
        job = _load(job_file, job={k: v for k, v in (("rounds", rounds), ("seed", seed)) if v is not None})
        out_dir = out or Path("runs") / f"{job.job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        console.print(
            f"[bold]{job.job.name}[/]: {job.data.num_clients} clients on {job.data.dataset} "
            f"({job.data.partition}), model {job.model.name}, strategy {job.strategy.name}, "
            f"mechanism [bold]{job.privacy.mechanism}[/], {job.job.rounds} rounds"
        )
        started = time.perf_counter()
        with (
            _recording(store, job, "simulation", out_dir) as record_round,
            _round_display(job.job.rounds, quiet) as on_round,
        ):
            result = simulate(job, out_dir=out_dir, data_dir=data_dir,
                              on_round=lambda record: (record_round(record), on_round(record)))
    failed = sum(r.status != "ok" for r in result.history)
    if result.stopped:
        console.print(f"[bold yellow]stopped early[/]: {escape(result.stopped)}", highlight=False)
    console.print(
        f"[bold green]done[/] in {time.perf_counter() - started:.1f} s: final accuracy "
        f"[bold]{result.final_accuracy:.4f}[/], {failed} failed rounds; wrote {out_dir}/"
        "{metrics.jsonl, model.pt, model.json, job.toml}",
        highlight=False,
    )


_COLUMNS = "round  clients  train loss  test loss  accuracy     up (MB)   down (MB)  seconds"


def _row(record: RoundRecord) -> str:
    clients = f"{record.succeeded}/{record.sampled}"
    line = (
        f"{record.round:>5}  {clients:>7}  {record.train_loss:>10.4f}  {record.loss:>9.4f}  "
        f"{record.accuracy:>8.4f}  {record.bytes_up / 1e6:>10.3f}  {record.bytes_down / 1e6:>10.3f}  "
        f"{record.seconds:>7.2f}"
    )
    if "dp_epsilon" in record.mechanism:
        line += f"  ε={record.mechanism['dp_epsilon']:.3g}"
    if record.status != "ok":
        line += f"  [red]round failed: {escape(record.error)}[/]"
    elif record.failures:
        line += f"  [yellow]{len(record.failures)} client(s) dropped[/]"
    return line


@contextmanager
def _round_display(rounds: int, quiet: bool) -> Iterator[Callable[[RoundRecord], None]]:
    """A progress bar with one table row printed above it per round."""
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet,
    )
    task = progress.add_task("training", total=rounds)
    if not quiet:
        console.print(f"[bold]{_COLUMNS}[/]", highlight=False)

    def on_round(record: RoundRecord) -> None:
        if not quiet:
            progress.console.print(_row(record), highlight=False)
        progress.advance(task)

    with progress:
        yield on_round


@app.command()
def data(
    job_file: JobArg,
    data_dir: DataDirOpt = None,
) -> None:
    """Show how the job's dataset is split among clients: samples and label histogram per client."""
    _setup_logging(False)
    with _user_errors():
        job = _load(job_file)
        dataset = load_dataset(job.data.dataset, data_dir or job.data.data_dir)
        parts = partition_clients(job, dataset)
    used = len(dataset.y_train) if job.data.train_samples is None else job.data.train_samples
    subset = f" (a seeded subset of {len(dataset.y_train)})" if job.data.train_samples is not None else ""
    console.print(
        f"{job.data.dataset}: {used} training examples{subset}, "
        f"{job.data.num_clients} clients, partition {job.data.partition}"
    )
    console.print(summary_table(summarize(parts, dataset.y_train, dataset.num_classes), dataset.class_names))


@app.command()
def server(
    job_file: JobArg,
    address: Annotated[str, typer.Option(help="HOST:PORT to listen on.")] = "127.0.0.1:8443",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/<job>-server).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue after the last checkpointed round in --out.")] = False,
    certs_dir: Annotated[Path | None, typer.Option("--certs", help="Folder from `fedcrypt certs`.")] = None,
    insecure: Annotated[bool, typer.Option(help="Plaintext, unauthenticated gRPC (loopback only).")] = False,
    revoked: Annotated[str, typer.Option(help="Comma-separated client names to refuse.")] = "",
    keys: KeysOpt = None,
    data_dir: DataDirOpt = None,
    store: StoreOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")] = False,
) -> None:
    """Serve a job to remote clients over gRPC (mutual TLS unless --insecure); the run is
    recorded in the run store (`fedcrypt runs`)."""
    _setup_logging(verbose)
    with _user_errors():
        job = _load(job_file)
        tls = tls_or_insecure(certs_dir, insecure, lambda d: server_files(d))
        out_dir = out or Path("runs") / f"{job.job.name}-server"
        console.print(
            f"[bold]{job.job.name}[/]: serving {job.job.rounds} rounds on {address} "
            f"({'TLS' if tls else '[red]INSECURE[/]'}), mechanism [bold]{job.privacy.mechanism}[/]"
        )
        with (
            _recording(store, job, "server", out_dir, resume=resume) as record_round,
            _round_display(job.job.rounds, quiet=False) as on_round,
        ):
            result = serve(
                job,
                address=address,
                out_dir=out_dir,
                tls=tls,
                resume=resume,
                revoked=tuple(n for n in revoked.split(",") if n),
                key_dir=keys,
                data_dir=data_dir,
                on_round=lambda record: (record_round(record), on_round(record)),
                on_listening=lambda port: console.print(f"listening on port {port}; waiting for clients"),
            )
    done = len(result.history) + result.resumed_from
    if result.stopped:
        console.print(f"[bold yellow]stopped early[/]: {escape(result.stopped)}", highlight=False)
    console.print(f"[bold green]done[/]: {done} rounds; wrote {out_dir}/", highlight=False)


@app.command()
def client(
    server_address: Annotated[str, typer.Option("--server", help="Server HOST:PORT.")],
    name: Annotated[str, typer.Option(help="This client's name (its certificate's common name).")],
    partition: Annotated[int, typer.Option(min=0, help="Train on partition I of the job's dataset split.")] = 0,
    certs_dir: Annotated[Path | None, typer.Option("--certs", help="Folder with ca.pem, NAME.pem, NAME.key.")] = None,
    insecure: Annotated[bool, typer.Option(help="Plaintext, unauthenticated gRPC (loopback only).")] = False,
    reconnect_timeout: Annotated[float, typer.Option(min=0, help="Seconds to keep retrying an unreachable server.")] = 60.0,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads for training (use 1 when clients share a machine).")
    ] = None,
    keys: KeysOpt = None,
    data_dir: DataDirOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")] = False,
) -> None:
    """Join a server's job and train on local data until the job ends."""
    _setup_logging(verbose)
    if threads:
        torch.set_num_threads(threads)
    with _user_errors():
        tls = tls_or_insecure(certs_dir, insecure, lambda d: client_files(d, name))
        answered = join(
            server_address,
            name,
            tls=tls,
            partition=partition,
            key_dir=keys,
            data_dir=data_dir,
            limits=ClientLimits(reconnect_timeout=reconnect_timeout),
        )
    console.print(f"[bold green]done[/]: answered {answered} requests as {name}")


@app.command()
def aggregator(
    server_address: Annotated[str, typer.Option("--server", help="Server HOST:PORT.")],
    name: Annotated[str, typer.Option(help="This helper's name: aggregator-1 ... aggregator-(k-1).")],
    keys: Annotated[
        Path | None,
        typer.Option("--keys", help="Folder with NAME.secret.json from `fedcrypt keys aggregator` (default: the job's \\[privacy] keys)."),
    ] = None,
    certs_dir: Annotated[Path | None, typer.Option("--certs", help="Folder with ca.pem, NAME.pem, NAME.key.")] = None,
    insecure: Annotated[bool, typer.Option(help="Plaintext, unauthenticated gRPC (loopback only).")] = False,
    reconnect_timeout: Annotated[float, typer.Option(min=0, help="Seconds to keep retrying an unreachable server.")] = 60.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")] = False,
) -> None:
    """Serve a `shares` job as one of its helper aggregators: hold one share of every update,
    sum them, never see data or models."""
    _setup_logging(verbose)
    with _user_errors():
        tls = tls_or_insecure(certs_dir, insecure, lambda d: client_files(d, name))
        answered = assist(
            server_address, name, tls=tls, key_dir=keys, limits=ClientLimits(reconnect_timeout=reconnect_timeout)
        )
    console.print(f"[bold green]done[/]: answered {answered} requests as helper aggregator {name}")


@contextmanager
def _recording(store: str | None, job: JobConfig, kind: str, out_dir: Path, *,
               resume: bool = False) -> Iterator[Callable[[RoundRecord], None]]:
    """Record the run in the store and keep its id in the run folder (``fedcrypt serve`` reports it,
    and a resumed server goes on recording the same run). A folder that already holds a run is
    refused before anything is recorded."""
    id_file = out_dir / "run_id"
    if not resume:
        RunDirectory.refuse_used(out_dir)
    run_id = id_file.read_text().strip() if resume and id_file.exists() else None
    mechanism = job.privacy.mechanism + ("+dp" if job.dp else "")
    run_store = open_store(store)

    def on_start(new_id: str) -> None:
        _keep_id(id_file, new_id)
        if resume:  # a round the killed server wrote to its folder but not to the store
            run_store.restore_rounds(new_id, RunDirectory(out_dir, resume=True).rounds())

    with recording(run_store, job=job.job.name, mechanism=mechanism, kind=kind,
                   planned_rounds=job.job.rounds, run_dir=out_dir, config=job.to_toml(),
                   model_path=out_dir / "model.pt", run_id=run_id, on_start=on_start) as record_round:
        yield record_round


def _keep_id(path: Path, run_id: str) -> None:
    """Write the run id once (a resumed server's folder already has its own)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")


app.command()(certs)
app.add_typer(keys_app)
app.command()(vertical)
app.command()(psi)
app.add_typer(runs_app)
app.command()(board)
app.command(name="serve")(serve_run)
app.command()(audit)


@app.command()
def check(job_file: JobArg) -> None:
    """Validate a job file and print it with every default filled in."""
    with _user_errors():
        job = load_job(job_file)
    console.print(job.to_toml(), highlight=False, markup=False)


@app.command()
def version() -> None:
    """Print the fedcrypt version."""
    console.print(f"fedcrypt {__version__}")


def main() -> None:
    app()
