"""The main job: measure -> evaluate -> condense -> measure -> evaluate, and one before/after HTML report.

Each stage writes its own run directory under OUT (measure_before/, evaluate_before/, condense/, measure_after/,
evaluate_after/), following the RunDir protocol (attnsparse.core.runs). A stage whose directory holds a finished
run is reused, an interrupted measure or evaluate stage is run again and an interrupted condense stage resumes
from its last checkpoint, so re-running the same command after a crash loses only the stage in progress.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnsparse.core.devices import resolve_device
from attnsparse.core.plotting import pyplot
from attnsparse.core.report import Section, write_html_report
from attnsparse.core.runs import RunDir, atomic_write_json, read_run
from attnsparse.errors import AttnsparseError

KIND = "run"
STAGES = ("measure_before", "evaluate_before", "condense", "measure_after", "evaluate_after")


@dataclass
class PipelineConfig:
    """Settings of the main job; the condense preset decides the fine-tune (docs/condense.md)."""

    model: str = "smollm2-135m"
    train_data: str | None = "builtin:train"
    eval_data: str | None = "builtin:test"
    preset: str = "smollm2-cpu-15min"
    ctx: int = 1024
    measure_windows: int = 4
    eval_windows: int = 4
    policies: str = "dense,topk:4,topk:8,topk:16,topk:32,topk:64"
    steps: int | None = None  # override the preset's step count (None: keep it)
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

    def profile_and_score(model: LoadedModel, when: str, label: str) -> None:
        """The measure and evaluate stages for one model, each skipped when already finished."""
        if not _finished(stage[f"measure_{when}"], "measure"):
            echo(f"== measure the {label} model")
            measure(model, config.eval_data, config.ctx, config.measure_windows, stage[f"measure_{when}"],
                    progress=progress, echo=echo)
        if not _finished(stage[f"evaluate_{when}"], "evaluate"):
            echo(f"== evaluate the {label} model")
            evaluate(model, config.eval_data, config.ctx, config.policies, config.eval_windows,
                     stage[f"evaluate_{when}"], progress=progress)

    with run.guard(lambda: _kept(out)):
        profile_and_score(loaded, "before", "original")
        if not _finished(stage["condense"], "condense"):
            echo(f"== condense ({config.preset})")
            resuming = bool(checkpoints(stage["condense"] / "checkpoints"))
            trainee = loaded if config.dtype == "float32" else None  # mixed precision trains float32 weights it loads
            condense(condense_config, stage["condense"], resume=resuming, progress=progress, model=trainee, echo=echo)
        condensed = load_model(str(stage["condense"] / "model"), config.dtype, device=config.device)
        condensed = LoadedModel(condensed.model, condensed.tokenizer, f"{config.model} (condensed)",
                                condensed.source, condensed.load_seconds)
        profile_and_score(condensed, "after", "condensed")

        before, after = _summary(stage["measure_before"], stage["evaluate_before"]), _summary(
            stage["measure_after"], stage["evaluate_after"])
        summary = {"before": before, "after": after, "preset": config.preset}
        atomic_write_json(out / "summary.json", summary)
        report = _write_report(out, config, before, after)
        run.finish()
    echo(_summary_table(before, after))
    echo(f"report: {report}")
    return PipelineResult(out, report, before, after)


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
    loaded = load_model(config.model, config.dtype, device=config.device)
    check_context(config.ctx, loaded.max_context)
    check_context(condense_config.seq_len, loaded.max_context)
    eval_ids = tokenize(loaded.tokenizer, load_text(config.eval_data))
    for count in (config.measure_windows, config.eval_windows):
        windows(eval_ids, config.ctx, count=count)
    windows(tokenize(loaded.tokenizer, load_text(config.train_data)), condense_config.seq_len)
    return condense_config, loaded


def _kept(out: Path) -> str:
    done = [name for name in STAGES if _finished(out / name, name.split("_")[0])]
    return (f"{out} keeps the finished stages ({', '.join(done) or 'none'}); run the same command again to resume "
            "from the next one")


def _config_json(config: PipelineConfig) -> dict[str, Any]:
    return {key: getattr(config, key) for key in config.__dataclass_fields__}


def _summary(measure_dir: Path, evaluate_dir: Path) -> dict[str, Any]:
    from attnsparse.measure.profile import ProfileView

    profile = ProfileView.read_json(measure_dir / "profile.json")
    results = json.loads((evaluate_dir / "results.json").read_text())
    key = next(k for k in profile.summary if k.startswith("k_") and k.endswith("_mean"))
    return {
        "perplexity": {row["policy"]: row["perplexity"] for row in results["rows"]},
        "density": {row["policy"]: row["density"] for row in results["rows"]},
        "k_mean": profile.summary[key],
        "k_key": key,
        "k_per_layer": [layer[key] for layer in profile.per_layer],
        "C_mean": profile.summary["C_mean"],
        "streaming_share": profile.summary["streaming_share"],
    }


def _summary_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    dense = before["perplexity"]["dense"]
    lines = [f"{'policy':<12} {'density':>8} {'ppl before':>11} {'ppl after':>10} {'after/orig dense':>17}"]
    for policy, ppl in before["perplexity"].items():
        lines.append(f"{policy:<12} {before['density'][policy]:>8.4f} {ppl:>11.3f} "
                     f"{after['perplexity'][policy]:>10.3f} {after['perplexity'][policy] / dense:>17.3f}")
    lines.append(f"mean {before['k_key'][2:-5]} keys: {before['k_mean']:.1f} before, {after['k_mean']:.1f} after")
    return "\n".join(lines)


def _write_report(out: Path, config: PipelineConfig, before: dict[str, Any], after: dict[str, Any]) -> Path:
    import html

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    density_png = _plot_ppl_vs_density(before, after, plots / "ppl_vs_density.png")
    layers_png = _plot_k_per_layer(before, after, plots / "k_per_layer.png")
    dense = before["perplexity"]["dense"]
    rows = [[policy, before["density"][policy], ppl, after["perplexity"][policy], after["perplexity"][policy] / dense]
            for policy, ppl in before["perplexity"].items()]
    sections = [
        Section(
            "Quality against attention density",
            f"<p>Model <code>{html.escape(config.model)}</code>, fine-tuned with preset "
            f"<code>{html.escape(config.preset)}</code> on <code>{html.escape(str(config.train_data))}</code>; "
            f"evaluated on <code>{html.escape(str(config.eval_data))}</code>, {config.eval_windows} evenly spaced "
            f"windows of {config.ctx} tokens. Ratios are to the <b>original</b> model's dense perplexity.</p>",
            tables=[(["policy", "density", "ppl original", "ppl condensed", "condensed / original dense"], rows)],
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
