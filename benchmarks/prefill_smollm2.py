"""Block-sparse prefill on SmolLM2-135M at 8K (issue 15, item 1): perplexity, attention time and time to first token.

1. Whole-window perplexity of a few 8K WikiText-2 test windows: dense (transformers' SDPA) and
   `blocksparse:64:D:EST` for each estimator (1 thread: quality only).
2. Attention time of one layer's prefill at 8K (SmolLM2's shapes: 9 query heads, 3 kv heads, head dim 64; the q, k,
   v of layer `--layer` of the first window), SDPA (is_causal, GQA) vs selection + kernel, interleaved rounds.
3. Time to first token: one full 8K forward with SDPA (the model's default implementation) vs each sparse policy,
   interleaved rounds, same thread count.

    OMP_NUM_THREADS=2 python benchmarks/prefill_smollm2.py --windows 2 --rounds 3

`--parts attention` (or any comma list of ppl, attention, ttft) runs only those parts and writes
`prefill_smollm2_ctx{ctx}_{parts}.json` beside the full run's file; `--blocks 4,8,16,64 --estimators mean` compares
block sizes (the file name gains `_blocks4-8-16-64`, and `_EST` for estimators beside mean and the default three);
`--blocks 64x4,64x8` splits query and key blocks; `--estimators exact` selects with the true block masses (the
oracle: what the selection rule costs apart from estimation error).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import WIKITEXT_TEST, earlier_dense_perplexity, write_result

from attnsparse.attention.backend import sparse_attention
from attnsparse.attention.blockattend import block_sparse_attention
from attnsparse.attention.policies import parse_policy
from attnsparse.core.data import load_windows
from attnsparse.core.models import load_model
from attnsparse.evaluate.perplexity import perplexity

ESTIMATORS = ("mean", "antidiag", "vslash")
PARTS = ("ppl", "attention", "ttft")
DEFAULT_BLOCK = 64


def _stats(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "rounds": len(times)}


def capture_layer(model: torch.nn.Module, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, ...]:
    """q, k, v (post-RoPE) of one layer's attention call for `ids`: the backend's dense path hands them to SDPA."""
    from attnsparse.attention import backend

    seen: dict[str, torch.Tensor] = {}
    original = backend.sdpa_attention_forward

    def spy(module, query, key, value, *rest, **kw):
        if getattr(module, "layer_idx", None) == layer:
            seen.update(q=query.detach().clone(), k=key.detach().clone(), v=value.detach().clone())
        return original(module, query, key, value, *rest, **kw)

    backend.sdpa_attention_forward = spy
    try:
        with torch.no_grad(), sparse_attention(model, "dense"):
            model(ids, logits_to_keep=1)
    finally:
        backend.sdpa_attention_forward = original
    return seen["q"], seen["k"], seen["v"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--data", default=str(WIKITEXT_TEST))
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--blocks", default=str(DEFAULT_BLOCK),
                        help="comma list of block sizes: B, or QxK for queries in blocks of Q and keys in blocks of K")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS),
                        help="comma list of estimators (';' between them when their keywords hold commas)")
    parser.add_argument("--results", default=None, help="result file name (default: from the parts, blocks and "
                                                         "estimators)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ttft-rounds", type=int, default=2)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="threads for the timing parts (SDPA uses the same)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma list of ppl, attention, ttft")
    parser.add_argument("--dense-from", default=None,
                        help="an earlier result JSON of the same ctx, windows and data: reuse its dense perplexity")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        parser.error(f"--parts {args.parts}: a comma list of {', '.join(PARTS)}")

    loaded = load_model("smollm2-135m")
    model = loaded.model.eval()
    windows = load_windows(loaded.tokenizer, args.data, args.ctx, count=args.windows)
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]  # B or QxK (queries in Q, keys in K)
    separator = ";" if ";" in args.estimators else ","  # ';' when an estimator's keywords hold commas
    estimators = [e.strip() for e in args.estimators.split(separator) if e.strip()]
    policies = [parse_policy(f"blocksparse:{b}:{args.density:g}:{e}") for b in blocks for e in estimators]
    result: dict = {"ctx": args.ctx, "windows": args.windows, "blocks": blocks, "density": args.density,
                    "model": "smollm2-135m (embedded GGUF Q4_1, dequantised to float32)",
                    "data": "WikiText-2 test, evenly spaced windows", "data_path": args.data,
                    "noise": "2 shared CPU cores, other jobs running: timings are noisy; ratios are side by side",
                    "parts": parts}

    if "ppl" in parts:
        torch.set_num_threads(1)
        dense_ppl = earlier_dense_perplexity(args.dense_from, args.ctx, args.windows, args.data) if args.dense_from else \
            perplexity(model, windows, parse_policy("dense"), progress=False).perplexity
        rows = {"dense": {"perplexity": dense_ppl, "density": 1.0}}
        if args.dense_from:
            rows["dense"]["from"] = args.dense_from
        for policy in policies:
            fresh = parse_policy(policy.spec)  # its own achieved-density counter
            r = perplexity(model, windows, fresh, progress=False)
            rows[policy.spec] = {"perplexity": r.perplexity, "ratio": r.perplexity / dense_ppl,
                                 "density": fresh.density(args.ctx)}
            print(policy.spec, rows[policy.spec], flush=True)
        result["perplexity"] = rows

    torch.set_num_threads(args.threads)
    if "attention" in parts:
        result["attention"] = _attention(model, windows[:1], policies, args.layer, args.rounds)
        print(result["attention"], flush=True)
    if "ttft" in parts:
        result["ttft"] = _ttft(model, windows[:1], policies, args.ttft_rounds)
        print(result["ttft"], flush=True)
    result["threads"] = {"perplexity": 1, "timing": args.threads}
    result["targets"] = _targets(result)
    name = f"prefill_smollm2_ctx{args.ctx}" + ("" if parts == list(PARTS) else "_" + "_".join(parts))
    if blocks != [str(DEFAULT_BLOCK)]:
        name += "_blocks" + "-".join(blocks)
    if estimators != ["mean"] and estimators != list(ESTIMATORS):  # earlier files: the default set, or mean
        name += "_" + "-".join(e.replace(":", "").replace("=", "") for e in estimators)
    print("wrote", write_result(args.results or name, result))


def _attention(model: torch.nn.Module, ids: torch.Tensor, policies: list, layer: int, rounds: int) -> dict:
    """One layer's prefill attention: SDPA against selection + kernel per policy, interleaved rounds."""
    q, k, v = capture_layer(model, ids, layer)
    scaling = q.shape[-1] ** -0.5
    attention: dict[str, list[float]] = {"sdpa": [], **{p.spec: [] for p in policies}}
    selection: dict[str, list[float]] = {p.spec: [] for p in policies}
    for _ in range(rounds):
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        attention["sdpa"].append(time.perf_counter() - start)
        for policy in policies:
            start = time.perf_counter()
            kept = policy.prepare(q, k, scaling=scaling, layer_idx=layer)
            chosen = time.perf_counter()
            block_sparse_attention(q, k, v, kept.blocks, kept.grid, scaling)
            attention[policy.spec].append(time.perf_counter() - start)
            selection[policy.spec].append(chosen - start)
    sdpa = statistics.median(attention["sdpa"])
    out: dict = {name: {**_stats(t), "speedup_vs_sdpa": sdpa / statistics.median(t),
                        **({"selection": _stats(selection[name])} if name in selection else {})}
                 for name, t in attention.items()}
    out["layer"] = layer
    return out


