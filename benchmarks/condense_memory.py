"""Benchmark: peak memory and step time of a condense run, with and without --gradient-checkpointing.

Each arm is a short run of a preset (`attnsparse condense ... --steps N`) in its own process, so its peak resident
set (ru_maxrss of the child) is its own; arms alternate over --rounds. Step time is the median of the logged steps
after the first (the first also loads the teacher and builds the graph). Writes benchmarks/results/<--results>.json
and prints a Markdown table. Usage:

    .venv/bin/python benchmarks/condense_memory.py [--preset smollm2-keep-all-top8-2k] [--seq-lens 2048,4096] \
        [--steps 3] [--rounds 1] [--plain-seq-lens 2048]   # the plain arm only where it fits in memory
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, write_result

DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def one_run(preset: str, seq_len: int, steps: int, recompute: bool, work: Path) -> dict[str, Any]:
    """Run the preset for `steps` steps in a child process; its peak RSS and step times."""
    out = work / f"{seq_len}-{'ckpt' if recompute else 'plain'}-{time.monotonic_ns()}"
    command = [sys.executable, "-c", "from attnsparse.cli.app import main; main()", "condense", "smollm2-135m",
               "--preset", preset, "--data", str(DATA), "--seq-len", str(seq_len), "--steps", str(steps),
               "--save-steps", str(steps), "--out", str(out), "--no-progress",
               "--gradient-checkpointing" if recompute else "--no-gradient-checkpointing"]
    with (out.parent / f"{out.name}.log").open("w") as log_file:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage: its peak resident set
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = (out.parent / f"{out.name}.log").read_text().strip().splitlines()[-1:]
        return {"seq_len": seq_len, "recompute": recompute, "failed": child.returncode, "tail": tail}
    peak_kib = usage.ru_maxrss
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    elapsed = [row["elapsed_s"] for row in log]
    steps_s = [b - a for a, b in itertools.pairwise(elapsed)]
    return {"seq_len": seq_len, "recompute": recompute, "wall_s": round(wall, 1),
            "peak_rss_gib": round(peak_kib / 2**20, 2),
            "step_s": [round(s, 1) for s in steps_s], "median_step_s": round(statistics.median(steps_s), 1),
            "loss": [round(row["loss"], 5) for row in log]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-keep-all-top8-2k")
    parser.add_argument("--seq-lens", default="2048,4096")
    parser.add_argument("--plain-seq-lens", default="2048", help="lengths where the plain arm also runs")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--results", default="condense_memory_smollm2")
    args = parser.parse_args()
    lengths = [int(x) for x in args.seq_lens.split(",")]
    plain = {int(x) for x in args.plain_seq_lens.split(",") if x}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for recompute in (True, False):
                for seq_len in lengths:
                    if recompute or seq_len in plain:
                        rows.append(one_run(args.preset, seq_len, args.steps, recompute, Path(tmp)))
                        print(json.dumps(rows[-1]), flush=True)
    table = ["| seq len | gradient checkpointing | peak RSS (GiB) | median step (s) |", "|---:|---|---:|---:|"]
    for row in rows:
        if "failed" not in row:
            table.append(f"| {row['seq_len']} | {'on' if row['recompute'] else 'off'} | {row['peak_rss_gib']} | "
                         f"{row['median_step_s']} |")
    print("\n".join(table))
    write_result(args.results, {"preset": args.preset, "steps": args.steps, "rounds": args.rounds, "runs": rows,
                                "note": "peak RSS is the ru_maxrss of each run's own process (os.wait4); step times exclude step 1"})


if __name__ == "__main__":
    main()
