"""The gate's training signal, recorded inside the attention backend: no model-specific code.

`BlockPoolRecorder` is an observer (`attnsparse.attention.backend.AttentionChunk`). For every layer of one forward
it keeps, per query head, the block-pooled dense attention map: for query block i and key block j, the attention
mass the block's queries put on the keys of block j, averaged over the block's queries (each row sums to 1 over
the visible key blocks). Beside it, the gate's inputs: the mean query of each query block (per query head) and the
[mean | max | min] key of each key block (per kv head), after RoPE, as the backend sees them. Memory per layer is
O(heads x blocks^2 + heads x blocks x D): at 8K tokens in blocks of 64, 0.6 MB per layer for SmolLM2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsparse.attention.backend import AttentionChunk
from attnsparse.errors import AttnsparseError
from attnsparse.gate.model import pool_keys


@dataclass
class PooledLayer:
    """One layer's record: the gate's target and its inputs, for the query blocks that held queries."""

    target: torch.Tensor  # (B, H, Nq, Nk) float32, block-pooled attention, rows sum to 1
    pooled_q: torch.Tensor  # (B, H, Nq, D) mean query of each query block
    pooled_k: torch.Tensor  # (B, Hkv, Nk, 3D) [mean | max | min] key of each key block
    query_blocks: torch.Tensor  # (Nq,) long, key-block index of each query block


class BlockPoolRecorder:
    """Observer recording each layer's `PooledLayer` over one forward pass; call `clear()` before the next."""

    def __init__(self, block: int) -> None:
        if block < 1:
            raise AttnsparseError(f"gate block {block} must be >= 1 token")
        self.block = block
        self._mass: dict[int, torch.Tensor] = {}
        self._queries: dict[int, torch.Tensor] = {}
        self._rows: dict[int, torch.Tensor] = {}
        self._keys: dict[int, torch.Tensor] = {}

    def clear(self) -> None:
        self._mass.clear()
        self._queries.clear()
        self._rows.clear()
        self._keys.clear()

    def __call__(self, chunk: AttentionChunk) -> None:
        if chunk.query is None or chunk.key is None:
            raise AttnsparseError("the gate recorder needs the backend's queries and keys (AttentionChunk.query/key)")
        layer, size = chunk.layer_idx, self.block
        probs = chunk.probs.detach()
        batch, heads, rows, width = probs.shape
        keys = chunk.key.shape[2]
        blocks = -(-keys // size)
        if layer not in self._mass:
            self._mass[layer] = probs.new_zeros(batch, heads, blocks, blocks)
            self._queries[layer] = probs.new_zeros(batch, heads, blocks, chunk.query.shape[-1])
            self._rows[layer] = probs.new_zeros(batch, 1, blocks, 1)
            self._keys[layer] = pool_keys(chunk.key.detach(), size)
        seen = chunk.visible.any(-1, keepdim=True).to(probs.dtype)  # (B, 1, Qc, 1): padded queries count 0
        covered = -(-width // size)
        mass = torch.nn.functional.pad(probs, (0, covered * size - width)).view(batch, heads, rows, covered, size)
        mass = mass.sum(-1) * seen
        query_blocks = (chunk.query_positions // size).to(probs.device)
        self._mass[layer][..., :covered].index_add_(2, query_blocks, mass)
        self._queries[layer].index_add_(2, query_blocks, chunk.query.detach().float() * seen)
        self._rows[layer].index_add_(2, query_blocks, seen.expand(batch, 1, rows, 1).contiguous())

    def layers(self) -> dict[int, PooledLayer]:
        """Every recorded layer's record, keeping the query blocks that held at least one (unpadded) query."""
        out = {}
        for layer, mass in self._mass.items():
            rows = self._rows[layer]
            held = rows.sum((0, 1, 3)) > 0
            count = rows.clamp_min(1.0)
            out[layer] = PooledLayer(target=(mass / count)[:, :, held], pooled_q=(self._queries[layer] / count)[:, :, held],
                                     pooled_k=self._keys[layer], query_blocks=held.nonzero().squeeze(1))
        return out
