"""What every command shares: the one-line error wrapper and the --device / --dtype options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import typer

from attnsparse.errors import AttnsparseError

T = TypeVar("T")
DEVICE_HELP = "Device: cpu, cuda or cuda:N (default: cuda when available, else cpu)."
DTYPE_HELP = "Model precision: float32 (default), bfloat16 or float16 (attention softmax stays float32)."
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


def device_option() -> Any:
    """`--device`: cpu, cuda or cuda:N; None (not given) means cuda when available, else cpu."""
    return typer.Option(None, "--device", help=DEVICE_HELP)


def dtype_option() -> Any:
    """`--dtype`: float32 (default), bfloat16 or float16."""
    return typer.Option("float32", "--dtype", help=DTYPE_HELP)
