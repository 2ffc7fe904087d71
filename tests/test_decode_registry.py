"""Decode policies and block scorers are registered methods: every one round-trips its spec and its plan entry, and
a scorer written in one file (here, in this test) works end to end in a plan against brute force."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from attnsparse.core.tiny import tiny_llama
from attnsparse.decode.cache import PENDING, SparseLayer
from attnsparse.decode.generate import generate
from attnsparse.decode.plan import DecodePlan, parse_head_policy
from attnsparse.decode.policies import POLICY_TYPES, BlockPolicy, StreamingPolicy, policy_from_dict
from attnsparse.decode.scorers import SCORER_TYPES, BlockScorer, ChannelScore, register_scorer
from attnsparse.errors import AttnsparseError

pytestmark = pytest.mark.usefixtures("one_thread")

PLANS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "plans"
EXAMPLES = {  # every registered policy needs examples here (checked), covering every field
    "dense": ["dense"],
    "topk": ["topk:1", "topk:256"],
    "block": ["block:16:0.0625", "block:8:64", "block:4:1.0:bound", "block:16:64:channels24", "block:16:0.5:channels1"],
    "streaming": ["streaming:0:1", "streaming:4:1020"],
}


@register_scorer("exactmax", "exactmax", "test only: the true max q . k of each block, from a float32 key copy")
@dataclass(frozen=True)
class ExactMaxScore(BlockScorer):
    """A throwaway scorer, defined here and nowhere else: its own token-major float32 copy of the keys."""

    def grow(self, old: torch.Tensor, key_blocks: torch.Tensor, n: int) -> torch.Tensor:
        batch, heads, blocks, size, dim = key_blocks.shape
        data = torch.zeros(batch, heads, blocks * size, dim)
        if n:
            data[:, :, :n] = old[:, :, :n]
        return data

    def update(self, data: torch.Tensor, key_blocks: torch.Tensor, keys: torch.Tensor, start: int) -> None:
        data[:, :, start : start + keys.shape[2]] = keys.float()

    def scores(self, data: torch.Tensor, key_blocks: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
        size = key_blocks.shape[-2]
        blocks = -(-n // size)
        scores = q.float() @ data[:, :, : blocks * size].transpose(-1, -2)
        scores[..., n:] = float("-inf")
        return scores.view(*scores.shape[:-1], blocks, size).amax(-1).amax(-2)

    def bytes_read(self, n: int, block: int, selected: int, dim: int, itemsize: int) -> int:
        return 4 * n * dim + 2 * min(selected * block, n) * dim * itemsize


def test_every_registered_policy_round_trips_its_spec_and_plan_entry(tmp_path):
    assert set(POLICY_TYPES) == set(EXAMPLES)
    for kind, specs in EXAMPLES.items():
        for spec in specs:
            policy = parse_head_policy(spec)
            assert (policy.kind, policy.spec) == (kind, spec)
            assert parse_head_policy(policy.spec) == policy
            entry = policy.to_dict()
            assert entry["policy"] == kind and policy_from_dict(json.loads(json.dumps(entry))) == policy
            plan = DecodePlan.uniform(policy, 2, 3)
            plan.heads[1][0] = StreamingPolicy(2, 9)
            plan.save(tmp_path / "plan.json")
            assert DecodePlan.load(tmp_path / "plan.json").heads == plan.heads


def test_every_registered_scorer_round_trips_in_a_block_policy():
    assert {"mean", "bound", "channels"} <= set(SCORER_TYPES)
    scorers = [cls() for cls in SCORER_TYPES.values()] + [ChannelScore(3)]
    for scorer in scorers:
        policy = BlockPolicy(8, budget=40, sink_blocks=2, recent_blocks=3, score=scorer)
        assert parse_head_policy(f"block:8:40:{scorer.spec}").score == scorer
        assert policy_from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


def test_plan_entries_keep_their_exact_format():
    """The committed plans load unchanged and are written back key for key, in the same order."""
    files = sorted(PLANS.glob("*.json"))
    assert files
    for path in files:
        text = json.loads(path.read_text())
        assert json.dumps(DecodePlan.load(path).to_dict()) == json.dumps(text)
    assert parse_head_policy("block:16:64:channels7").to_dict() == {
        "policy": "block", "block_size": 16, "budget": 64, "density": 0.0, "sink_blocks": 1, "recent_blocks": 2,
        "score": "channels", "channels": 7}
    assert list(parse_head_policy("block:16:0.0625").to_dict()) == [
        "policy", "block_size", "budget", "density", "sink_blocks", "recent_blocks", "score"]


def test_old_spellings_and_the_prefill_name_of_streaming():
    assert parse_head_policy("sink+window:4:64") == parse_head_policy("streaming:4:64") == StreamingPolicy(4, 64)
    assert parse_head_policy("Block:16:64:CHANNELS").score == ChannelScore(16)
    assert parse_head_policy("block:16:64:mean").spec == "block:16:64"


@pytest.mark.parametrize(("entry", "named"), [
    ({"policy": "streaming", "sink": 4, "window": 8, "k": 3}, "unknown fields ['k']"),  # a field of another policy
    ({"policy": "block", "block_size": 16, "budget": 64, "score": "mean", "channels": 16}, "no fields ['channels']"),
    ({"policy": "block", "block_size": 16, "budget": 64, "score": "best"}, "unknown block score 'best'"),
    ({"policy": "topk"}, "'k'"),
    ({"policy": "topk", "k": 0}, "k >= 1"),
    ({"policy": "nonsense"}, "unknown decode policy 'nonsense'"),
    ({"k": 3}, "needs a 'policy' field"),
])
def test_bad_plan_entries_are_one_line_errors_naming_the_problem(entry, named):
    with pytest.raises(AttnsparseError) as error:
        policy_from_dict(entry)
    assert named in str(error.value) and "\n" not in str(error.value)


def brute_force_block_attention(q, keys, values, size, count, sink, recent, scaling):
    """Per kv head: blocks ranked by the true max q . k over their keys and query heads; sink and recent kept."""
    batch, heads = q.shape[:2]
    n = keys.shape[2]
    blocks = -(-n // size)
    out = torch.empty_like(q)
    for b in range(batch):
        for h in range(heads):
            scores = q[b, h] @ keys[b, h].T
            per_block = torch.stack([scores[:, j * size : (j + 1) * size].max() for j in range(blocks)])
            forced = set(range(min(sink, blocks))) | set(range(max(blocks - recent, 0), blocks))
            rest = [j for j in per_block.argsort(descending=True).tolist() if j not in forced]
            chosen = forced | set(rest[: max(count - len(forced), 0)])
            keep = torch.zeros(n, dtype=torch.bool)
            for j in chosen:
                keep[j * size : (j + 1) * size] = True
            weights = torch.softmax((scores * scaling).masked_fill(~keep, float("-inf")), dim=-1)
            out[b, h] = weights @ values[b, h]
    return out


def test_a_scorer_added_in_one_file_works_in_a_plan_against_brute_force(tmp_path):
    plan = DecodePlan([[parse_head_policy("block:4:20:exactmax"), parse_head_policy("dense")]])
    plan.save(tmp_path / "plan.json")
    assert '"score": "exactmax"' in (tmp_path / "plan.json").read_text()
    loaded = DecodePlan.load(tmp_path / "plan.json")
    assert loaded.heads == plan.heads and loaded.heads[0][0].score == ExactMaxScore()
    torch.manual_seed(4)
    keys, values = torch.randn(2, 2, 61, 8), torch.randn(2, 2, 61, 8)
    layer = SparseLayer(loaded.heads[0])
    layer.update(keys[:, :, :20], values[:, :, :20])
    for t in range(20, 61):  # the scorer's data updated one token at a time
        layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    PENDING.clear()
    q = torch.randn(2, 6, 1, 8)
    out = layer.attend(q, 0.3).view(2, 2, 3, 8)
    grouped = q.view(2, 2, 3, 8)
    expected = brute_force_block_attention(grouped[:, :1], keys[:, :1], values[:, :1], 4, 5, 1, 2, 0.3)
    assert torch.allclose(out[:, :1], expected, atol=1e-5)
    dense = torch.softmax(grouped[:, 1:] @ keys[:, 1:].transpose(-1, -2) * 0.3, -1) @ values[:, 1:]
    assert torch.allclose(out[:, 1:], dense, atol=1e-5)
    assert layer.bytes_read(3) == 2 * (4 * 61 * 8 + 2 * 20 * 8 * 4) + 2 * (2 * 61 * 8 * 4)


def test_a_scorer_added_in_one_file_generates_like_dense_when_it_covers_the_context():
    model = tiny_llama(heads=6, kv_heads=2, head_dim=16)
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    dense = generate(model, ids, "dense", max_new_tokens=8, keep_logits=True)
    sparse = generate(model, ids, "block:4:1.0:exactmax", max_new_tokens=8, keep_logits=True)
    assert torch.equal(dense.sequences, sparse.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(dense.logits, sparse.logits)) <= 1e-4
