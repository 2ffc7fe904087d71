"""Wall time of `attnsparse evaluate MODEL --quick` (issue 13: under 10 minutes on 2 cores for dense plus two plans).

Runs the command as a user would (a subprocess, the model loaded from its cache, a fresh run directory) and writes
`benchmarks/results/tasks_quick.json`: the wall time, the prompt count, the accuracy rows and the target row.

    python benchmarks/tasks_quick.py --plans block:16:0.0625,streaming:4:256
    python benchmarks/tasks_quick.py --model runs/x/model --results tasks_quick_x   # a condensed model, same grid
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result

LIMIT_S = 10 * 60


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plans", default="block:16:0.0625,streaming:4:256")
    parser.add_argument("--results", default="tasks_quick", help="name of the JSON under benchmarks/results/")
    parser.add_argument("--note", default="", help="what the wall time was measured beside, if anything")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "quick"
        command = [str(Path(sys.executable).parent / "attnsparse"), "evaluate", args.model, "--quick", "--plans",
                   args.plans, "--out", str(out), "--no-progress"]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - start
        results = json.loads((out / "results.json").read_text())
        config = json.loads((out / "config.json").read_text())["config"]
    rows = results["tasks"]
    prompts = sum(r["trials"] for r in rows if r["policy"] == "dense")
    write_result(args.results, {
        "model": args.model, "note": args.note,
        "run_command": " ".join(["attnsparse", *command[1:-3], "--out", "OUT"]),
        "tasks_config": config.get("tasks"), "wall_s": round(wall, 1), "prompts": prompts, "tasks": rows,
        "targets": [{"measure": "attnsparse evaluate --quick, dense plus two plans, wall time on 2 CPU cores",
                     "target": "< 10 min", "value": f"{wall / 60:.1f} min", "met": wall < LIMIT_S}],
    })


if __name__ == "__main__":
    main()
