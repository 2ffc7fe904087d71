"""What every command shares: the one-line error wrapper."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer

from attnsparse.errors import AttnsparseError

T = TypeVar("T")


def run_or_exit(action: Callable[[], T]) -> T:
    """Run a command body; an AttnsparseError becomes `error: ...` on stderr and exit status 2."""
    try:
        return action()
    except AttnsparseError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
