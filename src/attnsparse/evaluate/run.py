"""Quality against density: perplexity of a model under several attention policies, side by side.

For each protocol (the whole text in non-overlapping windows, or M evenly spaced windows) and each policy this
reports perplexity, density (kept pairs / causal pairs at the evaluation context) and the ratio to the dense
perplexity, and writes results.json, results.csv, ppl_vs_density.png and config.json into a run directory.
Perplexity itself comes from `attnsparse.evaluate.perplexity`; this module only organises runs and outputs.
"""

from __future__ import annotations

import csv
import html
import io
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attnsparse.attention.policies import DENSE, Policy, parse_policies, parse_policy
from attnsparse.core.data import check_context, load_text, tokenize
from attnsparse.core.data import windows as make_windows
from attnsparse.core.devices import (
    check_placement,
    model_device,
    model_dtype,
    placement,
    resolve_device,
    resolve_dtype,
)
from attnsparse.core.models import LoadedModel, ModelShape, load_model
from attnsparse.core.runs import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_text
from attnsparse.decode.eval import decode_perplexity, plan_label
from attnsparse.decode.plan import DecodePlan
from attnsparse.errors import AttnsparseError
from attnsparse.evaluate.perplexity import PerplexityResult, perplexity
from attnsparse.evaluate.tasks.run import TaskOptions, TaskResult, prepare_tasks, run_grid, write_trials

KIND = "evaluate"
Protocol = int | None  # None = whole text (non-overlapping windows), M = M evenly spaced windows


@dataclass
class EvaluationRow:
    """One (protocol, policy) measurement."""

    protocol: str  # "all" or "windows:M"
    policy: str  # a policy spec, or plan:<spec or file> for a decode plan (scored on the decoded tokens only)
    density: float  # kept pairs / causal pairs; for a plan, the share of dense KV bytes read per decode step
    perplexity: float
    mean_nll: float
    tokens: int
    windows: int
    ctx: int
    ratio_to_dense: float | None
    seconds: float

    @classmethod
    def of(cls, protocol: str, ppl: PerplexityResult, ratio_to_dense: float | None, seconds: float) -> EvaluationRow:
        """The row of one prefill or decode perplexity under `protocol`."""
        return cls(protocol=protocol, policy=ppl.policy, density=ppl.density, perplexity=ppl.perplexity,
                   mean_nll=ppl.mean_nll, tokens=ppl.tokens, windows=ppl.windows, ctx=ppl.ctx,
                   ratio_to_dense=ratio_to_dense, seconds=seconds)


@dataclass
class EvaluationResult:
    """Rows for every protocol and policy, plus what produced them."""

    model: str
    data: str
    ctx: int
    rows: list[EvaluationRow] = field(default_factory=list)
    out: Path | None = None
    tasks: TaskResult | None = None  # the long-context task rows, when tasks were run

    def row(self, policy: str, protocol: str | None = None) -> EvaluationRow:
        """The row of `policy` (spec) under `protocol` (default: the first protocol evaluated)."""
        spec = policy if policy.startswith("plan:") else parse_policy(policy).spec
        protocol = protocol or self.rows[0].protocol
        for row in self.rows:
            if row.policy == spec and row.protocol == protocol:
                return row
        raise KeyError(f"no result for {spec} under {protocol}")

    def to_json(self) -> dict[str, Any]:
        out = {"model": self.model, "data": self.data, "ctx": self.ctx, "rows": [asdict(r) for r in self.rows]}
        return out | (self.tasks.to_json() if self.tasks is not None else {})

    def table(self) -> str:
        """A fixed-width summary table for the terminal."""
        header = f"{'protocol':<12} {'policy':<22} {'density':>8} {'ppl':>10} {'x dense':>8} {'tokens':>9}"
        lines = [header, "-" * len(header)]
        for r in self.rows:
            ratio = "" if r.ratio_to_dense is None else f"{r.ratio_to_dense:.3f}"
            lines.append(
                f"{r.protocol:<12} {r.policy:<22} {r.density:>8.4f} {r.perplexity:>10.3f} {ratio:>8} {r.tokens:>9}"
            )
        if self.tasks is not None:
            lines = (lines if self.rows else []) + ["task accuracy over every length and depth:", self.tasks.table()]
        return "\n".join(lines)


