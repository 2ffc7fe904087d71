"""What every command shares: the one-line error wrapper."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer

from attnsparse.errors import AttnsparseError

T = TypeVar("T")
INTERRUPTED_STATUS = 130  # the shell's status for a process stopped by SIGINT


def run_or_exit(action: Callable[[], T]) -> T:
    """Run a command body; an AttnsparseError becomes `error: ...` on stderr and exit status 2, Ctrl-C one line
    saying what the run directory kept (see attnsparse.core.runs.RunInterrupted) and exit status 130."""
    try:
        return action()
    except AttnsparseError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as interrupt:
        typer.echo(str(interrupt) or "interrupted before any run directory was written", err=True)
        raise typer.Exit(INTERRUPTED_STATUS) from None
