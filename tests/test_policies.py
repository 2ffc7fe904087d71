import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnsparse.attention.policies import Policy, parse_policies, parse_policy, sink_window_keep_mask, topk_keep_mask
from attnsparse.errors import AttnsparseError


def brute_topk_keep(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Row by row: order visible keys by (score descending, index ascending) and keep the first k."""
    keep = torch.zeros_like(visible)
    for row in range(scores.shape[0]):
        candidates = [j for j in range(scores.shape[1]) if visible[row, j]]
        candidates.sort(key=lambda j: (-scores[row, j].item(), j))
        for j in candidates[:k]:
            keep[row, j] = True
    return keep


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), keys=st.integers(1, 12), k=st.integers(1, 14), levels=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_topk_keep_mask_matches_brute_force_with_ties(rows, keys, k, levels, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (rows, keys), generator=generator).float()  # few levels: many ties
    visible = torch.rand(rows, keys, generator=generator) > 0.3
    assert torch.equal(topk_keep_mask(scores, visible, k), brute_topk_keep(scores, visible, k))


def test_sink_window_keeps_first_visible_and_recent_keys():
    visible = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    visible[:, 0] = False  # a padded first key: the sink moves to the first visible one
    visible[0, 0] = False
    keep = sink_window_keep_mask(visible, torch.arange(6), sink=1, window=2)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for i in range(6):
        for j in range(6):
            if visible[i, j] and (j > i - 2 or j == 1):
                expected[i, j] = True
    assert torch.equal(keep, expected)


def test_parse_policies_round_trip_and_errors():
    assert [p.spec for p in parse_policies("dense, topk:8,sink+window:4:64")] == ["dense", "topk:8", "sink+window:4:64"]
    for bad in ["topk:0", "topk:x", "sparse", "sink+window:4", "sink+window:-1:3", "dense:3"]:
        with pytest.raises(AttnsparseError, match="policy"):
            parse_policy(bad)
    with pytest.raises(AttnsparseError, match="empty policy list"):
        parse_policies(" , ")


def test_density_is_kept_pairs_over_causal_pairs():
    n = 10
    assert Policy("dense").density(n) == 1.0
    assert Policy("topk", k=3).density(n) == pytest.approx(sum(min(3, i + 1) for i in range(n)) / (n * (n + 1) / 2))
    assert Policy("topk", k=100).density(n) == 1.0
