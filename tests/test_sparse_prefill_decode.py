"""Block-sparse prefill into a SparseCache: keys arrive in the projection's (B, N, H, D) memory layout.

`generate` prefills through `sparse_decoding`, whose cache hands the attention function the layer's own key and
value states (the k/v projections viewed as (B, H, N, D): not contiguous); the estimators and the block kernels
must give what they give on contiguous tensors, and sparse prefill followed by dense decoding must match dense.
"""

from __future__ import annotations

import pytest
import torch

from attnsparse.attention.backend import sparse_attention
from attnsparse.attention.blockattend import block_sparse_attention, gathered_block_attention
from attnsparse.attention.selection import ESTIMATORS, BlockGrid, Density, parse_estimator, select_blocks


def _projection_layout(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) with the memory of a (B, N, H, D) projection output, as the attention modules pass it."""
    view = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("estimator", [name for name in ESTIMATORS.names() if name != "gate"])
@pytest.mark.parametrize("n", [64, 45])
def test_estimators_and_kernels_accept_keys_in_the_projection_layout(estimator, n):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, n, 16, generator=gen)
    k = torch.randn(1, 2, n, 16, generator=gen)
    v = torch.randn(1, 2, n, 16, generator=gen)
    k_view, v_view = _projection_layout(k), _projection_layout(v)
    grid = BlockGrid(16, n, n)
    est = parse_estimator(estimator)
    expected = est.log_mass(q, k, grid, scaling=0.25, layer_idx=0)
    got = est.log_mass(q, k_view, grid, scaling=0.25, layer_idx=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    blocks = select_blocks(expected, grid, Density(0.5))
    dense_out = block_sparse_attention(q, k, v, blocks, grid, 0.25)
    torch.testing.assert_close(block_sparse_attention(q, k_view, v_view, blocks, grid, 0.25), dense_out)
    torch.testing.assert_close(gathered_block_attention(q, k_view, v_view, blocks, grid, 0.25),
                               gathered_block_attention(q, k, v, blocks, grid, 0.25))


def test_sparse_prefill_then_dense_decode_covering_budget_equals_dense_generation():
    from attnsparse.core.tiny import tiny_llama
    from attnsparse.decode.generate import generate

    model = tiny_llama(seed=0).eval()
    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(1))
    dense = generate(model, ids, "dense", max_new_tokens=6, keep_logits=True)
    for estimator in [name for name in ESTIMATORS.names() if name != "gate"]:
        with sparse_attention(model, f"blocksparse:8:1:{estimator}"):
            sparse = generate(model, ids, "dense", max_new_tokens=6, keep_logits=True)
        assert torch.equal(sparse.sequences, dense.sequences), estimator
        for a, b in zip(sparse.logits, dense.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
