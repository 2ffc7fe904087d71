"""Benchmark: does a condensed SmolLM2 keep the model? Perplexity against the ORIGINAL's dense, two domains, behaviour.

For the original and each condensed model directory (any `condense` run's `model/` or checkpoint):

1. perplexity on WikiText-2 test (ctx 1024, 8 evenly spaced windows) and on a text of another domain that no recipe
   trains on (`builtin:test`, the Python language reference, ctx 1024, 4 windows), dense and the prefill policies;
2. passkey at the given lengths and depths, dense decoding and the deployed sparse decode plans (prefill dense);
3. every ratio against the original model's dense perplexity on the same protocol, and the issue-14 targets.

Each evaluation is cached under --work/<name>/ (an interrupted run resumes). Writes benchmarks/results/<--results>.json
(with a `targets` list) and prints a Markdown table. Usage:

    .venv/bin/python benchmarks/condense_keep.py --model keep16=runs/keep16/condense/model [--model ...] \
        [--lengths 1024,4096] [--depths 0.1,0.5,0.9] [--trials 10] [--results condense_keep_smollm2] \
        [--original-from benchmarks/results/condense_keep_smollm2_budget16.json]   # reuse its original rows
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import ROOT, WIKITEXT_TEST, write_result

ORIGINAL = "smollm2-135m"
DOMAINS = {"wikitext-test": (str(WIKITEXT_TEST), 8), "builtin-test": ("builtin:test", 4)}


def text_perplexities(spec: str, text: str, windows: int, ctx: int, policies: list[str], out: Path) -> dict[str, float]:
    """policy -> perplexity on `windows` evenly spaced windows of `text` (an `evaluate` run cached in `out`, redone
    when it lacks an asked policy)."""
    from attnsparse.evaluate.run import evaluate

    def cached() -> dict[str, float]:
        if not (out / "results.json").is_file():
            return {}
        return {row["policy"]: row["perplexity"] for row in json.loads((out / "results.json").read_text())["rows"]}

    if not all(p in cached() for p in policies):
        evaluate(spec, text, ctx, policies, [windows], out, overwrite=True)
    return cached()


def perplexities(spec: str, work: Path, policies: list[str], ctx: int) -> dict[str, dict[str, float]]:
    """domain -> policy -> perplexity (each domain one cached `evaluate` run)."""
    return {domain: text_perplexities(spec, text, windows, ctx, policies, work / f"eval_{domain}")
            for domain, (text, windows) in DOMAINS.items()}


def passkey(spec: str, work: Path, plans: list[str], lengths: list[int], depths: list[float],
            trials: int) -> dict[str, dict[str, float]]:
    """policy -> "length@depth" -> accuracy (one dense prefill per prompt, every plan decodes from it)."""
    from attnsparse.core.models import load_model
    from attnsparse.core.runs import atomic_write_json
    from attnsparse.evaluate.passkey import accuracy_table, run_passkey

    out = work / "passkey.json"
    key = {"plans": plans, "lengths": lengths, "depths": depths, "trials": trials}
    if out.is_file() and json.loads(out.read_text()).get("key") == key:
        return json.loads(out.read_text())["accuracy"]
    loaded = load_model(spec)
    results = run_passkey(loaded.model, loaded.tokenizer, {p: p for p in plans}, lengths, depths, trials=trials)
    accuracy = accuracy_table(results)
    atomic_write_json(out, {"key": key, "accuracy": accuracy})
    return accuracy


def stored_original(path: Path, policies: list[str], plans: list[str], lengths: list[int], depths: list[float],
                    trials: int) -> dict[str, Any]:
    """The original model's rows of an earlier result, when its protocol is this run's (else a one-line exit)."""
    import sys

    stored = json.loads(path.read_text())
    asked = {"lengths": lengths, "depths": depths, "trials": trials, "plans": plans}
    original = stored["models"]["original"]
    missing = [p for p in policies if any(p not in row for row in original["perplexity"].values())]
    if stored["protocol"]["passkey"] != asked or missing or set(original["perplexity"]) != set(DOMAINS):
        sys.exit(f"error: --original-from {path}: its passkey protocol {stored['protocol']['passkey']} is not this "
                 f"run's {asked}, or it lacks the policies {missing}; measure the original instead (drop the option)")
    return {"model": original["model"], "passkey": original["passkey"],
            "perplexity": {domain: {p: row[p] for p in policies} for domain, row in original["perplexity"].items()}}


def targets(original: dict[str, Any], model: dict[str, Any], sparse_plan: str, trials: int) -> list[dict[str, Any]]:
    """Issue 14's rows that this protocol measures, each {measure, target, value, met}."""
    rows: list[dict[str, Any]] = []
    wiki = original["perplexity"]["wikitext-test"]["dense"]
    for policy, limit in (("topk:16", 1.02), ("topk:8", 1.04), ("dense", 1.01)):
        value = model["perplexity"]["wikitext-test"][policy] / wiki
        rows.append({"measure": f"WikiText-2 test ctx 1024 (8 windows), {policy}, x original dense",
                     "target": f"<= {limit}", "value": round(value, 4), "met": value <= limit})
        other = model["perplexity"]["builtin-test"][policy] / original["perplexity"]["builtin-test"]["dense"]
        rows.append({"measure": f"other domain (builtin:test, 4 windows), {policy}, x original dense",
                     "target": f"within +0.02 of the WikiText ratio ({value + 0.02:.4f})", "value": round(other, 4),
                     "met": other <= value + 0.02})
    budgets = [p for p in model["perplexity"]["wikitext-test"] if p.startswith("budget:")]
    for policy in budgets:
        value = model["perplexity"]["wikitext-test"][policy] / wiki
        rows.append({"measure": f"WikiText-2 test, per-head allocation {policy}, x original dense",
                     "target": "<= 1.01", "value": round(value, 4), "met": value <= 1.01})
    for plan in ("dense", sparse_plan):
        cells = original["passkey"].get(plan, {})
        worst = min((round((model["passkey"][plan][cell] - cells[cell]) * trials) for cell in cells), default=None)
        rows.append({"measure": f"passkey under {plan}, every length@depth cell, trials x (model - original)",
                     "target": ">= -1", "value": worst, "met": worst is not None and worst >= -1})
    return rows


