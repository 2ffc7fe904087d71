"""The main job: measure -> evaluate -> tasks -> condense -> measure -> evaluate -> tasks, and one HTML report.

The report leads with what a user needs to decide whether to condense: perplexity against density for the original
and the condensed model (as ratios to the original's dense and to each model's own dense), the behaviour table
(passkey, dense and under a deployed sparse decode plan), and one sentence comparing the condensed model under
sparse attention with training-free sparse attention on the original at the same density.

Each stage writes its own run directory under OUT (measure_before/, evaluate_before/, tasks_before/, condense/,
measure_after/, evaluate_after/, tasks_after/), following the RunDir protocol (attnsparse.core.runs). A stage whose directory holds a finished
run is reused, an interrupted measure or evaluate stage is run again and an interrupted condense stage resumes
from its last checkpoint, so re-running the same command after a crash loses only the stage in progress.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnsparse.core.devices import resolve_device
from attnsparse.core.plotting import pyplot
from attnsparse.core.report import Section, write_html_report
from attnsparse.core.runs import RunDir, atomic_write_json, read_run
from attnsparse.errors import AttnsparseError

KIND = "run"
STAGES = ("measure_before", "evaluate_before", "tasks_before", "condense", "measure_after", "evaluate_after",
          "tasks_after")
STAGE_KIND = {"measure": "measure", "evaluate": "evaluate", "tasks": "evaluate", "condense": "condense"}
# Verdict thresholds: a condensed model is worth using when its sparse perplexity beats the original's at the same
# density, its dense perplexity stays within this factor of the original's, and it loses at most one task trial.
DENSE_TOLERANCE = 1.01


@dataclass
class PipelineConfig:
    """Settings of the main job; the condense preset decides the fine-tune (docs/condense.md)."""

    model: str = "smollm2-135m"
    train_data: str | None = "builtin:train"
    eval_data: str | None = "builtin:test"
    preset: str = "smollm2-keep-15min-anchored"
    ctx: int = 1024
    measure_windows: int = 4
    eval_windows: int = 4
    policies: str = "dense,topk:4,topk:8,topk:16,topk:32"  # 0.4-3.1 % of keys at 1K; 6 policies ran over 15 min
    steps: int | None = None  # override the preset's step count (None: keep it)
    tasks: str = "passkey"  # behaviour stages; "" skips them
    task_lengths: tuple[int, ...] = (1024,)
    task_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    task_trials: int = 7
    task_plans: str = "block:16:0.0625"  # decode plans answered from the same dense prefill
    overrides: dict[str, Any] = field(default_factory=dict)
    device: str | None = None  # cpu, cuda or cuda:N (None: cuda when available); every stage runs there
    dtype: str = "float32"  # model precision of measure and evaluate, mixed precision of condense


@dataclass
class PipelineResult:
    out: Path
    report: Path
    before: dict[str, Any]
    after: dict[str, Any]


def _finished(directory: Path, kind: str) -> bool:
    """A stage is done when its run directory holds a finished run of its kind (stage names start with it)."""
    record = read_run(directory)
    return record is not None and record.kind == kind and record.finished


def run_pipeline(
    config: PipelineConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
    echo: Callable[[str], None] = print,
) -> PipelineResult:
    """Run every stage not already finished in `out`; returns the before/after summary and the report path.

    Every input is checked before anything is written. A directory holding this run with the same settings is
    resumed stage by stage; other settings are refused unless `overwrite` (which starts over) or no stage has
    started yet (a start that failed on bad input).
    """
    from attnsparse.condense import condense
    from attnsparse.condense.checkpoints import checkpoints
    from attnsparse.core.models import LoadedModel, load_model
    from attnsparse.evaluate.run import evaluate
    from attnsparse.measure.run import measure

    out = Path(out)
    run = RunDir(out, KIND)
    previous = run.inspect()
    settings = json.loads(json.dumps(_config_json(config)))
    settings["device"] = str(resolve_device(config.device))  # the device it resolved to (a missing one fails here)
    stage = {name: out / name for name in STAGES}
    started = [name for name in STAGES if stage[name].exists()]
    if previous is not None and previous.config != settings and started and not overwrite:
        raise AttnsparseError(
            f"{out} holds a run with different settings; pass the same options to resume it, or --overwrite"
        )
    condense_config, loaded = _validated(config)
    resume = previous is not None and previous.config == settings and not overwrite
    run.start(settings, clear=not resume)

    seconds = _StageClock(out / STAGE_SECONDS)

    def profile_and_score(model: LoadedModel, when: str, label: str) -> None:
        """The measure, evaluate and task stages for one model, each skipped when already finished."""
        if not _finished(stage[f"measure_{when}"], "measure"):
            echo(f"== measure the {label} model")
            with seconds(f"measure_{when}"):
                measure(model, config.eval_data, config.ctx, config.measure_windows, stage[f"measure_{when}"],
                        progress=progress, echo=echo)
        if not _finished(stage[f"evaluate_{when}"], "evaluate"):
            echo(f"== evaluate the {label} model")
            with seconds(f"evaluate_{when}"):
                evaluate(model, config.eval_data, config.ctx, config.policies, config.eval_windows,
                         stage[f"evaluate_{when}"], progress=progress)
        if config.tasks and not _finished(stage[f"tasks_{when}"], "evaluate"):
            echo(f"== tasks on the {label} model")
            with seconds(f"tasks_{when}"):
                evaluate(model, None, config.ctx, "dense", out=stage[f"tasks_{when}"], plans=_task_plans(config),
                         tasks=_task_options(config), ppl=False, progress=progress)

    with run.guard(lambda: _kept(out)):
        profile_and_score(loaded, "before", "original")
        if not _finished(stage["condense"], "condense"):
            echo(f"== condense ({config.preset})")
            resuming = bool(checkpoints(stage["condense"] / "checkpoints"))
            trainee = loaded if config.dtype == "float32" else None  # mixed precision trains float32 weights it loads
            with seconds("condense"):
                condense(condense_config, stage["condense"], resume=resuming, progress=progress, model=trainee,
                         echo=echo)
        condensed = load_model(str(stage["condense"] / "model"), config.dtype, device=config.device)
        condensed = LoadedModel(condensed.model, condensed.tokenizer, f"{config.model} (condensed)",
                                condensed.source, condensed.load_seconds)
        profile_and_score(condensed, "after", "condensed")

        before, after = (_summary(stage[f"measure_{when}"], stage[f"evaluate_{when}"], stage[f"tasks_{when}"])
                         for when in ("before", "after"))
        verdict = _verdict(before, after, condense_config.k)
        summary = {"before": before, "after": after, "preset": config.preset, "verdict": verdict,
                   "stage_seconds": seconds.read()}
        atomic_write_json(out / "summary.json", summary)
        report = _write_report(out, config, before, after, verdict)
        run.finish()
    echo(_summary_table(before, after))
    echo(verdict["sentence"])
    echo(f"report: {report}")
    return PipelineResult(out, report, before, after)


STAGE_SECONDS = "stage_seconds.json"


class _StageClock:
    """Wall seconds of each stage, kept in OUT/stage_seconds.json (a resumed stage adds its new time to the old)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, float]:
        return json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            times = self.read()
            times[name] = round(times.get(name, 0.0) + time.perf_counter() - started, 1)
            atomic_write_json(self.path, times)


