"""`attnsparse gate MODEL --out DIR`: train a learned block gate on the frozen model (attnsparse.gate.train)."""

from __future__ import annotations

import typer

from attnsparse.cli._common import device_option, dtype_option


def gate_command(
    model: str = typer.Argument("smollm2-135m", help="Embedded name, hub id, local HF directory or .gguf file."),
    out: str = typer.Option(..., "--out", help="Run directory; ends with gate.safetensors and gate.json."),
    data: str | None = typer.Option(None, "--data", help="Training text: file, hf:NAME[:CONFIG[:SPLIT]], builtin."),
    synthetic: float = typer.Option(0.25, "--synthetic", help="Share of synthetic retrieval/copy documents."),
    ctx: int = typer.Option(2048, "--ctx", help="Tokens per training window."),
    positions: int = typer.Option(
        0, "--positions", help="Place windows at random positions below this (RoPE positions of long contexts).",
    ),
    windows: int = typer.Option(16, "--windows", help="Windows in all, evenly spaced over the text."),
    holdout: int = typer.Option(2, "--holdout", help="Last windows held out of training (their KL is reported)."),
    block: int = typer.Option(64, "--block", help="Block size in tokens (queries and keys)."),
    rank: int = typer.Option(16, "--rank", help="Rank of the per-layer query and key projections."),
    steps: int = typer.Option(300, "--steps", help="Adam steps over the collected features (full batch)."),
    lr: float = typer.Option(1e-2, "--lr", help="Peak learning rate (cosine decay)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the gate's initialisation and the synthetic documents."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished gate run in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Print each collected window."),
    device: str | None = device_option(),
    dtype: str = dtype_option(),
) -> None:
    """Distil the frozen model's block-pooled attention into a small gate (only the gate is trained)."""
    from attnsparse.cli._common import run_or_exit
    from attnsparse.gate.train import GateTrainConfig, train_gate

    def body() -> None:
        config = GateTrainConfig(model, data, synthetic, ctx, positions, windows, holdout, block, rank, steps, lr, seed)
        result = train_gate(config, out, overwrite=overwrite, progress=progress, device=device, dtype=dtype)
        notes = result.notes
        held = notes["final"].get("holdout_kl")
        typer.echo(f"wrote {out}: gate for {model} (blocks of {block}, rank {rank}) from {notes['tokens']} tokens; "
                   f"KL train {notes['initial']['train_kl']:.4f} -> {notes['final']['train_kl']:.4f}"
                   + (f", held out -> {held:.4f} (mean-key estimate {notes['mean_key_holdout_kl']:.4f})"
                      if held is not None else "")
                   + f"; {notes['collect_seconds']:.0f} s collecting, {notes['fit_seconds']:.0f} s fitting")

    run_or_exit(body)
