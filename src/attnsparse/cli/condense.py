"""`attnsparse condense`: the typer command over `attnsparse.condense.condense` (registered in attnsparse.cli.app)."""

from __future__ import annotations

from typing import Optional

import typer

from attnsparse.specs import split_list


def _layers(text: str | None) -> list[int] | None:
    """--layers: comma-separated layer indices, sorted and unique; empty means every layer."""
    if text is None or not text.strip():
        return None
    return sorted(set(split_list(text, "--layers", int)))


def condense_command(
    model: Optional[str] = typer.Argument(  # noqa: UP045 - typer reads the annotation
        None, help="Embedded name, hub id, local HF directory or .gguf file (default: smollm2-135m or the preset's)."
    ),
    data: Optional[str] = typer.Option(None, "--data", help="Training text: file, hf:NAME[:CONFIG[:SPLIT]], builtin."),  # noqa: UP045
    out: str = typer.Option(..., "--out", help="Run directory (checkpoints, log, curves, model/)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Start from a named preset, e.g. smollm2-cpu-15min."),  # noqa: UP045
    k: Optional[int] = typer.Option(None, "--k", help="Target top-k budget (default 16)."),  # noqa: UP045
    loss: Optional[str] = typer.Option(  # noqa: UP045
        None, "--loss", help="Loss variant: tail (default), adaptive:alpha=A,C=C, softcount:eps=E,tau=T, entropy."
    ),
    lam: Optional[float] = typer.Option(None, "--lambda", help="Condensation weight λ (initial λ if --margin)."),  # noqa: UP045
    lambda_schedule: Optional[str] = typer.Option(None, "--lambda-schedule", help="constant, warmup or linear."),  # noqa: UP045
    lambda_ramp_steps: Optional[int] = typer.Option(None, "--lambda-ramp-steps", help="Steps of the λ warmup."),  # noqa: UP045
    k_start: Optional[int] = typer.Option(None, "--k-start", help="Anneal k from this value down to --k."),  # noqa: UP045
    k_anneal_steps: Optional[int] = typer.Option(None, "--k-anneal-steps", help="Steps of the k annealing."),  # noqa: UP045
    k_schedule: Optional[str] = typer.Option(None, "--k-schedule", help="geometric (default), linear or constant."),  # noqa: UP045
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated layers to regularise/train."),  # noqa: UP045
    margin: Optional[float] = typer.Option(  # noqa: UP045
        None, "--margin", help="Constrained mode: adapt λ to keep the LM loss within this many nats of the original."
    ),
    lambda_rate: Optional[float] = typer.Option(None, "--lambda-rate", help="Constrained λ step size (per nat)."),  # noqa: UP045
    distill: Optional[str] = typer.Option(  # noqa: UP045
        None, "--distill", help="none, add (KL to the original beside the LM loss) or only (KL instead of it)."
    ),
    distill_weight: Optional[float] = typer.Option(None, "--distill-weight", help="Weight of the KL term."),  # noqa: UP045
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Distillation temperature."),  # noqa: UP045
    sparse_aware: Optional[bool] = typer.Option(  # noqa: UP045
        None, "--sparse-aware/--dense-forward", help="Forward with top-k attention (the loss stays on dense rows)."
    ),
    trainable: Optional[str] = typer.Option(None, "--trainable", help="all, attn, qk (default) or lora."),  # noqa: UP045
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="LoRA rank."),  # noqa: UP045
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help="LoRA on qk or attn projections."),  # noqa: UP045
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps."),  # noqa: UP045
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per step per process."),  # noqa: UP045
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Gradient accumulation steps."),  # noqa: UP045
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per training window."),  # noqa: UP045
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate."),  # noqa: UP045
    lr_scheduler: Optional[str] = typer.Option(None, "--lr-scheduler", help="cosine, linear, constant, ..."),  # noqa: UP045
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Learning-rate warmup steps."),  # noqa: UP045
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),  # noqa: UP045
    save_steps: Optional[int] = typer.Option(None, "--save-steps", help="Checkpoint every N steps."),  # noqa: UP045
    save_total_limit: Optional[int] = typer.Option(None, "--keep-checkpoints", help="Checkpoints to keep (at least 1)."),  # noqa: UP045
    query_chunk: Optional[int] = typer.Option(None, "--query-chunk", help="Queries per attention chunk."),  # noqa: UP045
    fsdp: Optional[str] = typer.Option(None, "--fsdp", help="FSDP mode passed to Trainer, e.g. 'full_shard auto_wrap'."),  # noqa: UP045
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous condense run in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar with the loss components."),
) -> None:
    """Fine-tune a model so each query's attention mass concentrates in its top-k keys (LM + λ·condensation loss)."""
    from attnsparse.cli._common import run_or_exit
    from attnsparse.condense import CondenseConfig, condense, preset_config

    def body() -> str:
        overrides = {
            "model": model, "data": data, "k": k, "loss": loss, "lam": lam, "lambda_schedule": lambda_schedule,
            "lambda_ramp_steps": lambda_ramp_steps, "k_start": k_start, "k_anneal_steps": k_anneal_steps,
            "k_schedule": k_schedule, "layers": _layers(layers), "margin": margin, "lambda_rate": lambda_rate, "distill": distill,
            "distill_weight": distill_weight, "temperature": temperature, "sparse_aware": sparse_aware, "trainable": trainable,
            "lora_rank": lora_rank, "lora_targets": lora_targets, "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum,
            "seq_len": seq_len, "lr": lr, "lr_scheduler": lr_scheduler, "warmup_steps": warmup_steps, "seed": seed,
            "save_steps": save_steps, "save_total_limit": save_total_limit, "query_chunk": query_chunk, "fsdp": fsdp,
        }
        if preset is not None:
            config = preset_config(preset, **overrides)
        else:
            config = CondenseConfig(**{key: value for key, value in overrides.items() if value is not None})
        result = condense(config, out, resume=resume, overwrite=overwrite, progress=progress, echo=typer.echo)
        if result.already_finished:
            return (f"the condense run in {result.out} is already finished ({result.steps} steps); nothing to do "
                    "(pass --overwrite instead of --resume to train it again)")
        final = result.final
        lines = [f"condensed model written to {result.model_dir} ({result.steps} steps)"]
        if final:
            lines.append(
                f"last step: lm {final['lm']:.4f}  cond {final['cond']:.4f}  kd {final['kd']:.4f}  "
                f"top-{final['k']} mass {final['topk_mass']:.4f}  λ {final['lambda']:.4g}"
            )
        return "\n".join(lines)

    typer.echo(run_or_exit(body))