def markdown(models: dict[str, dict[str, Any]]) -> str:
    original = models["original"]
    lines = ["| model | domain | " + " | ".join(original["perplexity"]["wikitext-test"]) + " |",
             "|---|---|" + "---|" * len(original["perplexity"]["wikitext-test"])]
    for name, model in models.items():
        for domain, row in model["perplexity"].items():
            base = original["perplexity"][domain]["dense"]
            cells = " | ".join(f"{ppl:.2f} (×{ppl / base:.3f})" for ppl in row.values())
            lines.append(f"| {name} | {domain} | {cells} |")
    lines += ["", "| model | policy | " + " | ".join(next(iter(original["passkey"].values()))) + " |",
              "|---|---|" + "---|" * len(next(iter(original["passkey"].values())))]
    for name, model in models.items():
        for policy, cells in model["passkey"].items():
            lines.append(f"| {name} | {policy} | " + " | ".join(f"{v:.2f}" for v in cells.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=DIR of a condensed model (repeatable)")
    parser.add_argument("--policies", default="dense,topk:8,topk:16", help="prefill policies (and budget:FILE)")
    parser.add_argument("--plans", default="dense,block:16:0.0625:channels32", help="passkey decode plans")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "condense_keep")
    parser.add_argument("--results", default="condense_keep_smollm2")
    parser.add_argument("--note", default="")
    parser.add_argument("--original-from", type=Path, default=None,
                        help="a committed result of this script whose original-model rows are reused (same passkey "
                             "protocol, every asked policy present) instead of measuring the original again")
    args = parser.parse_args()

    policies = [p for p in args.policies.split(",") if p]
    plans = [p for p in args.plans.split(",") if p]
    lengths = [int(v) for v in args.lengths.split(",")]
    depths = [float(v) for v in args.depths.split(",")]
    specs = {"original": ORIGINAL} | dict(item.split("=", 1) for item in args.model)
    models: dict[str, dict[str, Any]] = {}
    if args.original_from is not None:
        models["original"] = stored_original(args.original_from, policies, plans, lengths, depths, args.trials)
    for name, spec in specs.items():
        if name in models:
            continue
        work = args.work / name
        models[name] = {"model": spec,
                        "perplexity": perplexities(spec, work, policies, args.ctx),
                        "passkey": passkey(spec, work, plans, lengths, depths, args.trials)}
    result = {
        "benchmark": "condense_keep_smollm2",
        "note": args.note,
        "original_from": None if args.original_from is None else str(args.original_from),
        "protocol": {"perplexity": {d: {"text": t, "windows": w, "ctx": args.ctx} for d, (t, w) in DOMAINS.items()},
                     "passkey": {"lengths": lengths, "depths": depths, "trials": args.trials, "plans": plans}},
        "models": models,
        "targets": {name: targets(models["original"], model, plans[-1], args.trials)
                    for name, model in models.items() if name != "original"},
    }
    path = write_result(args.results, result)
    print(markdown(models))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
