"""End-to-end anchors for SmolLM2-135M at 2K and 8K: time to first token and decode tokens/s, side by side.

Engines, all greedy on the same token ids (a WikiText-2 test window: ctx - new prompt tokens, then `new`
generated), the same thread count for each:

- `sdpa`: transformers' default (SDPA attention, DynamicCache), a plain cached-forward loop;
- `attnsparse-dense`: `attnsparse.decode.generate.generate` with the dense plan (prefill through the attnsparse
  backend, which hands dense attention to SDPA; decode through the SparseCache and the compiled decode kernels);
- `blocksparse:B:D:EST`: the same, prefill under block-sparse attention for each registered estimator (the
  learned `gate` too when `--gate DIR` names a trained gate and the estimator is registered);
- `llama.cpp`: llama-cpp-python on the very GGUF the model is read from (Q4_1 weights, its default f16 KV cache).

Rounds are interleaved (every engine once per round and context, the order rotated each round); medians and
ranges are reported with the load average seen before each run, because the cores are shared with other jobs.
A second part times one attnsparse decode step at the largest context, split by module (attention kernel,
attention projections and cache, MLP, norms, LM head, the rest), and once with the attention kernel replaced by
a no-op of the same shapes.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/prefill_e2e.py --ctx 2048,8192 --new 64 --rounds 3

Needs the benchmark-only extra `anchors` (llama-cpp-python; built from source); without it the llama.cpp row is
skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import WIKITEXT_TEST, write_result

from attnsparse.attention.backend import sparse_attention
from attnsparse.attention.selection import ESTIMATORS
from attnsparse.core.data import load_windows
from attnsparse.core.models import embedded_gguf, load_model
from attnsparse.decode.cache import DECODE_BACKEND
from attnsparse.decode.generate import generate

Run = dict[str, Any]  # {"ttft_s", "decode_tokens_per_s", "tokens"}
Engine = Callable[[torch.Tensor, int], Run]


@torch.inference_mode()
def run_sdpa(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> Run:
    """transformers' own path: SDPA attention and a DynamicCache, one cached forward per token."""
    cache = DynamicCache(config=model.config)
    started = time.perf_counter()
    out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    ttft = time.perf_counter() - started
    tokens = [int(token)]
    started = time.perf_counter()
    for _ in range(new - 1):
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    return {"ttft_s": ttft, "decode_tokens_per_s": (new - 1) / (time.perf_counter() - started), "tokens": tokens}


def run_attnsparse(model: torch.nn.Module, prompt: torch.Tensor, new: int, prefill_policy: str) -> Run:
    """attnsparse's generate with the dense decode plan; prefill under `prefill_policy` (dense: SDPA)."""
    with sparse_attention(model, prefill_policy):
        result = generate(model, prompt, "dense", max_new_tokens=new)
    return {"ttft_s": result.prefill_seconds, "decode_tokens_per_s": result.decode_tokens_per_second,
            "tokens": result.sequences[0, prompt.shape[1]:].tolist()}


