"""Block-sparse prefill: the selection rule, the estimators, the attention over kept blocks, the policy end to end.

References are written from the definitions (docs/prefill.md) with python loops in tests/reference.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnsparse.attention.backend import chunked_attention, sparse_attention
from attnsparse.attention.blockattend import block_sparse_attention, gathered_block_attention
from attnsparse.attention.policies import BlockSparse, parse_policy
from attnsparse.attention.selection import (
    ESTIMATORS,
    BlockGrid,
    Density,
    Mass,
    forced_blocks,
    parse_estimator,
    select_blocks,
)
from attnsparse.errors import AttnsparseError
from tests import reference as R


def _inputs(batch: int, heads: int, kv_heads: int, n: int, dim: int, seed: int, queries: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries or n, dim, generator=gen)
    k = torch.randn(batch, kv_heads, n, dim, generator=gen) * 1.5
    v = torch.randn(batch, kv_heads, n, dim, generator=gen)
    return q, k, v


# ---- the selection rule -------------------------------------------------------------------------------------
grids = st.builds(lambda block, split, n, q_share: BlockGrid(block, max(1, int(n * q_share)), n,
                                                             block // split if block % split == 0 else block),
                  st.integers(1, 8), st.sampled_from([1, 1, 2, 4]), st.integers(1, 40),
                  st.sampled_from([1.0, 1.0, 0.5, 0.01]))


@settings(max_examples=60, deadline=None)
@given(grid=grids, density=st.floats(0.01, 1.0), sink=st.integers(0, 2), local=st.integers(1, 3),
       seed=st.integers(0, 1000))
def test_density_selection_is_causal_keeps_forced_and_respects_the_budget(grid, density, sink, local, seed):
    gen = torch.Generator().manual_seed(seed)
    log_mass = torch.randn(2, 3, grid.query_blocks, grid.key_blocks, generator=gen)
    keep = select_blocks(log_mass, grid, Density(density), sink=sink, local=local)
    causal, forced = R.block_causal(grid), R.block_forced(grid, sink, local)
    assert not (keep & ~causal).any()
    assert (keep | ~forced).all()
    budget = max(1, math.floor(density * int(causal.sum()) + 0.5))
    assert (keep.sum(dim=(-1, -2)) == max(budget, int(forced.sum()))).all()
    assert torch.equal(keep, R.density_select(log_mass, causal, forced, budget))


@settings(max_examples=40, deadline=None)
@given(grid=grids, density=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_density_selection_breaks_ties_towards_the_earlier_block(grid, density, seed):
    """Equal estimated masses within a row (two levels only): the earlier (row, column) is kept first."""
    gen = torch.Generator().manual_seed(seed)
    log_mass = 2.0 * (torch.rand(2, 3, grid.query_blocks, grid.key_blocks, generator=gen) < 0.3).float()
    keep = select_blocks(log_mass, grid, Density(density))
    causal, forced = R.block_causal(grid), R.block_forced(grid, 1, 1)
    budget = max(1, math.floor(density * int(causal.sum()) + 0.5))
    assert torch.equal(keep, R.density_select(log_mass, causal, forced, budget))


@settings(max_examples=60, deadline=None)
@given(grid=grids, gamma=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_mass_selection_keeps_the_fewest_blocks_reaching_gamma(grid, gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    log_mass = torch.randn(1, 2, grid.query_blocks, grid.key_blocks, generator=gen) * 2
    keep = select_blocks(log_mass, grid, Mass(gamma))
    causal, forced = R.block_causal(grid), R.block_forced(grid, 1, 1)
    assert torch.equal(keep, R.mass_select(log_mass, causal, forced, gamma))


def test_forced_blocks_are_sink_and_diagonal():
    grid = BlockGrid(4, 16, 16)
    assert forced_blocks(grid, 1, 1).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]
    late = BlockGrid(4, 3, 14)  # queries at 11, 12, 13: key blocks 2 and 3
    assert late.first == 2 and late.query_blocks == 2 and late.key_blocks == 4
    assert forced_blocks(late, 1, 2).int().tolist() == [[1, 1, 1, 0], [1, 0, 1, 1]]
    split = BlockGrid(4, 14, 14, key_block=2)  # query blocks of 4, key blocks of 2: the diagonal is 2 key blocks
    assert (split.query_blocks, split.key_blocks, split.causal_pairs()) == (4, 7, 2 + 4 + 6 + 7)
    assert forced_blocks(split, 1, 1).int().tolist() == [[1, 1, 0, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0, 0],
                                                         [1, 0, 0, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0, 1]]
    with pytest.raises(AttnsparseError, match="must divide"):
        BlockGrid(4, 14, 14, key_block=3)


# ---- attention over kept blocks -----------------------------------------------------------------------------
def _random_blocks(grid: BlockGrid, batch: int, kv_heads: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, kv_heads, grid.query_blocks, grid.key_blocks, generator=gen) < 0.4
    return (keep | forced_blocks(grid, 1, 1)) & grid.causal()


@pytest.mark.parametrize("batch,heads,kv_heads,n,dim,block,queries,key_block", [
    (1, 4, 2, 37, 16, 8, None, 8),  # GQA, partial last block
    (2, 3, 3, 50, 8, 16, None, 16),  # batch 2, MHA
    (1, 6, 2, 40, 24, 8, 13, 8),  # fewer queries than keys, first query block partial
    (1, 2, 1, 5, 4, 8, None, 8),  # one partial block
    (1, 4, 2, 37, 16, 8, None, 2),  # key blocks smaller than query blocks, partial last key block
    (1, 6, 2, 41, 8, 16, 19, 4),  # and fewer queries than keys
])
def test_gathered_attention_matches_brute_force_over_the_same_blocks(batch, heads, kv_heads, n, dim, block, queries,
                                                                      key_block):
    q, k, v = _inputs(batch, heads, kv_heads, n, dim, seed=n, queries=queries)
    grid = BlockGrid(block, q.shape[2], n, key_block)
    blocks = _random_blocks(grid, batch, kv_heads, seed=1)
    keep = R.block_keep_tokens(blocks, grid, heads // kv_heads)
    expected = R.attention(q, k, v, dim**-0.5, keep=keep).transpose(1, 2)
    torch.testing.assert_close(gathered_block_attention(q, k, v, blocks, grid, dim**-0.5), expected,
                               atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(block_sparse_attention(q, k, v, blocks, grid, dim**-0.5), expected,
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("estimator", ["mean", "antidiag", "vslash", "exact", "meanquery"])
def test_covering_density_reproduces_dense_through_the_backend(estimator):
    q, k, v = _inputs(2, 4, 2, 45, 16, seed=3)
    policy = parse_policy(f"blocksparse:8:1:{estimator}")
    expected = R.attention(q, k, v, 0.25, keep=torch.ones(45, 45).tril().bool()).transpose(1, 2)
    out = chunked_attention(q, k, v, None, scaling=0.25, policy=policy, query_chunk=16)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    assert policy.density(45) == 1.0


def test_observers_see_the_block_mask_expanded_to_keys():
    q, k, v = _inputs(1, 4, 2, 30, 8, seed=4)
    policy = parse_policy("blocksparse:8:0.3:mean")
    seen = []
    out = chunked_attention(q, k, v, None, scaling=0.3, policy=policy, query_chunk=7,
                            observers=[lambda chunk: seen.append(chunk.kept)])
    prepared = policy.prepare(q, k, scaling=0.3, layer_idx=0)
    full = R.block_keep_tokens(prepared.blocks, prepared.grid, 2)
    for start, chunk in zip(range(0, 30, 7), seen, strict=True):
        assert torch.equal(chunk, full[:, :, start:start + chunk.shape[2], :chunk.shape[-1]])
    expected = R.attention(q, k, v, 0.3, keep=full).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


# ---- the policy ---------------------------------------------------------------------------------------------
def test_specs_round_trip_and_errors():
    for spec in ["blocksparse:64:0.1:mean", "blockmass:32:0.9:mean", "blocksparse:16:0.05:mean:sink=2,local=3",
                 "blocksparse:64x4:0.1:mean", "blockmass:32x8:0.9:antidiag", "blocksparse:16:0.1:mean:per=head",
                 "blocksparse:16:0.1:mean:sub=4,per=head"]:
        policy = parse_policy(spec)
        assert isinstance(policy, BlockSparse) and policy.spec == spec and parse_policy(policy.spec) == policy
    for bad in ["blocksparse:64", "blocksparse:0:0.1", "blocksparse:64:0", "blocksparse:64:1.5",
                "blockmass:64:0", "blocksparse:64:0.1:nosuch", "blocksparse:x:0.1", "blocksparse:64x5:0.1",
                "blocksparse:64x0:0.1", "blocksparse:16:0.1:mean:per=kv"]:
        with pytest.raises(AttnsparseError) as error:
            parse_policy(bad)
        assert "\n" not in str(error.value)
    assert "mean" in ESTIMATORS.usage() and parse_estimator("mean").spec == "mean"


@pytest.mark.parametrize("spec", ["blocksparse:8:0.45:mean", "blockmass:8x4:0.6:exact", "blocksparse:8:0.5:vslash:last=5"])
def test_per_head_selection_is_the_group_selection_of_keys_repeated_per_head(spec):
    """per=head on GQA inputs is per-group selection on MHA inputs (each query head its own copy of its kv head);
    the kept blocks then differ between heads of one group, so the path that reads keys per head is exercised."""
    q, k, v = _inputs(2, 6, 2, 90, 16, seed=11)
    per_head = parse_policy(spec + ("," if "=" in spec else ":") + "per=head")
    prepared = per_head.prepare(q, k, scaling=0.3, layer_idx=0)
    k_rep, v_rep = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    reference = parse_policy(spec).prepare(q, k_rep, scaling=0.3, layer_idx=0)
    assert prepared.blocks.shape[1] == 6 and torch.equal(prepared.blocks, reference.blocks)
    assert not all(torch.equal(prepared.blocks[:, 0], prepared.blocks[:, h]) for h in (1, 2))
    expected = R.attention(q, k_rep, v_rep, 0.3, keep=R.block_keep_tokens(reference.blocks, reference.grid, 1))
    for path in (block_sparse_attention, gathered_block_attention):
        torch.testing.assert_close(path(q, k, v, prepared.blocks, prepared.grid, 0.3)
                                   if path is block_sparse_attention else
                                   path(q, k_rep, v_rep, prepared.blocks, prepared.grid, 0.3),
                                   expected.transpose(1, 2), atol=2e-6, rtol=1e-5)
    out = chunked_attention(q, k, v, None, scaling=0.3, policy=parse_policy(per_head.spec), query_chunk=16)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=2e-6, rtol=1e-5)


def test_sparse_prefill_on_a_tiny_model_covering_budget_equals_dense():
    from attnsparse.core.tiny import tiny_llama

    model = tiny_llama(seed=0).eval()
    ids = torch.randint(0, 97, (2, 41), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_attention(model, "blocksparse:8:1:mean"):
            sparse = model(ids).logits
        with sparse_attention(model, "blocksparse:8:0.2:mean"):
            thin = model(ids).logits
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(thin, dense, atol=1e-3)


# ---- estimators ---------------------------------------------------------------------------------------------
def _estimated_probs(estimator, q, k, grid, scaling):
    log_mass = parse_estimator(estimator).log_mass(q, k, grid, scaling=scaling, layer_idx=0)
    causal = grid.causal()
    return torch.softmax(log_mass.masked_fill(~causal, float("-inf")), dim=-1).nan_to_num(0.0).double()


@pytest.mark.parametrize("n,block,queries,heads,kv_heads,key_block", [
    (21, 4, None, 4, 2, 4), (16, 8, None, 2, 2, 8), (19, 4, 6, 3, 1, 4), (23, 8, None, 4, 2, 2), (19, 8, 9, 2, 1, 4)])
@pytest.mark.parametrize("estimator", ["mean", "antidiag:stride=2", "antidiag:stride=3", "vslash:last=5", "exact:chunk=4",
                                       "meanquery:chunk=2"])
def test_estimators_match_brute_force_block_masses(estimator, n, block, queries, heads, kv_heads, key_block):
    q, k, _ = _inputs(2, heads, kv_heads, n, 8, seed=n + block, queries=queries)
    grid = BlockGrid(block, q.shape[2], n, key_block)
    got = _estimated_probs(estimator, q, k, grid, 0.4)
    name, _, arg = estimator.partition(":")
    value = int(arg.split("=")[1]) if arg else 0
    if name == "antidiag":
        value = max(d for d in range(1, min(key_block, value) + 1) if key_block % d == 0)  # runs tile the blocks
    for b in range(2):
        if name == "mean":
            expected = R.mean_key_block_probs(q[b], k[b], grid, 0.4)
        elif name == "antidiag":
            expected = R.antidiagonal_block_probs(q[b], k[b], grid, 0.4, value)
        elif name == "exact":
            expected = R.exact_block_probs(q[b], k[b], grid, 0.4)
        elif name == "meanquery":
            expected = R.mean_query_block_probs(q[b], k[b], grid, 0.4)
        else:
            expected = R.vertical_slash_block_probs(q[b], k[b], grid, 0.4, value)
        torch.testing.assert_close(got[b], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch,heads,kv_heads,n,dim,block,queries,key_block", [
    (1, 4, 2, 37, 16, 8, None, 8),  # GQA, partial last block, tiles of 4 rows and a remainder
    (2, 3, 3, 50, 32, 16, None, 16),  # batch 2, MHA
    (1, 6, 2, 40, 24, 8, 13, 8),  # head dim not a multiple of 16, fewer queries than keys
    (1, 9, 3, 150, 64, 64, None, 64),  # SmolLM2's heads and head dim, block 64
    (1, 2, 1, 20, 8, 32, None, 32),  # one partial block wider than the sequence
    (1, 9, 3, 301, 64, 64, None, 4),  # queries in 64, keys in 4: 16 key blocks gathered per tile, partial last
    (2, 4, 2, 90, 16, 32, 41, 8),  # keys in 8 under queries in 32, fewer queries than keys
    (1, 4, 1, 70, 16, 48, None, 24),  # key blocks of 24: tiles of 2 blocks, 48 columns
    (1, 6, 3, 100, 32, 64, None, 32),  # key blocks of 32: two 16-key panels each, read in place, partial last
    (1, 2, 2, 61, 16, 36, 50, 12),  # key blocks of 12: copied runs that cross 16-key panels
])
@pytest.mark.parametrize("per_head", [False, True])
def test_kernel_matches_brute_force_over_the_same_blocks(wide_kernel_build, batch, heads, kv_heads, n, dim, block,
                                                         queries, key_block, per_head):
    """Per kv group (the group's heads share kept blocks) and per query head (each head its own blocks, read from
    its kv head's keys)."""
    from attnsparse.core import native

    q, k, v = _inputs(batch, heads, kv_heads, n, dim, seed=n + dim, queries=queries)
    grid = BlockGrid(block, q.shape[2], n, key_block)
    blocks = _random_blocks(grid, batch, heads if per_head else kv_heads, seed=2)
    keep = R.block_keep_tokens(blocks, grid, 1 if per_head else heads // kv_heads)
    expected = R.attention(q, k, v, dim**-0.5, keep=keep).transpose(1, 2)
    kernel = native.load("blocksparse")
    assert kernel is not None and kernel.vector_paths() == wide_kernel_build[1]
    torch.testing.assert_close(block_sparse_attention(q, k, v, blocks, grid, dim**-0.5), expected,
                               atol=3e-6, rtol=2e-5)


@pytest.mark.parametrize("n,block,queries,key_block,sub", [(37, 8, None, 2, 4), (45, 16, 30, 4, 4), (29, 16, 7, 4, 8),
                                                         (41, 16, None, 16, 4), (37, 8, 23, 8, 1), (30, 16, 11, 8, 2)])
def test_sub_block_mean_estimator_averages_the_sub_blocks_masses(n, block, queries, key_block, sub):
    """mean:sub=S: a query block's mass on key block j is the query-weighted mean of its S-query sub-blocks' masses
    (each from its mean query, over the key blocks starting by its last query), which differs from the mass of the
    whole block's mean query; S may be smaller than a key block."""
    q, k, _ = _inputs(2, 4, 2, n, 8, seed=n, queries=queries)
    grid = BlockGrid(block, q.shape[2], n, key_block)
    got = _estimated_probs(f"mean:sub={sub}", q, k, grid, 0.4)
    for b in range(2):
        expected = R.sub_block_mean_key_probs(q[b], k[b], grid, 0.4, sub)
        torch.testing.assert_close(got[b], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, _estimated_probs("mean", q, k, grid, 0.4), atol=1e-3)
    with pytest.raises(AttnsparseError, match="sub=3"):
        parse_estimator("mean:sub=3").log_mass(q, k, grid, scaling=0.4, layer_idx=0)
