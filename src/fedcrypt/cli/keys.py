"""``fedcrypt keys``: key material for homomorphic mechanisms (made by a key authority) and for
the helper aggregators of additive sharing (each made on its helper's machine).

Kept apart from ``cli/main.py`` (which registers it with ``app.add_typer(keys_app)``).
"""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedcrypt.cli.certs import _user_errors
from fedcrypt.crypto.ckks import PRESETS, SecretKey
from fedcrypt.crypto.paillier import DEFAULT_BITS, generate_keypair
from fedcrypt.mechanisms import paillier as paillier_files
from fedcrypt.mechanisms.ckks import PUBLIC_FILE, SECRET_FILE, write_keys
from fedcrypt.mechanisms.shares import public_file as shares_public_file
from fedcrypt.mechanisms.shares import secret_file as shares_secret_file
from fedcrypt.mechanisms.shares import write_helper_key

keys_app = typer.Typer(name="keys", help="Create key material for homomorphic encryption and helper aggregators.", no_args_is_help=True)
console = Console()
HELPER_NAME = re.compile(r"aggregator-[1-9][0-9]?")

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
    _print_files(out, PUBLIC_FILE, SECRET_FILE)
    console.print(f"preset [bold]{preset}[/] ({PRESETS[preset].description}); key fingerprint {secret.public.fingerprint}")


@keys_app.command()
def paillier(
    out: Annotated[Path, typer.Option(help="Folder for paillier.public.json and paillier.secret.json.", show_default=False)],
    bits: Annotated[int, typer.Option(help="Key size: 1024, 2048, 3072 or 4096 bits.")] = DEFAULT_BITS,
) -> None:
    """Create a Paillier key (for `paillier` and `batchcrypt`): the secret file (0600) goes to every
    client, the public file to the server."""
    with _user_errors():
        if bits not in (1024, 2048, 3072, 4096):
            raise ValueError(f"--bits must be 1024, 2048, 3072 or 4096, got {bits}")
        public, private = generate_keypair(bits)
        paillier_files.write_keys(out, private)
    _print_files(out, paillier_files.PUBLIC_FILE, paillier_files.SECRET_FILE)
    console.print(f"{bits}-bit key; fingerprint {public.fingerprint}")


@keys_app.command()
def aggregator(
    out: Annotated[Path, typer.Option(help="Folder for NAME.public.json and NAME.secret.json.", show_default=False)],
    name: Annotated[str, typer.Option(help="The helper's name: aggregator-1 ... aggregator-(k-1).")] = "aggregator-1",
) -> None:
    """Create a helper aggregator's X25519 key (for `shares`), on the helper's own machine: the
    secret file (0600) stays with the helper, the public file goes to every client."""
    with _user_errors():
        if not HELPER_NAME.fullmatch(name):
            raise ValueError(f"--name must be aggregator-1, aggregator-2, ..., got {name!r}")
        public = write_helper_key(out, name)
    _print_files(
        out, shares_public_file(name), shares_secret_file(name),
        audiences=("every client", f"helper aggregator {name} only, never the server or a client"),
    )
    console.print(f"helper aggregator [bold]{name}[/]; public key {public.hex()[:16]}...")


def _print_files(
    out: Path,
    public_file: str,
    secret_file: str,
    audiences: tuple[str, str] = ("the server (and every client)", "every client, never the server"),
) -> None:
    table = Table("file", "mode", "give it to")
    for name, audience in zip((public_file, secret_file), audiences):
        path = out / name
        table.add_row(str(path), f"{stat.S_IMODE(path.stat().st_mode):04o}", audience)
    console.print(table)
