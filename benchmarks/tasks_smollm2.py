"""Benchmark: the long-context task suite on the original SmolLM2-135M under dense and sparse decode plans.

Grid: tasks x lengths x depths x trials (default the full one: 5 tasks x 1K/2K/4K/8K x 0.1/0.5/0.9 x 20). Every
prompt is prefilled once, densely, and answered under each plan from that prefill (docs/tasks.md):

- `dense`, `block:16:0.0625` (mean key), `block:16:0.0625:channels32`;
- `streaming-heads`: a plan from a measure profile, its streaming kv heads on `--streaming`, the rest block:16:0.0625;
- `protect-N-POLICY` (one per `--protect`, e.g. `4@block:16:0.25`): the N kv heads with the best retrieval scores of
  the profile on POLICY, the other heads' block budget chosen at each length so the plan reads the same share of
  dense KV bytes per decode step as uniform block:16:0.0625 (`plan_from_profile(..., average_density=...)`);
- `all-streaming`: `--streaming` on every head.

The profile (`--profile`, or one measured into --work: WikiText-2 valid when present, else builtin, ctx 1024, 4
windows, `--retrieval` with 2 trials on seed-1 prompts, so heads are chosen on other prompts than they are tested on)
gives the streaming classes and the retrieval scores. Each (task, length, depth) cell is measured `--chunk` trials
at a time (trials 0..c-1, c..2c-1, ...; a trial's prompt depends only on its index), each chunk cached under
--work/cells/: an interrupted run continues where it stopped, and a grid measured at fewer trials is extended by its
later chunks alone (`--seed-from` its JSON, whose `chunks` list every chunk). A cell with chunks still missing is
reported at the trials it has and listed in `missing_cells` with them; a run over part of a grid already in its --results
file is refused before any work (writing would drop the other cells). Writes benchmarks/results/<--results>.json (rows,
densities, retrieval-score summaries, `targets`/`notes` marking tasks where the original itself is near the floor)
and prints Markdown tables. Usage:

    .venv/bin/python benchmarks/tasks_smollm2.py [--lengths 1024,4096] [--depths 0.5] [--trials 5] \
        [--tasks passkey,common-words] [--no-retrieval] [--work runs/tasks_smollm2] [--results tasks_smollm2] \
        [--seed-from benchmarks/results/tasks_smollm2.json]   # an earlier run's cells, checked against this profile
        [--trials 20 --chunk 10]   # measure 10 trials a cell at a time; with --seed-from a 10-trial run, only 10-19
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import RESULTS, ROOT, WIKITEXT_VALID, write_result

UNIFORM = "block:16:0.0625"
FLOOR = 0.2  # dense accuracy below this: the original itself is near the floor on that task


def parse_args() -> argparse.Namespace:
    from attnsparse.evaluate.tasks.run import ALL_TASKS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default=ALL_TASKS)
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=None,
                        help="trials measured and cached together (default --trials); must divide --trials")
    parser.add_argument("--no-retrieval", action="store_true", help="skip the per-head retrieval scores of the grid")
    parser.add_argument("--profile", default=None, help="measure profile.json with retrieval scores")
    parser.add_argument("--streaming", default="streaming:4:252", help="policy of streaming heads")
    parser.add_argument("--protect", default="4@block:16:0.25,1@dense",
                        help="protected plans, N@POLICY each: the N best kv heads by retrieval score on POLICY")
    parser.add_argument("--threshold", type=float, default=0.1, help="retrieval score of a retrieval head")
    parser.add_argument("--work", default=str(ROOT / "runs" / "tasks_smollm2"))
    parser.add_argument("--results", default="tasks_smollm2")
    parser.add_argument("--seed-from", default=None,
                        help="an earlier results JSON of this script: its chunks enter --work/cells (its chunk size must "
                             "be this run's, and its profile's retrieval heads this profile's, since they decide the plans)")
    parser.add_argument("--cached-only", action="store_true",
                        help="report only the cells already in --work/cells (a partial grid, listed as such)")
    args = parser.parse_args()
    args.chunk = args.chunk or args.trials
    if args.trials < 1 or args.chunk < 1 or args.trials % args.chunk:
        parser.error(f"--chunk {args.chunk} must be >= 1 and divide --trials {args.trials}")
    return args


def ensure_profile(args: argparse.Namespace, loaded: Any, work: Path) -> Path:
    """The given profile, or one measured (with retrieval scores) into work/profile/."""
    from attnsparse.measure.run import measure

    if args.profile:
        return Path(args.profile)
    out = work / "profile"
    if not (out / "profile.json").is_file() or json.loads((out / "config.json").read_text())["status"] != "finished":
        data = str(WIKITEXT_VALID) if WIKITEXT_VALID.is_file() else None
        measure(loaded, data, ctx=1024, windows=4, out=out, overwrite=True, retrieval=True, retrieval_trials=2,
                retrieval_threshold=args.threshold)
    return out / "profile.json"


def build_plans(args: argparse.Namespace, profile: Any, lengths: list[int], shape: dict[str, int],
                plan_dir: Path) -> tuple[dict[int, dict[str, str]], dict[str, dict[int, float]], list[str]]:
    """Per length: name -> plan spec or JSON file; per name and length its density; one line per plan not feasible."""
    from attnsparse.decode.plan import DecodePlan, plan_density, plan_from_profile
    from attnsparse.errors import AttnsparseError

    layers, kv_heads, head_dim, itemsize, groups = (shape[k] for k in ("layers", "kv_heads", "head_dim", "itemsize",
                                                                         "groups"))
    plan_dir.mkdir(parents=True, exist_ok=True)
    streaming_plan = plan_from_profile(profile, UNIFORM, args.streaming)
    streaming_plan.save(plan_dir / "streaming-heads.json")
    fixed = {"block:16:0.0625": DecodePlan.uniform(UNIFORM, layers, kv_heads),
             "block:16:0.0625:channels32": DecodePlan.uniform("block:16:0.0625:channels32", layers, kv_heads),
             "streaming-heads": streaming_plan,
             "all-streaming": DecodePlan.uniform(args.streaming, layers, kv_heads)}
    specs = {"block:16:0.0625": UNIFORM, "block:16:0.0625:channels32": "block:16:0.0625:channels32",
             "streaming-heads": str(plan_dir / "streaming-heads.json"), "all-streaming": args.streaming}
    plans: dict[int, dict[str, str]] = {}
    density: dict[str, dict[int, float]] = {"dense": dict.fromkeys(lengths, 1.0)}
    skipped = []
    for n in lengths:
        plans[n] = dict(specs)
        for name, plan in fixed.items():
            density.setdefault(name, {})[n] = plan_density(plan, n, head_dim, itemsize, groups)
        target = density["block:16:0.0625"][n]
        for item in args.protect.split(","):
            count, _, policy = item.partition("@")
            name = f"protect-{count}-{policy}"
            try:
                plan = plan_from_profile(profile, UNIFORM, None, protect=int(count), protected=policy,
                                         average_density=target, context=n, head_dim=head_dim, itemsize=itemsize,
                                         groups=groups)
            except AttnsparseError as error:
                skipped.append(f"{name} at {n}: {error}")
                continue
            path = plan_dir / f"{name.replace(':', '_')}_{n}.json"
            plan.save(path)
            plans[n][name] = str(path)
            density.setdefault(name, {})[n] = plan_density(plan, n, head_dim, itemsize, groups)
    return plans, density, skipped


def run_cell(loaded: Any, task: str, length: int, depth: float, first: int, trials: int, plans: dict[str, str],
             retrieval: bool, cells: Path, cached_only: bool = False) -> dict[str, Any] | None:
    """Trials first..first+trials-1 of one (task, length, depth) cell under every plan, cached by their settings
    (None: not cached, `cached_only`)."""
    from attnsparse.core.runs import atomic_write_json
    from attnsparse.evaluate.tasks.run import prepare_tasks, run_grid

    key = _cell_key(task, length, depth, first, trials, retrieval, plans)
    path = _cell_path(cells, task, length, depth, key)
    if path.is_file():
        return json.loads(path.read_text())
    if cached_only:
        return None
    grid = prepare_tasks(loaded.model, loaded.tokenizer, [task], [length], [depth], trials,
                         plans=list(plans.values()), retrieval=retrieval, first_trial=first)
    started = time.perf_counter()
    result = run_grid(loaded.model, loaded.tokenizer, grid, progress=False)
    names = {f"plan:{Path(spec).name}" if spec.endswith(".json") else f"plan:{spec}": name
             for name, spec in plans.items()} | {"dense": "dense"}
    record = {"key": key, "seconds": round(time.perf_counter() - started, 1),
              "rows": [{"task": r.task, "length": r.length, "depth": r.depth, "policy": names[r.policy],
                        "trials": r.trials, "correct": r.correct, "accuracy": r.accuracy} for r in result.rows],
              "retrieval": None}
    if result.retrieval is not None and result.retrieval.samples:
        record["retrieval"] = {"samples": sum(result.retrieval.samples.values()),
                               "sum": (result.retrieval.mean() * sum(result.retrieval.samples.values())).tolist()}
    atomic_write_json(path, record)
    return record


def seed_cells(previous_path: Path, profile: Any, chunk: int, plans: dict[int, dict[str, str]], retrieval: bool,
               cells: Path, first_depth: float) -> int:
    """Write the chunks of an earlier run's results into the cache under this run's keys; how many were new.

    A results file without a `chunks` list measured every cell in one chunk of its grid's trials.
    """
    from attnsparse.core.runs import atomic_write_json

    previous = json.loads(previous_path.read_text())
    heads = previous["retrieval"]["profile"]["measured"].get("heads_above")
    chunks = previous.get("chunks") or [
        {"task": row["task"], "length": row["length"], "depth": row["depth"], "first_trial": 0,
         "trials": previous["grid"]["trials"], "rows": [row]} for row in previous["rows"]]
    sizes = {c["trials"] for c in chunks}
    if sizes != {chunk} or heads != profile.data.get("retrieval", {}).get("heads_above"):
        sys.exit(f"error: --seed-from {previous_path}: its chunks of {sorted(sizes)} trials or its retrieval heads "
                 f"({heads}) differ from this run's ({chunk}, {profile.data.get('retrieval', {}).get('heads_above')}); "
                 "give --chunk its chunk size, or measure again: its plans would not be this run's")
    grouped: dict[tuple, list[dict[str, Any]]] = {}
    for item in chunks:
        # a task without a depth (common-words) is cached under the run's first depth, as run_cell is called
        depth = first_depth if item["depth"] is None else item["depth"]
        grouped.setdefault((item["task"], item["length"], depth, item["first_trial"]), []).extend(item["rows"])
    written = 0
    for (task, length, depth, first), rows in grouped.items():
        if length not in plans:
            continue
        key = _cell_key(task, length, depth, first, chunk, retrieval, plans[length])
        path = _cell_path(cells, task, length, depth, key)
        if not path.is_file():
            atomic_write_json(path, {"key": key, "rows": rows, "retrieval": None, "seeded_from": previous["command"]})
            written += 1
    return written


def _cell_key(task: str, length: int, depth: float, first: int, trials: int, retrieval: bool,
              plans: dict[str, str]) -> dict[str, Any]:
    return {"task": task, "length": length, "depth": depth, "first_trial": first, "trials": trials,
            "retrieval": retrieval, "plans": {name: _plan_key(spec) for name, spec in plans.items()}}


def _cell_path(cells: Path, task: str, length: int, depth: float, key: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cells / f"{task.replace(':', '_')}_{length}_{depth}_{digest}.json"


def _plan_key(spec: str) -> Any:
    return json.loads(Path(spec).read_text())["heads"] if spec.endswith(".json") else spec


def score_summary(scores: list[list[float]], threshold: float) -> dict[str, Any]:
    """Which heads score at least `threshold`, per layer, and the best ones."""
    heads = [(layer, head, s) for layer, row in enumerate(scores) for head, s in enumerate(row)]
    above = [(layer, head, round(s, 4)) for layer, head, s in heads if s >= threshold]
    per_layer = {}
    for layer, head, _ in above:
        per_layer.setdefault(str(layer), []).append(head)
    best = sorted(heads, key=lambda x: -x[2])[:10]
    return {"threshold": threshold, "heads_above": len(above), "heads_total": len(heads), "per_layer": per_layer,
            "top10": [{"layer": layer, "head": head, "score": round(s, 4)} for layer, head, s in best]}


def refuse_dropping_cells(results: str, todo: list[tuple[str, int, float]], no_depth: set[str]) -> None:
    """Stop, before any work, when --results names a file holding cells outside this run's grid: writing it would
    drop them (a run over one length would leave only that length in the results)."""
    path = RESULTS / f"{results}.json"
    if not path.is_file():
        return
    grid = {(task, n, None if task in no_depth else depth) for task, n, depth in todo}
    held = {(row["task"], row["length"], row["depth"]) for row in json.loads(path.read_text()).get("rows", [])}
    dropped = sorted({n for _, n, _ in held - grid})
    if dropped:
        sys.exit(f"error: --results {results}: {path} holds cells outside this run's grid (lengths {dropped}), which "
                 f"writing it would drop; write this run under another --results name, or report the whole grid "
                 f"(all its --lengths and --tasks) with --cached-only and --seed-from {path}")


def sum_chunks(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One cell's rows from its chunks' rows: per policy, correct and trials summed."""
    summed: dict[str, dict[str, Any]] = {}
    for rows in parts:
        for row in rows:
            into = summed.setdefault(row["policy"], {**row, "trials": 0, "correct": 0})
            into["trials"] += row["trials"]
            into["correct"] += row["correct"]
    return [{**row, "accuracy": row["correct"] / row["trials"]} for row in summed.values()]