class LlamaCpp:
    """llama-cpp-python on one GGUF, one context per prompt length (built once, reset before every run)."""

    def __init__(self, gguf: Path, threads: int, contexts: list[int], batch: int, flash: bool = False) -> None:
        from llama_cpp import Llama

        self.models = {ctx: Llama(model_path=str(gguf), n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                                  n_batch=batch, n_ubatch=batch, flash_attn=flash, verbose=False)
                       for ctx in contexts}
        import llama_cpp

        self.version = llama_cpp.__version__

    def close(self) -> None:
        """Free the contexts now (llama-cpp-python's own finaliser fails at interpreter exit)."""
        for llm in self.models.values():
            llm.close()

    def run(self, prompt: torch.Tensor, new: int) -> Run:
        llm = self.models[min(c for c in self.models if c >= prompt.shape[1] + new)]
        llm.reset()  # no prefix reuse between runs: every run prefills the whole prompt
        ids = prompt[0].tolist()
        tokens: list[int] = []
        started = time.perf_counter()
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            if not tokens:
                ttft = time.perf_counter() - started
                decode_start = time.perf_counter()
            tokens.append(int(token))
            if len(tokens) == new:
                break
        return {"ttft_s": ttft, "decode_tokens_per_s": (new - 1) / (time.perf_counter() - decode_start),
                "tokens": tokens}


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def agreement(a: list[int], b: list[int]) -> int:
    """Leading generated tokens two engines agree on."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# the decode step split by module


@torch.inference_mode()
def decode_breakdown(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> dict[str, Any]:
    """One attnsparse decode step (dense plan) at len(prompt), timed whole, by module and with a no-op kernel."""
    from attnsparse.decode.backend import decode_attention, sparse_decoding

    inner = model.model
    parts: dict[str, list[torch.nn.Module]] = {
        "attention projections, RoPE, cache": [layer.self_attn for layer in inner.layers],
        "mlp": [layer.mlp for layer in inner.layers],
        "norms": [m for layer in inner.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
        + [inner.norm],
        "lm head": [model.lm_head],
        "embedding": [inner.embed_tokens],
        "rotary tables": [inner.rotary_emb],
    }
    spent: dict[str, float] = defaultdict(float)

    def hook(name: str) -> tuple[Callable[..., None], Callable[..., None]]:
        started: list[float] = []

        def pre(*_: Any) -> None:
            started.append(time.perf_counter())

        def post(*_: Any) -> None:
            spent[name] += time.perf_counter() - started.pop()
        return pre, post

    def timed_kernel(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        out = decode_attention(*args, **kwargs)
        spent["attention kernel"] += time.perf_counter() - started
        return out

    def noop_kernel(module: torch.nn.Module, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # pops the step's pending entry like the real kernel, then returns zeros of the output's shape
        from attnsparse.decode.cache import PENDING

        PENDING.pop(id(args[0]), None)
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None

    new = 3 * steps + 2
    result: dict[str, Any] = {"context": prompt.shape[1], "steps": steps}
    with sparse_decoding(model, "dense", reserve=prompt.shape[1] + new) as cache:
        out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)

        def step() -> float:
            nonlocal token
            started = time.perf_counter()
            logits = model(token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - started

        step()  # warm
        plain = [step() for _ in range(steps)]
        handles = []
        for name, modules in parts.items():
            pre, post = hook(name)
            for module in modules:
                handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        AttentionInterface.register(DECODE_BACKEND, timed_kernel)
        try:
            hooked = [step() for _ in range(steps)]
        finally:
            for handle in handles:
                handle.remove()
        AttentionInterface.register(DECODE_BACKEND, noop_kernel)
        try:
            noop = [step() for _ in range(steps)]
        finally:
            AttentionInterface.register(DECODE_BACKEND, decode_attention)
    total = sum(hooked)
    ms = {name: spent[name] / steps * 1e3 for name in ["attention kernel", *parts]}
    ms["attention projections, RoPE, cache"] -= ms["attention kernel"]  # the kernel runs inside self_attn
    ms["rest (decoder glue, residuals, masks, Python/transformers)"] = total / steps * 1e3 - sum(ms.values())
    result["step_ms"] = summary([t * 1e3 for t in plain])
    result["hooked_step_ms"] = round(total / steps * 1e3, 2)
    result["parts_ms"] = {k: round(v, 2) for k, v in ms.items()}
    result["parts_share"] = {k: round(v / (total / steps * 1e3), 3) for k, v in ms.items()}
    result["noop_attention_step_ms"] = summary([t * 1e3 for t in noop])
    result["attention_share_by_noop"] = round(1 - statistics.median(noop) / statistics.median(plain), 3)
    return result


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", default="2048,8192", help="window lengths (prompt = ctx - new), comma-separated")
    parser.add_argument("--new", type=int, default=32, help="generated tokens (the first one ends the TTFT)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; 0: the decode breakdown only")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.1, help="block density of the sparse prefill rows")
    parser.add_argument("--gate", default=None, help="a trained gate directory (attnsparse gate --out DIR)")
    parser.add_argument("--llama-batch", type=int, default=512, help="llama.cpp n_batch = n_ubatch")
    parser.add_argument("--llama-flash", action="store_true", help="also llama.cpp with flash attention on")
    parser.add_argument("--engines", default=None, help="only these rows (sdpa and attnsparse-dense always run)")
    parser.add_argument("--breakdown-steps", type=int, default=8, help="decode steps per breakdown variant; 0 skips")
    parser.add_argument("--data", default=str(WIKITEXT_TEST))
    parser.add_argument("--name", default="prefill_e2e")
    args = parser.parse_args()
    contexts = [int(c) for c in args.ctx.split(",")]
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m")
    model = loaded.model.eval()
    prompts = {ctx: load_windows(loaded.tokenizer, args.data, ctx, max_context=loaded.max_context, count=1)[:, :-args.new]
               for ctx in contexts}
    notes: list[str] = []
    engines: dict[str, Engine] = {
        "sdpa": lambda p, n: run_sdpa(model, p, n),
        "attnsparse-dense": lambda p, n: run_attnsparse(model, p, n, "dense"),
    }
    estimators = [name for name in ESTIMATORS.names() if name != "gate"]
    if args.gate and "gate" in ESTIMATORS.names():
        estimators.append(f"gate:path={args.gate}")
    elif args.gate:
        notes.append("--gate given but no 'gate' estimator is registered: gate row skipped")
    else:
        notes.append("no trained gate file given (--gate DIR): gate row skipped")
    for est in estimators:
        spec = f"blocksparse:{args.block}:{args.density:g}:{est}"
        label = spec.split(":path=")[0]  # the gate's directory is recorded once, as "gate"
        engines[label] = lambda p, n, s=spec: run_attnsparse(model, p, n, s)
    llama_version = None
    llamas: list[LlamaCpp] = []
    if importlib.util.find_spec("llama_cpp") is not None:
        for flash in (False, True) if args.llama_flash else (False,):
            llamas.append(LlamaCpp(embedded_gguf(), args.threads, contexts, args.llama_batch, flash))
            engines["llama.cpp+flash-attn" if flash else "llama.cpp"] = llamas[-1].run
        llama_version = llamas[0].version
    else:
        notes.append("llama-cpp-python not installed (pip install -e '.[anchors]'): llama.cpp row skipped")
    if args.engines:
        keep = {"sdpa", "attnsparse-dense", *args.engines.split(",")}  # the two references always run
        engines = {name: run for name, run in engines.items() if name in keep}

    names = list(engines)
    runs: dict[int, dict[str, list[Run]]] = {ctx: {name: [] for name in names} for ctx in contexts}
    for name in names if args.rounds else []:  # one untimed warm-up run each (kernel builds, llama.cpp graphs)
        engines[name](prompts[min(contexts)][:, -256:], 2)
    result: dict[str, Any] = {
        "model": "smollm2-135m: the embedded GGUF (Q4_1); attnsparse and transformers dequantise it to float32, "
                 "llama.cpp runs the Q4_1 weights as they are",
        "weights_bytes": {"attnsparse/transformers float32": weight_bytes(model),
                          "gguf file": embedded_gguf().stat().st_size},
        "data": "WikiText-2 test, the first window of each length; prompt = ctx - new tokens, greedy generation",
        "contexts": contexts, "new": args.new, "rounds": args.rounds, "threads": args.threads,
        "gate": args.gate,
        "llama_cpp": {"version": llama_version, "n_batch": args.llama_batch, "kv_cache": "f16 (default)",
                      "flash_attn": "off (llama-cpp-python's default)"
                      + ("; the +flash-attn row on" if args.llama_flash else "")} if llama_version else None,
        "load": "2 CPU cores shared with other jobs of this session (load average per run recorded): absolute "
                "times are inflated and noisy; the ratios are measured side by side in interleaved rounds",
        "notes": notes,
    }
    if args.breakdown_steps:  # first, so a run cut short still has it
        result["decode_breakdown"] = decode_breakdown(model, prompts[max(contexts)], args.breakdown_steps)
        print(result["decode_breakdown"], flush=True)
        if not args.rounds:  # --rounds 0: the breakdown alone
            result["targets"] = breakdown_targets(result["decode_breakdown"])
            print("wrote", write_result(args.name, result))
            return
    for r in range(args.rounds):
        for ctx in contexts:
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                load = os.getloadavg()[0]
                run = engines[name](prompts[ctx], args.new)
                run["load_1min"] = load
                runs[ctx][name].append(run)
                print(f"round {r} ctx {ctx} {name}: ttft {run['ttft_s']:.2f} s, "
                      f"{run['decode_tokens_per_s']:.2f} tok/s (load {load:.1f})", flush=True)
        table = tabulate(runs, names)  # written after every round: a run cut short keeps what it measured
        result |= {"rounds_done": r + 1, "results": table, "targets": targets(table, max(contexts), args.density),
                   "runs": {str(ctx): {name: [{k: v for k, v in x.items() if k != "tokens"} for x in rs]
                                       for name, rs in by.items()} for ctx, by in runs.items()}}
        path = write_result(args.name, result)
    for llama in llamas:
        llama.close()
    print(markdown(table))
    print("wrote", path)


def tabulate(runs: dict[int, dict[str, list[Run]]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per context and engine: medians and ranges, ratios to SDPA, tokens agreeing with attnsparse dense."""
    table: dict[str, dict[str, Any]] = {}
    for ctx, by in runs.items():
        base_ttft = statistics.median(x["ttft_s"] for x in by["sdpa"])
        base_tps = statistics.median(x["decode_tokens_per_s"] for x in by["sdpa"])
        reference = by["attnsparse-dense"][0]["tokens"]
        rows = {}
        for name in names:
            ttft = [x["ttft_s"] for x in by[name]]
            tps = [x["decode_tokens_per_s"] for x in by[name]]
            rows[name] = {
                "ttft_s": summary(ttft), "decode_tokens_per_s": summary(tps),
                "ttft_speedup_vs_sdpa": round(base_ttft / statistics.median(ttft), 3),
                "decode_speedup_vs_sdpa": round(statistics.median(tps) / base_tps, 3),
                "tokens_agreeing_with_attnsparse_dense": agreement(by[name][0]["tokens"], reference),
                "load_1min": summary([x["load_1min"] for x in by[name]]),
            }
        table[str(ctx)] = rows
    return table


