"""Block-sparse attention with torch FlexAttention: a `BlockMask` built from a kept-block selection.

The selection is the one `attention.selection.select_blocks` makes for the CPU kernel (B, Hkv, Qb, Kb), so GPU
and CPU read the same blocks by construction. Per query block, kept key blocks left of the diagonal are full
blocks (no mask evaluated by the compiled kernel); the kept diagonal block is partial, causal inside. The mask
function states the whole token mask (kept block and causal), which is all eager flex reads. The G query heads of a kv group
share their group's row of the table (`enable_gqa`).

On CUDA `flex_attention` runs compiled (Triton kernels, with a backward, so it also serves training); on CPU it
runs eagerly (inference only: torch has no CPU backward for it), which the tests use on small shapes.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from attnsparse.attention.selection import BlockGrid


def fits(grid: BlockGrid) -> bool:
    """Query blocks line up with key blocks of the same size (the first query starts a block: prefill, aligned
    chunks); other grids take the gathered torch path."""
    return grid.key_block == grid.block and grid.offset % grid.block == 0


def block_mask(blocks: torch.Tensor, grid: BlockGrid, groups: int) -> BlockMask:
    """The BlockMask of a kept-block table (B, Hkv, Qb, Kb) for G = `groups` query heads per kv head."""
    batch, kv_heads, rows, cols = blocks.shape
    table = blocks[:, :, None].expand(batch, kv_heads, groups, rows, cols).reshape(batch, kv_heads * groups, rows,
                                                                                   cols)
    diagonal = torch.arange(rows, device=blocks.device)[:, None] + grid.first
    column = torch.arange(cols, device=blocks.device)[None, :]
    partial, full = table & (column == diagonal), table & (column < diagonal)
    offset, size = grid.offset, grid.block

    def kept_and_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """The whole token mask (eager flex reads only this); compiled flex applies it to partial blocks only."""
        return table[b, h, q // size, kv // size] & (kv <= q + offset)

    return BlockMask.from_kv_blocks(*_counts_and_indices(partial), *_counts_and_indices(full), BLOCK_SIZE=size,
                                    mask_mod=kept_and_causal, seq_lengths=(grid.queries, grid.keys))


def _counts_and_indices(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, how many blocks are kept and their indices first (then the rest, unread): int32, flex's layout."""
    counts = kept.sum(dim=-1, dtype=torch.int32)
    indices = torch.sort(kept.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return counts, indices


@functools.cache
def _compiled():  # type: ignore[no-untyped-def]
    return torch.compile(flex_attention, dynamic=False)


def flex_block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor,
                         grid: BlockGrid, scaling: float) -> torch.Tensor:
    """Exact softmax attention over each query block's kept key blocks, as `blockattend.block_sparse_attention`:
    query (B, H, Q, D), key/value (B, Hkv, K, D) -> (B, Q, H, D). Needs `fits(grid)`."""
    mask = block_mask(blocks, grid, query.shape[1] // key.shape[1])
    if query.is_cuda:
        out = _compiled()(query, key, value, block_mask=mask, scale=scaling, enable_gqa=True)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex's note that eager mode is for debugging: on CPU it is the path
            out = flex_attention(query, key, value, block_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)