def protocol_name(protocol: Protocol) -> str:
    return "all" if protocol is None else f"windows:{protocol}"


def parse_protocol(text: str) -> Protocol:
    """`all` (the whole text) or a positive window count M."""
    text = text.strip().lower()
    if text in ("all", "whole"):
        return None
    try:
        count = int(text)
    except ValueError:
        raise AttnsparseError(f"window protocol '{text}': use 'all' or a positive window count") from None
    if count < 1:
        raise AttnsparseError(f"--windows {count}: a window count must be >= 1; use --windows all for the whole text")
    return count


def _policies(policies: str | Sequence[str | Policy]) -> list[Policy]:
    """Parsed policies, de-duplicated, with dense first (every ratio is taken against it)."""
    parsed = parse_policies(policies) if isinstance(policies, str) else [parse_policy(p) for p in policies]
    if not parsed:
        raise AttnsparseError("no policies to evaluate; pass e.g. --policies dense,topk:8,topk:16")
    unique: dict[str, Policy] = {}
    for policy in [DENSE, *parsed]:
        unique.setdefault(policy.spec, policy)
    return list(unique.values())


def _protocols(windows: Protocol | Sequence[Protocol]) -> list[Protocol]:
    if windows is None or isinstance(windows, int):
        items: list[Protocol] = [windows]
    else:
        items = list(windows) or [None]
    for item in items:
        if item is not None and item < 1:
            raise AttnsparseError(f"window count {item} must be >= 1 (or None for the whole text)")
    return list(dict.fromkeys(items))