def aggregate(rows: list[dict[str, Any]], by: tuple[str, ...]) -> dict[tuple, tuple[int, int]]:
    out: dict[tuple, tuple[int, int]] = {}
    for row in rows:
        k = tuple(row[name] for name in by)
        correct, total = out.get(k, (0, 0))
        out[k] = (correct + row["correct"], total + row["trials"])
    return out


def main() -> None:
    import torch

    from attnsparse.core.models import ModelShape, load_model
    from attnsparse.evaluate.tasks.base import parse_tasks
    from attnsparse.measure.profile import ProfileView
    from attnsparse.specs import split_list

    args = parse_args()
    tasks = [t.spec for t in parse_tasks(args.tasks)]
    lengths = list(split_list(args.lengths, "--lengths", int))
    depths = list(split_list(args.depths, "--depths", float))
    no_depth = {t.spec for t in parse_tasks(tasks) if not t.uses_depth}
    # Length outermost: an interrupted run has covered every task at the short lengths first.
    todo = [(task, n, d) for n in lengths for task in tasks for d in (depths[:1] if task in no_depth else depths)]
    refuse_dropping_cells(args.results, todo, no_depth)
    work = Path(args.work)
    loaded = load_model(args.model)
    shape = ModelShape.of(loaded.model)
    facts = {"layers": shape.need("layers"), "kv_heads": shape.need("kv_heads"), "head_dim": shape.need("head_dim"),
             "itemsize": next(loaded.model.parameters()).element_size(),
             "groups": shape.need("heads") // shape.need("kv_heads")}
    profile_path = ensure_profile(args, loaded, work)
    profile = ProfileView.read_json(profile_path)
    plans, density, skipped = build_plans(args, profile, lengths, facts, work / "plans")
    cells = work / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    if args.seed_from:
        seeded_count = seed_cells(Path(args.seed_from), profile, args.chunk, plans, not args.no_retrieval, cells,
                                  depths[0])
        print(f"seeded {seeded_count} chunks from {args.seed_from}", flush=True)
    rows: list[dict[str, Any]] = []
    chunks: list[dict[str, Any]] = []  # every measured chunk, so a later run can extend this grid (--seed-from)
    retrieval_sum, retrieval_samples = None, 0
    missing, seeded = [], []
    for index, (task, n, depth) in enumerate(todo):
        records = {first: run_cell(loaded, task, n, depth, first, args.chunk, plans[n], not args.no_retrieval, cells,
                                   args.cached_only) for first in range(0, args.trials, args.chunk)}
        present = {first: r for first, r in records.items() if r is not None}
        measured = len(present) * args.chunk
        if measured < args.trials:
            missing.append({"task": task, "length": n, "depth": depth, "trials_measured": measured})
        if not present:
            continue
        cell_rows = sum_chunks([r["rows"] for r in present.values()])
        rows += cell_rows
        for first, record in present.items():
            chunks.append({"task": task, "length": n, "depth": cell_rows[0]["depth"], "first_trial": first,
                           "trials": args.chunk, "rows": record["rows"]})
            if record.get("seeded_from"):
                seeded.append({"task": task, "length": n, "depth": depth, "first_trial": first,
                               "from": record["seeded_from"]})
            if record["retrieval"]:
                part = torch.tensor(record["retrieval"]["sum"])
                retrieval_sum = part if retrieval_sum is None else retrieval_sum + part
                retrieval_samples += record["retrieval"]["samples"]
        print(f"[{index + 1}/{len(todo)}] {task} {n} {depth}: " + ", ".join(
            f"{r['policy']} {r['correct']}/{r['trials']}" for r in cell_rows), flush=True)
    names = list(dict.fromkeys(r["policy"] for r in rows))
    by_task = aggregate(rows, ("policy", "task"))
    by_length = aggregate(rows, ("policy", "length"))
    dense_task_length = aggregate([r for r in rows if r["policy"] == "dense"], ("task", "length"))
    notes, floor = [], []
    for task in tasks:
        correct, total = by_task.get(("dense", task), (0, 0))
        if total == 0:
            continue  # not measured (a partial grid lists it under missing_cells)
        accuracy = correct / total
        low = [n for n in lengths if (task, n) in dense_task_length
               and dense_task_length[(task, n)][0] / max(dense_task_length[(task, n)][1], 1) < FLOOR]
        near_floor = accuracy < FLOOR
        floor.append({"task": task, "dense_accuracy": round(accuracy, 4), "near_floor": near_floor,
                        "lengths_near_floor": low})
        if near_floor or low:
            notes.append(f"{task}: the original under dense scores {accuracy:.2f} overall"
                         + (f", below {FLOOR} at lengths {low}" if low else "")
                         + "; plan differences there say little about the plans")
    profile_scores = [[h.retrieval_score for h in profile.per_head[layer * profile.heads:(layer + 1) * profile.heads]]
                      for layer in range(profile.layers)]
    retrieval = {"definition": "docs/tasks.md#retrieval-scores",
                 "profile": {"path": str(profile_path), "measured": profile.data.get("retrieval", {})}
                 | (score_summary(profile_scores, args.threshold) if profile_scores[0][0] is not None else {})}
    if retrieval_sum is not None:
        retrieval["grid"] = {"samples": retrieval_samples}
        retrieval["grid"] |= score_summary((retrieval_sum / retrieval_samples).tolist(), args.threshold)
    protection = {}
    for name in names:
        if name.startswith("protect-"):
            protection[name] = {task: round(by_task[(name, task)][0] / max(by_task[(name, task)][1], 1)
                                            - by_task[("block:16:0.0625", task)][0]
                                            / max(by_task[("block:16:0.0625", task)][1], 1), 4)
                                for task in tasks if (name, task) in by_task}
    write_result(args.results, {
        "model": args.model, "grid": {"tasks": tasks, "lengths": lengths, "depths": depths, "trials": args.trials},
        "plans": {n: plans[n] for n in lengths}, "density": density, "plans_skipped": skipped,
        "rows": rows, "retrieval": retrieval,
        "protection_minus_uniform": protection,
        "floor": floor, "notes": notes,
        "partial": bool(missing), "missing_cells": missing,
        "seeded_cells": seeded,  # chunks measured by an earlier run (--seed-from), with its command
        "chunks": chunks,
        "targets": [{"measure": "issue-13 grid measured: 5 tasks x 1K/2K/4K/8K x 3 depths, 20 trials, every plan",
                     "target": "every cell at 20 trials",
                     "value": f"{len(todo) - len(missing)} of {len(todo)} cells (lengths {lengths}) at {args.trials} "
                              "trials" + (f"; the other {len(missing)} at " + ", ".join(
                                  f"{t} trials: {c}" for t, c in sorted(Counter(m["trials_measured"] for m in missing)
                                                                         .items())) if missing else ""),
                     "met": not missing and args.trials >= 20 and set(lengths) >= {1024, 2048, 4096, 8192}}],
        "command": "python benchmarks/tasks_smollm2.py " + " ".join(sys.argv[1:]),
    })
    print(markdown(names, tasks, lengths, by_task, by_length, density))
    for line in notes + skipped:
        print(f"- {line}")
    if missing:
        print(f"- partial: {len(missing)} of {len(todo)} cells short of {args.trials} trials (missing_cells in the JSON)")


def markdown(names: list[str], tasks: list[str], lengths: list[int], by_task: dict, by_length: dict,
             density: dict[str, dict[int, float]]) -> str:
    def cell(table: dict, k: tuple) -> str:
        correct, total = table.get(k, (0, 0))
        return f"{correct / total:.2f} ({correct}/{total})" if total else "-"

    lines = ["| plan | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    lines += [f"| {name} | " + " | ".join(cell(by_task, (name, t)) for t in tasks) + " |" for name in names]
    lines += ["", "| plan | " + " | ".join(f"{n} (density)" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    lines += [f"| {name} | " + " | ".join(f"{cell(by_length, (name, n))} ({density.get(name, {}).get(n, float('nan')):.3f})"
                                          for n in lengths) + " |" for name in names]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
