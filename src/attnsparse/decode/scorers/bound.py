"""Score `bound` (Quest, Tang et al. 2024): the upper bound of q . k over the block from element-wise key min and max.

Per dimension max(q * kmax, q * kmin) bounds q * k; summed that is q+ . kmax + q- . kmin, one matmul against the
summary stored as [kmax | kmin]. There is no compiled kernel for it: selection runs in torch, attention over the
selected blocks in the block kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsparse.decode import kernels as K
from attnsparse.decode.scorers.base import BlockScorer, grow_per_block, register_scorer, touched_blocks


@register_scorer("bound", "bound", "Quest's upper bound of q . k from per-block key min and max")
@dataclass(frozen=True)
class BoundScore(BlockScorer):
    """Selection data: [kmax | kmin] per block, (B, h, capacity / block, 2D)."""

    def grow(self, old: torch.Tensor, key_blocks: torch.Tensor, n: int) -> torch.Tensor:
        return grow_per_block(old, key_blocks, n, vectors=2)

    def update(self, data: torch.Tensor, key_blocks: torch.Tensor, keys: torch.Tensor, start: int) -> None:
        size, dim = key_blocks.shape[-2], keys.shape[-1]
        kmax, kmin = data[..., :dim], data[..., dim:]
        if keys.shape[2] == 1:
            block, key = start // size, keys[:, :, 0]
            if start % size == 0:
                data[:, :, block] = key.repeat(1, 1, 2)
            else:
                top, bottom = kmax[:, :, block], kmin[:, :, block]
                torch.maximum(top, key, out=top)
                torch.minimum(bottom, key, out=bottom)
            return
        blocks, held, valid = touched_blocks(key_blocks, start, start + keys.shape[2])
        kmin[:, :, blocks] = held.masked_fill(~valid, float("inf")).amin(dim=-2)
        kmax[:, :, blocks] = held.masked_fill(~valid, float("-inf")).amax(dim=-2)

    def scores(self, data: torch.Tensor, key_blocks: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
        return K.block_bounds(q, data[:, :, : -(-n // key_blocks.shape[-2])])

    def bytes_read(self, n: int, block: int, selected: int, dim: int, itemsize: int) -> int:
        return K.block_bytes(n, block, selected, dim, itemsize, summary_vectors=2)
