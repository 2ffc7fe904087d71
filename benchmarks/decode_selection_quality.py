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
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from attnsparse.core.data import load_windows
from attnsparse.core.models import load_model
from attnsparse.core.runs import atomic_write_json
from attnsparse.decode.backend import decode_backend
from attnsparse.decode.generate import cache_from_kv, decode_step, prefill
from attnsparse.decode.plan import DecodePlan
from attnsparse.decode.policies import BlockPolicy
from attnsparse.decode.scorers import BlockScorer, BoundScore, ChannelScore, register_scorer


class OracleScore(BlockScorer):
    """Blocks ranked by the true max score of their keys (or their softmax mass): reads every key, keeps no data."""

    mass: ClassVar[bool] = False

    def grow(self, old: torch.Tensor, key_blocks: torch.Tensor, n: int) -> torch.Tensor:
        return old

    def update(self, data: torch.Tensor, key_blocks: torch.Tensor, keys: torch.Tensor, start: int) -> None:
        return None

    def scores(self, data: torch.Tensor, key_blocks: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
        size = key_blocks.shape[-2]
        used = -(-n // size)
        keys = key_blocks[:, :, :used].flatten(2, 3)
        scores = q @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5
        scores[..., n:] = float("-inf")
        if self.mass:
            return torch.softmax(scores, dim=-1).view(*scores.shape[:-1], used, size).sum(-1).amax(-2)
        return scores.view(*scores.shape[:-1], used, size).amax(-1).amax(-2)

    def bytes_read(self, n: int, block: int, selected: int, dim: int, itemsize: int) -> int:
        return n * dim * itemsize + 2 * min(selected * block, n) * dim * itemsize


@register_scorer("oracle-max", "oracle-max", "true max q.k of each block's keys (reads every key)")
@dataclass(frozen=True)
class OracleMax(OracleScore):
    pass


@register_scorer("oracle-mass", "oracle-mass", "softmax mass of each block's keys (reads every key)")
@dataclass(frozen=True)
class OracleMass(OracleScore):
    mass: ClassVar[bool] = True


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
    mean = BlockPolicy(16, density=args.density)
    topk = f"topk:{int(args.density * args.ctx)}"
    variants: list[tuple[str, object]] = [
        ("dense", "dense"), (topk, topk), ("oracle max", BlockPolicy(16, density=args.density, score=OracleMax())),
        ("oracle mass", BlockPolicy(16, density=args.density, score=OracleMass())), ("mean key", mean),
        ("quest bound", BlockPolicy(16, density=args.density, score=BoundScore())),
        ("mean key b8", BlockPolicy(8, density=args.density)),
    ] + [(f"channels {r}", BlockPolicy(16, density=args.density, score=ChannelScore(r))) for r in (8, 16, 24, 32)]
    wanted = {v for v in args.variants.split(",") if v}
    variants = [v for v in variants if v[0] == "dense" or not wanted or v[0] in wanted]
    results: dict[str, float] = {}
    with decode_backend(model):
        for name, policy in variants:
            plan = DecodePlan.uniform(policy, len(kv), kv[0][0].shape[1]) if isinstance(policy, BlockPolicy) else policy
            cache = cache_from_kv(model, kv, plan, reserve=args.ctx)  # type: ignore[arg-type]
            nll = [F.cross_entropy(logits, targets[:, 0]).item()]
            for t in range(args.new - 1):
                step = decode_step(model, cache, targets[:, t : t + 1])
                nll.append(F.cross_entropy(step, targets[:, t + 1]).item())
            results[name] = sum(nll) / len(nll)
            print(f"{name:14s} ppl {math.exp(results[name]):8.3f}  ratio {math.exp(results[name] - results['dense']):.3f}",
                  flush=True)
    if wanted and Path(args.out).is_file():  # a subset run adds its rows to the earlier ones (same dense NLL)
        earlier = json.loads(Path(args.out).read_text())
        if abs(earlier["nll"]["dense"] - results["dense"]) < 1e-6:
            results = earlier["nll"] | results
    atomic_write_json(args.out, {"config": vars(args), "nll": results,
                                 "ppl_ratio": {k: math.exp(v - results["dense"]) for k, v in results.items()}})


if __name__ == "__main__":
    main()
