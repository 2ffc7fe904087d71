"""`attnsparse measure`: the typer command over `attnsparse.measure.run.measure` (registered in attnsparse.cli.app)."""

from __future__ import annotations

import typer

from attnsparse.cli._common import device_option, dtype_option
from attnsparse.specs import split_list


def measure_command(
    model: str = typer.Argument("smollm2-135m", help="Embedded name, hub id, local HF directory or .gguf file."),
    data: str | None = typer.Option(
        None, "--data", help="Text file, hf:NAME[:CONFIG[:SPLIT]], or builtin (default)."
    ),
    ctx: int = typer.Option(1024, "--ctx", help="Tokens per window (at most the model's maximum context)."),
    windows: int = typer.Option(8, "--windows", help="Number of evenly spaced windows to measure."),
    out: str = typer.Option(..., "--out", help="Run directory for config.json, profile.json, CSV, plots, report."),
    k: str | None = typer.Option(
        None, "--k", help="Comma-separated k list for top-k mass (default 1,2,4,... up to ctx)."
    ),
    deltas: str = typer.Option("0.01,0.05,0.1", "--deltas", help="Coverage deltas: k at coverage 1-δ."),
    eps: str = typer.Option("0.001,0.01,0.1", "--eps", help="ε grid for (ε,k)-sparsity."),
    sink: int = typer.Option(4, "--sink", help="Sink tokens s (the first s positions)."),
    local_window: int = typer.Option(64, "--local-window", help="Local window w (the last w keys)."),
    stream_delta: float = typer.Option(
        0.1, "--stream-delta", help="A head is streaming if its sink+local mass >= 1 - this."
    ),
    fit_delta: float = typer.Option(0.05, "--fit-delta", help="C is fitted on k at coverage 1 - this."),
    fit_min_n: int = typer.Option(16, "--fit-min-n", help="Rows shorter than this are left out of the C fit."),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows per forward pass."),
    query_chunk: int = typer.Option(128, "--query-chunk", help="Queries per attention chunk (bounds memory)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous measure run in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar over windows."),
    retrieval: bool = typer.Option(
        False, "--retrieval",
        help="Also measure per-head retrieval scores on the retrieval tasks at length --ctx (docs/tasks.md).",
    ),
    retrieval_trials: int = typer.Option(2, "--retrieval-trials", help="Prompts per retrieval task and depth."),
    retrieval_threshold: float = typer.Option(
        0.1, "--retrieval-threshold", help="A head scoring at least this is classed retrieval."
    ),
    device: str | None = device_option(),
    dtype: str = dtype_option(),
) -> None:
    """Per-layer, per-head attention sparsity profile: top-k mass, k at coverage, C, entropy, head classes."""
    from attnsparse.cli._common import run_or_exit
    from attnsparse.measure.run import measure

    run_or_exit(lambda: measure(
        model, data, ctx, windows, out,
        ks=None if k is None else tuple(split_list(k, "--k", int)), deltas=tuple(split_list(deltas, "--deltas", float)),
        eps=tuple(split_list(eps, "--eps", float)), sink_tokens=sink,
        local_window=local_window, stream_delta=stream_delta, fit_delta=fit_delta, fit_min_n=fit_min_n,
        batch_size=batch_size, query_chunk=query_chunk, overwrite=overwrite, progress=progress,
        echo=typer.echo, retrieval=retrieval, retrieval_trials=retrieval_trials,
        retrieval_threshold=retrieval_threshold, device=device, dtype=dtype,
    ))
