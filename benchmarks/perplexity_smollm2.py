"""Dense (and optional sparse) perplexity of SmolLM2-135M on WikiText-2 test: whole set or M evenly spaced windows.

    python benchmarks/perplexity_smollm2.py --ctx 1024                  # whole test set, non-overlapping
    python benchmarks/perplexity_smollm2.py --ctx 1024 --windows 8      # the 8-window reference protocol
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WIKITEXT_TEST, write_result

from attnsparse.attention.policies import parse_policies
from attnsparse.core.data import load_windows
from attnsparse.core.models import load_model
from attnsparse.evaluate.perplexity import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=None, help="evenly spaced windows; default: whole set")
    parser.add_argument("--policies", default="dense")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    batches = load_windows(loaded.tokenizer, str(WIKITEXT_TEST), args.ctx, max_context=loaded.max_context,
                           count=args.windows)
    rows = []
    for policy in parse_policies(args.policies):
        started = time.perf_counter()
        result = perplexity(loaded.model, batches, policy)
        rows.append({"policy": result.policy, "perplexity": result.perplexity, "mean_nll": result.mean_nll,
                     "tokens_scored": result.tokens, "density": result.density,
                     "seconds": time.perf_counter() - started})
        print(f"{result.policy:>14}  ppl {result.perplexity:.3f}  density {result.density:.4f}", flush=True)
    dense = next((r["perplexity"] for r in rows if r["policy"] == "dense"), None)
    for row in rows:
        row["ratio_to_dense"] = row["perplexity"] / dense if dense else None
    protocol = "whole test set, non-overlapping windows" if args.windows is None else (
        f"{args.windows} evenly spaced windows (window i starts at i*floor(len/{args.windows}))")
    name = args.name or f"perplexity_smollm2_ctx{args.ctx}_" + ("whole" if args.windows is None else f"w{args.windows}")
    path = write_result(name, {
        "model": "smollm2-135m (embedded GGUF Q4_1, dequantised to float32)",
        "data": "wikitext-2 test.txt (shared/data)",
        "ctx": args.ctx, "protocol": protocol, "windows": int(batches.shape[0]),
        "scoring": "each window scores its last ctx-1 tokens; perplexity = exp(total NLL / tokens scored)",
        "results": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
