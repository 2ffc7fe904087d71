"""`attnsparse evaluate`: the typer command over `attnsparse.evaluate.run.evaluate` (registered in attnsparse.cli.app)."""

from __future__ import annotations

import typer

from attnsparse.specs import split_list


def evaluate_command(
    model: str = typer.Argument("smollm2-135m", help="Embedded name, hub id, local HF directory or .gguf file."),
    data: str | None = typer.Option(
        None, "--data", help="Text file, hf:NAME[:CONFIG[:SPLIT]], or builtin (default)."
    ),
    ctx: int = typer.Option(1024, "--ctx", help="Tokens per window (at most the model's maximum context)."),
    policies: str = typer.Option(
        "dense,topk:8,topk:16,topk:32,topk:64,topk:128", "--policies",
        help="Comma-separated policies: dense, topk:K, sink+window:S:W (dense is always included).",
    ),
    windows: list[str] | None = typer.Option(  # noqa: B008 - typer reads the default
        None, "--windows",
        help="'all' (default) = the whole text in non-overlapping windows; M = M evenly spaced windows. Repeat for both.",
    ),
    out: str | None = typer.Option(
        None, "--out", help="Run directory for results.json, results.csv, ppl_vs_density.png, config.json."
    ),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows per forward pass."),
    query_chunk: int | None = typer.Option(
        None, "--query-chunk", help="Queries per attention chunk (default: sized to a memory budget)."
    ),
    plans: str | None = typer.Option(
        None, "--plans",
        help="Comma-separated decode plans (plan JSON files, or specs such as block:16:0.0625, streaming:4:256), "
        "scored by decoding the last --decode-tokens of each window after a dense prefill.",
    ),
    decode_tokens: int = typer.Option(64, "--decode-tokens", help="Tokens decoded per window for --plans."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous evaluate run in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Perplexity, density and ratio to dense for each attention policy; JSON, CSV and a plot."""
    from attnsparse.cli._common import run_or_exit
    from attnsparse.evaluate.run import evaluate, parse_protocol

    def body() -> str:
        protocols = [parse_protocol(item) for item in windows or ["all"]]
        result = evaluate(
            model, data, ctx, policies, protocols, out,
            batch_size=batch_size, query_chunk=query_chunk, overwrite=overwrite, progress=progress,
            plans=split_list(plans, "--plans") if plans else (),
            decode_tokens=decode_tokens,
        )
        return result.table() + (f"\nwritten to {result.out}" if result.out is not None else "")

    typer.echo(run_or_exit(body))
