import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnsparse.attention.policies import (
    DENSE,
    POLICIES,
    POLICY_HELP,
    Dense,
    HeadBudget,
    Policy,
    SinkWindow,
    TopK,
    parse_policies,
    parse_policy,
    sink_window_keep_mask,
    topk_keep_mask,
)
from attnsparse.errors import AttnsparseError
from tests import reference as R


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), keys=st.integers(1, 12), k=st.integers(1, 14), levels=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_topk_keep_mask_matches_brute_force_with_ties(rows, keys, k, levels, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (rows, keys), generator=generator).float()  # few levels: many ties
    visible = torch.rand(rows, keys, generator=generator) > 0.3
    assert torch.equal(topk_keep_mask(scores, visible, k), R.topk_keep(scores, visible, k))


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


def brute_sink_window_keep(visible: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Row by row over an unpadded-or-padded causal mask: the first `sink` visible keys and the last `window`."""
    keep = torch.zeros_like(visible)
    for i in range(visible.shape[0]):
        seen = [j for j in range(visible.shape[1]) if visible[i, j]]
        for j in seen[:sink] + [j for j in seen if j > i - window]:
            keep[i, j] = True
    return keep


def test_parse_policies_round_trip_and_errors():
    assert [p.spec for p in parse_policies("dense, topk:8,sink+window:4:64")] == ["dense", "topk:8", "sink+window:4:64"]
    for bad in ["topk:0", "topk:x", "sparse", "sink+window:4", "sink+window:-1:3", "dense:3", "streaming:1:0", ""]:
        with pytest.raises(AttnsparseError, match="policy") as error:
            parse_policy(bad)
        assert "\n" not in str(error.value) and POLICY_HELP in str(error.value)
    with pytest.raises(AttnsparseError, match="empty policy list"):
        parse_policies(" , ")


policy_instances = st.one_of(
    st.just(DENSE),
    st.builds(TopK, st.integers(1, 100)),
    st.builds(SinkWindow, st.integers(0, 16), st.integers(1, 100)),
)


@settings(max_examples=60, deadline=None)
@given(policy=policy_instances)
def test_every_policy_round_trips_through_its_spec(policy):
    assert parse_policy(policy.spec) == policy
    assert parse_policy(f" {policy.spec.upper()} ") == policy  # names are case- and space-insensitive
    assert parse_policy(policy) is policy


def test_registry_names_every_policy_and_its_usage(tmp_path):
    assert sorted(POLICIES.names()) == ["blockmass", "blocksparse", "budget", "decodeblock", "dense", "sink+window", "topk"]
    budget = tmp_path / "budget.json"
    budget.write_text(json.dumps(HeadBudget(((2, 3),)).to_json()))
    examples = {"dense": "dense", "topk": "topk:3", "sink+window": "sink+window:1:2", "budget": f"budget:{budget}",
                "blocksparse": "blocksparse:16:0.1:mean", "blockmass": "blockmass:16:0.9:mean",
                "decodeblock": "decodeblock:16:0.0625"}
    assert sorted(examples) == sorted(POLICIES.names())  # a new policy needs an example here
    for name, spec in examples.items():
        policy = parse_policy(spec)
        assert isinstance(policy, Policy) and policy.spec.startswith(name) and parse_policy(policy.spec) == policy
    with pytest.raises(AttnsparseError) as error:
        parse_policy("bogus:1")
    message = str(error.value)
    assert "\n" not in message
    for usage, _ in POLICIES.help_table():
        assert usage in message
    for name in [*POLICIES.names(), "streaming"]:
        assert name in message


def test_streaming_is_sink_window_in_prefill():
    """`streaming:S:W` (the decode spelling) parses to the very same rule as `sink+window:S:W`."""
    assert parse_policy("streaming:4:64") == parse_policy("sink+window:4:64") == SinkWindow(4, 64)
    assert parse_policy("streaming:4:64").spec == "sink+window:4:64"
    assert [p.spec for p in parse_policies("streaming:1:2,dense")] == ["sink+window:1:2", "dense"]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), sink=st.integers(0, 4), window=st.integers(1, 6), pad=st.integers(0, 3),
       seed=st.integers(0, 1000))
def test_keep_masks_match_brute_force(n, sink, window, pad, seed):
    generator = torch.Generator().manual_seed(seed)
    visible = torch.tril(torch.ones(n, n, dtype=torch.bool))
    visible[:, : min(pad, n - 1)] = False  # left padding
    scores = torch.randn(n, n, generator=generator)
    positions = torch.arange(n)
    assert torch.equal(Dense().keep_mask(scores, visible, positions), visible)
    assert torch.equal(SinkWindow(sink, window).keep_mask(scores, visible, positions),
                       brute_sink_window_keep(visible, sink, window))
    assert torch.equal(TopK(3).keep_mask(scores, visible, positions), R.topk_keep(scores, visible, 3))


@settings(max_examples=40, deadline=None)
@given(policy=policy_instances, n=st.integers(1, 80))
def test_kept_pairs_count_the_keep_mask(policy, n):
    """kept_pairs(n) is the number of pairs keep_mask keeps on an unpadded causal sequence of n tokens."""
    visible = torch.tril(torch.ones(n, n, dtype=torch.bool))
    scores = torch.randn(n, n)
    assert policy.kept_pairs(n) == int(policy.keep_mask(scores, visible, torch.arange(n)).sum())


def test_density_is_kept_pairs_over_causal_pairs():
    n = 10
    assert DENSE.density(n) == 1.0 and DENSE.is_dense and not TopK(3).is_dense
    assert TopK(3).density(n) == pytest.approx(sum(min(3, i + 1) for i in range(n)) / (n * (n + 1) / 2))
    assert TopK(100).density(n) == 1.0
    assert SinkWindow(1, 2).density(n) == TopK(3).density(n)
