"""Attention over kept blocks only, exact within them: the compiled kernel (core/native/blocksparse.c), FlexAttention
on CUDA (attention/flexblock.py), or torch.

Inputs: query (B, H, Q, D), key/value (B, Hkv, K, D), a kept-block mask (B, Hkv, Qb, Kb) on a `BlockGrid` (query
and key blocks may differ in size), causal inside the diagonal span (query at key position K - Q + i sees keys <=
that position). Output (B, Q, H, D), the
layout transformers' attention functions return. Key blocks a query block did not keep contribute nothing; a row
sees at least its own position whenever its diagonal block is kept (the selection always keeps it).
"""

from __future__ import annotations

import torch

from attnsparse.attention.selection import BlockGrid
from attnsparse.core import native


def block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor,
                           grid: BlockGrid, scaling: float) -> torch.Tensor:
    """Exact softmax attention over each query block's kept key blocks: (B, Q, H, D) in the query's dtype.

    `blocks` has one row per kv group, or one per query head (a per-head selection: the keys are then read per head).
    """
    out = _native(query, key, value, blocks, grid, scaling)
    if out is not None:
        return out.to(query.dtype)
    if blocks.shape[1] != key.shape[1]:
        key, value = (t.repeat_interleave(blocks.shape[1] // key.shape[1], dim=1) for t in (key, value))
    out = _flex(query, key, value, blocks, grid, scaling)
    if out is None:
        out = gathered_block_attention(query, key, value, blocks, grid, scaling)
    return out.to(query.dtype)


def gathered_block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor,
                             grid: BlockGrid, scaling: float) -> torch.Tensor:
    """Torch path: per query block, gather its kept key/value blocks (padded to the most any group keeps) and run
    one masked softmax over them. float32; (B, Q, H, D)."""
    batch, heads, queries, dim = query.shape
    kv_heads, groups, size = key.shape[1], heads // key.shape[1], grid.key_block
    pad = grid.key_blocks * size - grid.keys
    k_blocks = torch.nn.functional.pad(key.float(), (0, 0, 0, pad)).view(batch, kv_heads, grid.key_blocks, size, dim)
    v_blocks = torch.nn.functional.pad(value.float(), (0, 0, 0, pad)).view_as(k_blocks)
    q = query.float()
    out = torch.zeros(batch, heads, queries, dim, dtype=torch.float32, device=query.device)
    within = torch.arange(size, device=query.device)
    last_visible = grid.last_visible().tolist()
    for r in range(grid.query_blocks):
        first_pos = max(grid.offset, (grid.first + r) * grid.block)
        last_pos = min(grid.keys, (grid.first + r + 1) * grid.block)
        row = blocks[:, :, r, : last_visible[r] + 1]  # (B, Hkv, visible blocks)
        count = int(row.sum(-1).max())
        if count == 0:
            continue
        order = torch.sort(row.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :count]
        valid = torch.arange(count, device=query.device) < row.sum(-1, keepdim=True)  # (B, Hkv, C)
        index = order[..., None, None].expand(-1, -1, -1, size, dim)
        keys_r = k_blocks.gather(2, index).reshape(batch, kv_heads, count * size, dim)
        values_r = v_blocks.gather(2, index).reshape(batch, kv_heads, count * size, dim)
        token_pos = (order[..., None] * size + within).reshape(batch, kv_heads, 1, count * size)
        token_ok = valid[..., None].expand(-1, -1, -1, size).reshape(batch, kv_heads, 1, count * size)
        positions = torch.arange(first_pos, last_pos, device=query.device)
        see = token_ok & (token_pos <= positions[:, None])  # (B, Hkv, nq, C * size)
        nq = last_pos - first_pos
        q_r = q[:, :, first_pos - grid.offset: last_pos - grid.offset].reshape(batch, kv_heads, groups, nq, dim)
        scores = (q_r @ keys_r[:, :, None].transpose(-1, -2)) * scaling  # (B, Hkv, G, nq, C * size)
        scores = scores.masked_fill(~see[:, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        result = probs @ values_r[:, :, None]  # (B, Hkv, G, nq, D)
        out[:, :, first_pos - grid.offset: last_pos - grid.offset] = result.reshape(batch, heads, nq, dim)
    return out.transpose(1, 2).contiguous()


def _native(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor, grid: BlockGrid,
            scaling: float) -> torch.Tensor | None:
    """The compiled kernel's result, or None where it does not apply (not CPU float32, no compiler)."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (query, key, value)):
        return None
    kernel = native.function("blocksparse", "block_sparse_prefill", "ppppp" + "n" * 11 + "fnp")
    if kernel is None:
        return None
    batch, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    q, v = query.contiguous(), value.contiguous()
    chunked = chunk_transposed_keys(key)
    offsets, index = block_lists(blocks)
    out = torch.empty(batch, queries, heads, dim, dtype=torch.float32)
    status = kernel(q.data_ptr(), chunked.data_ptr(), v.data_ptr(), offsets.data_ptr(), index.data_ptr(), batch,
                    kv_heads, heads // kv_heads, blocks.shape[1], queries, grid.keys, dim, grid.block, grid.key_block,
                    grid.first, grid.query_blocks, scaling, torch.get_num_threads(), out.data_ptr())
    if status != 0:
        raise MemoryError("block-sparse prefill kernel could not allocate its scratch")
    return out


KEY_CHUNK = 16  # keys per panel of the kernel's key copy (COLS in blocksparse.c)


def chunk_transposed_keys(key: torch.Tensor) -> torch.Tensor:
    """The kernel's key copy: (B, Hkv, K, D) -> (B, Hkv, ceil(K / 16), D, 16), each 16 consecutive keys transposed
    into one panel (zero-padded after the last key), so tiles read keys as contiguous 16-wide rows."""
    batch, kv_heads, keys, dim = key.shape
    chunks = -(-keys // KEY_CHUNK)
    padded = torch.nn.functional.pad(key, (0, 0, 0, chunks * KEY_CHUNK - keys))
    return padded.reshape(batch, kv_heads, chunks, KEY_CHUNK, dim).transpose(-1, -2).contiguous()


def block_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block mask (B, S, Qb, Kb), S selections (kv groups or query heads), as compressed rows: offsets
    (B*S*Qb + 1,) and ascending key-block indices, int64 (the kernel's input; row (b, s, r) keeps
    index[offsets[i] : offsets[i + 1]] with i = (b*S + s)*Qb + r)."""
    flat = blocks.reshape(-1, blocks.shape[-1])
    offsets = torch.zeros(flat.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = flat.sum(-1).cumsum(0)
    index = flat.nonzero()[:, 1].contiguous()
    return offsets, index


def _flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor, grid: BlockGrid,
          scaling: float) -> torch.Tensor | None:
    """On CUDA, FlexAttention over the same selection (attention/flexblock.py); None elsewhere."""
    from attnsparse.attention import flexblock

    if not query.is_cuda or not flexblock.fits(grid):
        return None
    return flexblock.flex_block_attention(query, key, value, blocks, grid, scaling)
