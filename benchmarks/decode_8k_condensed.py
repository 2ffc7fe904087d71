"""Benchmark: decoding a condensed model at 8K, against the ORIGINAL model's dense decode on the same windows.

Runs (or reuses, when --work already holds its finished results of this protocol) `attnsparse evaluate MODEL --data
WikiText-2 test --ctx 8192 --policies dense --windows 4 --plans block:16:0.0625,block:16:0.0625:channels32
--decode-tokens 64` (which adds the plan:dense row), takes the original model's rows of the same protocol from
benchmarks/results/long_context_ppl.json (runs original_8192 and original_8192_channels32) and writes
benchmarks/results/<--results>.json with the issue-14 decode targets. Usage:

    .venv/bin/python benchmarks/decode_8k_condensed.py --model keepAllTop8At2k=runs/x/condense/model \
        [--work runs/decode8k_x] [--results decode_8k_condensed_x]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, ROOT, WIKITEXT_TEST, write_result

CTX, WINDOWS, DECODE_TOKENS = 8192, 4, 64
PLANS = ["dense", "block:16:0.0625", "block:16:0.0625:channels32"]
ORIGINAL_RUNS = ("original_8192", "original_8192_channels32")


def decode_rows(rows: list[dict], where: str) -> dict[str, float]:
    """policy -> perplexity of the decode rows of `rows`, after checking they follow this protocol."""
    if any(row["ctx"] != CTX or row["windows"] != WINDOWS for row in rows):
        raise SystemExit(f"{where}: not ctx {CTX} x {WINDOWS} windows; rerun it with this protocol")
    return {row["policy"]: row["perplexity"] for row in rows if row["tokens"] == WINDOWS * DECODE_TOKENS}


def original_decode(path: Path) -> dict[str, float]:
    """policy -> perplexity of the original model's decode rows in `path` (long_context_ppl.json's layout)."""
    runs = json.loads(path.read_text())["runs"]
    table: dict[str, float] = {}
    for name in ORIGINAL_RUNS:
        table.update(decode_rows(runs[name]["rows"], f"{path} run {name}"))
    return table


def main() -> None:
    from attnsparse.evaluate.run import evaluate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="NAME=DIR of a condensed model")
    parser.add_argument("--work", default=None, help="evaluate's output directory (reused when finished)")
    parser.add_argument("--original-from", default=str(RESULTS / "long_context_ppl.json"))
    parser.add_argument("--results", default=None, help="results name (default decode_8k_condensed_NAME)")
    args = parser.parse_args()
    if "=" not in args.model:
        raise SystemExit(f"--model {args.model}: give NAME=DIR, e.g. keep=runs/keep/condense/model")
    name, spec = args.model.split("=", 1)
    original = original_decode(Path(args.original_from))  # checked before any work
    work = Path(args.work or ROOT / "runs" / f"decode8k_{name}")
    if not (work / "results.json").is_file():
        evaluate(spec, str(WIKITEXT_TEST), CTX, ["dense"], [WINDOWS], work, overwrite=True, plans=PLANS[1:],
                 decode_tokens=DECODE_TOKENS)
    rows = json.loads((work / "results.json").read_text())["rows"]
    ppl = decode_rows(rows, str(work / "results.json"))
    if missing := [p for p in PLANS if f"plan:{p}" not in ppl]:
        raise SystemExit(f"{work}: no decode rows for {', '.join(missing)}; remove it or give another --work")
    base = original["plan:dense"]
    ratios = {f"plan:{p}": round(ppl[f"plan:{p}"] / base, 4) for p in PLANS}
    own = {f"plan:{p}": round(ppl[f"plan:{p}"] / ppl["plan:dense"], 4) for p in PLANS[1:]}
    original_ratios = {f"plan:{p}": round(original[f"plan:{p}"] / base, 4) for p in PLANS[1:]}
    targets = [
        {"measure": f"decode at 8K, {p}, condensed {name}, x original dense decode ({WINDOWS} windows x "
                    f"{DECODE_TOKENS} tokens)", "target": "<= 1.01", "value": ratios[f"plan:{p}"],
         "met": ratios[f"plan:{p}"] <= 1.01}
        for p in PLANS[1:]
    ]
    path = write_result(args.results or f"decode_8k_condensed_{name}", {
        "benchmark": "decode_8k_condensed", "model": f"{name}={spec}",
        "protocol": {"data": str(WIKITEXT_TEST.relative_to(ROOT.parent)), "ctx": CTX, "windows": WINDOWS,
                     "decode_tokens": DECODE_TOKENS, "plans": PLANS},
        "original": f"{Path(args.original_from).name} runs {', '.join(ORIGINAL_RUNS)}",
        "rows": rows, "ratios_to_original_dense_decode": ratios, "ratios_to_own_dense_decode": own,
        "original_ratios": original_ratios, "targets": targets,
    })
    print(f"| plan | {name} x original dense decode | x own dense decode | original x its dense decode |")
    print("|---|---:|---:|---:|")
    for p in PLANS:
        key = f"plan:{p}"
        print(f"| {p} | x{ratios[key]:.3f} | x{own.get(key, 1.0):.3f} | x{original_ratios.get(key, 1.0):.3f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