def _ttft(model: torch.nn.Module, ids: torch.Tensor, policies: list, rounds: int) -> dict:
    """Time to first token: a full forward with SDPA against each sparse policy, interleaved rounds."""
    ttft: dict[str, list[float]] = {"sdpa": [], **{p.spec: [] for p in policies}}
    with torch.no_grad():
        for _ in range(rounds):
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            ttft["sdpa"].append(time.perf_counter() - start)
            for policy in policies:
                with sparse_attention(model, policy):
                    start = time.perf_counter()
                    model(ids, logits_to_keep=1)
                    ttft[policy.spec].append(time.perf_counter() - start)
    base = statistics.median(ttft["sdpa"])
    return {name: {**_stats(t), "speedup_vs_sdpa": base / statistics.median(t)} for name, t in ttft.items()}


def _targets(result: dict) -> list[dict]:
    rows = []
    sparse = {k: v for k, v in result.get("perplexity", {}).items() if k != "dense"}
    if sparse:
        best = min(sparse, key=lambda k: sparse[k]["ratio"])
        value = sparse[best]["ratio"]
        rows.append({"measure": f"whole-window perplexity at {result['ctx']} under sparse prefill, density <= 10% "
                                "of causal block pairs, x dense (best estimator)",
                     "target": "<= 1.02", "value": round(value, 4), "best": best, "met": value <= 1.02})
    att = {k: v for k, v in result.get("attention", {}).items() if k not in ("sdpa", "layer")}
    if att:
        best = max(att, key=lambda k: att[k]["speedup_vs_sdpa"])
        rows.append({"measure": f"prefill attention time at {result['ctx']}, density <= 10%, vs SDPA (one layer, "
                                "selection included)", "target": ">= 4x",
                     "value": round(att[best]["speedup_vs_sdpa"], 2), "best": best,
                     "met": att[best]["speedup_vs_sdpa"] >= 4})
    tt = {k: v for k, v in result.get("ttft", {}).items() if k != "sdpa"}
    if tt:
        best = max(tt, key=lambda k: tt[k]["speedup_vs_sdpa"])
        rows.append({"measure": f"time to first token at {result['ctx']} vs SDPA", "target": ">= 1.5x",
                     "value": round(tt[best]["speedup_vs_sdpa"], 2), "best": best,
                     "met": tt[best]["speedup_vs_sdpa"] >= 1.5})
    if sparse and att:
        both = [k for k in sparse if k in att and sparse[k]["ratio"] <= 1.02 and att[k]["speedup_vs_sdpa"] >= 4]
        rows.append({"measure": f"one configuration with perplexity <= x1.02 and attention >= 4x at {result['ctx']}",
                     "target": "some policy meets both", "value": both or "none", "met": bool(both)})
    return rows


if __name__ == "__main__":
    main()
