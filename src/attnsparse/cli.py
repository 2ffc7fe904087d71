"""The `attnsparse` command line: thin wrappers over the Python API; bad input gives one line and exit status 2."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Optional, TypeVar

import typer

from attnsparse import __version__
from attnsparse.errors import AttnsparseError

app = typer.Typer(
    name="attnsparse",
    help="Measure, condense, evaluate and accelerate sparse attention in Hugging Face causal LMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")


def run_or_exit(action: Callable[[], T]) -> T:
    """Run a command body; an AttnsparseError becomes `error: ...` on stderr and exit status 2."""
    try:
        return action()
    except AttnsparseError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"attnsparse {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Optional[bool] = typer.Option(  # noqa: UP045 - typer reads the annotation
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """attnsparse: attention condensation toolkit."""


@app.command()
def info(
    model: str = typer.Argument("smollm2-135m", help="Embedded name, hub id, local HF directory or .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Architecture, heads, context and whether the attnsparse backend supports the model."""
    from attnsparse.models import check_backend_support, describe, load_model

    def body() -> dict[str, object]:
        loaded = load_model(model, probe=False)
        facts = describe(loaded.model)
        try:
            check_backend_support(loaded.model)
            facts["backend_supported"] = True
        except AttnsparseError as error:
            facts["backend_supported"] = False
            facts["backend_error"] = str(error)
        facts["source"] = loaded.source
        facts["load_seconds"] = round(loaded.load_seconds, 2)
        return facts

    facts = run_or_exit(body)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    width = max(len(key) for key in facts)
    for key, value in facts.items():
        typer.echo(f"{key:<{width}}  {value}")


@app.command()
def run(
    model: str = typer.Argument("smollm2-135m", help="Embedded name, hub id, local HF directory or .gguf file."),
    out: str = typer.Option("runs/main", help="Run directory; re-running the same command resumes it."),
    train_data: str = typer.Option("builtin:train", help="Fine-tuning text (file, hf:NAME[:CONFIG[:SPLIT]], builtin:train)."),
    eval_data: str = typer.Option("builtin:test", help="Measuring and evaluation text; keep it apart from the training text."),
    preset: str = typer.Option("smollm2-cpu-15min", help="Condense preset (docs/condense.md)."),
    ctx: int = typer.Option(1024, help="Tokens per window for measure and evaluate."),
    measure_windows: int = typer.Option(4, help="Evenly spaced windows to measure."),
    eval_windows: int = typer.Option(4, help="Evenly spaced windows to evaluate."),
    policies: str = typer.Option("dense,topk:4,topk:8,topk:16,topk:32,topk:64", help="Policies to evaluate."),
    steps: Optional[int] = typer.Option(None, help="Override the preset's number of training steps."),  # noqa: UP045
    overwrite: bool = typer.Option(False, help="Start over in an existing run directory with other settings."),
) -> None:
    """The main job: measure, condense, evaluate original against condensed, one before/after HTML report."""
    from attnsparse.pipeline import PipelineConfig, run_pipeline

    config = PipelineConfig(model=model, train_data=train_data, eval_data=eval_data, preset=preset, ctx=ctx,
                            measure_windows=measure_windows, eval_windows=eval_windows, policies=policies,
                            steps=steps)
    run_or_exit(lambda: run_pipeline(config, out, overwrite=overwrite, echo=typer.echo))


def _register_commands() -> None:
    """Commands whose bodies live beside their module (each a thin typer function over the API)."""
    from attnsparse.condense_cli import condense_command
    from attnsparse.evaluate_cli import evaluate_command
    from attnsparse.generate_cli import generate_command
    from attnsparse.measure_cli import measure_command
    from attnsparse.theory_cli import theory_command

    app.command("measure")(measure_command)
    app.command("evaluate")(evaluate_command)
    app.command("condense")(condense_command)
    app.command("generate")(generate_command)
    app.command("theory")(theory_command)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="attnsparse")


if __name__ == "__main__":
    sys.exit(main())
