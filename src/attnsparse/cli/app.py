"""The `attnsparse` command line: thin wrappers over the Python API; bad input gives one line and exit status 2."""

from __future__ import annotations

import sys

import typer

from attnsparse import __version__

app = typer.Typer(
    name="attnsparse",
    help="Measure, condense, evaluate and accelerate sparse attention in Hugging Face causal LMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: option help is full of spec grammar (`block:B:BUDGET[:mean|bound]`) that rich markup would
    # rewrite (`:B:` is an emoji code, `[...]` a style tag); printed as written, it reads as typed.
    rich_markup_mode=None,
)

def _version(value: bool) -> None:
    if value:
        typer.echo(f"attnsparse {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool | None = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """attnsparse: attention condensation toolkit."""


def _register_commands() -> None:
    """Each command is a thin typer function in its own module."""
    from attnsparse.cli.budget import budget_command
    from attnsparse.cli.condense import condense_command
    from attnsparse.cli.evaluate import evaluate_command
    from attnsparse.cli.gate import gate_command
    from attnsparse.cli.generate import generate_command
    from attnsparse.cli.info import info_command
    from attnsparse.cli.measure import measure_command
    from attnsparse.cli.run import run_command
    from attnsparse.cli.theory import theory_command

    app.command("info")(info_command)
    app.command("run")(run_command)
    app.command("measure")(measure_command)
    app.command("evaluate")(evaluate_command)
    app.command("condense")(condense_command)
    app.command("generate")(generate_command)
    app.command("theory")(theory_command)
    app.command("budget")(budget_command)
    app.command("gate")(gate_command)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="attnsparse")


if __name__ == "__main__":
    sys.exit(main())
