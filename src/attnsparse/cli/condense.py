"""`attnsparse condense`: the typer command over `attnsparse.condense.condense` (registered in attnsparse.cli.app)."""

from __future__ import annotations

import typer

from attnsparse.cli._common import device_option
from attnsparse.specs import split_list


def _layers(text: str | None) -> list[int] | None:
    """--layers: comma-separated layer indices, sorted and unique; empty means every layer."""
    if text is None or not text.strip():
        return None
    return sorted(set(split_list(text, "--layers", int)))


def condense_command(
    model: str | None = typer.Argument(
        None, help="Embedded name, hub id, local HF directory or .gguf file (default: smollm2-135m or the preset's)."
    ),
    data: str | None = typer.Option(
        None, "--data", help="Training text: file, hf:NAME[:CONFIG[:SPLIT]], builtin, or none (the --sampled windows "
        "alone)."
    ),
    out: str = typer.Option(..., "--out", help="Run directory (checkpoints, log, curves, model/)."),
    preset: str | None = typer.Option(None, "--preset", help="Start from a named preset, e.g. smollm2-cpu-15min."),
    k: int | None = typer.Option(None, "--k", help="Target top-k budget (default 16)."),
    loss: str | None = typer.Option(
        None, "--loss", help="Loss variant: tail (default), adaptive:alpha=A,C=C, softcount:eps=E,tau=T, entropy."
    ),
    lam: float | None = typer.Option(None, "--lambda", help="Condensation weight λ (initial λ if --margin)."),
    lambda_schedule: str | None = typer.Option(None, "--lambda-schedule", help="constant, warmup or linear."),
    lambda_ramp_steps: int | None = typer.Option(None, "--lambda-ramp-steps", help="Steps of the λ warmup."),
    k_start: int | None = typer.Option(None, "--k-start", help="Anneal k from this value down to --k."),
    k_anneal_steps: int | None = typer.Option(None, "--k-anneal-steps", help="Steps of the k annealing."),
    k_schedule: str | None = typer.Option(None, "--k-schedule", help="geometric (default), linear or constant."),
    layers: str | None = typer.Option(None, "--layers", help="Comma-separated layers to regularise/train."),
    margin: float | None = typer.Option(
        None, "--margin", help="Constrained mode: adapt λ to keep the LM loss within this many nats of the original."
    ),
    lambda_rate: float | None = typer.Option(None, "--lambda-rate", help="Constrained λ step size (per nat)."),
    distill: str | None = typer.Option(
        None, "--distill", help="none, add (KL to the original beside the LM loss) or only (KL instead of it)."
    ),
    teacher: str | None = typer.Option(
        None, "--teacher", help="Model to distil to (default: the student's starting weights); pass the original when "
        "refining an already condensed model."
    ),
    distill_weight: float | None = typer.Option(None, "--distill-weight", help="Weight of the KL term."),
    temperature: float | None = typer.Option(None, "--temperature", help="Distillation temperature."),
    dense_weight: float | None = typer.Option(
        None, "--dense-weight", help="Also distil a dense forward of the student to the original (sparse-aware runs), "
        "with this weight, so dense quality is held."
    ),
    anchor_weight: float | None = typer.Option(
        None, "--anchor-weight", help="Pull the trained weights towards the original's after each step by a share "
        "lr x this (decoupled L2-SP): holds the model on every input, not only the training text."
    ),
    sparse_aware: bool | None = typer.Option(
        None, "--sparse-aware/--dense-forward", help="Forward with top-k attention (the loss stays on dense rows)."
    ),
    sparse_policy: str | None = typer.Option(
        None, "--sparse-policy", help="Policy of the sparse-aware forward instead of top-k, e.g. decodeblock:16:0.0625 "
        "(what block:16:0.0625 decoding reads)."
    ),
    trainable: str | None = typer.Option(None, "--trainable", help="all, attn, qk (default) or lora."),
    budget: str | None = typer.Option(
        None, "--budget", help="Head-budget file (attnsparse budget): per-head k, rescaled to --k's schedule."
    ),
    synthetic: float | None = typer.Option(
        None, "--synthetic", help="Share of the training text made of synthetic retrieval/copy documents."
    ),
    sampled: int | None = typer.Option(
        None, "--sampled", help="Windows of --seq-len tokens sampled from the original model, added to the text's."
    ),
    lora_rank: int | None = typer.Option(None, "--lora-rank", help="LoRA rank."),
    lora_targets: str | None = typer.Option(None, "--lora-targets", help="LoRA on qk or attn projections."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Windows per step per process."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Gradient accumulation steps."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Tokens per training window."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate."),
    lr_scheduler: str | None = typer.Option(None, "--lr-scheduler", help="cosine, linear, constant, ..."),
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", help="Learning-rate warmup steps."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed."),
    save_steps: int | None = typer.Option(None, "--save-steps", help="Checkpoint every N steps."),
    save_total_limit: int | None = typer.Option(None, "--keep-checkpoints", help="Checkpoints to keep (at least 1)."),
    query_chunk: int | None = typer.Option(None, "--query-chunk", help="Queries per attention chunk."),
    gradient_checkpointing: bool | None = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute each layer's activations in the backward pass: far less memory, slower steps."),
    fsdp: str | None = typer.Option(
        None, "--fsdp", help="Shard under torchrun / accelerate launch (FSDP2, CPU or GPU): 'full_shard auto_wrap', "
        "'shard_grad_op auto_wrap', add 'offload' to keep weights on the host."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous condense run in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar with the loss components."),
    device: str | None = device_option(),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32 (default), or bfloat16 / float16 mixed precision (weights stay float32)."
    ),
) -> None:
    """Fine-tune a model so each query's attention mass concentrates in its top-k keys (LM + λ·condensation loss)."""
    from attnsparse.cli._common import run_or_exit
    from attnsparse.condense import CondenseConfig, condense, preset_config

    def body() -> str:
        overrides = {
            "model": model, "data": data, "k": k, "loss": loss, "lam": lam, "lambda_schedule": lambda_schedule,
            "lambda_ramp_steps": lambda_ramp_steps, "k_start": k_start, "k_anneal_steps": k_anneal_steps,
            "k_schedule": k_schedule, "layers": _layers(layers), "margin": margin, "lambda_rate": lambda_rate, "distill": distill, "teacher": teacher,
            "distill_weight": distill_weight, "temperature": temperature, "dense_weight": dense_weight, "anchor_weight": anchor_weight, "sparse_aware": sparse_aware,
            "sparse_policy": sparse_policy, "trainable": trainable,
            "budget": budget, "synthetic": synthetic, "sampled": sampled,
            "lora_rank": lora_rank, "lora_targets": lora_targets, "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum,
            "seq_len": seq_len, "lr": lr, "lr_scheduler": lr_scheduler, "warmup_steps": warmup_steps, "seed": seed,
            "save_steps": save_steps, "save_total_limit": save_total_limit, "query_chunk": query_chunk,
            "gradient_checkpointing": gradient_checkpointing, "fsdp": fsdp,
            "device": device, "dtype": dtype,
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
