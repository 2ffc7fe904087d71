"""Passkey retrieval accuracy per (length, depth), dense vs each decoding policy, for one model.

    .venv/bin/python benchmarks/passkey.py --model smollm2-135m --lengths 1024,2048,4096,8000 --trials 20
    .venv/bin/python benchmarks/passkey.py --model runs/condensed --out benchmarks/results/passkey_condensed.json

Policies are specs applied to every kv head or plan JSON files (for example one made from a measure profile).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from attnsparse.core.models import load_model
from attnsparse.evaluate.passkey import accuracy_table, run_passkey, save_results

DEFAULT_POLICIES = "dense,block:16:0.0625,streaming:4:1020"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--policies", default=DEFAULT_POLICIES, help="specs or plan JSON files, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "passkey.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    lengths = [int(x) for x in args.lengths.split(",")]
    if max(lengths) + 8 > loaded.max_context:
        sys.exit(f"error: length {max(lengths)} + answer exceeds the model's {loaded.max_context} tokens")
    plans = {Path(p).stem if p.endswith(".json") else p: p for p in args.policies.split(",") if p}
    results = run_passkey(loaded.model, loaded.tokenizer, plans, lengths, [float(d) for d in args.depths.split(",")],
                          trials=args.trials, seed=args.seed)
    config = vars(args)
    save_results(args.out, results, config)
    table = accuracy_table(results)
    cells = sorted({cell for row in table.values() for cell in row}, key=lambda c: tuple(float(x) for x in c.split("@")))
    lines = ["| policy | " + " | ".join(cells) + " |", "|---|" + "---:|" * len(cells)]
    for policy, row in table.items():
        lines.append(f"| {policy} | " + " | ".join(f"{row.get(c, float('nan')):.2f}" for c in cells) + " |")
    text = f"model {args.model}, {args.trials} trials per cell (length@depth)\n\n" + "\n".join(lines) + "\n"
    Path(args.out).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
