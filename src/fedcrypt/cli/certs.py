"""``fedcrypt certs``: create the CA, server and client certificates for a mutual-TLS deployment.

Kept apart from ``cli/main.py`` (which registers it with ``app.command()(certs)``) and without
importing it, so that main.py can import this module at the top without an import cycle.
"""

from __future__ import annotations

import stat
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedcrypt.cli.errors import user_errors
from fedcrypt.transport.certs import DEFAULT_HOSTS, CertError, write_bundle

console = Console()


# Certificate, file and value errors: one ``error:`` line, exit status 2.
_user_errors = partial(user_errors, CertError)


def _split(values: str) -> list[str]:
    return [value.strip() for value in values.split(",") if value.strip()]


def certs(
    out: Annotated[Path, typer.Option(help="Folder for ca.*, server.* and clients/NAME.*.", show_default=False)],
    clients: Annotated[
        str,
        typer.Option(help="Comma-separated client names, e.g. a,b,c (each gets clients/NAME.pem).", show_default=False),
    ],
    hosts: Annotated[
        str, typer.Option(help="Comma-separated DNS names and IP addresses the server is reached by.")
    ] = ",".join(DEFAULT_HOSTS),
    days: Annotated[int, typer.Option(min=1, help="Validity of new certificates, in days.")] = 365,
    force: Annotated[
        bool, typer.Option("--force", help="Replace existing server and client files (an existing CA is always kept).")
    ] = False,
) -> None:
    """Create a CA, server and client certificates for mutual TLS; an existing CA in OUT is reused."""
    with _user_errors():
        bundle = write_bundle(out, _split(clients), hosts=_split(hosts), days=days, force=force)
        if not bundle.ca_created:
            console.print(f"using the existing CA in {out / 'ca.pem'}", highlight=False)
        if not bundle.written:
            console.print("nothing to write", highlight=False)
            return
        table = Table("file", "mode")
        for path in bundle.written:
            table.add_row(str(path), f"{stat.S_IMODE(path.stat().st_mode):04o}")
        console.print(table)
        if bundle.ca_created:
            console.print(
                f"[bold yellow]note:[/] {bundle.ca_key} can sign certificates every participant trusts: "
                "move it offline and bring it back only to enroll clients.",
                highlight=False,
            )
