"""Benchmark: decoding a condensed model at 8K, against the ORIGINAL model's dense decode on the same windows.

Runs (or reuses, when --work already holds its results) `attnsparse evaluate MODEL --data WikiText-2 test --ctx 8192
--policies dense --windows 4 --plans block:16:0.0625,block:16:0.0625:channels32 --decode-tokens 64` (plus its plan:dense row), then takes
the original model's rows of the same protocol from benchmarks/results/long_context_ppl.json (runs original_8192 and
original_8192_channels32) and writes benchmarks/results/<--results>.json with the issue-14 decode targets. Usage:

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


def original_decode(path: Path) -> dict[str, float]:
    """policy -> perplexity of the original model's decode rows (same ctx, windows and decode tokens)."""
    runs = json.loads(path.read_text())["runs"]
    table: dict[str, float] = {}
    for name in ORIGINAL_RUNS:
        run = runs[name]
        if run["ctx"] != CTX or any(row["windows"] != WINDOWS for row in run["rows"]):
            raise SystemExit(f"{path}: run {name} is not ctx {CTX} x {WINDOWS} windows; rerun the original")
        table.update({row["policy"]: row["perplexity"] for row in run["rows"] if row["tokens"] == WINDOWS * DECODE_TOKENS})
    return table


def main() -> None:
    from attnsparse.evaluate.run import evaluate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="NAME=DIR of a condensed model")
    parser.add_argument("--work", default=None, help="evaluate's output directory (reused when finished)")
    parser.add_argument("--original-from", default=str(RESULTS / "long_context_ppl.json"))
    parser.add_argument("--results", default=None, help="results name (default decode_8k_condensed_NAME)")
    args = parser.parse_args()
    name, spec = args.model.split("=", 1)
    original = original_decode(Path(args.original_from))  # checked before any work
    work = Path(args.work or ROOT / "runs" / f"decode8k_{name}")
    if not (work / "results.json").is_file():
        evaluate(spec, str(WIKITEXT_TEST), CTX, ["dense"], [WINDOWS], work, overwrite=True, plans=PLANS[1:],
                 decode_tokens=DECODE_TOKENS)
    rows = json.loads((work / "results.json").read_text())["rows"]
    ppl = {row["policy"]: row["perplexity"] for row in rows}
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
