"""``fedcrypt runs``: list the recorded runs, or show one with its rounds.

Kept apart from ``cli/main.py`` (which registers it) and without importing it, so main.py imports
this module at the top without an import cycle.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedcrypt.cli.errors import user_errors
from fedcrypt.tracking.store import STATUSES, RunStore, StoreError, default_store

console = Console()

StoreOpt = Annotated[
    str | None,
    typer.Option("--store", help="Run store: an SQLite file or a postgresql:// URL (default: $FEDCRYPT_STORE, "
                                 "else runs.sqlite in the user's data folder)."),
]
runs_app = typer.Typer(name="runs", help="Recorded runs: `fedcrypt runs` lists them, `fedcrypt runs show ID` shows one.",
                       invoke_without_command=True, no_args_is_help=False)
_STATUS_STYLE = {"running": "yellow", "finished": "green", "failed": "red"}


# Store, file and value errors: one ``error:`` line, exit status 2.
_user_errors = partial(user_errors, StoreError)


def open_store(location: str | None) -> RunStore:
    """The run store at ``location`` (None: the default)."""
    return RunStore(location or default_store())


@runs_app.callback()
def runs(
    context: typer.Context,
    store: StoreOpt = None,
    mechanism: Annotated[str | None, typer.Option(help="Only runs of this mechanism (e.g. ckks).")] = None,
    status: Annotated[str | None, typer.Option(help="Only running, finished or failed runs.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many runs, newest first.")] = 50,
) -> None:
    """List recorded runs, newest first."""
    if context.invoked_subcommand is not None:
        return
    with _user_errors():
        if status is not None and status not in STATUSES:
            raise ValueError(f"--status must be one of {', '.join(STATUSES)}, got {status!r}")
        found = open_store(store).runs(mechanism=mechanism, status=status, limit=limit)
    if not found:
        console.print("no runs recorded" + (" matching the filters" if mechanism or status else ""))
        return
    table = Table("id", "job", "mechanism", "kind", "status", "rounds", "accuracy", "started", "seconds")
    for run in found:
        table.add_row(run.id, run.job, run.mechanism, run.kind, _status(run.status),
                      f"{run.rounds_done}/{run.planned_rounds}", _number(run.final_accuracy),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(run.started)), f"{run.seconds:.1f}")
    console.print(table)


@runs_app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="A run's id (or a unique prefix).", show_default=False)],
    store: StoreOpt = None,
) -> None:
    """Show one run: its settings, status, files and every round's metrics."""
    with _user_errors():
        detail = open_store(store).get(run_id)
    run = detail.run
    console.print(f"[bold]{escape(run.id)}[/]: job {escape(run.job)}, mechanism {escape(run.mechanism)}, "
                  f"{run.kind}, {_status(run.status)}, {run.rounds_done}/{run.planned_rounds} rounds, "
                  f"{run.seconds:.1f} s", highlight=False)
    if run.error:
        console.print(f"[red]error:[/] {escape(run.error)}", highlight=False)
    console.print(f"run folder: {escape(run.run_dir)}; model: {escape(run.model_path or '-')}", highlight=False)
    table = Table("round", "status", "clients", "train loss", "loss", "accuracy", "up MB", "down MB", "seconds", "ε")
    for record in detail.rounds:
        table.add_row(str(record["round"]), record["status"], f"{record['succeeded']}/{record['sampled']}",
                      _number(record.get("train_loss")), _number(record.get("loss")), _number(record.get("accuracy")),
                      f"{record['bytes_up'] / 1e6:.3f}", f"{record['bytes_down'] / 1e6:.3f}",
                      f"{record['seconds']:.2f}", _number(record.get("dp_epsilon"), ".3g"))
    console.print(table)


def _status(status: str) -> str:
    return f"[{_STATUS_STYLE.get(status, 'white')}]{status}[/]"


def _number(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"

