"""What limits a block estimator: kept attention mass at 10 % with pooled queries against exact keys (issue 15).

On one 8K WikiText-2 test window in blocks of 16, per query head, for the chosen layers: the oracle (true block
masses), the mean-key estimate, a gate (--gate), and the estimate a pooled query would give if it saw every key
exactly: softmax(q̄_s · k / sqrt(D)) over all keys, summed into key blocks, averaged over S sub-block mean queries
q̄_s (S = 1: the block's mean query, what the gate and `mean` see). The gap oracle − (S = 1, exact keys) is what query
pooling costs; (S = 1, exact keys) − gate is what the gate's pooled keys and projections cost. The block's mean query
against K mean keys per key block (K = 2, 4, 8; training-free) shows how much of the key-pooling loss a summary of
several keys per block recovers. Writes benchmarks/results/<--results>.json.

    OMP_NUM_THREADS=1 python benchmarks/gate_pooling_smollm2.py --layers 3,10,20,25,29 --gate GATE
"""

from __future__ import annotations

import argparse
import math

import torch

from attnsparse.attention.backend import AttentionChunk, sparse_attention
from attnsparse.attention.selection.base import BlockGrid, group_mean_log
from attnsparse.core.data import load_windows
from attnsparse.core.models import load_model
from attnsparse.gate.kept import Estimate, gate_estimate, kept_mass, mean_key_estimate, oracle_estimate
from attnsparse.gate.model import BlockGate
from attnsparse.gate.observer import BlockPoolRecorder, PooledLayer
from attnsparse.gate.train import attention_scaling
from common import WIKITEXT_TEST, write_result

BLOCK, CTX, DENSITY = 16, 8192, 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="3,10,20,25,29")
    parser.add_argument("--gate", default=None, help="a gate trained in blocks of 16 (attnsparse gate)")
    parser.add_argument("--subblocks", default="1,2,4", help="sub-block query counts S")
    parser.add_argument("--key-subblocks", default="2,4,8",
                        help="mean keys per key block K for the mean query's sub-block key estimate")
    parser.add_argument("--results", default="gate_pooling_smollm2")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    loaded = load_model("smollm2-135m")
    ids = load_windows(loaded.tokenizer, str(WIKITEXT_TEST), CTX, max_context=loaded.max_context, count=1)[0:1]
    recorder, raw = BlockPoolRecorder(BLOCK), RawQueriesKeys(layers)
    with torch.no_grad(), sparse_attention(loaded.model, "dense", observers=[recorder, raw]):
        loaded.model(ids)
    records = recorder.layers()
    scaling = attention_scaling(loaded.model, records[layers[0]].pooled_q.shape[-1])
    estimates: dict[str, Estimate] = {"exact": oracle_estimate, "mean": mean_key_estimate(scaling)}
    for sub in (int(s) for s in args.subblocks.split(",")):
        estimates[f"pooled_q{sub}_exact_keys"] = raw.exact_keys_estimate(sub, scaling)
    for key_sub in (int(s) for s in args.key_subblocks.split(",") if s):
        estimates[f"mean_q_{key_sub}_sub_keys"] = raw.sub_block_keys_estimate(key_sub, scaling)
    if args.gate:
        estimates["gate"] = gate_estimate(BlockGate.load(args.gate))
    chosen = [records[layer] for layer in layers]
    kept = kept_mass(estimates, chosen, block=BLOCK, ctx=CTX, density=DENSITY, per="head", layers=layers)
    table = {name: {"layers": dict(zip(layers, (round(x, 4) for x in v["layers"]), strict=True)),
                    "mean": round(float(v["mean"]), 4)} for name, v in kept.items()}
    for name, row in table.items():
        print(f"{name:>24}  " + "  ".join(f"{x:.4f}" for x in row["layers"].values()) + f"  mean {row['mean']:.4f}")
    write_result(args.results, {
        "model": "smollm2-135m (embedded GGUF, dequantised to float32)", "data": "WikiText-2 test, first 8K window",
        "block": BLOCK, "ctx": CTX, "density": DENSITY, "per": "head", "layers": layers, "gate": args.gate,
        "kept_mass": table, "targets": pooling_targets(table),
    })