def targets(table: dict[str, dict[str, Any]], ctx: int, density: float) -> list[dict[str, Any]]:
    rows = table[str(ctx)]
    out = []
    sparse = {k: v for k, v in rows.items() if k.startswith("blocksparse")}
    if sparse:
        best = max(sparse, key=lambda k: sparse[k]["ttft_speedup_vs_sdpa"])
        out.append({"measure": f"time to first token at {ctx} vs SDPA (density {density:g} of causal block pairs, "
                               "best estimator, whole forward + first token)", "target": ">= 1.5x",
                    "value": sparse[best]["ttft_speedup_vs_sdpa"], "best": best,
                    "met": sparse[best]["ttft_speedup_vs_sdpa"] >= 1.5})
    llamas = {k: v for k, v in rows.items() if k.startswith("llama.cpp")}
    if llamas:
        fastest = max(llamas, key=lambda k: llamas[k]["decode_tokens_per_s"]["median"])
        ours = rows["attnsparse-dense"]["decode_tokens_per_s"]["median"]
        theirs = llamas[fastest]["decode_tokens_per_s"]["median"]
        out.append({"measure": f"decode tokens/s at {ctx} vs llama.cpp on the same GGUF (attnsparse dense decode "
                               f"/ {fastest})", "target": "measured; state the gap and what closes it",
                    "value": round(ours / theirs, 3), "attnsparse_tokens_per_s": ours,
                    "llama_cpp_tokens_per_s": theirs, "met": True})
    return out


def breakdown_targets(breakdown: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's llama.cpp row asks what the decode step is made of: attention's share, two ways."""
    return [{"measure": f"attnsparse dense decode step at {breakdown['context']}: attention's share (step time "
                        "without it, a no-op kernel of the same shapes; by module hooks: the kernel alone)",
             "target": "measured (issue 15: the per-token cost of attnsparse's decode, attention vs the rest)",
             "value": {"by_noop": breakdown["attention_share_by_noop"],
                       "kernel_by_hooks": breakdown["parts_share"]["attention kernel"]}, "met": True}]


def markdown(table: dict[str, dict[str, Any]]) -> str:
    head = ("| ctx | engine | TTFT s (median, range) | TTFT vs SDPA | decode tok/s (median, range) | "
            "decode vs SDPA | tokens = dense |")
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|"]
    for ctx, rows in table.items():
        for name, row in rows.items():
            t, d = row["ttft_s"], row["decode_tokens_per_s"]
            lines.append(f"| {ctx} | {name} | {t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f}) | "
                         f"{row['ttft_speedup_vs_sdpa']:.2f}x | {d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f}) | "
                         f"{row['decode_speedup_vs_sdpa']:.2f}x | {row['tokens_agreeing_with_attnsparse_dense']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
