"""End-to-end decoding of SmolLM2-135M at long context: tokens/s and next-token NLL, dense vs sparse policies.

For each window of WikiText-2 test (ctx tokens), the first ctx - new tokens are prefilled once (dense, as every
plan prefills), then every variant decodes the remaining `new` tokens teacher-forced from its own copy of that
KV: one cached forward per token, exactly the work of generation. Steps are interleaved across variants, so
the tokens/s ratios are measured side by side. The NLL of the true next tokens shows what each policy costs in
quality at that context (a decode-time perplexity over the generated positions).

    .venv/bin/python benchmarks/decode_e2e.py --ctx 8192 --new 32 --windows 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from attnsparse.core.data import load_windows
from attnsparse.core.models import load_model
from attnsparse.core.runs import atomic_write_json, atomic_write_text, environment
from attnsparse.decode.backend import decode_backend
from attnsparse.decode.generate import cache_from_kv, decode_step, prefill

DEFAULT_POLICIES = "dense,block:16:0.0625,block:16:1024,streaming:4:1020"
BASELINE = "sdpa+DynamicCache"


def dynamic_from_kv(model: torch.nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    for layer_idx, (keys, values) in enumerate(kv):
        cache.update(keys.clone(), values.clone(), layer_idx)
    return cache


def dynamic_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.inference_mode()
def run_window(model: torch.nn.Module, window: torch.Tensor, new: int, variants: list[str],
               plans: dict[str, str], thread_counts: list[int]) -> dict[str, dict[str, object]]:
    prompt, targets = window[None, :-new], window[None, -new:]
    started = time.perf_counter()
    kv, logits = prefill(model, prompt)
    prefill_s = time.perf_counter() - started
    caches: dict[str, object] = {}
    for name in variants:
        caches[name] = dynamic_from_kv(model, kv) if name == BASELINE else cache_from_kv(
            model, kv, plans[name], reserve=window.numel())
    first_nll = F.cross_entropy(logits, targets[:, 0]).item()
    stats = {name: {"nll": [first_nll]} | {f"ms_{t}t": [] for t in thread_counts} for name in variants}
    held = {name: dynamic_bytes(c) if name == BASELINE else c.held_bytes() for name, c in caches.items()}  # type: ignore[union-attr]
    read = {name: None if name == BASELINE else c.bytes_read_per_step() for name, c in caches.items()}  # type: ignore[union-attr]
    with decode_backend(model):
        for t in range(new - 1):
            threads = thread_counts[t % len(thread_counts)]  # thread counts alternate step by step
            torch.set_num_threads(threads)
            for name in variants:
                if name == BASELINE:
                    model.set_attn_implementation("sdpa")
                token = targets[:, t : t + 1]
                started = time.perf_counter()
                step_logits = decode_step(model, caches[name], token)
                stats[name][f"ms_{threads}t"].append((time.perf_counter() - started) * 1e3)
                stats[name]["nll"].append(F.cross_entropy(step_logits, targets[:, t + 1]).item())
                if name == BASELINE:
                    model.set_attn_implementation("attnsparse-decode")
    return {name: {"prefill_s": prefill_s, "kv_bytes_held": held[name], "attention_bytes_per_step": read[name]} | s
            for name, s in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"))
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--policies", default=DEFAULT_POLICIES, help="specs or plan JSON files, comma-separated")
    parser.add_argument("--threads", default="2,1", help="thread counts, alternating step by step")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_e2e.json"))
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(max(thread_counts))
    loaded = load_model(args.model)
    model = loaded.model
    windows = load_windows(loaded.tokenizer, args.data, args.ctx, max_context=loaded.max_context, count=args.windows)
    plans = {Path(p).stem if p.endswith(".json") else p: p for p in args.policies.split(",") if p}
    variants = [BASELINE] + list(plans)
    runs = []
    for i, window in enumerate(windows):
        torch.set_num_threads(max(thread_counts))
        runs.append(run_window(model, window, args.new, variants, plans, thread_counts))
        print(f"window {i}: prefill {runs[-1][BASELINE]['prefill_s']:.1f} s", flush=True)
    summary: dict[str, dict[str, object]] = {}
    base_nll = statistics.fmean(x for run in runs for x in run[BASELINE]["nll"])
    for name in variants:
        nll = statistics.fmean(x for run in runs for x in run[name]["nll"])
        row: dict[str, object] = {
            "nll": round(nll, 5), "ppl": round(math.exp(nll), 4), "ppl_ratio_vs_dense": round(math.exp(nll - base_nll), 4),
            "kv_bytes_held": runs[0][name]["kv_bytes_held"],
            "kv_held_fraction_of_dense": round(runs[0][name]["kv_bytes_held"] / runs[0][BASELINE]["kv_bytes_held"], 4),
            "attention_bytes_per_step": runs[0][name]["attention_bytes_per_step"],
        }
        for t in thread_counts:
            base_ms = statistics.median(x for run in runs for x in run[BASELINE][f"ms_{t}t"])
            ms = statistics.median(x for run in runs for x in run[name][f"ms_{t}t"])
            row[f"{t}t"] = {"ms_per_token": round(ms, 2), "tokens_per_s": round(1e3 / ms, 2),
                            "speedup_vs_dense": round(base_ms / ms, 2)}
        summary[name] = row
    head = " | ".join(f"{t}t ms/token | {t}t tokens/s | {t}t speedup" for t in thread_counts)
    lines = [f"| variant | {head} | decode ppl | ppl ratio | KV MB held |",
             "|---|" + "---:|" * (3 * len(thread_counts) + 3)]
    for name, row in summary.items():
        cells = " | ".join(f"{row[f'{t}t']['ms_per_token']:.1f} | {row[f'{t}t']['tokens_per_s']:.2f} | "  # type: ignore[index]
                           f"{row[f'{t}t']['speedup_vs_dense']:.2f}x" for t in thread_counts)  # type: ignore[index]
        lines.append(f"| {name} | {cells} | {row['ppl']:.3f} | {row['ppl_ratio_vs_dense']:.4f} | "
                     f"{int(row['kv_bytes_held']) / 1e6:.0f} |")  # type: ignore[call-overload]
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    atomic_write_json(out, {"benchmark": "decode_e2e", "model": args.model, "ctx": args.ctx, "new": args.new,
                            "windows": args.windows, "threads": thread_counts, "summary": summary, "runs": runs,
                            "environment": environment()})
    atomic_write_text(out.with_suffix(".md"), table)


if __name__ == "__main__":
    main()