def _validated(config: PipelineConfig) -> tuple[Any, Any]:
    """Check every input of every stage (preset, model, context, texts long enough, policies) before anything is
    written; returns the condense settings and the loaded model."""
    from attnsparse.attention.policies import parse_policies
    from attnsparse.condense import preset_config
    from attnsparse.core.data import check_context, load_text, tokenize, windows
    from attnsparse.core.models import load_model

    condense_config = preset_config(config.preset, model=config.model, data=config.train_data, steps=config.steps,
                                    device=config.device, dtype=config.dtype, **config.overrides)
    condense_config.validate()
    for option, count in (("--measure-windows", config.measure_windows), ("--eval-windows", config.eval_windows)):
        if count < 1:
            raise AttnsparseError(f"{option} {count} must be >= 1")
    if config.ctx < 2:
        raise AttnsparseError(f"--ctx {config.ctx} is too small; use --ctx 2 or more")
    parse_policies(config.policies)
    if config.tasks:
        _task_options(config).check()
    loaded = load_model(config.model, config.dtype, device=config.device)
    check_context(config.ctx, loaded.max_context)
    if config.tasks:  # every prompt built and every plan resolved once, so a bad one fails before any write
        from attnsparse.evaluate.tasks.run import prepare_tasks

        options = _task_options(config)
        for length in options.lengths:
            check_context(length, loaded.max_context, "--task-lengths")
        prepare_tasks(loaded.model, loaded.tokenizer, options.tasks, options.lengths, options.depths,
                      options.trials, plans=_task_plans(config), retrieval=False)
    check_context(condense_config.seq_len, loaded.max_context)
    eval_ids = tokenize(loaded.tokenizer, load_text(config.eval_data))
    for count in (config.measure_windows, config.eval_windows):
        windows(eval_ids, config.ctx, count=count)
    windows(tokenize(loaded.tokenizer, load_text(config.train_data)), condense_config.seq_len)
    return condense_config, loaded


