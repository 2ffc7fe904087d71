"""Benchmark: condense SmolLM2-135M on WikiText-2 valid, then compare original vs condensed on WikiText-2 test.

Steps (each step's output is reused when it already exists, so the script can be re-run after an interruption):

1. `condense` with a preset (default smollm2-cpu-15min) on ../shared/data/wikitext-2/valid.txt -> OUT/condense
   (an interrupted run is resumed from its last checkpoint).
2. `evaluate` the original and the condensed model on test.txt at ctx 1024 with dense and top-k for
   k in {4, 8, 16, 32, 64}, under the "8 evenly spaced windows" protocol and (unless --no-all) the whole test set.
3. If `attnsparse.measure` is available: per-layer mean k at 95 % coverage before and after (8 windows).
4. Writes benchmarks/results/condense_smollm2.json and prints a Markdown table for the README.

`--checkpoint N` evaluates the checkpoint of step N instead (a run stopped early; the JSON records the steps).

Slow: on 2 CPU cores the condense step takes ~15 min, each 8-window evaluation ~1-2 min per policy, and the
whole-test-set protocol ~10 min per policy. Usage:

    .venv/bin/python benchmarks/condense_smollm2.py [--preset smollm2-cpu-15min] [--no-all] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "benchmarks" / "results"


def evaluate_model(spec: str, out: Path, ks: list[int], protocols: list[int | None], ctx: int) -> dict[str, Any]:
    """Run (or reuse) an evaluate run directory and return its results.json."""
    from attnsparse.evaluate import evaluate

    results = out / "results.json"
    if not results.is_file():
        policies = ["dense"] + [f"topk:{k}" for k in ks]
        evaluate(spec, str(DATA / "test.txt"), ctx, policies, protocols, out, overwrite=True)
    return json.loads(results.read_text())


def per_layer_k95(spec: str, out: Path, ctx: int) -> list[float] | None:
    """Mean k at 95 % coverage per layer (from measure's profile.json), or None without the measure module."""
    try:
        from attnsparse.measure import measure
    except ImportError:
        return None
    profile_path = out / "profile.json"
    if not profile_path.is_file():
        measure(spec, str(DATA / "test.txt"), ctx, 8, out, overwrite=True, echo=None)
    profile = json.loads(profile_path.read_text())
    by_layer: dict[int, list[float]] = {}
    for head in profile["per_head"]:
        by_layer.setdefault(int(head["layer"]), []).append(float(head["k_at_coverage"]["0.95"]["mean"]))
    return [sum(v) / len(v) for _, v in sorted(by_layer.items())]


def markdown(original: dict[str, Any], condensed: dict[str, Any]) -> str:
    header = ("| protocol | policy | density | original ppl | ×dense | condensed ppl | ×dense (condensed) | "
              "condensed / original dense |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    dense_original = {r["protocol"]: r["perplexity"] for r in original["rows"] if r["policy"] == "dense"}
    index = {(r["protocol"], r["policy"]): r for r in condensed["rows"]}
    for row in original["rows"]:
        other = index[(row["protocol"], row["policy"])]
        lines.append(
            f"| {row['protocol']} | {row['policy']} | {row['density']:.4f} | {row['perplexity']:.2f} | "
            f"{row['ratio_to_dense']:.3f} | {other['perplexity']:.2f} | {other['ratio_to_dense']:.3f} | "
            f"{other['perplexity'] / dense_original[row['protocol']]:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-cpu-15min")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "condense_smollm2")
    parser.add_argument("--ks", default="4,8,16,32,64")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--no-all", action="store_true", help="skip the whole-test-set protocol (slow)")
    parser.add_argument("--no-measure", action="store_true", help="skip the per-layer k_0.95 profiles")
    parser.add_argument("--checkpoint", type=int, default=None,
                        help="evaluate the run's checkpoint at this step instead of training to the end (a stopped "
                        "run; re-running without it resumes training from the last checkpoint)")
    args = parser.parse_args()

    from attnsparse.condense import condense, preset_config
    from attnsparse.condense.trainer import checkpoints

    ks = [int(k) for k in args.ks.split(",")]
    protocols: list[int | None] = [8] if args.no_all else [8, None]
    out: Path = args.out
    run_dir = out / "condense"
    config = preset_config(args.preset, data=str(DATA / "valid.txt"))
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model_dir = run_dir / "model"
    if args.checkpoint is not None:
        model_dir = run_dir / "checkpoints" / f"checkpoint-{args.checkpoint}"
        if not (model_dir / "config.json").is_file():
            raise SystemExit(f"error: no checkpoint at step {args.checkpoint} in {run_dir / 'checkpoints'}")
    elif not (model_dir / "config.json").is_file():
        resume = bool(checkpoints(run_dir / "checkpoints"))
        condense(config, run_dir, resume=resume, overwrite=not resume)
    timings["condense_s"] = time.perf_counter() - started
    condensed_name = "eval_condensed" if args.checkpoint is None else f"eval_checkpoint-{args.checkpoint}"
    measured_name = "measure_condensed" if args.checkpoint is None else f"measure_checkpoint-{args.checkpoint}"

    started = time.perf_counter()
    original = evaluate_model(config.model, out / "eval_original", ks, protocols, args.ctx)
    condensed = evaluate_model(str(model_dir), out / condensed_name, ks, protocols, args.ctx)
    timings["evaluate_s"] = time.perf_counter() - started

    k95 = None
    if not args.no_measure:
        before = per_layer_k95(config.model, out / "measure_original", args.ctx)
        after = per_layer_k95(str(model_dir), out / measured_name, args.ctx)
        if before is not None and after is not None:
            k95 = {"original": before, "condensed": after}

    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    if args.checkpoint is not None:
        log = [record for record in log if record["step"] <= args.checkpoint]
    summary = {
        "benchmark": "condense_smollm2",
        "preset": args.preset,
        "condensed_model": str(model_dir.relative_to(out)),
        "trained_steps": log[-1]["step"] if log else 0,
        "config": config.to_json(),
        "train": {"first": log[0], "last": log[-1]} if log else {},
        "original": original,
        "condensed": condensed,
        "per_layer_k95": k95,
        "timings": timings,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    from attnsparse.runio import atomic_write_json

    atomic_write_json(RESULTS / "condense_smollm2.json", summary)
    table = markdown(original, condensed)
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
