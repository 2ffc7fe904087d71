"""Single-token (decode-step) attention kernels over per-kv-head key/value storage.

Shapes: the query of one decode step is viewed as `q (B, Hkv, G, D)`, the G query heads of a kv group standing
in for G queries against the same keys. That lets one SDPA call serve grouped-query attention without repeating
keys (transformers' `repeat_kv` copies the whole cache every step). Keys and values are `(B, Hkv, N, D)`; block
storage is the same memory viewed as `(B, Hkv, N / block, block, D)`.

Bytes read per step are what the kernel must stream from memory; `*_bytes` functions state them per kv head.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def dense_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Exact attention of q (B, Hkv, G, D) over every key (B, Hkv, N, D); returns (B, Hkv, G, D).

    Keys and values may be the first N tokens of larger per-head buffers. On CPU float32 the compiled kernel reads
    them in place (faster than SDPA for one query: `benchmarks/README.md`); otherwise SDPA.
    """
    out = _dense_decode_native(q, keys, values, scaling)
    return F.scaled_dot_product_attention(q, keys, values, scale=scaling) if out is None else out


def _token_rows(t: torch.Tensor) -> int | None:
    """Tokens between consecutive heads when t (B, H, N, D) is a token-prefix of contiguous (B, H, cap, D)
    storage, else None."""
    batch, heads, _, dim = t.shape
    stride = t.stride()
    if stride[3] != 1 or stride[2] != dim or stride[1] % dim or (batch > 1 and stride[0] != heads * stride[1]):
        return None
    return stride[1] // dim


def _dense_decode_native(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor | None:
    cap = _token_rows(keys)
    if cap is None or cap != _token_rows(values) or not _native_fits(q, keys, values, contiguous=False):
        return None
    kernel = _native_dense_decode()
    if kernel is None:
        return None
    batch, kv_heads, n, dim = keys.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    if kernel(q.data_ptr(), keys.data_ptr(), values.data_ptr(), batch * kv_heads, q.shape[2], dim, cap, n, scaling,
              torch.get_num_threads(), out.data_ptr()) != 0:
        raise MemoryError("dense attention kernel could not allocate its buffers")
    return out


def topk_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int, scaling: float) -> torch.Tensor:
    """Exact scores, each query head keeps its k largest (reads every key, only k values per head)."""
    n = keys.shape[-2]
    if k >= n:
        return dense_decode(q, keys, values, scaling)
    scores = (q @ keys.transpose(-1, -2)).mul_(scaling)  # (B, Hkv, G, N)
    top, index = scores.topk(k, dim=-1)
    probs = torch.softmax(top, dim=-1)  # (B, Hkv, G, k)
    batch, kv_heads, groups, dim = q.shape
    base = (torch.arange(batch * kv_heads, device=q.device) * n).view(batch, kv_heads, 1, 1)
    picked = values.reshape(-1, dim).index_select(0, (index + base).reshape(-1)).view(batch, kv_heads, groups, k, dim)
    return (probs.unsqueeze(-2) @ picked).squeeze(-2)


