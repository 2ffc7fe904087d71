"""The main job's result as a benchmark record: a finished `attnsparse run` directory -> benchmarks/results/NAME.json.

Reads OUT/summary.json (before, after, verdict, stage_seconds) and OUT/config.json (the job's settings) and adds the
issue-14 target rows for the main job: top-8 at most half of the original's excess over its own dense, dense within
x1.01 of the original, passkey at 1K kept (>= 19 of 20, scaled to the trials run), and 15 minutes in all.

    .venv/bin/python benchmarks/main_job.py runs/main --name main_job_smollm2_anchored --run-command "..." \
        [--note "..."]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import write_result

from attnsparse.pipeline import STAGES

WALL_LIMIT_S = 15 * 60


def targets(summary: dict[str, Any], k: int = 8) -> list[dict[str, Any]]:
    """The main-job rows of issue 14's target table, from a summary.json."""
    before, after = summary["before"], summary["after"]
    policy = f"topk:{k}"
    original_excess = before["perplexity"][policy] / before["perplexity"]["dense"]
    own = after["perplexity"][policy] / after["perplexity"]["dense"]
    dense = after["perplexity"]["dense"] / before["perplexity"]["dense"]
    half = 1 + (original_excess - 1) / 2
    rows = [
        {"measure": f"main job: top-{k} own-dense ratio on held-out text (original x{original_excess:.3f})",
         "target": f"<= x{half:.3f}", "value": round(own, 4), "met": own <= half},
        {"measure": "main job: condensed dense perplexity x original dense", "target": "<= x1.01",
         "value": round(dense, 4), "met": dense <= 1.01},
    ]
    passkey = after.get("tasks", {}).get("passkey", {})
    if passkey:
        cells = {name: tuple(cell) for name, cell in passkey.items()}  # policy -> (correct, trials)
        worst = min(correct / trials for correct, trials in cells.values())
        shown = " / ".join(f"{name} {c}/{t}" for name, (c, t) in cells.items())
        rows.append({"measure": "main job: passkey 1K, condensed (dense and the decode plan)", "target": ">= 19/20",
                     "value": shown, "met": worst >= 19 / 20})
    seconds = summary.get("stage_seconds") or {}
    untimed = [stage for stage in STAGES if stage not in seconds]
    total = sum(seconds.values())
    value = (f"{total / 60:.1f} min" if not untimed else
             f"not measured end to end: {', '.join(untimed)} reused or untimed; the timed stages took {total / 60:.1f} min")
    rows.append({"measure": "main job wall time on 2 CPU cores (sum of the stage times)", "target": "<= 15 min",
                 "value": value, "met": not untimed and total <= WALL_LIMIT_S})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", help="a finished `attnsparse run` directory")
    parser.add_argument("--name", required=True, help="results file name (without .json)")
    parser.add_argument("--run-command", required=True, help="the attnsparse run command that made OUT")
    parser.add_argument("--note", default="", help="what a reader must know about the run (load, reuse)")
    args = parser.parse_args()
    out = Path(args.out)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    settings = json.loads((out / "config.json").read_text(encoding="utf-8"))
    condense = json.loads((out / "condense" / "config.json").read_text(encoding="utf-8"))
    k = int(condense["config"]["settings"]["k"])
    result = {"run_command": args.run_command, "note": args.note, "preset": summary["preset"],
              "settings": settings.get("config"), "condense": condense["config"]["settings"],
              "before": summary["before"], "after": summary["after"], "verdict": summary["verdict"],
              "stage_seconds": summary.get("stage_seconds"), "targets": targets(summary, k)}
    print("wrote", write_result(args.name, result))
    for row in result["targets"]:
        print(f"{row['measure']}: {row['value']} ({row['target']}, {'met' if row['met'] else 'missed'})")


if __name__ == "__main__":
    main()
