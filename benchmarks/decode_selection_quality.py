"""Which blocks should block top-k read? Decode perplexity of block scores against exact and oracle selection.

One WikiText-2 test window of `ctx` tokens is prefilled densely; then each variant decodes the last `new` tokens
teacher-forced from its own cache and the NLL of the true tokens is compared with dense. Oracle variants rank
blocks by the true max q.k (or attention mass) of their keys, which reads every key: they show what the budget
allows, and whether a gap comes from the block score or from the budget.

    .venv/bin/python benchmarks/decode_selection_quality.py --ctx 8192 --new 48 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from attnsparse.core.data import load_windows
from attnsparse.core.models import load_model
from attnsparse.core.runs import atomic_write_json
from attnsparse.decode import cache as kvcache
from attnsparse.decode import kernels as K
from attnsparse.decode.backend import cache_from_kv, decode_backend, decode_step, prefill
from attnsparse.decode.plan import DecodePlan, HeadPolicy

Select = Callable[[kvcache.FullStore, torch.Tensor], torch.Tensor]


def oracle(kind: str) -> Select:
    """Rank blocks by the true max score (kind "max") or softmax mass (kind "mass") of their keys."""
    def select(store: kvcache.FullStore, q: torch.Tensor) -> torch.Tensor:
        n, size = store.n, store.block
        used = -(-n // size)
        scores = q @ store.keys[:, :, : used * size].transpose(-1, -2) * q.shape[-1] ** -0.5
        scores[..., n:] = float("-inf")
        if kind == "mass":
            scores = torch.softmax(scores, dim=-1)
            per_block = scores.view(*scores.shape[:-1], used, size).sum(-1).amax(-2)
        else:
            per_block = scores.view(*scores.shape[:-1], used, size).amax(-1).amax(-2)
        p = store.policy
        return K.select_blocks(per_block, p.selected_blocks(n), p.sink_blocks, p.recent_blocks)
    return select


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"))
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--window", type=int, default=1, help="which of 2 evenly spaced windows")
    parser.add_argument("--density", type=float, default=0.0625)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="", help="comma-separated subset of variant names (default: all)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_selection_quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model = loaded.model
    window = load_windows(loaded.tokenizer, args.data, args.ctx, max_context=loaded.max_context, count=2)[args.window]
    prompt, targets = window[None, : -args.new], window[None, -args.new :]
    kv, logits = prefill(model, prompt)
    mean = HeadPolicy("block", block_size=16, density=args.density)
    bound = HeadPolicy("block", block_size=16, density=args.density, score="bound")
    topk = f"topk:{int(args.density * args.ctx)}"
    variants: list[tuple[str, object, Select | None]] = [
        ("dense", "dense", None), (topk, topk, None), ("oracle max", mean, oracle("max")),
        ("oracle mass", mean, oracle("mass")), ("mean key", mean, None), ("quest bound", bound, None),
        ("mean key b8", HeadPolicy("block", block_size=8, density=args.density), None),
    ] + [(f"channels {r}", HeadPolicy("block", block_size=16, density=args.density, score="channels", channels=r), None)
         for r in (8, 16, 24, 32)]
    wanted = {v for v in args.variants.split(",") if v}
    variants = [v for v in variants if v[0] == "dense" or not wanted or v[0] in wanted]
    original = kvcache.FullStore.select
    results: dict[str, float] = {}
    with decode_backend(model):
        for name, policy, select in variants:
            kvcache.FullStore.select = select or original  # type: ignore[method-assign]
            plan = DecodePlan.uniform(policy, len(kv), kv[0][0].shape[1]) if isinstance(policy, HeadPolicy) else policy
            cache = cache_from_kv(model, kv, plan, reserve=args.ctx)  # type: ignore[arg-type]
            nll = [F.cross_entropy(logits, targets[:, 0]).item()]
            for t in range(args.new - 1):
                step = decode_step(model, cache, targets[:, t : t + 1])
                nll.append(F.cross_entropy(step, targets[:, t + 1]).item())
            results[name] = sum(nll) / len(nll)
            print(f"{name:14s} ppl {math.exp(results[name]):8.3f}  ratio {math.exp(results[name] - results['dense']):.3f}",
                  flush=True)
    kvcache.FullStore.select = original  # type: ignore[method-assign]
    if wanted and Path(args.out).is_file():  # a subset run adds its rows to the earlier ones (same dense NLL)
        earlier = json.loads(Path(args.out).read_text())
        if abs(earlier["nll"]["dense"] - results["dense"]) < 1e-6:
            results = earlier["nll"] | results
    atomic_write_json(args.out, {"config": vars(args), "nll": results,
                                 "ppl_ratio": {k: math.exp(v - results["dense"]) for k, v in results.items()}})


if __name__ == "__main__":
    main()
