"""Benchmark: quality against training tokens along one condense run (its checkpoints), ratios to the ORIGINAL's dense.

Each checkpoint directory (a `condense` run's `checkpoints/checkpoint-N`, or a copy of its model files) is scored like
`condense_keep.py` scores a model: WikiText-2 test, ctx 1024, 8 evenly spaced windows, under dense and each prefill
policy; the original is scored the same way once. The run's `train_log.jsonl` gives each step's k and the tokens seen
(steps x batch x seq len from its `config.json`). Evaluations are cached under --work (an interrupted run resumes).
Writes benchmarks/results/<--results>.json and prints a Markdown table. Usage:

    .venv/bin/python benchmarks/condense_curve.py --run runs/x --checkpoint 10=runs/x/ckpts/step-10 \
        [--checkpoint 60=runs/x/model] [--policies dense,topk:4,topk:8,topk:16] [--results condense_curve_x]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import ROOT, WIKITEXT_TEST, write_result
from condense_keep import text_perplexities

ORIGINAL = "smollm2-135m"
WINDOWS = 8
CTX = 1024


def scored(spec: str, out: Path, policies: list[str]) -> dict[str, float]:
    """policy -> perplexity on the protocol's windows (condense_keep's cached evaluate run)."""
    ppl = text_perplexities(spec, str(WIKITEXT_TEST), WINDOWS, CTX, policies, out)
    return {p: ppl[p] for p in policies}


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 14's moonshot row at the last checkpoint: top-4 (0.8 % density) within x1.05 of the original's dense."""
    if not rows or "topk:4" not in rows[-1]["x_original_dense"]:
        return []
    value = rows[-1]["x_original_dense"]["topk:4"]
    return [{"measure": f"WikiText-2 test ctx 1024 (8 windows), topk:4 at step {rows[-1]['step']}, x original dense",
             "target": "<= 1.05", "value": value, "met": value <= 1.05}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the condense run directory (config.json, train_log)")
    parser.add_argument("--checkpoint", action="append", default=[], help="STEP=DIR (repeatable)")
    parser.add_argument("--policies", default="dense,topk:4,topk:8,topk:16")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "condense_curve")
    parser.add_argument("--results", default="condense_curve_smollm2")
    args = parser.parse_args()

    policies = [p for p in args.policies.split(",") if p]
    if "dense" not in policies:
        raise SystemExit("--policies must include dense (every ratio of the curve is against a dense perplexity)")
    checkpoints: dict[int, str] = {}
    for item in args.checkpoint:
        step, _, path = item.partition("=")
        if not step.isdigit() or not Path(path, "config.json").is_file():
            raise SystemExit(f"--checkpoint {item}: give STEP=DIR, DIR a saved model (config.json in it)")
        checkpoints[int(step)] = path
    config_path, log_path = args.run / "config.json", args.run / "train_log.jsonl"
    if not config_path.is_file() or not log_path.is_file():
        raise SystemExit(f"--run {args.run}: no config.json and train_log.jsonl there; give a condense run directory")
    config = json.loads(config_path.read_text())["config"]["settings"]
    tokens_per_step = config["batch_size"] * config["grad_accum"] * config["seq_len"]
    log = {row["step"]: row for row in map(json.loads, log_path.read_text().splitlines())}

    original = scored(ORIGINAL, args.work / "original", policies)
    base = original["dense"]
    rows: list[dict[str, Any]] = []
    for step in sorted(checkpoints):
        ppl = scored(checkpoints[step], args.work / f"step-{step}", policies)
        rows.append({"step": step, "tokens": step * tokens_per_step, "k": log.get(step, {}).get("k"),
                     "perplexity": ppl, "x_original_dense": {p: round(v / base, 4) for p, v in ppl.items()},
                     "x_own_dense": {p: round(v / ppl["dense"], 4) for p, v in ppl.items()}})
    result = {"run": str(args.run), "run_config": config,
              "protocol": {"text": str(WIKITEXT_TEST.relative_to(ROOT.parent)), "ctx": CTX, "windows": WINDOWS},
              "original": {"model": ORIGINAL, "perplexity": original,
                           "x_original_dense": {p: round(v / base, 4) for p, v in original.items()}},
              "curve": rows, "targets": targets(rows)}
    path = write_result(args.results, result)
    head = "| step | tokens | k trained | " + " | ".join(policies) + " |"
    lines = [head, "|---:|---:|---:|" + "---:|" * len(policies),
             "| original | 0 | – | " + " | ".join(f"×{v / base:.3f}" for v in original.values()) + " |"]
    for row in rows:
        lines.append(f"| {row['step']} | {row['tokens']} | {row['k']} | "
                     + " | ".join(f"×{v:.3f}" for v in row["x_original_dense"].values()) + " |")
    print("\n".join(lines))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