def _task_options(config: PipelineConfig) -> Any:
    from attnsparse.evaluate.tasks.run import TaskOptions

    return TaskOptions(tasks=config.tasks, lengths=tuple(config.task_lengths), depths=tuple(config.task_depths),
                       trials=config.task_trials, retrieval=False)


def _task_plans(config: PipelineConfig) -> list[str]:
    from attnsparse.specs import split_list

    return list(split_list(config.task_plans, "--task-plans")) if config.task_plans else []


def _kept(out: Path) -> str:
    done = [name for name in STAGES if _finished(out / name, STAGE_KIND[name.split("_")[0]])]
    return (f"{out} keeps the finished stages ({', '.join(done) or 'none'}); run the same command again to resume "
            "from the next one")


def _config_json(config: PipelineConfig) -> dict[str, Any]:
    return {key: getattr(config, key) for key in config.__dataclass_fields__}


def _summary(measure_dir: Path, evaluate_dir: Path, tasks_dir: Path) -> dict[str, Any]:
    from attnsparse.measure.profile import ProfileView

    profile = ProfileView.read_json(measure_dir / "profile.json")
    results = json.loads((evaluate_dir / "results.json").read_text())
    key = next(k for k in profile.summary if k.startswith("k_") and k.endswith("_mean"))
    tasks: dict[str, dict[str, list[int]]] = {}  # task -> policy -> [correct, trials] over lengths and depths
    if (tasks_dir / "results.json").is_file():
        for row in json.loads((tasks_dir / "results.json").read_text()).get("tasks", []):
            cell = tasks.setdefault(row["task"], {}).setdefault(row["policy"], [0, 0])
            cell[0] += row["correct"]
            cell[1] += row["trials"]
    return {
        "perplexity": {row["policy"]: row["perplexity"] for row in results["rows"]},
        "density": {row["policy"]: row["density"] for row in results["rows"]},
        "k_mean": profile.summary[key],
        "k_key": key,
        "k_per_layer": [layer[key] for layer in profile.per_layer],
        "C_mean": profile.summary["C_mean"],
        "streaming_share": profile.summary["streaming_share"],
        "tasks": tasks,
    }