def _resolve_model(
    model_or_spec: str | LoadedModel | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """A spec is loaded on `device` in `dtype`; a model object stays where it is (a mismatch is an error)."""
    if isinstance(model_or_spec, str):
        loaded = load_model(model_or_spec, dtype, device=device)
        return loaded.model, loaded.tokenizer, loaded.spec
    check_placement(model_or_spec.model if isinstance(model_or_spec, LoadedModel) else model_or_spec, device, dtype)
    if isinstance(model_or_spec, LoadedModel):
        return model_or_spec.model, tokenizer or model_or_spec.tokenizer, model_or_spec.spec
    if tokenizer is None:
        raise AttnsparseError("evaluating a model object needs its tokenizer; pass tokenizer=")
    name = getattr(model_or_spec.config, "_name_or_path", "") or type(model_or_spec).__name__
    return model_or_spec, tokenizer, str(name)


def evaluate(
    model_or_spec: str | LoadedModel | PreTrainedModel,
    text_spec: str | None,
    ctx: int,
    policies: str | Sequence[str | Policy] = "dense,topk:8,topk:16,topk:32,topk:64,topk:128",
    windows: Protocol | Sequence[Protocol] = None,
    out: str | Path | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    batch_size: int = 1,
    query_chunk: int | None = None,
    plans: Sequence[str | Path | DecodePlan] = (),
    decode_tokens: int = 64,
    tasks: TaskOptions | None = None,
    ppl: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> EvaluationResult:
    """Perplexity and density of every policy (dense always included, first) under every window protocol.

    `windows=None` scores the whole text in non-overlapping windows of `ctx`; `windows=M` scores M evenly spaced
    windows (window i starts at i·⌊len/M⌋); a list runs several protocols on the same tokens. With `out`, writes
    a run directory (attnsparse.core.runs.RunDir: a finished evaluate run in it is replaced only with `overwrite`).
    Decode `plans` (JSON files or specs such as block:16:0.0625) add rows scored by decoding the last
    `decode_tokens` of each window from a dense prefill (`attnsparse.decode.eval`), with a dense decode row
    (plan:dense) as their reference. `tasks` also runs the long-context task suite (`attnsparse.evaluate.tasks`)
    under dense, the same policies and the same plans; `ppl=False` skips perplexity (tasks only).
    `device` / `dtype` load a model spec there (defaults: cuda when available, float32); a model object stays where
    it is. Windows, attention, losses and decode caches live on the model's device.
    """
    if batch_size < 1:
        raise AttnsparseError(f"batch size {batch_size} must be >= 1")
    if query_chunk is not None and query_chunk < 1:
        raise AttnsparseError(f"query chunk {query_chunk} must be >= 1")
    plan = _policies(policies)
    protocols = _protocols(windows)
    run = RunDir(out, KIND).check(overwrite) if out is not None else None  # read-only, before the slow load
    if not ppl and tasks is None:
        raise AttnsparseError("nothing to evaluate: give text for perplexity or tasks (--tasks)")
    if tasks is not None:
        tasks.check()
    if device is not None:
        resolve_device(device)  # a device this machine lacks fails before the slow load
    if dtype is not None:
        resolve_dtype(dtype)
    model, tok, name = _resolve_model(model_or_spec, tokenizer, device, dtype)
    grid = None if tasks is None else prepare_tasks(
        model, tok, tasks.tasks, tasks.lengths, tasks.depths, tasks.trials, policies=plan, plans=plans,
        haystack=tasks.haystack, chat_template=tasks.chat_template, retrieval=tasks.retrieval, seed=tasks.seed)
    if ppl:
        check_context(ctx, ModelShape.of(model).need("max_context"))
        ids = tokenize(tok, load_text(text_spec))
        batches_of = {protocol: make_windows(ids, ctx, count=protocol) for protocol in protocols}  # all checked first
    else:
        ids, protocols = torch.zeros(0), []
    config = {
        "model": name, "data": text_spec or "builtin", "ctx": ctx, "policies": [p.spec for p in plan],
        "protocols": [protocol_name(p) for p in protocols], "batch_size": batch_size, "query_chunk": query_chunk,
        "plans": [plan_label(p) for p in plans], "decode_tokens": decode_tokens if plans else None,
        "text_tokens": int(ids.numel()), **placement(model_device(model), model_dtype(model)),
    } | ({"tasks": grid.config} if grid is not None else {})
    result = EvaluationResult(model=name, data=text_spec or "builtin", ctx=ctx,
                              out=run.start(config) if run is not None else None)
    with run.guard(lambda: _kept(run.path, result)) if run is not None else nullcontext():
        for protocol in protocols:
            _evaluate_protocol(result, model, batches_of[protocol], protocol_name(protocol), plan, plans,
                               decode_tokens, batch_size, query_chunk, progress)
        if grid is not None:
            result.tasks = run_grid(model, tok, grid, progress)
        if run is not None:
            write_outputs(result, run.path)
            run.finish()
    return result


def _evaluate_protocol(result: EvaluationResult, model: PreTrainedModel, batches: Any, protocol: str,
                       plan: list[Policy], plans: Sequence[str | Path | DecodePlan], decode_tokens: int,
                       batch_size: int, query_chunk: int | None, progress: bool) -> None:
    """Append one row per policy (and per decode plan) for the windows of one protocol."""
    dense_ppl: float | None = None
    for policy in plan:
        started = time.perf_counter()
        ppl = perplexity(model, batches, policy, batch_size=batch_size, query_chunk=query_chunk, progress=progress)
        _check_finite(ppl, protocol)
        if policy.is_dense:
            dense_ppl = ppl.perplexity
        result.rows.append(EvaluationRow.of(
            protocol, ppl, None if dense_ppl is None else ppl.perplexity / dense_ppl, time.perf_counter() - started,
        ))
    if plans:
        started = time.perf_counter()
        decoded = decode_perplexity(model, batches, list(plans), decode_tokens, progress=progress)
        seconds = (time.perf_counter() - started) / len(decoded)
        for d in decoded:
            _check_finite(d, protocol)
        reference = decoded[0].perplexity
        for d in decoded:
            result.rows.append(EvaluationRow.of(protocol, d, d.perplexity / reference, seconds))


def _check_finite(ppl: PerplexityResult, protocol: str) -> None:
    """Stop at the first non-finite score (corrupt weights, overflow) before any result file is written."""
    if not (math.isfinite(ppl.mean_nll) and math.isfinite(ppl.perplexity)):
        raise AttnsparseError(
            f"policy {ppl.policy} under {protocol} gives a non-finite score (mean NLL {ppl.mean_nll}, perplexity "
            f"{ppl.perplexity}): the model's logits are not finite; check its weights for NaN/inf, or load it in "
            "float32"
        )


def _kept(out: Path, result: EvaluationResult) -> str:
    return (f"{out} keeps the unfinished 'evaluate' run (status running, {len(result.rows)} rows computed, none "
            "written); run the same command again to start it over")


def write_outputs(result: EvaluationResult, out: Path) -> None:
    """results.json, results.csv and ppl_vs_density.png (config.json is the RunDir's: written first, finished
    last); with tasks also their heatmaps, every answer (tasks_trials.jsonl) and report.html."""
    atomic_write_json(out / "results.json", result.to_json())
    if result.rows:
        buffer = io.StringIO()
        fields = list(EvaluationRow.__dataclass_fields__)
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in result.rows:
            writer.writerow(asdict(row))
        atomic_write_text(out / "results.csv", buffer.getvalue())
        plot_ppl_vs_density(result, out / "ppl_vs_density.png")
    if result.tasks is not None:
        write_task_outputs(result, out)


def write_task_outputs(result: EvaluationResult, out: Path) -> None:
    """tasks_<policy>.png, retrieval_heads.png, tasks_trials.jsonl and report.html (tasks, then perplexity)."""
    from attnsparse.core.report import Section, table_html, write_html_report
    from attnsparse.evaluate.tasks.plots import tasks_section, write_task_figures

    if result.tasks is None:
        return
    sections = [tasks_section(result.tasks, write_task_figures(result.tasks, out))]
    write_trials(result.tasks, out / "tasks_trials.jsonl")
    if result.rows:
        header = ["protocol", "policy", "density", "perplexity", "x dense", "tokens"]
        rows = [[r.protocol, r.policy, r.density, r.perplexity, "" if r.ratio_to_dense is None else r.ratio_to_dense,
                 r.tokens] for r in result.rows]
        body = f"<p>{html.escape(result.data)}, windows of {result.ctx} tokens.</p>" + table_html(header, rows)
        figure = (out / "ppl_vs_density.png", "perplexity against density")
        sections.append(Section("Perplexity", body, figures=[figure]))
    write_html_report(out / "report.html", f"evaluate {Path(result.model).name or result.model}", sections)


def plot_ppl_vs_density(result: EvaluationResult, path: Path) -> Path:
    """Perplexity against density (log x), one line per protocol, dense perplexity as a dashed line."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4), dpi=110)
    axes = figure.add_subplot()
    for protocol in dict.fromkeys(r.protocol for r in result.rows):
        # decode-plan rows score other tokens (the decoded tail); they are in the table, not on this plot
        rows = sorted((r for r in result.rows if r.protocol == protocol and not r.policy.startswith("plan:")),
                      key=lambda r: r.density)
        line = axes.plot([r.density for r in rows], [r.perplexity for r in rows], marker="o", label=protocol)[0]
        for r in rows:
            axes.annotate(r.policy, (r.density, r.perplexity), textcoords="offset points", xytext=(4, 4), fontsize=7)
        dense = [r.perplexity for r in rows if r.policy == "dense"]
        if dense:
            axes.axhline(dense[0], color=line.get_color(), linestyle="--", linewidth=0.8)
    axes.set_xscale("log")
    axes.set_xlabel("density (kept pairs / causal pairs)")
    axes.set_ylabel("perplexity")
    axes.set_title(f"{Path(result.model).name or result.model}, ctx {result.ctx}", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path