def pooling_targets(table: dict[str, dict]) -> list[dict]:
    """Issue 15's gate row is measured elsewhere; this records what limits it: query pooling vs key pooling."""
    oracle, pooled_query = table["exact"]["mean"], table["pooled_q1_exact_keys"]["mean"]
    value = {"query pooling (oracle - mean query, exact keys)": round(oracle - pooled_query, 4)}
    if "gate" in table:
        value["key pooling and projections (mean query, exact keys - gate)"] = round(pooled_query - table["gate"]["mean"], 4)
    return [{"measure": "kept attention mass lost to pooling, 8K, blocks of 16, 10 %, per head (mean over the layers)",
             "target": "measured (what limits the learned gate's selection)", "value": value, "met": True}]


class RawQueriesKeys:
    """Observer keeping the chosen layers' full post-RoPE queries and keys (one window)."""

    def __init__(self, layers: list[int]) -> None:
        self.layers = set(layers)
        self.queries: dict[int, list[torch.Tensor]] = {}
        self.keys: dict[int, torch.Tensor] = {}

    def __call__(self, chunk: AttentionChunk) -> None:
        if chunk.layer_idx in self.layers and chunk.query is not None and chunk.key is not None:
            self.queries.setdefault(chunk.layer_idx, []).append(chunk.query.detach().float())
            self.keys[chunk.layer_idx] = chunk.key.detach().float()

    def exact_keys_estimate(self, sub: int, scaling: float) -> Estimate:
        """Block masses from `sub` sub-block mean queries per query block, each against every key exactly."""

        def estimate(layer: int, record: PooledLayer, grid: BlockGrid, groups: int) -> torch.Tensor:
            query = torch.cat(self.queries[layer], 2)  # (1, H, T, D)
            batch, heads, tokens, dim = query.shape
            key = self.keys[layer].repeat_interleave(heads // self.keys[layer].shape[1], 1)
            blocks = tokens // BLOCK
            pooled = query.view(batch, heads, blocks, sub, BLOCK // sub, dim).mean(-2)
            positions = torch.arange(tokens)
            mass = torch.zeros(batch, heads, blocks, blocks)
            for s in range(sub):
                last = torch.arange(blocks) * BLOCK + (s + 1) * (BLOCK // sub) - 1  # the sub-block's last query
                logits = (pooled[:, :, :, s] @ key.transpose(-1, -2)) * scaling
                logits = logits.masked_fill(positions[None, :] > last[:, None], -math.inf)
                mass += torch.softmax(logits, -1).view(batch, heads, blocks, blocks, BLOCK).sum(-1) / sub
            return group_mean_log(mass.clamp_min(1e-30).log(), groups, grid.causal(mass.device))

        return estimate

    def sub_block_keys_estimate(self, key_sub: int, scaling: float) -> Estimate:
        """Block masses from the block's mean query against `key_sub` mean keys per key block (each the mean of
        BLOCK / key_sub consecutive keys, weighted by its key count): what a summary of several keys per block
        keeps. key_sub = 1 is the `mean` estimate, key_sub = BLOCK the mean query against exact keys."""

        def estimate(layer: int, record: PooledLayer, grid: BlockGrid, groups: int) -> torch.Tensor:
            query = torch.cat(self.queries[layer], 2)  # (1, H, T, D)
            batch, heads, tokens, dim = query.shape
            key = self.keys[layer].repeat_interleave(heads // self.keys[layer].shape[1], 1)
            blocks = tokens // BLOCK
            pooled_q = query.view(batch, heads, blocks, BLOCK, dim).mean(-2)
            pooled_k = key.view(batch, heads, blocks * key_sub, BLOCK // key_sub, dim).mean(-2)
            logits = (pooled_q @ pooled_k.transpose(-1, -2)) * scaling + math.log(BLOCK // key_sub)
            hidden = torch.arange(blocks)[None, :] > torch.arange(blocks)[:, None]
            logits = logits.view(batch, heads, blocks, blocks, key_sub).logsumexp(-1).masked_fill(hidden, -math.inf)
            return group_mean_log(torch.log_softmax(logits, -1), groups, grid.causal(logits.device))

        return estimate


if __name__ == "__main__":
    main()
