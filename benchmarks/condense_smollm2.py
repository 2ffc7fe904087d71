"""Benchmark: condense SmolLM2-135M on WikiText-2 valid, then compare original vs condensed on WikiText-2 test.

Steps (each step's output is reused when it already exists, so the script can be re-run after an interruption):

1. `condense` with a preset (default smollm2-cpu-15min) on ../shared/data/wikitext-2/valid.txt -> OUT/condense
   (an interrupted run is resumed from its last checkpoint).
2. `evaluate` the original and the condensed model on test.txt at ctx 1024 with dense and top-k for
   k in {4, 8, 16, 32, 64} under the "8 evenly spaced windows" protocol, and (unless --no-all) dense plus
   --whole-ks (default 8, 16) on the whole test set (304 non-overlapping windows).
3. If `attnsparse.measure.run` is available: per-layer mean k at 95 % coverage before and after (8 windows); then
   passkey accuracy at 1K tokens (dense and top-8 decoding) for both models: does the fine-tune keep behaviour?
4. Writes benchmarks/results/<--results>.json (default condense_smollm2.json) and prints a Markdown table for the README.

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
    from attnsparse.evaluate.run import evaluate

    results = out / "results.json"
    if not results.is_file():
        policies = ["dense"] + [f"topk:{k}" for k in ks]
        evaluate(spec, str(DATA / "test.txt"), ctx, policies, protocols, out, overwrite=True)
    return json.loads(results.read_text())


def evaluate_both(spec: str, out: Path, ks: list[int], whole_ks: list[int] | None, ctx: int) -> dict[str, Any]:
    """8 evenly spaced windows for every k; the whole test set (slow) for dense and `whole_ks` unless None."""
    result = evaluate_model(spec, out, ks, [8], ctx)
    if whole_ks is not None:
        whole = evaluate_model(spec, out.with_name(out.name + "_whole"), whole_ks, [None], ctx)
        result = result | {"rows": result["rows"] + whole["rows"]}
    return result


def per_layer_k95(spec: str, out: Path, ctx: int) -> list[float] | None:
    """Mean k at 95 % coverage per layer (from measure's profile.json), or None without the measure module."""
    try:
        from attnsparse.measure.run import measure
    except ImportError:
        return None
    profile_path = out / "profile.json"
    if not profile_path.is_file():
        measure(spec, str(DATA / "test.txt"), ctx, 8, out, overwrite=True, echo=None)
    from attnsparse.measure.profile import ProfileView

    by_layer: dict[int, list[float]] = {}
    for head in ProfileView.read_json(profile_path).per_head:
        by_layer.setdefault(head.layer, []).append(float(head.k_at_coverage["0.95"]["mean"]))
    return [sum(v) / len(v) for _, v in sorted(by_layer.items())]


def earlier_whole_dense(path: Path) -> dict[str, Any]:
    """The original model's dense whole-test-set row from an earlier run (benchmarks/perplexity_smollm2.py)."""
    earlier = json.loads(path.read_text())
    dense = next(r for r in earlier["results"] if r["policy"] == "dense")
    return {"protocol": "all", "policy": "dense", "density": 1.0, "perplexity": dense["perplexity"],
            "mean_nll": dense["mean_nll"], "tokens": dense["tokens_scored"], "windows": earlier["windows"],
            "ctx": earlier["ctx"], "ratio_to_dense": 1.0, "seconds": dense["seconds"], "from": path.name}


def passkey_accuracy(spec: str, trials: int, out: Path) -> dict[str, float]:
    """Behaviour check: passkey accuracy at 1K tokens, depth 0.5, dense and top-8 decoding (prefill is dense)."""
    from attnsparse.core.models import load_model
    from attnsparse.core.runs import atomic_write_json
    from attnsparse.evaluate.passkey import accuracy_table, run_passkey

    if not out.is_file():
        loaded = load_model(spec)
        results = run_passkey(loaded.model, loaded.tokenizer, {"dense": "dense", "topk:8": "topk:8"}, [1024], [0.5],
                              trials=trials, progress=False)
        table = {policy: row["1024@0.5"] for policy, row in accuracy_table(results).items()}
        atomic_write_json(out, {"trials": trials, "accuracy": table})
    return dict(json.loads(out.read_text())["accuracy"])


def markdown(original: dict[str, Any], condensed: dict[str, Any]) -> str:
    header = ("| protocol | policy | density | original ppl | ×dense | condensed ppl | ×dense (condensed) | "
              "condensed / original dense |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    dense_original = {r["protocol"]: r["perplexity"] for r in original["rows"] if r["policy"] == "dense"}
    index = {(r["protocol"], r["policy"]): r for r in original["rows"]}
    for row in condensed["rows"]:
        before = index.get((row["protocol"], row["policy"]))
        original_cells = (f"{before['perplexity']:.2f} | {before['ratio_to_dense']:.3f}" if before else "– | –")
        lines.append(
            f"| {row['protocol']} | {row['policy']} | {row['density']:.4f} | {original_cells} | "
            f"{row['perplexity']:.2f} | {row['ratio_to_dense']:.3f} | "
            f"{row['perplexity'] / dense_original[row['protocol']]:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-cpu-15min")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "condense_smollm2")
    parser.add_argument("--ks", default="4,8,16,32,64")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--no-all", action="store_true", help="skip the whole-test-set protocol (slow)")
    parser.add_argument("--whole-ks", default="8,16",
                        help="k values evaluated on the whole test set beside dense (~12-18 min each on 2 cores)")
    parser.add_argument("--original-whole-ks", default=None,
                        help="k values on the whole test set for the original model (default: --whole-ks; '' = dense only)")
    parser.add_argument("--original-whole-from", type=Path, default=None,
                        help="take the original's dense whole-set perplexity from this earlier perplexity_smollm2.py "
                        "result instead of re-running it (same protocol); the row records the file")
    parser.add_argument("--passkey-trials", type=int, default=20,
                        help="passkey trials at 1K tokens for each model (does the fine-tune keep behaviour?); 0 skips")
    parser.add_argument("--results", default="condense_smollm2", help="name of the JSON written to benchmarks/results")
    parser.add_argument("--no-measure", action="store_true", help="skip the per-layer k_0.95 profiles")
    parser.add_argument("--checkpoint", type=int, default=None,
                        help="evaluate the run's checkpoint at this step instead of training to the end (a stopped "
                        "run; re-running without it resumes training from the last checkpoint)")
    args = parser.parse_args()

    from attnsparse.condense import condense, preset_config
    from attnsparse.condense.trainer import checkpoints

    ks = [int(k) for k in args.ks.split(",")]
    whole_ks = None if args.no_all else [int(k) for k in args.whole_ks.split(",") if k]
    original_ks = args.whole_ks if args.original_whole_ks is None else args.original_whole_ks
    original_whole_ks = None if args.no_all else [int(k) for k in original_ks.split(",") if k]
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
    if args.original_whole_from is not None and whole_ks is not None:
        original = evaluate_both(config.model, out / "eval_original", ks, None, args.ctx)
        original = original | {"rows": original["rows"] + [earlier_whole_dense(args.original_whole_from)]}
    else:
        original = evaluate_both(config.model, out / "eval_original", ks, original_whole_ks, args.ctx)
    condensed = evaluate_both(str(model_dir), out / condensed_name, ks, whole_ks, args.ctx)
    timings["evaluate_s"] = time.perf_counter() - started

    k95 = None
    if not args.no_measure:
        before = per_layer_k95(config.model, out / "measure_original", args.ctx)
        after = per_layer_k95(str(model_dir), out / measured_name, args.ctx)
        if before is not None and after is not None:
            k95 = {"original": before, "condensed": after}

    passkey = None
    if args.passkey_trials > 0:
        passkey = {"cell": "1024 tokens, depth 0.5", "trials": args.passkey_trials,
                   "original": passkey_accuracy(config.model, args.passkey_trials, out / "passkey_original.json"),
                   "condensed": passkey_accuracy(str(model_dir), args.passkey_trials, out / f"passkey_{condensed_name}.json")}

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
        "passkey": passkey,
        "timings": timings,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    from attnsparse.core.runs import atomic_write_json

    atomic_write_json(RESULTS / f"{args.results}.json", summary)
    table = markdown(original, condensed)
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
