"""Top-k attention on tied scores: the earlier key wins, on every path (masked softmax and gathered keys).

Integer-valued queries and keys make tied scores the rule rather than the exception; torch.topk breaks ties in
no promised order, so the gathered path must notice a tie at the k-th score and fall back to the mask rule.
Rows are wide enough (>= 32 k keys) that the backend picks the gathered path by itself.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnsparse.attention.backend import chunked_attention
from attnsparse.attention.policies import parse_policy


def brute_topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, keep: int,
                         scaling: float) -> torch.Tensor:
    """kv heads repeated; each row keeps its `keep` best visible keys ordered by (score desc, index asc).

    Scores of integer inputs are integers, so score * 4096 - index orders exactly that way (keys < 4096)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1).double(), v.repeat_interleave(groups, dim=1).double()
    exact = q.double() @ k.transpose(-1, -2)
    assert torch.equal(exact, exact.round())
    order = (exact * 4096 - torch.arange(exact.shape[-1], dtype=torch.float64)).masked_fill(~mask, float("-inf"))
    kept = torch.zeros_like(exact, dtype=torch.bool).scatter_(-1, order.topk(keep, dim=-1).indices, True) & mask
    probs = torch.softmax((exact * scaling).masked_fill(~kept, float("-inf")), dim=-1)
    return (probs @ v).transpose(1, 2).float()


def integer_inputs(seed: int, heads: int, kv_heads: int, queries: int, keys: int, levels: int):  # type: ignore[no-untyped-def]
    """q, k with integer entries in [-levels, levels], random v, and the causal mask of the last `queries` rows."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-levels, levels + 1, (1, heads, queries, 4), generator=gen).float()
    k = torch.randint(-levels, levels + 1, (1, kv_heads, keys, 4), generator=gen).float()
    v = torch.randn(1, kv_heads, keys, 4, generator=gen)
    positions = torch.arange(queries) + keys - queries
    return q, k, v, (torch.arange(keys)[None, :] <= positions[:, None])[None, None]


def test_gathered_topk_on_ties_keeps_the_earliest_keys() -> None:
    q, k, v, mask = integer_inputs(0, heads=4, kv_heads=2, queries=8, keys=72, levels=1)
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)
    tied = (scores.topk(3, dim=-1).values[..., 1:].diff(dim=-1) == 0).any()
    assert tied  # the inputs do tie at the boundary of top-1 and top-2
    for keep in (1, 2):
        out = chunked_attention(q, k, v, mask, scaling=0.5, policy=parse_policy(f"topk:{keep}"), query_chunk=8)
        assert torch.allclose(out, brute_topk_attention(q, k, v, mask, keep, 0.5), atol=1e-5)


@settings(max_examples=40)  # nearly every example ties (72+ keys of few integer scores)
@given(seed=st.integers(0, 2**16), keep=st.integers(1, 2), levels=st.integers(1, 2), queries=st.integers(1, 6),
       chunk=st.integers(1, 6), groups=st.sampled_from([1, 2]))
def test_topk_with_integer_scores_equals_brute_force(seed, keep, levels, queries, chunk, groups) -> None:  # type: ignore[no-untyped-def]
    keys = 32 * keep + 8
    q, k, v, mask = integer_inputs(seed, heads=2 * groups, kv_heads=2, queries=queries, keys=keys, levels=levels)
    out = chunked_attention(q, k, v, mask, scaling=0.5, policy=parse_policy(f"topk:{keep}"), query_chunk=chunk)
    assert torch.allclose(out, brute_topk_attention(q, k, v, mask, keep, 0.5), atol=1e-5)
