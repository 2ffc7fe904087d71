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
    rank: int = typer.Option(0, "--rank", help="Rank of the per-layer query and key projections (0: the head dim)."),
    loss: str = typer.Option("merged", "--loss", help="merged: KL with the always-kept blocks merged; whole: row KL."),
    init: str = typer.Option("mean", "--init", help="mean: start at the mean-key estimate (rank >= head dim); random."),
    sink: int = typer.Option(1, "--sink", help="Sink blocks the merged loss treats as always kept."),
    local: int = typer.Option(1, "--local", help="Blocks ending at the diagonal the merged loss treats as always kept."),
    density: float = typer.Option(0.1, "--density", help="Block density of the held-out kept-mass report."),
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
        config = GateTrainConfig(model, data, synthetic, ctx, positions, windows, holdout, block, rank, steps, lr, seed,
                                 loss, init, sink, local, density)
        result = train_gate(config, out, overwrite=overwrite, progress=progress, device=device, dtype=dtype)
        notes = result.notes
        held, kept = notes["final"].get("holdout_kl"), notes["holdout_kept_mass"]
        typer.echo(f"wrote {out}: gate for {model} (blocks of {block}, rank {result.gate.config.rank}) from "
                   f"{notes['tokens']} tokens; {loss} KL train {notes['initial']['train_kl']:.4f} -> "
                   f"{notes['final']['train_kl']:.4f}"
                   + (f", held out -> {held:.4f} (mean-key estimate {notes['mean_key_holdout_kl']:.4f})"
                      if held is not None else "")
                   + (f"; held-out mass kept at density {density:g}: gate {kept['gate']['mean']:.4f}, mean key "
                      f"{kept['mean']['mean']:.4f}, oracle {kept['exact']['mean']:.4f}" if kept else "")
                   + f"; {notes['collect_seconds']:.0f} s collecting, {notes['fit_seconds']:.0f} s fitting")

    run_or_exit(body)
