"""``fedcrypt keys``: key material for homomorphic mechanisms, made by a key authority.

Kept apart from ``cli/main.py`` (which registers it with ``app.add_typer(keys_app)``).
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedcrypt.cli.certs import _user_errors
from fedcrypt.crypto.ckks import PRESETS, SecretKey
from fedcrypt.mechanisms.ckks import PUBLIC_FILE, SECRET_FILE, write_keys

keys_app = typer.Typer(name="keys", help="Create key material for homomorphic mechanisms.", no_args_is_help=True)
console = Console()

_PRESET_HELP = "Parameter preset: " + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())


@keys_app.command()
def ckks(
    out: Annotated[Path, typer.Option(help="Folder for ckks.public.json and ckks.secret.", show_default=False)],
    preset: Annotated[str, typer.Option(help=_PRESET_HELP)] = "fast",
) -> None:
    """Create a CKKS key: the secret file (0600) goes to every client, the public file to the server."""
    with _user_errors():
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        secret = SecretKey(PRESETS[preset])
        write_keys(out, secret)
    table = Table("file", "mode", "give it to")
    for name, audience in ((PUBLIC_FILE, "the server (and every client)"), (SECRET_FILE, "every client, never the server")):
        path = out / name
        table.add_row(str(path), f"{stat.S_IMODE(path.stat().st_mode):04o}", audience)
    console.print(table)
    console.print(f"preset [bold]{preset}[/] ({PRESETS[preset].description}); key fingerprint {secret.public.fingerprint}")
