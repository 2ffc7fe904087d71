"""FlexAttention over a kept-block selection (attention/flexblock.py) against brute force and the CPU block paths.

On CPU flex_attention runs eagerly (inference; it reads only the mask function), so the block tables the compiled
GPU kernel reads are checked separately: they list exactly the kept blocks, split into partial and full blocks.
"""

from __future__ import annotations

import pytest
import torch

from attnsparse.attention import flexblock
from attnsparse.attention.blockattend import block_sparse_attention, gathered_block_attention
from attnsparse.attention.selection import BlockGrid, Density, MeanKey, expand_to_keys, select_blocks
from tests.reference import attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inputs(batch: int, heads: int, kv_heads: int, queries: int, keys: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, keys, dim, generator=gen) for _ in range(2))
    return q, k, v


def brute_force(q, k, v, blocks, grid, scaling):
    """softmax over the kept blocks' keys at or before each query's position, float64: (B, Q, H, D)."""
    positions = torch.arange(grid.offset, grid.keys)
    keep = expand_to_keys(blocks, grid, positions, grid.keys, q.shape[1] // k.shape[1])
    keep &= torch.arange(grid.keys)[None, :] <= positions[:, None]
    return attention(q.double(), k.double(), v.double(), scaling, keep=keep).transpose(1, 2)


@pytest.mark.parametrize(("queries", "keys", "block", "density"), [(100, 100, 16, 0.4), (64, 96, 32, 0.5),
                                                                   (37, 101, 16, 0.3)])
def test_flex_over_the_selection_equals_brute_force_and_the_torch_path(queries, keys, block, density):
    """The selection of `select_blocks` (mean estimator) as a BlockMask: partial last blocks, chunks at an offset,
    G = 2 query heads per kv head."""
    q, k, v = inputs(1, 4, 2, queries, keys, 16, seed=queries)
    grid = BlockGrid(block, queries, keys)
    blocks = select_blocks(MeanKey().log_mass(q, k, grid, scaling=0.25, layer_idx=0), grid, Density(density))
    assert flexblock.fits(grid)
    got = flexblock.flex_block_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), blocks.to(DEVICE), grid, 0.25)
    assert torch.allclose(got.cpu().double(), brute_force(q, k, v, blocks, grid, 0.25), atol=2e-5, rtol=1e-4)
    assert torch.allclose(got.cpu(), gathered_block_attention(q, k, v, blocks, grid, 0.25), atol=2e-5, rtol=1e-4)
    assert torch.allclose(got.cpu(), block_sparse_attention(q, k, v, blocks, grid, 0.25), atol=2e-5, rtol=1e-4)


def test_block_tables_list_the_kept_blocks_full_below_the_diagonal():
    """What the compiled kernel reads: partial + full blocks are the kept table, full ones strictly left of the
    diagonal (where the mask function is all true, so skipping it is exact)."""
    grid = BlockGrid(16, 80, 80)
    gen = torch.Generator().manual_seed(3)
    blocks = (torch.rand(2, 2, 5, 5, generator=gen) < 0.5) & grid.causal()
    blocks |= torch.eye(5, dtype=torch.bool)
    mask = flexblock.block_mask(blocks, grid, groups=3)
    table = blocks[:, :, None].expand(2, 2, 3, 5, 5).reshape(2, 6, 5, 5)
    assert torch.equal(mask.to_dense().bool(), table)
    full = torch.zeros_like(table)
    for b in range(2):
        for h in range(6):
            for r in range(5):
                count = int(mask.full_kv_num_blocks[b, h, r])
                full[b, h, r, mask.full_kv_indices[b, h, r, :count].long()] = True
    assert torch.equal(full, table & (torch.arange(5)[None, :] < torch.arange(5)[:, None]))
    q_idx, kv_idx = torch.meshgrid(torch.arange(80), torch.arange(80), indexing="ij")
    dense = mask.mask_mod(torch.tensor(1), torch.tensor(4), q_idx, kv_idx)
    for r, c in full[1, 4].nonzero().tolist():
        assert dense[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].all()


def test_unaligned_chunks_do_not_fit():
    assert not flexblock.fits(BlockGrid(16, 10, 100))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: flex_attention has no CPU backward")
def test_cuda_flex_gradients_equal_the_torch_path():
    """Sparse-aware training on CUDA: flex's backward gives the torch block path's gradients."""
    q, k, v = inputs(1, 4, 2, 256, 256, 64, seed=1)
    grid = BlockGrid(64, 256, 256)
    blocks = select_blocks(MeanKey().log_mass(q, k, grid, scaling=0.125, layer_idx=0), grid, Density(0.5))
    grads = []
    for device, fn in (("cuda", flexblock.flex_block_attention), ("cpu", gathered_block_attention)):
        leaves = [t.to(device).requires_grad_(True) for t in (q, k, v)]
        fn(*leaves, blocks.to(device), grid, 0.125).square().sum().backward()
        grads.append([t.grad.cpu() for t in leaves])
    for gpu, cpu in zip(*grads, strict=True):
        assert torch.allclose(gpu, cpu, atol=1e-3, rtol=1e-3)
