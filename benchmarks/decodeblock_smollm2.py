"""Training matched to decoding on SmolLM2-135M (issue 14): what the `decodeblock` forward costs, and that it matches.

1. Step time of a sparse-aware condensation step at 1024 tokens (q/k projections trainable, tail-loss observer,
   LM loss, forward + backward) under exact `topk:16` and under `decodeblock:16:0.0625` (and its channels32
   variant): rounds interleaved, medians and ranges, one thread.
2. The match at real scale: one WikiText-2 test window, prefill logits under `decodeblock:16:0.0625` against
   decoding the same tokens one by one under `block:16:0.0625` (max |logit difference|, NLL of each, and the
   dense prefill's NLL for scale).

    OMP_NUM_THREADS=1 python benchmarks/decodeblock_smollm2.py --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from attnsparse.attention.backend import sparse_attention
from attnsparse.condense.losses import CondensationRegularizer
from attnsparse.core.data import load_windows
from attnsparse.core.models import load_model
from attnsparse.decode.backend import sparse_decoding
from attnsparse.decode.generate import decode_step
from common import WIKITEXT_TEST, write_result

POLICIES = ("topk:16", "decodeblock:16:0.0625", "decodeblock:16:0.0625:channels32")
ISSUE_ROWS = (
    ("WikiText-2 test, ctx 1024, top-16, x original dense", "<= 1.02"),
    ("same, top-8", "<= 1.04"),
    ("same, dense", "<= 1.01"),
    ("any per-head allocation at <= 3.1 % average density, x original dense", "<= 1.01"),
    ("other-domain text: each ratio above", "within +0.02 of the WikiText ratio"),
    ("decode at 8K, block:16:0.0625 with the selection you ship, x original dense decode", "<= 1.01"),
    ("passkey 1K-8K, depths 0.1/0.5/0.9, 20 trials, dense and under the shipped sparse policy", ">= original - 1"),
    ("main job: top-8 own-dense excess on held-out text", "<= x1.22, dense within x1.01, passkey 1K >= 19/20"),
)


def step_seconds(model: torch.nn.Module, ids: torch.Tensor, policy: str) -> float:
    """One sparse-aware condensation step (forward under `policy` with the tail observer, LM + 5 x tail, backward)."""
    regularizer = CondensationRegularizer("tail:k=16")
    start = time.perf_counter()
    with sparse_attention(model, policy, observers=[regularizer], query_chunk=128, fast_dense=False):
        logits = model(input_ids=ids, use_cache=False).logits
    lm = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    (lm + 5.0 * regularizer.value()).backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def match_check(model: torch.nn.Module, ids: torch.Tensor, spec: str) -> dict[str, float]:
    """Prefill under decode`spec` vs token-by-token decoding under `spec`: logit difference and NLLs."""
    targets = ids[0, 1:]
    with torch.no_grad():
        dense = model(ids).logits[0].float()
        with sparse_attention(model, f"decode{spec}", query_chunk=128):
            prefill = model(ids).logits[0].float()
        steps = []
        with sparse_decoding(model, spec, reserve=ids.shape[1]) as cache:
            for t in range(ids.shape[1]):
                steps.append(decode_step(model, cache, ids[:, t : t + 1])[0])
    decoded = torch.stack(steps)
    nll = {name: float(F.cross_entropy(logits[:-1], targets))
           for name, logits in (("dense", dense), ("prefill", prefill), ("decoded", decoded))}
    return {"max_abs_logit_diff": float((prefill - decoded).abs().max()),
            "max_abs_logit_diff_vs_dense": float((dense - decoded).abs().max()),
            "nll_dense_prefill": nll["dense"], f"nll_prefill_decode{spec}": nll["prefill"],
            f"nll_decoded_{spec}": nll["decoded"], "tokens": ids.shape[1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", default=str(WIKITEXT_TEST))
    parser.add_argument("--skip-match", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    loaded = load_model("smollm2-135m")
    model = loaded.model
    ids = load_windows(loaded.tokenizer, args.data, args.ctx, count=1)[:1]
    result: dict = {"ctx": args.ctx, "model": "smollm2-135m (embedded GGUF Q4_1, dequantised to float32)",
                    "data": "WikiText-2 test, first window",
                    "noise": "2 shared CPU cores with other jobs running (load ~10): step times are noisy; the "
                             "ratios are side by side, rounds interleaved"}

    model.requires_grad_(False)
    for name, parameter in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            parameter.requires_grad_(True)
    model.train()
    step_seconds(model, ids, POLICIES[0])  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {p: [] for p in POLICIES}
    for _ in range(args.rounds):
        for policy in POLICIES:
            times[policy].append(step_seconds(model, ids, policy))
            print(policy, round(times[policy][-1], 2), flush=True)
    base = statistics.median(times[POLICIES[0]])
    result["step"] = {p: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "rounds": len(t),
                          "ratio_vs_topk16": statistics.median(t) / base} for p, t in times.items()}
    result["step"]["what"] = ("forward + backward at 1 x 1024, q/k projections trainable, tail:k=16 observer, "
                              "query chunk 128 (the keep presets' step without the teacher forward)")
    model.eval()
    model.requires_grad_(False)

    if not args.skip_match:
        result["match"] = match_check(model, ids, "block:16:0.0625")
        print(result["match"], flush=True)
    result["threads"] = 1
    result["targets"] = [{"measure": measure, "target": target, "value": None, "met": False,
                          "note": "not measured here: this benchmark times the matched forward and checks the match"}
                         for measure, target in ISSUE_ROWS]
    path = write_result(f"decodeblock_smollm2_ctx{args.ctx}", result)
    print("wrote", path)


if __name__ == "__main__":
    main()
