"""The one way every command reports a user error: one ``error:`` line on stderr, exit status 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

err_console = Console(stderr=True)


@contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Show a ``ValueError``, ``OSError`` or one of ``kinds`` as one line and exit with status 2."""
    try:
        yield
    except (ValueError, OSError, *kinds) as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