def block_bounds(q: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
    """Upper bound of q.k over each block, max over the G query heads of a group: (B, Hkv, NB).

    For each dimension max(q*kmax, q*kmin) bounds q*k (Quest); summed that is q+ . kmax + q- . kmin. The summary
    holds [kmax | kmin] side by side (B, Hkv, NB, 2D), so the bound is one matmul with [q+ | q-]; keys on the left
    (NB x 2D times 2D x G) is the orientation CPU BLAS runs fastest for this skinny product.
    """
    signed = torch.cat([q.clamp(min=0), q.clamp(max=0)], dim=-1)  # (B, Hkv, G, 2D)
    return (summary @ signed.transpose(-1, -2)).amax(dim=-1)


def block_means(q: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """q . (sum of the block's keys), max over the G query heads: (B, Hkv, NB); ranks full blocks like q . mean key.

    Only the last block can be partly filled, and it is always kept as a recent block, so the sum ranks the same as
    the mean. An estimate, not a bound: on SmolLM2 it picks far better blocks than the min/max bound (see
    benchmarks/README.md), and its summary is half the size.
    """
    return (sums @ q.transpose(-1, -2)).amax(dim=-1)


def block_channel_scores(q: torch.Tensor, sketch: torch.Tensor, n: int, block: int, channels: int) -> torch.Tensor:
    """Block scores from a channel subset (SparQ-style, Ribar et al. 2024): (B, Hkv, ceil(n / block)).

    The `channels` dimensions where the group's |q| (summed over its G heads) is largest are read from the
    channel-major key copy `sketch` (B, Hkv, D, capacity), every key < n is scored on them, and a block scores the
    max over its keys and the G heads. With channels = D this is the exact max of q.k per block.
    """
    channels = min(channels, q.shape[-1])
    blocks = -(-n // block)
    chosen = q.abs().sum(dim=-2).topk(channels, dim=-1).indices  # (B, Hkv, R)
    rows = sketch[..., :n].gather(2, chosen.unsqueeze(-1).expand(-1, -1, -1, n)).float()  # (B, Hkv, R, n)
    scores = q.gather(-1, chosen.unsqueeze(2).expand(-1, -1, q.shape[2], -1)).float() @ rows  # (B, Hkv, G, n)
    padded = scores.new_full((*scores.shape[:-1], blocks * block), float("-inf"))
    padded[..., :n] = scores
    return padded.view(*scores.shape[:-1], blocks, block).amax(dim=-1).amax(dim=-2)


def select_blocks(bounds: torch.Tensor, count: int, sink_blocks: int, recent_blocks: int) -> torch.Tensor:
    """Indices (B, Hkv, count) of the blocks to read: sink and recent blocks always, then the highest bounds.

    Overwrites `bounds` (a fresh tensor from `block_bounds`). The order of the indices is unspecified: attention
    does not depend on key order.
    """
    total = bounds.shape[-1]
    if count >= total:
        return _arange(total, bounds.device).expand(*bounds.shape[:-1], total)
    bounds[..., : min(sink_blocks, total)] = float("inf")
    bounds[..., max(total - recent_blocks, 0):] = float("inf")
    return bounds.topk(count, dim=-1, sorted=False).indices


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)


@functools.lru_cache(maxsize=64)
def _row_base(batch: int, kv_heads: int, capacity: int, device: torch.device) -> torch.Tensor:
    """Offset of each (batch, kv head) in a flattened (B * Hkv * capacity) row index, (B, Hkv, 1)."""
    return (torch.arange(batch * kv_heads, device=device) * capacity).view(batch, kv_heads, 1)


def gather_blocks(blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """blocks (B, Hkv, NBcap, S, D), index (B, Hkv, C) -> (B, Hkv, C*S, D), one contiguous copy per block.

    The gather runs on a 2-D (blocks, S*D) view: index_select over 2-D rows is ~100x faster on CPU than over a
    3-D (blocks, S, D) view.
    """
    batch, kv_heads, capacity, size, dim = blocks.shape
    base = _row_base(batch, kv_heads, capacity, index.device)
    flat = blocks.reshape(-1, size * dim).index_select(0, (index + base).reshape(-1))
    return flat.view(batch, kv_heads, -1, dim)


def block_decode(
    q: torch.Tensor,
    key_blocks: torch.Tensor,
    value_blocks: torch.Tensor,
    index: torch.Tensor,
    n: int,
    scaling: float,
) -> torch.Tensor:
    """Exact attention over the selected blocks only; positions >= n in a partly filled last block are masked.

    On CPU float32 the compiled kernel (native/blockattn.c) reads the selected blocks in place; on CUDA the Triton
    kernel (decode/triton_block.py) does; otherwise the blocks are gathered into a copy for SDPA.
    """
    kernel = _native_block_attend() if _native_fits(q, key_blocks, value_blocks) else None
    if kernel is not None:
        return _block_decode_native(kernel, q, key_blocks, value_blocks, index, n, scaling)
    gpu = gpu_kernels(q, key_blocks, value_blocks)
    if gpu is not None:
        return gpu.attend(q, key_blocks, value_blocks, index, n, scaling)
    keys = gather_blocks(key_blocks, index)
    values = gather_blocks(value_blocks, index)
    size = key_blocks.shape[-2]
    mask = None
    if n % size:
        positions = index.unsqueeze(-1) * size + _arange(size, q.device)
        mask = (positions < n).view(*index.shape[:2], 1, -1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)


@functools.cache
def _triton_block():  # type: ignore[no-untyped-def]
    """decode/triton_block.py, or None when Triton is not installed (the `gpu` extra)."""
    try:
        from attnsparse.decode import triton_block
    except ImportError:
        return None
    return triton_block


def gpu_kernels(q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor):  # type: ignore[no-untyped-def]
    """The Triton block kernels for CUDA tensors they take (`triton_block.fits`), else None (CPU: the C kernels)."""
    if not q.is_cuda:
        return None
    gpu = _triton_block()
    return gpu if gpu is not None and gpu.fits(q, key_blocks, value_blocks) else None


def _native_fits(q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor, contiguous: bool = True) -> bool:
    """CPU float32 query, keys and values (contiguous unless told): what the compiled kernels read (every step)."""
    f32 = torch.float32
    return (q.dtype == f32 and key_blocks.dtype == f32 and value_blocks.dtype == f32 and not q.is_cuda
            and key_blocks.device.type == "cpu" and value_blocks.device.type == "cpu"
            and (not contiguous or (key_blocks.is_contiguous() and value_blocks.is_contiguous())))


def _native_block_attend():  # type: ignore[no-untyped-def]
    """The compiled block attention (ctypes function), or None: the torch gather + SDPA path is used."""
    from attnsparse.core import native

    return native.function("blockattn", "block_attend", "ppppnnnnnnnfp")


def _block_decode_native(
    kernel, q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor, index: torch.Tensor,  # type: ignore[no-untyped-def]
    n: int, scaling: float,
) -> torch.Tensor:
    batch, kv_heads, capacity, size, dim = key_blocks.shape
    groups = q.shape[2]
    q = q.contiguous()
    index = index.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    status = kernel(q.data_ptr(), key_blocks.data_ptr(), value_blocks.data_ptr(), index.data_ptr(), batch * kv_heads,
                    groups, dim, capacity * size, size, index.shape[-1], n, scaling, out.data_ptr())
    if status != 0:
        raise MemoryError("block attention kernel could not allocate its score buffer")
    return out


def _native_dense_decode():  # type: ignore[no-untyped-def]
    """The compiled attention over every key (ctypes function), or None: SDPA is used."""
    from attnsparse.core import native

    return native.function("blockattn", "dense_decode", "pppnnnnnfnp")


def _native_mean_decode():  # type: ignore[no-untyped-def]
    """The compiled mean-key selection + attention (ctypes function), or None."""
    from attnsparse.core import native

    return native.function("blockattn", "block_decode_mean", "ppppnnnnnnnnnnfnp")


def mean_block_decode(
    q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor, sums: torch.Tensor, n: int, count: int,
    sink_blocks: int, recent_blocks: int, scaling: float,
) -> torch.Tensor | None:
    """Block top-k by mean key, selection and attention in one compiled call (no copies, torch's thread count for
    large steps); on CUDA the Triton kernels (decode/triton_block.py); None when neither fits (CPU float32
    contiguous, or CUDA with Triton): use the torch path.

    Same result as `block_means` + `select_blocks` + `block_decode` (ties at the threshold: lower block first).
    """
    gpu = gpu_kernels(q, key_blocks, value_blocks)
    if gpu is not None:
        return gpu.mean_block_decode(q, key_blocks, value_blocks, sums, n, count, sink_blocks, recent_blocks, scaling)
    kernel = _native_mean_decode() if _native_fits(q, key_blocks, value_blocks) and sums.is_contiguous() else None
    if kernel is None:
        return None
    batch, kv_heads, capacity, size, dim = key_blocks.shape
    blocks = -(-n // size)
    count = min(count, blocks)
    q = q.contiguous()
    out = torch.empty_like(q)
    status = kernel(q.data_ptr(), key_blocks.data_ptr(), value_blocks.data_ptr(), sums.data_ptr(), batch * kv_heads,
                    q.shape[2], dim, capacity * size, sums.shape[2], size, count, sink_blocks, recent_blocks, n,
                    scaling, torch.get_num_threads(), out.data_ptr())
    if status != 0:
        raise MemoryError("block attention kernel could not allocate its buffers")
    return out


def _native_channel_decode():  # type: ignore[no-untyped-def]
    """The compiled channel-subset selection + attention (ctypes function), or None."""
    from attnsparse.core import native

    return native.function("blockattn", "block_decode_channels", "ppppnnnnnnnnnnnfnp")


def channel_block_decode(
    q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor, sketch: torch.Tensor, n: int, count: int,
    sink_blocks: int, recent_blocks: int, channels: int, scaling: float,
) -> torch.Tensor | None:
    """Block top-k by channel-subset scores (`block_channel_scores`), selection and attention in one compiled call;
    None when the kernel or the tensors do not fit (CPU float32 keys, float16 contiguous sketch): use the torch path.
    """
    fits = _native_fits(q, key_blocks, value_blocks) and sketch.dtype == torch.float16 and sketch.is_contiguous()
    kernel = _native_channel_decode() if fits and q.shape[-1] <= 256 else None
    if kernel is None:
        return None
    batch, kv_heads, capacity, size, dim = key_blocks.shape
    count = min(count, -(-n // size))
    q = q.contiguous()
    out = torch.empty_like(q)
    status = kernel(q.data_ptr(), key_blocks.data_ptr(), value_blocks.data_ptr(), sketch.data_ptr(), batch * kv_heads,
                    q.shape[2], dim, capacity * size, sketch.shape[-1], size, count, sink_blocks, recent_blocks, n,
                    min(channels, dim), scaling, torch.get_num_threads(), out.data_ptr())
    if status != 0:
        raise MemoryError("block attention kernel could not allocate its buffers")
    return out


def block_sums(key_blocks: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of the keys of each block, from scratch: (B, Hkv, ceil(n/S), D)."""
    size = key_blocks.shape[-2]
    blocks = -(-n // size)
    valid = (torch.arange(blocks * size, device=key_blocks.device) < n).view(blocks, size, 1)
    return key_blocks[:, :, :blocks].masked_fill(~valid, 0.0).sum(dim=-2)


def block_summaries(key_blocks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise (min, max) of the keys of each block, from scratch: (B, Hkv, ceil(n/S), D) each."""
    size = key_blocks.shape[-2]
    full, rest = divmod(n, size)
    kmin = key_blocks[:, :, :full].amin(dim=-2)
    kmax = key_blocks[:, :, :full].amax(dim=-2)
    if rest:
        tail = key_blocks[:, :, full, :rest]
        kmin = torch.cat([kmin, tail.amin(dim=-2, keepdim=True)], dim=2)
        kmax = torch.cat([kmax, tail.amax(dim=-2, keepdim=True)], dim=2)
    return kmin, kmax


def dense_bytes(n: int, dim: int, itemsize: int) -> int:
    """Keys and values of n tokens, one kv head."""
    return 2 * n * dim * itemsize


def topk_bytes(n: int, k: int, groups: int, dim: int, itemsize: int) -> int:
    """Every key plus at most k values per query head of the group."""
    return n * dim * itemsize + min(n, k * groups) * dim * itemsize


def channel_block_bytes(n: int, block: int, selected: int, dim: int, itemsize: int, channels: int) -> int:
    """`channels` float16 rows of the channel-major key copy plus keys and values of the selected blocks."""
    return min(channels, dim) * n * 2 + 2 * min(selected * block, n) * dim * itemsize


def block_bytes(n: int, block: int, selected: int, dim: int, itemsize: int, summary_vectors: int = 2) -> int:
    """Summaries of every block (2 vectors: min and max; 1: key sum) plus keys and values of the selected blocks."""
    blocks = -(-n // block)
    return summary_vectors * blocks * dim * itemsize + 2 * min(selected * block, n) * dim * itemsize
