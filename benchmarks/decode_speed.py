"""Decode-step attention time: dense SDPA vs each sparse decoding policy, random KV, SmolLM2-135M shapes.

One decode step = one query token through every layer's attention (30 layers, 9 query heads, 3 kv heads, head
dim 64, float32). Every policy is timed side by side in interleaved rounds over the same random KV, and the
machine's copy bandwidth is measured in the same rounds, so the ratios hold on a noisy shared machine.

    .venv/bin/python benchmarks/decode_speed.py                  # 2K, 8K, 32K, 64K -> results/decode_speed.json
    .venv/bin/python benchmarks/decode_speed.py --contexts 2048 --rounds 3   # quick

Bytes read per step are counted honestly: block summaries (or the float16 key channels scored, for score
"channels") + selected keys and values (block top-k), all keys
+ kept values (top-k), held keys and values (streaming), all keys and values (dense).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from attnsparse.core.runs import atomic_write_json, atomic_write_text, environment
from attnsparse.decode import kernels as K
from attnsparse.decode.plan import parse_head_policy
from attnsparse.decode.stores import BlockStore, FullStore, StreamStore

LAYERS, HEADS, KV_HEADS, DIM = 30, 9, 3, 64
POLICIES = ["dense", "topk:256", "block:16:0.0625", "block:16:0.0625:bound", "block:16:0.0625:channels16",
            "block:16:0.0625:channels32", "block:32:0.0625", "block:16:1024", "streaming:4:1020"]


def copy_bandwidth(src: torch.Tensor, dst: torch.Tensor) -> tuple[float, float]:
    """(copy GB/s counting read + write bytes, as STREAM does; read-only GB/s of a sum)."""
    started = time.perf_counter()
    dst.copy_(src)
    copy = time.perf_counter() - started
    started = time.perf_counter()
    src.sum()
    read = time.perf_counter() - started
    return 2 * src.numel() * 4 / copy / 1e9, src.numel() * 4 / read / 1e9


def build_layers(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, KV_HEADS, n, DIM, generator=generator),
             torch.randn(1, KV_HEADS, n, DIM, generator=generator)) for _ in range(LAYERS)]


def make_store(spec: str, keys: torch.Tensor, values: torch.Tensor) -> FullStore | StreamStore:
    """A store holding the layer's random KV under `spec` (full stores share the tensors, no copy)."""
    store = parse_head_policy(spec).store(list(range(KV_HEADS)))
    if isinstance(store, StreamStore):
        store.append(keys, values)
        return store
    store.keys, store.values, store.n = keys, values, keys.shape[2]
    if isinstance(store, BlockStore):  # the scorer's selection data for the whole context, built once
        store.selection = store.scorer.grow(store.selection, store.key_blocks(), 0)
        store.scorer.update(store.selection, store.key_blocks(), keys, 0)
    return store


