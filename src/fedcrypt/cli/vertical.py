"""``fedcrypt vertical`` and ``fedcrypt psi``: vertical federated learning from the command line.

Kept apart from ``cli/main.py`` (which registers the commands) and without importing it, so
main.py imports this module at the top without an import cycle.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedcrypt.cli.errors import user_errors
from fedcrypt.config.job import JobError
from fedcrypt.config.vertical import GUEST, load_vertical_job
from fedcrypt.transport.certs import CertError, client_files, server_files, tls_or_insecure
from fedcrypt.vertical.data import VerticalDataError, read_ids
from fedcrypt.vertical.federation import Progress as ProgressCallback
from fedcrypt.vertical.federation import VerticalError, VerticalResult, load_guest_data, load_host_data
from fedcrypt.vertical.network import join_party, psi_connect, psi_listen, run_in_process, run_processes, serve_guest

console = Console()
_PHASES = {"psi": "intersecting IDs", "train": "training", "score": "scoring"}

CertsOpt = Annotated[Path | None, typer.Option("--certs", help="Folder from `fedcrypt certs` (mutual TLS).")]
InsecureOpt = Annotated[bool, typer.Option(help="Plaintext, unauthenticated gRPC (loopback only).")]
WorkersOpt = Annotated[int | None, typer.Option(min=1, help="Processes for PSI and Paillier work (default: all cores).")]


# Bad input and failed runs: one ``error:`` line, exit status 2.
_user_errors = partial(user_errors, VerticalError, VerticalDataError, JobError, CertError)


@contextmanager
def _progress(quiet: bool) -> Iterator[ProgressCallback]:
    """One bar per phase (PSI, training, scoring), updated by the guest's driver."""
    bars = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, disable=quiet)
    tasks: dict[str, TaskID] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bars.add_task(_PHASES.get(phase, phase), total=total)
        bars.update(tasks[phase], completed=done, total=total)

    with bars:
        yield update


def vertical(
    job_file: Annotated[Path, typer.Argument(help="Vertical job file (TOML).", show_default=False)],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/<job>).")] = None,
    processes: Annotated[
        bool, typer.Option("--processes", help="Run every other party as its own process over loopback gRPC with TLS.")
    ] = False,
    role: Annotated[
        str | None, typer.Option(help="Deployment: play only this party (guest, a host's name, or arbiter).")
    ] = None,
    listen: Annotated[str | None, typer.Option(help="The guest's HOST:PORT to listen on (with --role guest).")] = None,
    connect: Annotated[str | None, typer.Option(help="The guest's HOST:PORT (with --role NAME).")] = None,
    certs_dir: CertsOpt = None,
    insecure: InsecureOpt = False,
    data: Annotated[Path | None, typer.Option(help="This party's CSV, instead of the job's path (with --role).")] = None,
    workers: WorkersOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the final summary.")] = False,
) -> None:
    """Train a vertical model (HeteroLR or SecureBoost) over parties holding different columns.

    Without --role every party runs here (in this process, or with --processes one process each);
    with --role each party runs on its own machine: the guest with --listen, the others --connect.
    """
    with _user_errors():
        job = load_vertical_job(job_file)
        out_dir = out or Path("runs") / job.vertical.name
        if role is None:
            if listen or connect or certs_dir or insecure or data:
                raise ValueError("--listen, --connect, --certs, --insecure and --data go with --role")
            where = "one process per party" if processes else "one process"
            console.print(f"[bold]{job.vertical.name}[/]: {job.vertical.algorithm} over "
                          f"{', '.join([GUEST, *job.peers])} ({where})", highlight=False)
            with _progress(quiet) as progress:
                if processes:
                    result = run_processes(job_file, out_dir, workers=workers, progress=progress)
                else:
                    result = run_in_process(job, out_dir, workers=workers, progress=progress)
            _summary(result, out_dir)
        elif role == GUEST:
            if not listen or connect or processes:
                raise ValueError("the guest listens: --role guest --listen HOST:PORT (no --connect, no --processes)")
            tls = tls_or_insecure(certs_dir, insecure, server_files)
            guest_data = load_guest_data(job, data)
            console.print(f"[bold]{job.vertical.name}[/]: guest of {job.vertical.algorithm} on {listen} "
                          f"({'TLS' if tls else '[red]INSECURE[/]'}); waiting for {', '.join(job.peers)}")
            with _progress(quiet) as progress:
                result = serve_guest(job, guest_data, address=listen, tls=tls, out_dir=out_dir, workers=workers,
                                     progress=progress)
            _summary(result, out_dir)
        else:
            if not connect or listen or processes:
                raise ValueError(f"{role} connects to the guest: --role {role} --connect HOST:PORT")
            tls = tls_or_insecure(certs_dir, insecure, lambda d: client_files(d, role))
            party_data = None if role == "arbiter" else load_host_data(job, role, data)
            join_party(job, role, address=connect, tls=tls, out_dir=out_dir, data=party_data, workers=workers)
            console.print(f"[bold green]done[/]: took part as {role}"
                          + ("" if role == "arbiter" else f"; wrote its part of the model to {out_dir}/model.json"))


