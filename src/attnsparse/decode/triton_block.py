"""Block top-k decode on the GPU in Triton: mean-key block scores, the block selection, attention over the picks.

The same step as the CPU kernel (`kernels.mean_block_decode`, native/blockattn.c) for one decode query per kv head
with its G query heads (q (B, Hkv, G, D), blocks (B, Hkv, NBcap, S, D), key sums (B, Hkv, NBcap, D)):

1. `_score_kernel`: score of block b = max over the G heads of q . (sum of the block's keys), many programs a head.
2. `_select_kernel`: per head, the sink and recent blocks, then the highest scores, `count` in all; ties at the
   threshold go to the lower block (the C kernel's rule). The threshold comes from a binary search over the
   scores' bit patterns, so the pick is exact and needs no sort; indices come out ascending (`select_blocks`'s
   layout).
3. `_attend_kernel`: split-K (flash-decoding) attention of the G heads over each split's share of the picked blocks,
   positions >= n masked; `_combine_kernel` merges the splits' partial softmaxes.

Runs compiled on CUDA, and on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set before this module
is imported), which the tests use. Block size must be a power of two; `fits` says whether a call can run here.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

TILE_TOKENS = 64  # keys per attention tile (several blocks of S tokens)
SCORE_TILE = 64  # blocks scored per program
PROGRAMS_PER_SM = 2  # attention programs aimed at per streaming multiprocessor when splitting heads
LOG2E = 1.4426950408889634


@triton.jit
def _score_kernel(q_ptr, sums_ptr, scores_ptr, heads, blocks, sq_b, sq_h, sq_g, ss_b, ss_h, ss_n, score_stride,
                  G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr):
    row, part = tl.program_id(0), tl.program_id(1)
    batch, head = row // heads, row % heads
    g, d = tl.arange(0, G_PAD), tl.arange(0, D_PAD)
    b = part * TILE + tl.arange(0, TILE)
    q = tl.load(q_ptr + batch * sq_b + head * sq_h + g[:, None] * sq_g + d[None, :],
                mask=(g[:, None] < G) & (d[None, :] < D), other=0.0)
    sums = tl.load(sums_ptr + batch * ss_b + head * ss_h + b[:, None] * ss_n + d[None, :],
                   mask=(b[:, None] < blocks) & (d[None, :] < D), other=0.0)
    scores = tl.dot(sums.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")  # (TILE, G_PAD)
    scores = tl.where(g[None, :] < G, scores, float("-inf"))
    tl.store(scores_ptr + row * score_stride + b, tl.max(scores, axis=1), mask=b < blocks)


@triton.jit
def _select_kernel(scores_ptr, index_ptr, blocks, count, sink, recent, score_stride, NB_PAD: tl.constexpr):
    """Per (batch, kv head): the `count` blocks to read, ascending; ties at the threshold to the lower block."""
    row = tl.program_id(0)
    b = tl.arange(0, NB_PAD)
    valid = b < blocks
    score = tl.load(scores_ptr + row * score_stride + b, mask=valid, other=0.0)
    score = tl.where((b < sink) | (b >= blocks - recent), float("inf"), score)
    # order-preserving map of float32 to integers: negatives get every bit but the sign flipped
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    key = tl.where(valid, key, -(1 << 40))
    # binary search for the largest threshold t with at least `count` keys >= t (32 halvings of the int32 range)
    low = tl.full((), -(1 << 31), dtype=tl.int64)
    high = tl.full((), (1 << 31) - 1, dtype=tl.int64)
    for _ in tl.static_range(32):
        middle = (low + high + 1) >> 1
        enough = tl.sum((key >= middle).to(tl.int32), axis=0) >= count
        low = tl.where(enough, middle, low)
        high = tl.where(enough, high, middle - 1)
    threshold = low
    above = valid & (key > threshold)
    tied = valid & (key == threshold)
    needed = count - tl.sum(above.to(tl.int32), axis=0)
    keep = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= needed))
    rank = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(index_ptr + row * count + rank, b.to(tl.int64), mask=keep)


@triton.jit
def _attend_kernel(q_ptr, k_ptr, v_ptr, index_ptr, m_ptr, l_ptr, acc_ptr, heads, n, count, per_split, splits,
                   sq_b, sq_h, sq_g, sk_b, sk_h, sk_n, sk_s, sv_b, sv_h, sv_n, sv_s, scale_log2,
                   G: tl.constexpr, D: tl.constexpr, S: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
                   T: tl.constexpr):
    """One split of one (batch, kv head): online softmax over its picked blocks, T keys (T / S blocks) a tile."""
    row, split = tl.program_id(0), tl.program_id(1)
    batch, head = row // heads, row % heads
    g, d, t = tl.arange(0, G_PAD), tl.arange(0, D_PAD), tl.arange(0, T)
    dmask = d[None, :] < D
    q = tl.load(q_ptr + batch * sq_b + head * sq_h + g[:, None] * sq_g + d[None, :],
                mask=(g[:, None] < G) & dmask, other=0.0)
    m = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), dtype=tl.float32)
    start = split * per_split
    stop = tl.minimum(start + per_split, count)
    for first in range(start, stop, T // S):
        pick = first + t // S
        picked = pick < stop
        block = tl.load(index_ptr + row * count + pick, mask=picked, other=0)
        within = t % S
        live = picked & (block * S + within < n)
        k = tl.load(k_ptr + batch * sk_b + head * sk_h + block[:, None] * sk_n + within[:, None] * sk_s + d[None, :],
                    mask=live[:, None] & dmask, other=0.0)
        v = tl.load(v_ptr + batch * sv_b + head * sv_h + block[:, None] * sv_n + within[:, None] * sv_s + d[None, :],
                    mask=live[:, None] & dmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # (G_PAD, T), log2 units
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new
    part = (row * splits + split) * G_PAD
    tl.store(m_ptr + part + g, m)
    tl.store(l_ptr + part + g, l)
    tl.store(acc_ptr + (part + g[:, None]) * D_PAD + d[None, :], acc)


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, heads, splits, so_b, so_h, so_g,
                    G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """Merge the splits' (max, sum, weighted values) of one (batch, kv head) into its G output rows."""
    row = tl.program_id(0)
    batch, head = row // heads, row % heads
    g, d = tl.arange(0, G_PAD), tl.arange(0, D_PAD)
    top = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    for split in range(splits):
        top = tl.maximum(top, tl.load(m_ptr + (row * splits + split) * G_PAD + g))
    total = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), dtype=tl.float32)
    for split in range(splits):
        part = (row * splits + split) * G_PAD
        weight = tl.exp2(tl.load(m_ptr + part + g) - top)  # 0 for an empty split (max -inf)
        total += weight * tl.load(l_ptr + part + g)
        acc += weight[:, None] * tl.load(acc_ptr + (part + g[:, None]) * D_PAD + d[None, :])
    out = acc / total[:, None]
    tl.store(out_ptr + batch * so_b + head * so_h + g[:, None] * so_g + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(g[:, None] < G) & (d[None, :] < D))


