"""Figures and the report section of a task run: accuracy heatmaps (length x depth) per policy, retrieval scores
per head (layer x head)."""

from __future__ import annotations

import html
import io
import math
import re
from pathlib import Path

from attnsparse.core.report import Section
from attnsparse.core.runs import atomic_write_bytes
from attnsparse.evaluate.tasks.run import TaskResult, TaskRow


def _save(figure: object, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")  # type: ignore[attr-defined]
    atomic_write_bytes(path, buffer.getvalue())
    return path


def policy_slug(policy: str) -> str:
    """A file-name-safe form of a policy label (`plan:block:16:0.0625` -> `plan_block_16_0.0625`)."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", policy).strip("_")


def plot_policy_heatmap(rows: list[TaskRow], policy: str, path: Path) -> Path:
    """One panel per task: accuracy by length (rows) and needle depth (columns), numbers in the cells."""
    from matplotlib.figure import Figure

    rows = [r for r in rows if r.policy == policy]
    tasks = list(dict.fromkeys(r.task for r in rows))
    lengths = sorted({r.length for r in rows})
    figure = Figure(figsize=(1.6 + 2.6 * len(tasks), 2.2 + 0.45 * len(lengths)), dpi=110, layout="constrained")
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    image = None
    for ax, task in zip(axes, tasks, strict=True):
        cells = [r for r in rows if r.task == task]
        depths = sorted({r.depth for r in cells}, key=lambda d: -1.0 if d is None else d)
        grid = [[float("nan")] * len(depths) for _ in lengths]
        for r in cells:
            grid[lengths.index(r.length)][depths.index(r.depth)] = r.accuracy
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(depths)), ["-" if d is None else f"{d:g}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_xlabel("needle depth", fontsize=8)
        ax.set_title(task, fontsize=9)
    axes[0].set_ylabel("length (tokens)", fontsize=8)
    if image is not None:
        figure.colorbar(image, ax=list(axes), label="accuracy", shrink=0.9)
    figure.suptitle(f"task accuracy under {policy}", fontsize=10)
    return _save(figure, path)


def plot_retrieval_scores(scores: object, path: Path) -> Path:
    """Layers (rows) x heads (columns) mean retrieval score over every retrieval sample."""
    from matplotlib.figure import Figure

    matrix = scores.mean().numpy()  # type: ignore[attr-defined]
    layers, heads = matrix.shape
    figure = Figure(figsize=(min(2.0 + 0.55 * heads, 12), min(1.5 + 0.28 * layers, 14)), dpi=110)
    ax = figure.add_subplot()
    image = ax.imshow(matrix, aspect="auto", cmap="magma", vmin=0.0, vmax=max(float(matrix.max()), 1e-6),
                      interpolation="nearest")
    figure.colorbar(image, ax=ax, label="retrieval score")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(0, layers, max(1, layers // 15)))
    ax.set_title("retrieval score per head (Wu et al. 2024)", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def write_task_figures(result: TaskResult, out: Path) -> list[tuple[Path, str]]:
    """tasks_<policy>.png for every policy, and retrieval_heads.png when scores were measured."""
    figures = []
    for policy in dict.fromkeys(r.policy for r in result.rows):
        path = plot_policy_heatmap(result.rows, policy, out / f"tasks_{policy_slug(policy)}.png")
        figures.append((path, f"accuracy by length and depth under {policy}"))
    if result.retrieval is not None and result.retrieval.samples:
        path = plot_retrieval_scores(result.retrieval, out / "retrieval_heads.png")
        figures.append((path, "retrieval score per (layer, head), mean over the retrieval samples"))
    return figures


def summary_rows(result: TaskResult) -> tuple[list[str], list[list[object]]]:
    """Policy rows, task columns: accuracy over every length and depth, with correct/trials."""
    tasks = list(dict.fromkeys(r.task for r in result.rows))
    table = []
    for policy in dict.fromkeys(r.policy for r in result.rows):
        line: list[object] = [policy]
        for task in tasks:
            rows = [r for r in result.rows if r.policy == policy and r.task == task]
            correct, total = sum(r.correct for r in rows), sum(r.trials for r in rows)
            line.append(f"{correct / max(total, 1):.3f} ({correct}/{total})")
        table.append(line)
    return ["policy", *tasks], table


def tasks_section(result: TaskResult, figures: list[tuple[Path, str]], threshold: float = 0.1) -> Section:
    """The report section: what was run, accuracy per policy and task, heatmaps, the strongest retrieval heads."""
    config = result.config
    body = (
        f"<p>Tasks {html.escape(', '.join(config.get('tasks', [])))} at lengths "
        f"{html.escape(', '.join(map(str, config.get('lengths', []))))} tokens, needle depths "
        f"{html.escape(', '.join(f'{d:g}' for d in config.get('depths', [])))}, {config.get('trials')} trials per "
        f"cell, {html.escape(str(config.get('prompt_form')))} prompts, haystack "
        f"<code>{html.escape(str(config.get('haystack')))}</code>. Decode plans answer from one shared dense "
        "prefill per prompt; attention policies prefill under the policy and decode densely. Exact-match scoring "
        "and the answer extraction of each task: docs/tasks.md.</p>"
    )
    tables = [summary_rows(result)]
    if result.retrieval is not None and result.retrieval.samples:
        mean = result.retrieval.mean()
        strong = sorted(((float(mean[layer, head]), layer, head) for layer in range(mean.shape[0])
                         for head in range(mean.shape[1]) if mean[layer, head] > threshold), reverse=True)
        body += (f"<p>Retrieval heads (score &gt; {threshold:g}): <b>{len(strong)}</b> of {mean.numel()} "
                 f"(measured on {sum(result.retrieval.samples.values())} samples under dense).</p>")
        if strong:
            tables.append((["layer", "head", "retrieval score"], [[la, h, round(s, 3)] for s, la, h in strong[:30]]))
    return Section("Long-context tasks", body, tables=tables, figures=figures)
