"""Behaviour under sparse prefill at 8K (issue 15): the task suite per depth, each sparse policy against dense.

Each depth is one `attnsparse evaluate --tasks ... --lengths L --depths D` run directory under --work (skipped when
its results.json exists, so an interrupted run goes on where it stopped; `--from DIR` adds finished run
directories of other invocations, e.g. a second policy list on the same seeded prompts). Dense runs in every
directory; its answers must agree across directories (same seed, same prompts), which is checked. Writes
benchmarks/results/<--results>.json: rows per (task, depth, policy) and one target per policy, "within one trial of
dense per cell", with the cells where dense itself is below half marked as near the floor.

    OMP_NUM_THREADS=1 python benchmarks/prefill_tasks_smollm2.py --work W --trials 5 \
        --policies blocksparse:4:0.1:mean,blocksparse:8x4:0.1:mean,blocksparse:16:0.1:mean:per=head
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnsparse.specs import split_specs
from common import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="directory of the per-depth evaluate runs")
    parser.add_argument("--policies", default="", help="sparse prefill policies (dense always runs)")
    parser.add_argument("--tasks", default="passkey,niah-multikey")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--from", dest="extra", action="append", default=[],
                        help="a finished evaluate run directory to merge (repeat)")
    parser.add_argument("--results", default="prefill_tasks_smollm2_8k_depths")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    depths = [float(d) for d in args.depths.split(",")]
    work = Path(args.work)
    runs = [_run_depth(work / f"d{depth:g}", args, depth) for depth in depths] if args.policies else []
    runs += [Path(extra) for extra in args.extra]
    rows, dense = _merge(runs)
    write_result(args.results, {
        "model": "smollm2-135m (embedded GGUF, dequantised to float32)", "prompt_form": "raw",
        "length": args.length, "runs": [str(r) for r in runs], "note": args.note,
        "rows": rows, "targets": _targets(rows, dense),
    })


def _run_depth(out: Path, args: argparse.Namespace, depth: float) -> Path:
    """One evaluate run at one depth (skipped when already finished)."""
    if not (out / "results.json").exists():
        from attnsparse.evaluate.run import evaluate
        from attnsparse.evaluate.tasks.run import TaskOptions

        options = TaskOptions(tasks=args.tasks, lengths=(args.length,), depths=(depth,), trials=args.trials,
                              retrieval=False)
        evaluate("smollm2-135m", None, 1024, ",".join(["dense", *split_specs(args.policies)]), [], str(out),
                 tasks=options, ppl=False, progress=False, overwrite=True)
    return out


def _merge(runs: list[Path]) -> tuple[list[dict], dict[tuple, int]]:
    """Every run's task rows, dense once per cell (and equal wherever it ran again)."""
    rows: list[dict] = []
    dense: dict[tuple, int] = {}
    for run in runs:
        for row in json.loads((run / "results.json").read_text())["tasks"]:
            cell = (row["task"], row["length"], row["depth"], row["trials"])
            if row["policy"] == "dense":
                if cell in dense and dense[cell] != row["correct"]:
                    raise SystemExit(f"{run}: dense {row['correct']} at {cell} differs from {dense[cell]} elsewhere")
                if cell in dense:
                    continue
                dense[cell] = row["correct"]
            rows.append({**row, "run": str(run)})
    return rows, dense


def _targets(rows: list[dict], dense: dict[tuple, int]) -> list[dict]:
    targets = []
    for policy in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "dense"):
        cells = [r for r in rows if r["policy"] == policy]
        lines, met = [], True
        for r in cells:
            reference = dense[(r["task"], r["length"], r["depth"], r["trials"])]
            met &= r["correct"] >= reference - 1
            floor = " (dense near the floor)" if reference * 2 < r["trials"] else ""
            lines.append(f"{r['task']}@{r['depth']:g}: {r['correct']}/{r['trials']} (dense {reference}){floor}")
        targets.append({"measure": f"behaviour suite at {cells[0]['length']} under sparse prefill, {policy}",
                        "target": "within one trial of dense per cell", "value": "; ".join(lines), "met": met})
    return targets


if __name__ == "__main__":
    main()