def fits(q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor) -> bool:
    """Whether the Triton kernels take these tensors: one dtype (float32/bfloat16/float16), a power-of-two block,
    unit stride along the head dimension, all on one device (CUDA, or CPU under the interpreter)."""
    size = key_blocks.shape[-2]
    return (q.dtype == key_blocks.dtype == value_blocks.dtype
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and size & (size - 1) == 0 and q.device == key_blocks.device == value_blocks.device
            and q.stride(-1) == key_blocks.stride(-1) == value_blocks.stride(-1) == 1)


def _pad(x: int) -> int:
    """tl.dot needs every dimension >= 16 and tl.arange a power of two."""
    return max(16, triton.next_power_of_2(x))


def mean_scores(q: torch.Tensor, sums: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Block scores (B, Hkv, n_blocks) float32: max over the G heads of q . sums[block] (`kernels.block_means`)."""
    batch, heads, groups, dim = q.shape
    scores = torch.empty(batch, heads, n_blocks, device=q.device, dtype=torch.float32)
    grid = (batch * heads, triton.cdiv(n_blocks, SCORE_TILE))
    _score_kernel[grid](q, sums, scores, heads, n_blocks, *q.stride()[:3], *sums.stride()[:3], n_blocks,
                        G=groups, D=dim, G_PAD=_pad(groups), D_PAD=_pad(dim), TILE=SCORE_TILE)
    return scores


def select(scores: torch.Tensor, count: int, sink_blocks: int, recent_blocks: int) -> torch.Tensor:
    """Indices (B, Hkv, count) int64, ascending: sink and recent blocks, then the highest scores, ties to the lower
    block (the rule of the CPU kernel); every block when count >= the number of blocks."""
    batch, heads, blocks = scores.shape
    if count >= blocks:
        return torch.arange(blocks, device=scores.device).expand(batch, heads, blocks)
    scores = scores.contiguous()
    index = torch.empty(batch, heads, count, device=scores.device, dtype=torch.int64)
    _select_kernel[(batch * heads,)](scores, index, blocks, count, sink_blocks, recent_blocks, blocks,
                                     NB_PAD=triton.next_power_of_2(blocks))
    return index


def _splits(rows: int, count: int, per_tile: int, device: torch.device, splits: int | None) -> int:
    """How many programs share one head's picked blocks: enough for every SM to get PROGRAMS_PER_SM programs."""
    tiles = triton.cdiv(count, per_tile)
    if splits is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        splits = math.ceil(PROGRAMS_PER_SM * sms / rows)
    return max(1, min(splits, tiles))


def attend(q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor, index: torch.Tensor, n: int,
           scaling: float, splits: int | None = None) -> torch.Tensor:
    """Exact attention of q (B, Hkv, G, D) over the blocks `index` (B, Hkv, C) only, positions >= n masked
    (`kernels.block_decode`); `splits` programs per head (default: from the GPU's SM count)."""
    batch, heads, groups, dim = q.shape
    size, count = key_blocks.shape[-2], index.shape[-1]
    per_tile = max(1, TILE_TOKENS // size)
    rows = batch * heads
    splits = _splits(rows, count, per_tile, q.device, splits)
    per_split = triton.cdiv(triton.cdiv(count, splits), per_tile) * per_tile
    splits = triton.cdiv(count, per_split)
    g_pad, d_pad = _pad(groups), _pad(dim)
    index = index.contiguous()
    m = torch.empty(rows * splits * g_pad, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(rows * splits * g_pad * d_pad, device=q.device, dtype=torch.float32)
    _attend_kernel[(rows, splits)](
        q, key_blocks, value_blocks, index, m, l, acc, heads, n, count, per_split, splits,
        *q.stride()[:3], *key_blocks.stride()[:4], *value_blocks.stride()[:4], scaling * LOG2E,
        G=groups, D=dim, S=size, G_PAD=g_pad, D_PAD=d_pad, T=per_tile * size)
    out = torch.empty_like(q)
    _combine_kernel[(rows,)](m, l, acc, out, heads, splits, *out.stride()[:3], G=groups, D=dim, G_PAD=g_pad,
                             D_PAD=d_pad)
    return out


def mean_block_decode(q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor, sums: torch.Tensor,
                      n: int, count: int, sink_blocks: int, recent_blocks: int, scaling: float,
                      splits: int | None = None) -> torch.Tensor:
    """Block top-k by mean key, the whole step on the GPU: scores, selection, attention (see the module doc)."""
    blocks = -(-n // key_blocks.shape[-2])
    index = select(mean_scores(q, sums, blocks), count, sink_blocks, recent_blocks)
    return attend(q, key_blocks, value_blocks, index, n, scaling, splits)
