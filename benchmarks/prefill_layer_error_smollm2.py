"""Where a block estimator loses: each layer's attention error inside the sparse forward, beside the loss (issue 15).

For each prefill policy, one WikiText-2 test window goes through SmolLM2-135M under the policy; at every layer the
policy's attention output is compared with dense attention (SDPA) on the same inputs: the mean over query rows and
heads of |o_sparse - o_dense| / |o_dense|. The window's next-token loss under the policy is recorded beside it. A
sum of per-layer errors (or a kept attention mass, benchmarks/gate_pooling_smollm2.py) can rank estimators
differently from the loss: the layers that decide the loss are not those with the largest errors. Writes
benchmarks/results/<--results>.json.

    OMP_NUM_THREADS=1 python benchmarks/prefill_layer_error_smollm2.py --ctx 2048 \
        --policies 'blocksparse:16:0.1:mean:per=head;blocksparse:16:0.1:mean:sub=4,per=head'
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from common import WIKITEXT_TEST, write_result

from attnsparse.attention import backend
from attnsparse.attention.backend import sparse_attention
from attnsparse.core.data import load_windows
from attnsparse.core.models import load_model


def relative_error(out: torch.Tensor, dense: torch.Tensor) -> float:
    """Mean over (batch, query, head) of |out - dense| / |dense|, both (B, Q, H, D)."""
    return float(((out - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-12)).mean())


def layer_errors(model: torch.nn.Module, ids: torch.Tensor, policy: str) -> tuple[float, list[float]]:
    """(loss, per-layer relative attention error) of one window under `policy`, in layer order."""
    errors: list[float] = []
    original = backend.chunked_attention

    def spy(query, key, value, attention_mask, *args, **kwargs):
        out = original(query, key, value, attention_mask, *args, **kwargs)
        groups = query.shape[1] // key.shape[1]
        dense = F.scaled_dot_product_attention(query, key.repeat_interleave(groups, 1),
                                               value.repeat_interleave(groups, 1), is_causal=True)
        errors.append(relative_error(out.float(), dense.transpose(1, 2).float()))
        return out

    backend.chunked_attention = spy
    try:
        with torch.no_grad(), sparse_attention(model, policy):
            loss = float(model(ids, labels=ids).loss)
    finally:
        backend.chunked_attention = original
    return loss, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--policies", default="blocksparse:16:0.1:mean:per=head;blocksparse:16:0.1:meanquery:per=head;"
                                              "blocksparse:16:0.1:exact:per=head",
                        help="prefill policies separated by ';' (a spec's keywords use commas)")
    parser.add_argument("--results", default="prefill_layer_error_smollm2")
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    ids = load_windows(loaded.tokenizer, str(WIKITEXT_TEST), args.ctx, max_context=loaded.max_context, count=1)[0:1]
    with torch.no_grad():
        dense_loss = float(loaded.model(ids, labels=ids).loss)
    rows = {}
    for policy in (p for p in args.policies.split(";") if p):
        loss, errors = layer_errors(loaded.model, ids, policy)
        rows[policy] = {"loss": round(loss, 4), "perplexity_ratio": round(math.exp(loss - dense_loss), 4),
                        "error_sum": round(sum(errors), 3), "layer_errors": [round(e, 4) for e in errors]}
        print(f"{policy}: loss {loss:.4f} (x{math.exp(loss - dense_loss):.3f} of dense ppl), error sum "
              f"{sum(errors):.3f}; by layer " + " ".join(f"{e:.2f}" for e in errors), flush=True)
    write_result(args.results, {
        "model": "smollm2-135m (embedded GGUF, dequantised to float32)", "data": "WikiText-2 test, first window",
        "ctx": args.ctx, "dense_loss": round(dense_loss, 4), "policies": rows,
        "targets": [{"measure": "per-layer attention error vs loss under sparse prefill (diagnostic)",
                     "target": "measured (which layers decide an estimator's perplexity)",
                     "value": {p: r["perplexity_ratio"] for p, r in rows.items()}, "met": True}],
    })


if __name__ == "__main__":
    main()