def _verdict(before: dict[str, Any], after: dict[str, Any], k: int) -> dict[str, Any]:
    """Is the condensed model under sparse attention better than training-free sparse attention on the original?

    Compared at the trained k (or else the sparsest policy both have): better when the condensed model's sparse
    perplexity is lower, its dense perplexity within DENSE_TOLERANCE of the original's, and no task loses more
    than one trial under any policy."""
    dense = before["perplexity"]["dense"]
    sparse = [p for p in before["perplexity"] if p != "dense" and p in after["perplexity"]]
    policy = f"topk:{k}" if f"topk:{k}" in sparse else min(sparse, key=lambda p: before["density"][p], default=None)
    dense_ratio = after["perplexity"]["dense"] / dense
    lost = [f"{task} {policy_name} {after['tasks'][task][policy_name][0]}/{after['tasks'][task][policy_name][1]} "
            f"vs {cell[0]}/{cell[1]}"
            for task, by_policy in before["tasks"].items() for policy_name, cell in by_policy.items()
            if policy_name in after["tasks"].get(task, {}) and after["tasks"][task][policy_name][0] < cell[0] - 1]
    if policy is None:
        return {"policy": None, "better": None, "dense_ratio": dense_ratio, "tasks_lost": lost,
                "sentence": "No sparse policy was evaluated, so there is nothing to compare."}
    original, condensed = before["perplexity"][policy] / dense, after["perplexity"][policy] / dense
    better = condensed < original and dense_ratio <= DENSE_TOLERANCE and not lost
    reasons = [(f"{policy} (density {before['density'][policy]:.2%}) perplexity x{condensed:.3f} of the original's "
               f"dense against x{original:.3f} training-free on the original")]
    reasons.append(f"dense x{dense_ratio:.3f}" + ("" if dense_ratio <= DENSE_TOLERANCE
                                                  else f" (more than x{DENSE_TOLERANCE})"))
    reasons.append("tasks kept within one trial" if not lost else "tasks lost: " + "; ".join(lost))
    word = "better" if better else "not better"
    sentence = (f"The condensed model is {word} than training-free sparse attention on the original at the same "
                f"density: " + ", ".join(reasons) + ".")
    return {"policy": policy, "better": better, "original_ratio": original, "condensed_ratio": condensed,
            "dense_ratio": dense_ratio, "tasks_lost": lost, "sentence": sentence}


def _decision_rows(before: dict[str, Any], after: dict[str, Any]) -> list[list[Any]]:
    """Per policy: density, both perplexities, both as ratios to the original's dense, condensed to its own dense."""
    dense, own = before["perplexity"]["dense"], after["perplexity"]["dense"]
    return [[policy, before["density"][policy], ppl, after["perplexity"][policy], ppl / dense,
             after["perplexity"][policy] / dense, after["perplexity"][policy] / own]
            for policy, ppl in before["perplexity"].items() if policy in after["perplexity"]]


DECISION_HEADER = ["policy", "density", "ppl original", "ppl condensed", "original / original dense",
                   "condensed / original dense", "condensed / own dense"]


def _task_rows(before: dict[str, Any], after: dict[str, Any]) -> list[list[Any]]:
    """Per task and policy: correct/trials for the original and the condensed model."""
    def cell(summary: dict[str, Any], task: str, policy: str) -> str:
        correct, total = summary["tasks"].get(task, {}).get(policy, (0, 0))
        return f"{correct}/{total}" if total else "-"

    return [[task, policy, cell(before, task, policy), cell(after, task, policy)]
            for task, by_policy in before["tasks"].items() for policy in by_policy]


def _summary_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    lines = [(f"{'policy':<12} {'density':>8} {'ppl before':>11} {'ppl after':>10} {'after/orig dense':>17} "
             f"{'after/own dense':>16}")]
    for policy, density, ppl, ppl_after, _, ratio, own in _decision_rows(before, after):
        lines.append(f"{policy:<12} {density:>8.4f} {ppl:>11.3f} {ppl_after:>10.3f} {ratio:>17.3f} {own:>16.3f}")
    for task, policy, original, condensed in _task_rows(before, after):
        lines.append(f"{task} ({policy}): original {original}, condensed {condensed}")
    lines.append(f"mean {before['k_key'][2:-5]} keys: {before['k_mean']:.1f} before, {after['k_mean']:.1f} after")
    return "\n".join(lines)


