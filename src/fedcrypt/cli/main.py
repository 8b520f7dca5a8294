"""The ``fedcrypt`` command line. User errors print one line and exit with status 2."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedcrypt import __version__
from fedcrypt.config.job import JobConfig, JobError, load_job
from fedcrypt.core.server import RoundRecord
from fedcrypt.data import DatasetError, load_dataset, summarize, summary_table
from fedcrypt.simulation import partition_clients, simulate

app = typer.Typer(
    name="fedcrypt",
    help="Privacy-preserving federated learning: simulate and deploy protected FedAvg jobs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

JobArg = Annotated[Path, typer.Argument(help="TOML job file.", show_default=False)]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Dataset folder (default: $FEDCRYPT_DATA, else a cache dir).")
]


class UserError(Exception):
    """An error caused by input; shown as one line, exit status 2."""


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except (UserError, JobError, DatasetError, ValueError, OSError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the final summary.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")] = False,
) -> None:
    """Run a job as an in-process simulation and write metrics.jsonl, model.pt and job.toml."""
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
        with _round_display(job.job.rounds, quiet) as on_round:
            result = simulate(job, out_dir=out_dir, data_dir=data_dir, on_round=on_round)
    failed = sum(r.status != "ok" for r in result.history)
    console.print(
        f"[bold green]done[/] in {time.perf_counter() - started:.1f} s: final accuracy "
        f"[bold]{result.final_accuracy:.4f}[/], {failed} failed rounds; wrote {out_dir}/"
        "{metrics.jsonl, model.pt, job.toml}",
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
    if record.status != "ok":
        line += f"  [red]round failed: {record.error}[/]"
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
    console.print(
        f"{job.data.dataset}: {len(dataset.y_train)} training examples, "
        f"{job.data.num_clients} clients, partition {job.data.partition}"
    )
    console.print(summary_table(summarize(parts, dataset.y_train, dataset.num_classes), dataset.class_names))


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