def time_step(step: Callable[[], None], repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def bench_context(n: int, rounds: int, policies: list[str], bandwidth_buffers: tuple[torch.Tensor, torch.Tensor],
                  thread_counts: list[int]) -> dict[str, object]:
    kv = build_layers(n, seed=n)
    queries = torch.randn(LAYERS, 1, HEADS, 1, DIM, generator=torch.Generator().manual_seed(1))
    scale = DIM**-0.5
    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True, training=False)
    groups = HEADS // KV_HEADS
    stores = {spec: [make_store(spec, k, v) for k, v in kv] for spec in policies}

    def sdpa_step() -> None:
        for layer, (k, v) in enumerate(kv):
            sdpa_attention_forward(module, queries[layer], k, v, None, scaling=scale)

    def policy_step(spec: str) -> Callable[[], None]:
        layer_stores = stores[spec]

        def step() -> None:
            for layer, store in enumerate(layer_stores):
                store.attend(queries[layer].view(1, KV_HEADS, groups, DIM), scale)

        return step

    steps = {"sdpa": sdpa_step} | {spec: policy_step(spec) for spec in policies}
    repeats = max(1, 16384 // n)
    for step in steps.values():  # warm up
        step()
    times: dict[tuple[int, str], list[float]] = {(t, name): [] for t in thread_counts for name in steps}
    copies: dict[int, list[float]] = {t: [] for t in thread_counts}
    reads: dict[int, list[float]] = {t: [] for t in thread_counts}
    for _ in range(rounds):
        for threads in thread_counts:  # interleaved: every policy and thread count in every round
            torch.set_num_threads(threads)
            for name, step in steps.items():
                times[(threads, name)].append(time_step(step, repeats))
            copy, read = copy_bandwidth(*bandwidth_buffers)
            copies[threads].append(copy)
            reads[threads].append(read)
    machine_copy = max(statistics.median(v) for v in copies.values())
    dense_bytes = LAYERS * KV_HEADS * K.dense_bytes(n, DIM, 4)
    by_threads = {}
    for threads in thread_counts:
        sdpa_ms = statistics.median(times[(threads, "sdpa")]) * 1e3
        rows = {}
        for name in steps:
            samples = times[(threads, name)]
            ms = statistics.median(samples) * 1e3
            read = dense_bytes if name == "sdpa" else sum(s.bytes_read(groups) for s in stores[name])
            gbs = read / (ms / 1e3) / 1e9
            rows[name] = {
                "ms_per_step": round(ms, 3),
                "ms_per_layer": round(ms / LAYERS, 4),
                "bytes_per_step": int(read),
                "bytes_fraction_of_dense": round(read / dense_bytes, 4),
                "achieved_gb_s": round(gbs, 2),
                "fraction_of_copy_bandwidth": round(gbs / machine_copy, 3),
                "speedup_vs_sdpa": round(sdpa_ms / ms, 2),
                "density": round(_density(name, n), 5),
                "samples_ms": [round(x * 1e3, 3) for x in samples],
            }
        by_threads[str(threads)] = {"copy_gb_s": round(statistics.median(copies[threads]), 2),
                                    "read_gb_s": round(statistics.median(reads[threads]), 2), "policies": rows}
    return {"context": n, "copy_gb_s": round(machine_copy, 2), "repeats_per_sample": repeats, "threads": by_threads}


def _density(name: str, n: int) -> float:
    if name in ("sdpa", "dense"):
        return 1.0
    policy = parse_head_policy(name)
    if policy.kind == "topk":
        return min(policy.k, n) / n
    if policy.kind == "block":
        return min(policy.selected_blocks(n) * policy.block_size, n) / n
    return min(policy.sink + policy.window, n) / n


def markdown(results: list[dict[str, object]]) -> str:
    lines = [
        ("| context | threads | policy | density | ms/step (30 layers) | speedup vs sdpa | MB read/step | GB/s "
         "| % of copy BW |"),
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for threads, block in result["threads"].items():  # type: ignore[union-attr]
            for name, row in block["policies"].items():
                lines.append(
                    f"| {result['context']} | {threads} | {name} | {row['density']:.4f} | {row['ms_per_step']:.1f} | "
                    f"{row['speedup_vs_sdpa']:.2f}x | {row['bytes_per_step'] / 1e6:.1f} | {row['achieved_gb_s']:.1f} "
                    f"| {100 * row['fraction_of_copy_bandwidth']:.0f}% |"
                )
    copy = ", ".join(f"{r['context']}: {r['copy_gb_s']} GB/s" for r in results)
    lines.append("")
    lines.append(f"Copy bandwidth (best thread count, read + write bytes, measured between rounds): {copy}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="2048,8192,32768,65536")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", default="2,1", help="thread counts, interleaved in every round")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_speed.json"))
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    torch.set_grad_enabled(False)
    policies = [p for p in args.policies.split(",") if p]
    buffers = (torch.randn(64 * 2**20), torch.empty(64 * 2**20))  # 256 MiB each: far beyond any cache
    results = []
    for n in (int(c) for c in args.contexts.split(",")):
        result = bench_context(n, args.rounds, policies, buffers, thread_counts)
        results.append(result)
        print(f"context {n}: copy {result['copy_gb_s']} GB/s", flush=True)
        for threads, block in result["threads"].items():
            for name, row in block["policies"].items():
                print(f"  {threads}t {name:18s} {row['ms_per_step']:9.2f} ms/step  x{row['speedup_vs_sdpa']:5.2f}  "
                      f"{row['achieved_gb_s']:6.2f} GB/s ({100 * row['fraction_of_copy_bandwidth']:.0f}% copy)",
                      flush=True)
    out = Path(args.out)
    atomic_write_json(out, {
        "benchmark": "decode_speed",
        "shapes": {"layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "dtype": "float32"},
        "threads": thread_counts, "rounds": args.rounds, "cpu": platform.processor() or platform.machine(),
        "environment": environment(), "results": results,
    })
    atomic_write_text(out.with_suffix(".md"), markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
