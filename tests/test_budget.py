"""Per-head key budgets: the keep mask, the loss, the greedy allocation, the file and the command."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from attnsparse.attention.backend import sparse_attention
from attnsparse.attention.policies import HeadBudget, TopK, head_topk_keep_mask, parse_policy, read_budget
from attnsparse.cli.app import app
from attnsparse.condense.losses import CondensationRegularizer
from attnsparse.condense.losses.tail import head_topk_tail_mass, topk_tail_mass
from attnsparse.core.tiny import tiny_llama
from attnsparse.errors import AttnsparseError
from attnsparse.measure.budget import allocate, tail_curve
from tests.reference import topk_keep


def _causal(q: int, k: int) -> torch.Tensor:
    return (torch.arange(k)[None, :] <= torch.arange(q)[:, None] + (k - q))[None, None]


@given(seed=st.integers(0, 10_000), ties=st.booleans(), ks=st.lists(st.integers(1, 12), min_size=3, max_size=3))
def test_head_topk_mask_is_topk_per_head(seed: int, ties: bool, ks: list[int]) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 3, 5, 9, generator=gen)
    if ties:  # integer scores: many ties at the threshold, the earlier key must win
        scores = scores.mul(2).round()
    visible = _causal(5, 9)
    mask = head_topk_keep_mask(scores, visible, tuple(ks))
    for h, k in enumerate(ks):
        assert torch.equal(mask[:, h], topk_keep(scores[:, h:h + 1], visible, k)[:, 0]), (h, k)


def test_uniform_budget_is_topk_at_model_level() -> None:
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    with torch.no_grad():  # sharpen: peaked rows, so a wrong selection moves the logits
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    budget = HeadBudget(((4, 4, 4, 4), (4, 4, 4, 4)))
    uneven = HeadBudget(((1, 4, 4, 30), (4, 4, 4, 4)))
    with torch.no_grad():
        with sparse_attention(model, TopK(4)):
            topk = model(ids).logits
        with sparse_attention(model, budget):
            same = model(ids).logits
        with sparse_attention(model, uneven):
            other = model(ids).logits
    assert torch.equal(topk, same)
    assert (other - topk).abs().max() > 1e-3  # a different allocation changes the result: the layer's row is used


def test_head_tail_mass_equals_tail_per_head_with_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 6, 10, generator=gen, requires_grad=True)
    visible = _causal(6, 10)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    ks = (1, 3, 7)
    rows = head_topk_tail_mass(probs, visible, ks)
    grad = torch.autograd.grad(rows.total(), scores, retain_graph=True)[0]
    for h, k in enumerate(ks):
        single = topk_tail_mass(probs[:, h:h + 1], visible, k)
        assert torch.equal(rows.mask[:, h], single.mask[:, 0])
        torch.testing.assert_close(rows.values[:, h], single.values[:, 0], rtol=0, atol=1e-6)
        expected = torch.autograd.grad(single.total(), scores, retain_graph=True)[0][:, h]
        torch.testing.assert_close(grad[:, h], expected, rtol=0, atol=1e-6)


def test_regularizer_follows_the_budget_per_layer() -> None:
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    ids = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(2))
    budget = HeadBudget(((1, 2, 3, 4), (8, 8, 8, 8)))
    reg = CondensationRegularizer("tail:k=4")
    reg.budget = budget
    seen = []
    with torch.no_grad(), sparse_attention(model, "dense", observers=[reg, seen.append]):
        model(ids)
    total = sum(float(head_topk_tail_mass(c.probs, c.visible, budget.ks[c.layer_idx]).total()) for c in seen)
    count = sum(int(head_topk_tail_mass(c.probs, c.visible, budget.ks[c.layer_idx]).count()) for c in seen)
    assert reg.value().item() == pytest.approx(total / count, rel=1e-6)
    uniform = CondensationRegularizer("tail:k=4")
    with torch.no_grad(), sparse_attention(model, "dense", observers=[uniform]):
        model(ids)
    assert abs(uniform.value().item() - reg.value().item()) > 1e-3


def test_tail_curve_is_interpolated_and_non_increasing() -> None:
    curve = tail_curve({1: 0.5, 4: 0.9, 16: 0.99}, ctx=32)
    assert curve[0] == 1.0 and curve[32] == 0.0
    assert curve[1] == pytest.approx(0.5) and curve[4] == pytest.approx(0.1) and curve[16] == pytest.approx(0.01)
    assert curve[2] == pytest.approx(0.3)  # halfway in log k between 1 and 4
    assert all(a >= b for a, b in itertools.pairwise(curve))


@pytest.mark.parametrize("total", [3, 5, 8, 11])
def test_greedy_allocation_is_optimal_on_convex_tails(total: int) -> None:
    curves = [tail_curve(points, ctx=8) for points in ({1: 0.3, 2: 0.6, 4: 0.9}, {1: 0.9, 2: 0.95}, {1: 0.1, 4: 0.5})]
    ks = allocate(curves, total / 3)
    assert sum(ks) == total and min(ks) >= 1
    best = min(sum(c[k] for c, k in zip(curves, combo))
               for combo in itertools.product(range(1, 9), repeat=3) if sum(combo) == total)
    assert sum(c[k] for c, k in zip(curves, ks)) == pytest.approx(best, abs=1e-12)


def test_allocation_refuses_an_average_below_the_minimum() -> None:
    with pytest.raises(AttnsparseError, match="--min-k"):
        allocate([[1.0, 0.5, 0.0]] * 3, mean_k=1.0, min_k=2)


def test_scaled_budget_keeps_the_shape_and_the_mean() -> None:
    budget = HeadBudget(((2, 6), (16, 8)))
    twice = budget.scaled(budget.mean_k * 2)
    assert twice.ks == ((4, 12), (32, 16)) and twice.mean_k == 2 * budget.mean_k
    assert budget.density(64) < TopK(int(budget.mean_k) + 1).density(64)


def test_budget_command_writes_a_file_the_policy_reads(tmp_path, tiny_dir) -> None:
    runner = CliRunner()
    measured = runner.invoke(app, ["measure", str(tiny_dir), "--ctx", "48", "--windows", "2", "--out",
                                   str(tmp_path / "m"), "--no-progress"])
    assert measured.exit_code == 0, measured.output
    out = tmp_path / "budget.json"
    result = runner.invoke(app, ["budget", str(tmp_path / "m" / "profile.json"), "--mean-k", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["format"] == "attnsparse-head-budget" and data["mean_k"] == pytest.approx(6.0)
    policy = parse_policy(f"budget:{out}")
    assert policy == read_budget(out) and policy.spec == f"budget:{out}"
    assert 0 < policy.density(48) < 1
    evaluated = runner.invoke(app, ["evaluate", str(tiny_dir), "--ctx", "48", "--windows", "2", "--policies",
                                    f"dense,budget:{out}", "--out", str(tmp_path / "e")])
    assert evaluated.exit_code == 0, evaluated.output


def test_budget_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(AttnsparseError, match="does not exist"):
        parse_policy(f"budget:{tmp_path / 'none.json'}")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(AttnsparseError, match="not a head-budget file"):
        read_budget(bad)
    with pytest.raises(AttnsparseError, match=">= 1"):
        HeadBudget(((0, 2),))
    result = CliRunner().invoke(app, ["budget", str(tmp_path / "no-profile.json"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.output
