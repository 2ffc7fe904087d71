"""`attnsparse evaluate`: the typer command over `attnsparse.evaluate.run.evaluate` (registered in attnsparse.cli.app)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from attnsparse.cli._common import device_option, dtype_option
from attnsparse.specs import split_list

if TYPE_CHECKING:
    from attnsparse.evaluate.tasks.run import TaskOptions


# The perplexity sweep when --policies is not given (the default of attnsparse.evaluate.run.evaluate).
PPL_POLICIES = "dense,topk:8,topk:16,topk:32,topk:64,topk:128"


def evaluate_command(
    model: str = typer.Argument("smollm2-135m", help="Embedded name, hub id, local HF directory or .gguf file."),
    data: str | None = typer.Option(
        None, "--data", help="Text file, hf:NAME[:CONFIG[:SPLIT]], or builtin (default)."
    ),
    ctx: int = typer.Option(1024, "--ctx", help="Tokens per window (at most the model's maximum context)."),
    policies: str | None = typer.Option(
        None, "--policies",
        help=f"Comma-separated policies (default: {PPL_POLICIES}; with --tasks or --quick, dense only, since every "
             "policy is one more prefill per prompt): dense, topk:K, sink+window:S:W (alias streaming:S:W), "
             "budget:FILE.json (per-head k, attnsparse budget), blocksparse:B:D[:EST] / blockmass:B:G[:EST] (B or QxK; "
             "block-sparse prefill, "
             "EST one of mean, antidiag, vslash; docs/prefill.md), decodeblock:B:BUDGET[:SCORE] (the keys decode's "
             "block:B:BUDGET reads at each position); dense is always included.",
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
    tasks: str | None = typer.Option(
        None, "--tasks",
        help="Long-context tasks (docs/tasks.md): passkey, niah-multikey, niah-multivalue, variable-tracking, "
        "common-words, comma-separated; run under dense, --policies and --plans. Perplexity then runs only with --data.",
    ),
    lengths: str | None = typer.Option(
        None, "--lengths", help="Task prompt lengths in tokens, comma-separated (default 1024,2048,4096,8192)."
    ),
    depths: str | None = typer.Option(
        None, "--depths", help="Needle depths, fractions of the prompt body, comma-separated (default 0.1,0.5,0.9)."
    ),
    trials: int | None = typer.Option(None, "--trials", help="Prompts per (task, length, depth) cell (default 20)."),
    quick: bool = typer.Option(
        False, "--quick",
        help="Task preset: every task (unless --tasks), lengths 1024,4096, 2 trials per cell, no retrieval scores."
    ),
    haystack: str | None = typer.Option(
        None, "--haystack", help="Text the tasks hide needles in: a file, hf:NAME[:CONFIG[:SPLIT]] or builtin (default)."
    ),
    chat_template: bool = typer.Option(
        False, "--chat-template", help="Put task prompts in the tokenizer's chat template (default: raw prompts)."
    ),
    retrieval: bool | None = typer.Option(
        None, "--retrieval/--no-retrieval",
        help="Measure per-head retrieval scores on the retrieval tasks (default: yes, except with --quick).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the task prompts."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous evaluate run in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    device: str | None = device_option(),
    dtype: str = dtype_option(),
) -> None:
    """Perplexity, density and ratio to dense for each attention policy, and long-context task accuracy (--tasks);
    JSON, CSV, plots and, with tasks, an HTML report."""
    from attnsparse.cli._common import run_or_exit
    from attnsparse.evaluate.run import evaluate, parse_protocol

    def body() -> str:
        protocols = [parse_protocol(item) for item in windows or ["all"]]
        task_options = _task_options(tasks, lengths, depths, trials, quick, haystack, chat_template, retrieval, seed)
        chosen = policies if policies is not None else ("dense" if task_options is not None else PPL_POLICIES)
        result = evaluate(
            model, data, ctx, chosen, protocols, out,
            batch_size=batch_size, query_chunk=query_chunk, overwrite=overwrite, progress=progress,
            plans=split_list(plans, "--plans") if plans else (),
            decode_tokens=decode_tokens, tasks=task_options, ppl=task_options is None or data is not None,
            device=device, dtype=dtype,
        )
        return result.table() + (f"\nwritten to {result.out}" if result.out is not None else "")

    typer.echo(run_or_exit(body))


def _task_options(tasks: str | None, lengths: str | None, depths: str | None, trials: int | None, quick: bool,
                  haystack: str | None, chat_template: bool, retrieval: bool | None, seed: int) -> TaskOptions | None:
    """The task settings the options ask for (None: no task option given), --quick filling what is not given."""
    from attnsparse.errors import AttnsparseError
    from attnsparse.evaluate.tasks.run import QUICK, TaskOptions

    if tasks is None and not quick:
        given = [name for name, value in (("--lengths", lengths), ("--depths", depths), ("--trials", trials),
                                          ("--haystack", haystack)) if value is not None]
        if given or chat_template:
            raise AttnsparseError(f"{', '.join(given) or '--chat-template'} set task options; add --tasks or --quick")
        return None
    preset = TaskOptions(**QUICK) if quick else TaskOptions()  # type: ignore[arg-type]
    return TaskOptions(
        tasks=tasks or preset.tasks,
        lengths=split_list(lengths, "--lengths", int) if lengths else preset.lengths,
        depths=split_list(depths, "--depths", float) if depths else preset.depths,
        trials=trials if trials is not None else preset.trials,
        haystack=haystack, chat_template=chat_template,
        retrieval=preset.retrieval if retrieval is None else retrieval, seed=seed,
    )