def _summary(result: VerticalResult, out_dir: Path) -> None:
    table = Table("split", "rows", "accuracy", "AUC", "log loss")
    for split, scores in result.metrics.items():
        auc = f"{scores['auc']:.4f}" if "auc" in scores else "-"
        table.add_row(split, f"{scores['rows']:.0f}", f"{scores['accuracy']:.4f}", auc, f"{scores['log_loss']:.4f}")
    console.print(table)
    seconds = ", ".join(f"{phase} {value:.1f} s" for phase, value in result.seconds.items())
    console.print(f"[bold green]done[/]: {result.rows['common']} common rows ({seconds}); "
                  f"{(result.bytes_sent + result.bytes_received) / 1e6:.1f} MB exchanged; wrote {out_dir}/",
                  highlight=False)


def psi(
    ids_file: Annotated[Path, typer.Argument(help="CSV with an ID column.", show_default=False)],
    out: Annotated[Path, typer.Option(help="CSV to write the common IDs to (in the order both sides get).")],
    id_column: Annotated[str, typer.Option(help="Name of the ID column.")] = "id",
    listen: Annotated[str | None, typer.Option(help="HOST:PORT to listen on (one side).")] = None,
    peer: Annotated[str, typer.Option(help="With --listen: the other side's name (its certificate's).")] = "peer",
    connect: Annotated[str | None, typer.Option(help="HOST:PORT of the listening side (the other side).")] = None,
    name: Annotated[str, typer.Option(help="With --connect: this side's name (its certificate's).")] = "peer",
    certs_dir: CertsOpt = None,
    insecure: InsecureOpt = False,
    wait_timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the other side.")] = 300.0,
    workers: WorkersOpt = None,
) -> None:
    """Private set intersection of two ID columns (ECDH on Curve25519): each side learns the
    common IDs and the other's count, nothing else. One side --listen, the other --connect."""
    with _user_errors():
        if (listen is None) == (connect is None):
            raise ValueError("give exactly one of --listen HOST:PORT and --connect HOST:PORT")
        if out.exists():
            raise ValueError(f"{out} exists; refusing to overwrite it")
        ids = read_ids(ids_file, id_column)
        if listen is not None:
            tls = tls_or_insecure(certs_dir, insecure, server_files)
            common = psi_listen(ids, address=listen, tls=tls, peer=peer, wait_timeout=wait_timeout, workers=workers,
                                on_listening=lambda port: console.print(f"listening on port {port}; waiting for {peer}"))
        else:
            assert connect is not None
            tls = tls_or_insecure(certs_dir, insecure, lambda d: client_files(d, name))
            common = psi_connect(ids, address=connect, name=name, tls=tls, workers=workers)
        with out.open("x", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([id_column])
            writer.writerows([row_id] for row_id in common)
    console.print(f"[bold green]done[/]: {len(common)} of our {len(ids)} IDs are common; wrote {out}")

