"""Score `gate`: the learned block gate (`attnsparse gate`) ranks the blocks for each decode step.

The gate's key side is kept per block beside the keys: the block's [sum | max | min] key and its projection
through the layer's key matrix Wk (recomputed for the block a token lands in). A step projects the query through
Wq (per query head; the single query stands in for the pooled query of a block of queries), scores every block
by the dot product with the projected keys, and ranks blocks by the group's mean gate probability, as prefill's
estimator does. The scorer names its gate directory (`gate` field of a plan entry; `generate --gate DIR` fills it
in); the store of each layer binds the layer's weights (`bind`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from attnsparse.decode.scorers.base import BlockScorer, register_scorer, touched_blocks
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, expect_fields

NEEDS_GATE = ("block score gate needs a trained gate: give generate --gate DIR (written by `attnsparse gate`), or "
              "a \"gate\": DIR field in the plan entry")


@register_scorer("gate", "gate", "learned block gate of `attnsparse gate` (needs --gate DIR; no compiled kernel)")
@dataclass(frozen=True)
class GateScore(BlockScorer):
    """The unbound scorer of a plan entry: which gate directory; `bind` gives a layer's `BoundGate`."""

    gate: str = ""

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> GateScore:
        expect_fields(spec, 0)
        return cls()

    def load(self):
        if not self.gate:
            raise AttnsparseError(NEEDS_GATE)
        from attnsparse.attention.selection.gate import load_gate

        return load_gate(self.gate)

    def bind(self, layer: int, heads: list[int]) -> BlockScorer:
        gate = self.load()
        config = gate.config
        if layer >= config.layers or max(heads) >= config.kv_heads:
            raise AttnsparseError(f"the gate {self.gate} has {config.layers} layers x {config.kv_heads} kv heads; "
                                  f"the plan asks for layer {layer}, kv heads {heads}; train a gate for this model")
        index = torch.tensor(heads)
        groups = config.groups
        wq = gate.wq[layer].view(config.kv_heads, groups, config.head_dim, config.rank)[index]
        return BoundGate(self.gate, config.block, wq.contiguous(), gate.wk[layer][index].contiguous())

    def bytes_read(self, n: int, block: int, selected: int, dim: int, itemsize: int) -> int:
        rank = self.load().config.rank
        return -(-n // block) * rank * itemsize + 2 * min(selected * block, n) * dim * itemsize


class BoundGate(BlockScorer):
    """One layer's gate for a store of some kv heads. Selection data per block: [sum | max | min | Wk-projection]
    of its keys, (B, h, capacity / block, 3D + r)."""

    name = "gate"

    def __init__(self, path: str, block: int, wq: torch.Tensor, wk: torch.Tensor) -> None:
        self.path, self.block = path, block
        self.wq = wq  # (h, G, D, r)
        self.wk = wk  # (h, 3D, r)

    @property
    def spec(self) -> str:
        return "gate"

    def fields(self) -> dict[str, Any]:
        return {"gate": self.path}

    def grow(self, old: torch.Tensor, key_blocks: torch.Tensor, n: int) -> torch.Tensor:
        batch, heads, blocks, size, dim = key_blocks.shape
        if size != self.block:
            raise AttnsparseError(f"block:{size} uses blocks of {size} tokens but the gate {self.path} was trained "
                                  f"on blocks of {self.block}; train a gate with --block {size}")
        if dim * 3 != self.wk.shape[1]:
            raise AttnsparseError(f"the gate {self.path} was trained for head dim {self.wk.shape[1] // 3}, the model "
                                  f"has {dim}; train a gate for this model")
        self.wq, self.wk = self.wq.to(key_blocks.device), self.wk.to(key_blocks.device)  # the cache's device
        data = key_blocks.new_zeros(batch, heads, blocks, 3 * dim + self.wk.shape[-1])
        used = -(-n // size)
        if used:
            data[:, :, :used] = old[:, :, :used]
        return data

    def update(self, data: torch.Tensor, key_blocks: torch.Tensor, keys: torch.Tensor, start: int) -> None:
        size, dim = key_blocks.shape[-2], keys.shape[-1]
        total, kmax, kmin = data[..., :dim], data[..., dim:2 * dim], data[..., 2 * dim:3 * dim]
        blocks, held, valid = touched_blocks(key_blocks, start, start + keys.shape[2])
        if keys.shape[2] == 1 and start % size:
            key, block = keys[:, :, 0], start // size
            total[:, :, block] += key
            torch.maximum(kmax[:, :, block], key, out=kmax[:, :, block])
            torch.minimum(kmin[:, :, block], key, out=kmin[:, :, block])
        else:
            total[:, :, blocks] = held.masked_fill(~valid, 0.0).sum(dim=-2)
            kmax[:, :, blocks] = held.masked_fill(~valid, float("-inf")).amax(dim=-2)
            kmin[:, :, blocks] = held.masked_fill(~valid, float("inf")).amin(dim=-2)
        counts = valid.sum(dim=(-2, -1)).to(data.dtype)  # (C,) keys held per touched block
        pooled = torch.cat([total[:, :, blocks] / counts[:, None], kmax[:, :, blocks], kmin[:, :, blocks]], dim=-1)
        data[:, :, blocks, 3 * dim:] = (pooled.to(self.wk.dtype) @ self.wk[None]).to(data.dtype)

    def scores(self, data: torch.Tensor, key_blocks: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
        dim, rank = q.shape[-1], self.wk.shape[-1]
        projected = (q.unsqueeze(-2).to(self.wq.dtype) @ self.wq[None]).squeeze(-2) / math.sqrt(rank)  # (B,h,G,r)
        keys = data[:, :, : -(-n // key_blocks.shape[-2]), 3 * dim:].to(self.wq.dtype)  # (B, h, nb, r)
        logits = projected @ keys.transpose(-1, -2)  # (B, h, G, nb)
        return torch.softmax(logits, dim=-1).mean(dim=2).log()

    def bytes_read(self, n: int, block: int, selected: int, dim: int, itemsize: int) -> int:
        return -(-n // block) * self.wk.shape[-1] * itemsize + 2 * min(selected * block, n) * dim * itemsize


def with_gate(scorer: BlockScorer, directory: str) -> BlockScorer:
    """`scorer` naming gate `directory` where it is a gate scorer that names none yet."""
    if isinstance(scorer, GateScore) and not scorer.gate:
        return dataclasses.replace(scorer, gate=str(directory))
    return scorer

