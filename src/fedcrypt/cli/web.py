"""``fedcrypt board`` (the web board over the run store) and ``fedcrypt serve`` (a run's model
behind an HTTP prediction API). Registered by ``cli/main.py``; imports nothing from it."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedcrypt.board import create_app as create_board
from fedcrypt.cli.errors import err_console, user_errors
from fedcrypt.cli.runs import StoreOpt, open_store
from fedcrypt.serving import ServingError, create_app, load_served_model
from fedcrypt.serving.http import HttpServer, is_loopback
from fedcrypt.tracking.store import StoreError

console = Console()

# Store, run-folder, address and value errors: one ``error:`` line, exit status 2.
_user_errors = partial(user_errors, StoreError, ServingError)

HostOpt = Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")]


def board(
    store: StoreOpt = None,
    host: HostOpt = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port).")] = 8765,
    refresh: Annotated[float, typer.Option(min=0.2, help="Seconds between updates of a running run's page.")] = 2.0,
) -> None:
    """Serve the web board: the runs table, a page per run with its plots, and a compare view."""
    with _user_errors():
        run_store = open_store(store)
        server = HttpServer(create_board(run_store, refresh_seconds=refresh), host, port)
    if not is_loopback(host):
        err_console.print(f"[yellow]warning:[/] the board has no login; anyone who reaches {escape(host)}:{server.port} "
                          "sees every run and its configuration", highlight=False)
    console.print(f"fedcrypt board for {escape(run_store.location)} at [bold]{server.url}[/] (Ctrl-C stops)",
                  highlight=False)
    server.run()


def serve_run(
    run_dir: Annotated[Path, typer.Argument(help="A finished run's folder (holding model.pt).", show_default=False)],
    host: HostOpt = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port).")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, max=1_000_000, help="Most inputs in one request.")] = 1024,
    certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM) for HTTPS.")] = None,
    keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM) for HTTPS.")] = None,
) -> None:
    """Serve a run's final model: POST /predict, GET /metadata, GET /health (API docs at /docs)."""
    with _user_errors():
        served = load_served_model(run_dir)
        server = HttpServer(create_app(served, max_batch=max_batch), host, port,
                            certfile=str(certfile) if certfile else None, keyfile=str(keyfile) if keyfile else None)
    if not is_loopback(host) and certfile is None:
        err_console.print("[yellow]warning:[/] plain HTTP off loopback: requests and predictions travel unencrypted "
                          "(give --certfile/--keyfile, or put a TLS proxy in front)", highlight=False)
    run = served.run
    accuracy = f", test accuracy {run['accuracy']:.4f}" if isinstance(run.get("accuracy"), float) else ""
    console.print(f"serving [bold]{escape(str(run.get('job') or run_dir))}[/] ({served.spec.name}, mechanism "
                  f"{escape(str(run.get('mechanism')))}{accuracy}) at [bold]{server.url}[/]: POST /predict, "
                  "GET /metadata, GET /health (Ctrl-C stops)", highlight=False)
    server.run()