def _write_report(out: Path, config: PipelineConfig, before: dict[str, Any], after: dict[str, Any],
                  verdict: dict[str, Any]) -> Path:
    import html

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    density_png = _plot_ppl_vs_density(before, after, plots / "ppl_vs_density.png")
    layers_png = _plot_k_per_layer(before, after, plots / "k_per_layer.png")
    tables = [(DECISION_HEADER, _decision_rows(before, after))]
    if before["tasks"]:
        tables.append((["task", "policy", "original (correct/trials)", "condensed (correct/trials)"],
                       _task_rows(before, after)))
    task_text = (f" Tasks: {html.escape(config.tasks)} at {', '.join(map(str, config.task_lengths))} tokens, "
                 f"depths {', '.join(map(str, config.task_depths))}, {config.task_trials} trials each, dense and "
                 f"under the decode plans {html.escape(config.task_plans or 'none')} (one dense prefill per prompt)."
                 if config.tasks else "")
    sections = [
        Section(
            "Should you condense?",
            f"<p><b>{html.escape(verdict['sentence'])}</b></p>"
            f"<p>Model <code>{html.escape(config.model)}</code>, fine-tuned with preset "
            f"<code>{html.escape(config.preset)}</code> on <code>{html.escape(str(config.train_data))}</code>; "
            f"evaluated on held-out <code>{html.escape(str(config.eval_data))}</code>, {config.eval_windows} evenly "
            f"spaced windows of {config.ctx} tokens. Ratios are to the <b>original</b> model's dense perplexity, "
            f"and to the condensed model's own dense.{task_text}</p>",
            tables=tables,
            figures=[(density_png, "Perplexity against density (log x), original and condensed")],
        ),
        Section(
            "Keys needed per layer",
            f"<p>Mean {html.escape(before['k_key'][:-5])} over heads: {before['k_mean']:.1f} before, "
            f"{after['k_mean']:.1f} after; mean C {before['C_mean']:.3f} before, {after['C_mean']:.3f} after; "
            f"streaming heads {before['streaming_share']:.0%} before, {after['streaming_share']:.0%} after.</p>",
            figures=[(layers_png, "Mean keys at 95% coverage per layer, before and after condensation")],
        ),
    ]
    curves = out / "condense" / "curves.png"
    if curves.is_file():
        sections.append(Section("Training curves", figures=[(curves, "Condensation fine-tune: loss components")]))
    sections.append(Section(
        "Stage reports",
        "<p>Full profiles: <code>measure_before/report.html</code>, <code>measure_after/report.html</code>; "
        "evaluation tables: <code>evaluate_before/</code>, <code>evaluate_after/</code>; the condensed model: "
        "<code>condense/model/</code> (loadable with <code>from_pretrained</code>).</p>",
    ))
    return write_html_report(out / "report.html", "attnsparse: before and after condensation", sections)


def _plot_ppl_vs_density(before: dict[str, Any], after: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for label, data, marker in (("original", before, "o"), ("condensed", after, "s")):
        points = sorted((data["density"][p], data["perplexity"][p]) for p in data["perplexity"])
        axis.plot([d for d, _ in points], [p for _, p in points], marker=marker, label=label)
    axis.axhline(before["perplexity"]["dense"], color="grey", linestyle=":", label="original dense")
    axis.set_xscale("log")
    axis.set_xlabel("attention density (kept pairs / causal pairs)")
    axis.set_ylabel("perplexity")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_k_per_layer(before: dict[str, Any], after: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    axis.plot(before["k_per_layer"], marker="o", label="original")
    axis.plot(after["k_per_layer"], marker="s", label="condensed")
    axis.set_yscale("log")
    axis.set_xlabel("layer")
    axis.set_ylabel(f"mean {before['k_key'][:-5]}")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
