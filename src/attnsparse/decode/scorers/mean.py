"""Score `mean` (the default): q . (mean key of the block), from a running key sum per block.

An estimate, not a bound, like InfLLM's representative keys; on SmolLM2 it picks far better blocks than Quest's
min/max bound at half the summary size (benchmarks/README.md). Only the last block can be partly filled and it is
always kept as a recent block, so the sum ranks the blocks as the mean does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsparse.decode import kernels as K
from attnsparse.decode.scorers.base import BlockScorer, grow_per_block, register_scorer, touched_blocks


@register_scorer("mean", "mean", "q . mean key of each block (default; one key sum per block)")
@dataclass(frozen=True)
class MeanScore(BlockScorer):
    """Selection data: per-block key sums (B, h, capacity / block, D)."""

    def grow(self, old: torch.Tensor, key_blocks: torch.Tensor, n: int) -> torch.Tensor:
        return grow_per_block(old, key_blocks, n, vectors=1)

    def update(self, data: torch.Tensor, key_blocks: torch.Tensor, keys: torch.Tensor, start: int) -> None:
        size = key_blocks.shape[-2]
        if keys.shape[2] == 1:
            block, key = start // size, keys[:, :, 0]
            if start % size == 0:
                data[:, :, block] = key
            else:
                data[:, :, block] += key
            return
        blocks, held, valid = touched_blocks(key_blocks, start, start + keys.shape[2])
        data[:, :, blocks] = held.masked_fill(~valid, 0.0).sum(dim=-2)

    def scores(self, data: torch.Tensor, key_blocks: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
        return K.block_means(q, data[:, :, : -(-n // key_blocks.shape[-2])])

    def decode(self, q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor, data: torch.Tensor,
               n: int, count: int, sink_blocks: int, recent_blocks: int, scaling: float) -> torch.Tensor | None:
        return K.mean_block_decode(q, key_blocks, value_blocks, data, n, count, sink_blocks, recent_blocks, scaling)

    def bytes_read(self, n: int, block: int, selected: int, dim: int, itemsize: int) -> int:
        return K.block_bytes(n, block, selected, dim, itemsize, summary_vectors=1)
