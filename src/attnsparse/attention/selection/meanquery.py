"""`meanquery[:chunk=C]`: the block's mean query against every key, its softmax summed per key block.

Each query block's mean query is scored against each key it may see (up to the block's last query) exactly, not
against a pooled key; the softmax over those keys, summed per key block, is the block's guessed mass. Pooling the
keys is what costs the `mean` estimate most at blocks of 16 (benchmarks/results/gate_pooling_smollm2.json: kept
mass at 10 %, per head, 0.787 with mean keys, 0.877 with exact keys, 0.888 for the true masses), while a mean
query loses little. Cost: (Q / block) x K x D per head, 1/block of a dense attention's score product, computed in
chunks of C query blocks so memory stays (C x K) per head.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from attnsparse.attention.selection.base import ESTIMATORS, BlockGrid, ChunkedEstimator, group_mean_log

DEFAULT_CHUNK = 64


@ESTIMATORS.register("meanquery", usage="meanquery[:chunk=C] (query blocks per chunk, default 64)",
                     help="mean query of the query block . every key, softmax summed per key block")
class MeanQuery(ChunkedEstimator):
    default_chunk: ClassVar[int] = DEFAULT_CHUNK
    chunk_unit: ClassVar[str] = "query blocks"
    name: ClassVar[str] = "meanquery"

    def log_mass(self, query: torch.Tensor, key: torch.Tensor, grid: BlockGrid, *, scaling: float,
                 layer_idx: int) -> torch.Tensor:
        batch, heads = query.shape[:2]
        kv_heads, size = key.shape[1], grid.key_block
        groups = heads // kv_heads
        pooled = grid.pool_queries(query) * scaling  # (B, H, Qb, D)
        keys = F.pad(key.float(), (0, 0, 0, grid.key_blocks * size - grid.keys))  # (B, Hkv, Kb * size, D)
        last = (torch.arange(grid.query_blocks, device=query.device) + grid.first + 1) * grid.block
        last = last.clamp(max=grid.keys) - 1  # each query block's last query (key position)
        mass = pooled.new_zeros(batch, heads, grid.query_blocks, grid.key_blocks)
        for start in range(0, grid.query_blocks, self.chunk):
            stop = min(start + self.chunk, grid.query_blocks)
            width = -(-(int(last[stop - 1]) + 1) // size) * size  # keys up to the chunk's last query, in blocks
            q = pooled[:, :, start:stop].reshape(batch, kv_heads, groups * (stop - start), -1)
            scores = (q @ keys[:, :, :width].transpose(-1, -2)).view(batch, heads, stop - start, width)
            tail = min(width, (grid.first + start) * grid.block) // size * size  # only the chunk's own span
            hidden = torch.arange(tail, width, device=query.device)[None, :] > last[start:stop, None]
            scores[..., tail:].masked_fill_(hidden, float("-inf"))  # has keys after a row's last query
            probs = torch.softmax(scores, dim=-1)
            mass[:, :, start:stop, : width // size] = probs.view(batch, heads, stop - start, -1, size).sum(-1)
        return group_mean_log(mass.log(), groups, grid.causal(query.device))
