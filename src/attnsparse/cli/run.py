"""`attnsparse run`: the main job (measure, condense, evaluate, report) as one resumable command."""

from __future__ import annotations

import typer

from attnsparse.cli._common import device_option, dtype_option, run_or_exit


def run_command(
    model: str = typer.Argument("smollm2-135m", help="Embedded name, hub id, local HF directory or .gguf file."),
    out: str = typer.Option("runs/main", help="Run directory; re-running the same command resumes it."),
    train_data: str = typer.Option("builtin:train", help="Fine-tuning text (file, hf:NAME[:CONFIG[:SPLIT]], builtin:train)."),
    eval_data: str = typer.Option("builtin:test", help="Measuring and evaluation text; keep it apart from the training text."),
    preset: str = typer.Option("smollm2-keep-15min-anchored", help="Condense preset (docs/condense.md)."),
    ctx: int = typer.Option(1024, help="Tokens per window for measure and evaluate."),
    measure_windows: int = typer.Option(4, help="Evenly spaced windows to measure."),
    eval_windows: int = typer.Option(4, help="Evenly spaced windows to evaluate."),
    policies: str = typer.Option("dense,topk:4,topk:8,topk:16,topk:32", help="Policies to evaluate."),
    steps: int | None = typer.Option(None, help="Override the preset's number of training steps."),
    lr: float | None = typer.Option(None, help="Override the preset's peak learning rate."),
    tasks: str = typer.Option("passkey", help="Behaviour tasks run on both models (comma list; '' skips them)."),
    task_lengths: str = typer.Option("1024", help="Task prompt lengths in tokens (comma list)."),
    task_trials: int = typer.Option(7, help="Trials per task, length and depth (depths 0.1, 0.5, 0.9)."),
    task_plans: str = typer.Option("block:16:0.0625", help="Decode plans the tasks are also answered under."),
    overwrite: bool = typer.Option(False, help="Start over: replace the run in --out (needed to change its settings)."),
    device: str | None = device_option(),
    dtype: str = dtype_option(),
) -> None:
    """The main job: measure, condense, evaluate original against condensed, one before/after HTML report."""
    from attnsparse.pipeline import PipelineConfig, run_pipeline
    from attnsparse.specs import split_list

    def main() -> object:
        config = PipelineConfig(
            model=model, train_data=train_data, eval_data=eval_data, preset=preset, ctx=ctx,
            measure_windows=measure_windows, eval_windows=eval_windows, policies=policies, steps=steps, tasks=tasks,
            task_lengths=tuple(split_list(task_lengths, "--task-lengths", int)) if tasks else (),
            task_trials=task_trials, task_plans=task_plans, device=device, dtype=dtype,
            overrides={} if lr is None else {"lr": lr})
        return run_pipeline(config, out, overwrite=overwrite, echo=typer.echo)

    run_or_exit(main)
