"""Condensation losses against brute-force references (values and gradients) and the regularizer observer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnsparse.condense.losses import (
    LOSSES,
    Adaptive,
    CondensationLoss,
    CondensationRegularizer,
    Entropy,
    RowLoss,
    SoftCount,
    Tail,
    adaptive_topk_tail_mass,
    entropy,
    parse_loss,
    soft_count_excess,
    topk_tail_mass,
)
from attnsparse.errors import AttnsparseError

HYPO = settings(max_examples=40, deadline=None)


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class ContractChunk:
    """Exactly the fields docs/CONTRACTS.md gives an observer (the regularizer may read no others)."""

    layer_idx: int
    probs: torch.Tensor
    visible: torch.Tensor
    query_positions: torch.Tensor
    kept: torch.Tensor | None
    num_key_value_groups: int


# ---------------------------------------------------------------------------------------------------
# inputs


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over visible keys, exactly 0 elsewhere; padded rows all 0 with a zero (not NaN) gradient."""
    visible = torch.broadcast_to(visible, scores.shape)
    probs = torch.softmax(scores.masked_fill(~visible, -1e30), dim=-1)
    return torch.where(visible, probs, torch.zeros((), dtype=scores.dtype))


def causal_visible(batch: int, queries: int, keys: int, padded: list[tuple[int, int]] = (),
                   window: int | None = None) -> torch.Tensor:
    """(B, 1, Q, K) causal mask with the last query at the last key; `padded` (b, i) rows all False."""
    positions = torch.arange(queries) + (keys - queries)
    key_index = torch.arange(keys)
    visible = key_index[None, :] <= positions[:, None]
    if window is not None:
        visible &= key_index[None, :] > positions[:, None] - window
    visible = visible[None, None].repeat(batch, 1, 1, 1)
    for b, i in padded:
        visible[b, 0, i] = False
    return visible


@st.composite
def attention_inputs(draw: st.DrawFn, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random probs (B, H, Q, K) and visible (B, 1, Q, K) or (B, H, Q, K): short, padded and tied rows."""
    batch = draw(st.integers(1, 2))
    heads = draw(st.integers(1, 3))
    queries = draw(st.integers(1, 6))
    keys = draw(st.integers(queries, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    per_head = draw(st.booleans())
    ties = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        window = draw(st.integers(1, keys))
        visible = causal_visible(batch, queries, keys, window=window)
    else:
        visible = torch.rand(batch, 1, queries, keys, generator=gen) < 0.7
    visible[torch.rand(batch, 1, queries, generator=gen) < 0.2] = False  # padded rows
    if per_head:
        visible = visible & (torch.rand(batch, heads, queries, keys, generator=gen) < 0.9)
    scores = torch.randn(batch, heads, queries, keys, generator=gen, dtype=torch.float64) * 2
    if ties:
        scores = scores.round()  # many exactly equal scores, hence tied probabilities
    return masked_softmax(scores, visible).to(dtype), visible


# ---------------------------------------------------------------------------------------------------
# brute-force references: a Python loop over rows


def rows_of(probs: torch.Tensor, visible: torch.Tensor):
    """Yield (index, visible probabilities as a numpy float64 vector) for every row."""
    visible = torch.broadcast_to(visible, probs.shape)
    p = probs.detach().to(torch.float64).numpy()
    v = visible.numpy()
    for index in np.ndindex(p.shape[:-1]):
        yield index, p[index][v[index]]


def reference(probs: torch.Tensor, visible: torch.Tensor, row_fn) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (values, mask) from `row_fn(vector) -> value or None (row does not take part)`."""
    values = np.zeros(probs.shape[:-1])
    mask = np.zeros(probs.shape[:-1], dtype=bool)
    for index, row in rows_of(probs, visible):
        out = None if row.size == 0 else row_fn(row)
        if out is not None:
            values[index], mask[index] = out, True
    return values, mask


def ref_tail(k: int):
    def fn(row: np.ndarray) -> float | None:
        return None if row.size <= k else 1.0 - float(np.sort(row)[::-1][:k].sum())
    return fn


def ref_adaptive(alpha: float, C: float):
    def fn(row: np.ndarray) -> float | None:
        n = row.size
        k = max(1, math.ceil(alpha * n**C - 1e-9))
        return None if n <= k else 1.0 - float(np.sort(row)[::-1][:k].sum())
    return fn


def ref_softcount(k: int, eps: float, tau: float, normalize: bool):
    def sig(x: np.ndarray | float) -> np.ndarray | float:
        return 1.0 / (1.0 + np.exp(-x))

    def fn(row: np.ndarray) -> float | None:
        n = row.size
        if n <= k:
            return None
        g = (sig((row - eps) / tau) - sig(-eps / tau)) / (sig((1 - eps) / tau) - sig(-eps / tau))
        excess = max(0.0, float(g.sum()) - k)
        return excess / (n - k) if normalize else excess
    return fn


def ref_entropy(normalize: bool):
    def fn(row: np.ndarray) -> float | None:
        n = row.size
        if n < 2:
            return None
        nz = row[row > 0]
        h = float(-(nz * np.log(nz)).sum())
        return h / math.log(n) if normalize else h
    return fn


def check_against(result: RowLoss, probs: torch.Tensor, visible: torch.Tensor, row_fn, atol: float) -> None:
    values, mask = reference(probs, visible, row_fn)
    assert result.values.shape == probs.shape[:-1]
    np.testing.assert_array_equal(result.mask.numpy(), mask)
    np.testing.assert_allclose(result.values.detach().to(torch.float64).numpy(), values, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------
# values against the references


@HYPO
@given(inputs=attention_inputs(), k=st.integers(1, 10))
def test_tail_matches_reference(inputs, k):
    probs, visible = inputs
    check_against(topk_tail_mass(probs, visible, k), probs, visible, ref_tail(k), atol=1e-12)


@HYPO
@given(inputs=attention_inputs(), alpha=st.sampled_from([0.5, 1.0, 1.5, 2.0]),
       C=st.sampled_from([0.25, 0.5, 1 / 3, 0.75, 1.0]))
def test_adaptive_matches_reference(inputs, alpha, C):
    probs, visible = inputs
    check_against(adaptive_topk_tail_mass(probs, visible, alpha, C), probs, visible, ref_adaptive(alpha, C),
                  atol=1e-12)


@HYPO
@given(inputs=attention_inputs(), k=st.integers(1, 5), eps=st.sampled_from([0.01, 0.1, 0.3]),
       tau_frac=st.sampled_from([0.05, 0.2, 1.0]), normalize=st.booleans())
def test_softcount_matches_reference(inputs, k, eps, tau_frac, normalize):
    probs, visible = inputs
    tau = eps * tau_frac
    check_against(soft_count_excess(probs, visible, k, eps, tau, normalize), probs, visible,
                  ref_softcount(k, eps, tau, normalize), atol=1e-9)


@HYPO
@given(inputs=attention_inputs(), normalize=st.booleans())
def test_entropy_matches_reference(inputs, normalize):
    probs, visible = inputs
    check_against(entropy(probs, visible, normalize), probs, visible, ref_entropy(normalize), atol=1e-12)


@pytest.mark.parametrize("spec", ["tail:k=3", "adaptive:alpha=1.0,C=0.5", "softcount:k=2,eps=0.05,tau=0.01",
                                  "entropy"])
def test_float32_gqa_inputs_match_reference(spec):
    """The backend's case: float32 probs (B, H, Q, K) with one visible mask (B, 1, Q, K) for all heads."""
    gen = torch.Generator().manual_seed(1)
    visible = causal_visible(2, 7, 9, padded=[(0, 0), (1, 3)])
    probs = masked_softmax(torch.randn(2, 6, 7, 9, generator=gen), visible)
    config = parse_loss(spec)
    row_fn = {"tail": ref_tail(3), "adaptive": ref_adaptive(1.0, 0.5),
              "softcount": ref_softcount(2, 0.05, 0.01, True), "entropy": ref_entropy(True)}[config.name]
    result = config(probs, visible)
    assert result.values.dtype == torch.float32
    check_against(result, probs, visible, row_fn, atol=2e-6)
    assert not result.mask[0, :, 0].any() and not result.mask[1, :, 3].any()  # padded rows ignored


def test_adaptive_k_rounding_at_exact_powers():
    """⌈3125^0.2⌉ is 5, not 6, although 3125**0.2 rounds to 5.000000000000001 in floating point."""
    n = 3125
    visible = torch.ones(1, 1, 1, n, dtype=torch.bool)
    probs = torch.arange(n, 0, -1, dtype=torch.float64)[None, None, None] / (n * (n + 1) / 2)
    result = adaptive_topk_tail_mass(probs, visible, 1.0, 0.2)
    top5 = sum(range(n - 4, n + 1)) / (n * (n + 1) / 2)
    assert result.values.item() == pytest.approx(1 - top5, abs=1e-12)


def test_rows_not_longer_than_k_are_zero_and_excluded():
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 0.0]])
    visible = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    for result in (topk_tail_mass(probs, visible, 2), soft_count_excess(probs, visible, 2, 0.1, 0.02)):
        assert result.mask.tolist() == [False, True, False]
        assert result.values[0] == 0 and result.values[2] == 0
    assert topk_tail_mass(probs, visible, 5).count() == 0  # k larger than every row and than K


# ---------------------------------------------------------------------------------------------------
# sanity properties


@HYPO
@given(inputs=attention_inputs())
def test_tail_weakly_decreases_with_k(inputs):
    probs, visible = inputs
    lengths = torch.broadcast_to(visible, probs.shape).sum(-1)
    previous = None
    for k in range(1, 10):
        result = topk_tail_mass(probs, visible, k)
        # rows that stop taking part have tail 0 (all mass kept), so the full-definition tail is `values`
        tail = torch.where(lengths > 0, result.values, torch.zeros(()))
        if previous is not None:
            assert bool((tail <= previous + 1e-12).all())
        assert bool((tail >= -1e-12).all()) and bool((tail <= 1 + 1e-12).all())
        previous = tail


@pytest.mark.parametrize("n", [2, 5, 17])
def test_one_hot_and_uniform_rows(n):
    visible = torch.ones(1, n, dtype=torch.bool)
    one_hot = torch.zeros(1, n, dtype=torch.float64)
    one_hot[0, n // 2] = 1.0
    uniform = torch.full((1, n), 1.0 / n, dtype=torch.float64)
    for k in range(1, n):
        assert topk_tail_mass(one_hot, visible, k).values.item() == pytest.approx(0.0, abs=1e-15)
        assert topk_tail_mass(uniform, visible, k).values.item() == pytest.approx(1 - k / n, abs=1e-12)
    assert entropy(uniform, visible).values.item() == pytest.approx(1.0)
    assert entropy(one_hot, visible).values.item() == 0.0
    assert soft_count_excess(one_hot, visible, 1, 0.01, 0.002).values.item() == pytest.approx(0.0, abs=1e-12)


def test_soft_count_tends_to_hard_count():
    """As τ → 0 the soft excess approaches max(0, #{p > ε} − k)."""
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(50, 40, generator=gen, dtype=torch.float64) * 3, -1)
    visible = torch.ones_like(probs, dtype=torch.bool)
    eps, k = 0.02, 3
    hard = ((probs > eps).sum(-1) - k).clamp_min(0).to(torch.float64)
    soft = soft_count_excess(probs, visible, k, eps, 1e-6, normalize=False).values
    near = ((probs - eps).abs() < 1e-4).any(-1)  # rows with an entry right at ε are legitimately fractional
    torch.testing.assert_close(soft[~near], hard[~near], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# gradients: torch.autograd.gradcheck through softmax(scores) in float64


def distinct_scores(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Float64 scores with no near-ties within a row (top-k sets are stable under gradcheck's perturbation)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(*shape, generator=gen), dim=-1).to(torch.float64)
    return (order * 0.7 + 0.05 * torch.rand(*shape, generator=gen, dtype=torch.float64)).requires_grad_()


GRAD_CASES = {
    "tail": lambda p, v: topk_tail_mass(p, v, 2),
    "tail_k1": lambda p, v: topk_tail_mass(p, v, 1),
    "adaptive": lambda p, v: adaptive_topk_tail_mass(p, v, 1.0, 0.5),
    "adaptive_steep": lambda p, v: adaptive_topk_tail_mass(p, v, 0.7, 0.9),
    "softcount": lambda p, v: soft_count_excess(p, v, 1, 0.1, 0.05, normalize=True),
    "softcount_raw": lambda p, v: soft_count_excess(p, v, 1, 0.05, 0.03, normalize=False),
    "entropy": lambda p, v: entropy(p, v, normalize=True),
    "entropy_raw": lambda p, v: entropy(p, v, normalize=False),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck_through_softmax(name):
    loss = GRAD_CASES[name]
    visible = causal_visible(2, 6, 7, padded=[(1, 2)], window=5)  # GQA-shaped, padded row, sliding window
    scores = distinct_scores((2, 2, 6, 7), seed=len(name))

    def per_row(s: torch.Tensor) -> torch.Tensor:
        return loss(masked_softmax(s, visible), visible).values

    assert torch.autograd.gradcheck(per_row, (scores,), eps=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(per_row(scores).sum(), scores)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 1e-3  # not vacuous
    assert grad[1, :, 2].abs().max() == 0  # the padded row gets no gradient
    assert grad[torch.broadcast_to(~visible, grad.shape)].abs().max() == 0  # neither do hidden keys


def test_softcount_gradcheck_away_from_hinge():
    """Guard for the case above: every taking-part row sits clearly off the relu kink."""
    visible = causal_visible(2, 6, 7, padded=[(1, 2)], window=5)
    scores = distinct_scores((2, 2, 6, 7), seed=len("softcount")).detach()
    probs = masked_softmax(scores, visible)
    result = soft_count_excess(probs, visible, 1, 0.1, 0.05, normalize=False)
    assert (result.values[result.mask] > 1e-3).any()
    assert not ((result.values[result.mask] > 0) & (result.values[result.mask] < 1e-4)).any()


def test_entropy_gradient_is_finite_with_exact_zeros():
    """A visible key with probability exactly 0 must not produce NaN or inf gradients (0·log 0 = 0)."""
    probs = torch.tensor([[0.0, 0.25, 0.75, 0.0]], dtype=torch.float64, requires_grad=True)
    visible = torch.tensor([[True, True, True, False]])
    entropy(probs, visible).values.sum().backward()
    assert torch.isfinite(probs.grad).all()
    assert probs.grad[0, 0] == 0 and probs.grad[0, 3] == 0


# ---------------------------------------------------------------------------------------------------
# the regularizer


SPECS = ["tail:k=3", "adaptive:alpha=1.0,C=0.5", "softcount:k=2,eps=0.05,tau=0.01", "entropy"]


def layer_inputs(layers: int = 3, seed: int = 0):
    """Per-layer leaf probs (B=2, H=4, Q=10, K=10) with causal + padded rows, and the (B, 1, Q, K) mask."""
    gen = torch.Generator().manual_seed(seed)
    visible = causal_visible(2, 10, 10, padded=[(0, 0), (0, 1), (1, 9)])
    probs = [masked_softmax(torch.randn(2, 4, 10, 10, generator=gen, dtype=torch.float64), visible)
             .requires_grad_() for _ in range(layers)]
    return probs, visible


def feed(reg: CondensationRegularizer, probs: list[torch.Tensor], visible: torch.Tensor, chunk: int) -> None:
    """Give the regularizer every layer in query chunks of `chunk`, as the backend does."""
    queries = visible.shape[2]
    for layer, p in enumerate(probs):
        for start in range(0, queries, chunk):
            stop = min(start + chunk, queries)
            reg(ContractChunk(layer, p[:, :, start:stop], visible[:, :, start:stop],
                              torch.arange(start, stop), None, 2))


@pytest.mark.parametrize("spec", SPECS)
def test_regularizer_mean_does_not_depend_on_chunking(spec):
    probs, visible = layer_inputs()
    whole = parse_loss(spec)(torch.cat(probs), visible.repeat(len(probs), 1, 1, 1)).mean()
    (expected_grad,) = torch.autograd.grad(whole, probs[1])
    for chunk in (1, 3, 4, 10):
        reg = CondensationRegularizer(spec)
        feed(reg, probs, visible, chunk)
        value = reg.value()
        torch.testing.assert_close(value, whole, atol=1e-12, rtol=0)
        (grad,) = torch.autograd.grad(value, probs[1])
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0)


def test_regularizer_counts_heads_layers_and_skips_padding():
    probs, visible = layer_inputs()
    reg = CondensationRegularizer("tail:k=3")
    feed(reg, probs, visible, 4)
    lengths = visible.sum(-1)  # (B, 1, Q): 3 padded rows have 0
    assert reg.count == 3 * 4 * int((lengths > 3).sum())
    diag = reg.diagnostics()
    assert diag["rows"] == reg.count and diag["topk_rows"] == reg.count
    assert diag["topk_mass"] == pytest.approx(1 - diag["loss"])
    assert diag["spec"] == "tail:k=3"


def test_regularizer_layer_subset_reset_and_empty():
    probs, visible = layer_inputs()
    reg = CondensationRegularizer("tail:k=3", layers=[1])
    value = reg.value()
    assert value.item() == 0.0 and value.dtype == torch.float32
    assert math.isnan(reg.diagnostics()["topk_mass"])
    feed(reg, probs, visible, 5)
    only = topk_tail_mass(probs[1], visible, 3).mean()
    torch.testing.assert_close(reg.value(), only, atol=1e-12, rtol=0)
    reg.reset()
    assert reg.count == 0 and reg.value().item() == 0.0


def test_regularizer_with_no_taking_part_rows_keeps_a_graph():
    """All rows shorter than k: the value is 0 but still backpropagates (zero gradient), so training runs."""
    probs, visible = layer_inputs(layers=1)
    reg = CondensationRegularizer("tail:k=50")
    feed(reg, probs, visible, 10)
    value = reg.value()
    assert value.item() == 0.0 and reg.count == 0
    value.backward()
    assert probs[0].grad is not None and probs[0].grad.abs().max() == 0


def test_regularizer_diagnostics_for_entropy_use_diag_k():
    probs, visible = layer_inputs(layers=2)
    reg = CondensationRegularizer("entropy", diag_k=2)
    feed(reg, probs, visible, 3)
    expected = 1 - topk_tail_mass(torch.cat(probs), visible.repeat(2, 1, 1, 1), 2).mean().item()
    assert reg.diagnostics()["topk_mass"] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------
# spec parsing


@pytest.mark.parametrize(("spec", "expected"), [
    ("tail", Tail(k=16)),
    ("tail:k=16", Tail(k=16)),
    (" TAIL : k = 4 ", Tail(k=4)),
    ("adaptive:alpha=1.0,C=0.5", Adaptive(alpha=1.0, C=0.5)),
    ("adaptive:C=0.3", Adaptive(C=0.3)),
    ("adaptive:alpha=2:C=0.3", Adaptive(alpha=2.0, C=0.3)),  # keywords may also be separated by ':'
    ("softcount:k=16,eps=0.01,tau=0.002", SoftCount(k=16, eps=0.01, tau=0.002)),
    ("softcount:k=8,normalize=false", SoftCount(k=8, normalize=False)),
    ("entropy", Entropy()),
    ("entropy:normalize=0", Entropy(normalize=False)),
])
def test_parse_loss(spec, expected):
    loss = parse_loss(spec)
    assert loss == expected
    assert parse_loss(loss.spec) == loss
    assert parse_loss(loss) is loss


def test_canonical_specs_are_unchanged():
    """The spec text is what config.json and the training log record; old runs must read the same."""
    assert [parse_loss(name).spec for name in ("tail", "adaptive", "softcount", "entropy")] == [
        "tail:k=16", "adaptive:alpha=1.0,C=0.5", "softcount:k=16,eps=0.01,tau=0.002,normalize=true",
        "entropy:normalize=true",
    ]


losses = st.one_of(
    st.builds(Tail, st.integers(1, 10_000)),
    st.builds(Adaptive, st.floats(1e-3, 1e3), st.floats(1e-3, 1.0)),
    st.builds(SoftCount, st.integers(1, 10_000), st.floats(1e-6, 0.999), st.floats(1e-6, 10.0), st.booleans()),
    st.builds(Entropy, st.booleans()),
)


@settings(max_examples=80, deadline=None)
@given(loss=losses)
def test_every_loss_round_trips_through_its_spec(loss):
    assert isinstance(loss, CondensationLoss)
    assert parse_loss(loss.spec) == loss
    assert parse_loss(loss.with_budget(7).spec) == loss.with_budget(7)


def test_registry_lists_every_loss_in_its_errors():
    assert sorted(LOSSES.names()) == ["adaptive", "entropy", "softcount", "tail"]
    for bad in ("bogus", "", "tail:k=x"):
        with pytest.raises(AttnsparseError) as error:
            parse_loss(bad)
        message = str(error.value)
        assert "\n" not in message
        for usage, _ in LOSSES.help_table():
            assert usage in message


def test_budget_applies_to_the_losses_that_have_one():
    assert Tail(k=16).with_budget(4) == Tail(k=4)
    assert SoftCount(k=16, eps=0.05).with_budget(4) == SoftCount(k=4, eps=0.05)
    assert Adaptive(C=0.3).with_budget(4) == Adaptive(C=0.3)
    assert Entropy().with_budget(4) == Entropy()


@pytest.mark.parametrize(("spec", "message"), [
    ("", "empty"),
    ("topk:k=3", "unknown condensation loss"),
    ("tail:k=0", "positive integer"),
    ("tail:k=-2", "positive integer"),
    ("tail:k=2.5", "not a valid int"),
    ("tail:k", "key=value"),
    ("tail:k=3,k=4", "twice"),
    ("tail:eps=0.1", "no parameter 'eps'"),
    ("entropy:k=3", "no parameter 'k'"),
    ("softcount:eps=0", "eps must lie in"),
    ("softcount:eps=1.5", "eps must lie in"),
    ("softcount:tau=0", "tau must be"),
    ("softcount:eps=nan", "not a valid float"),
    ("adaptive:alpha=0", "alpha must be"),
    ("adaptive:C=1.5", "C must lie in"),
    ("adaptive:C=0", "C must lie in"),
    ("softcount:normalize=maybe", "not a valid bool"),
])
def test_parse_loss_errors(spec, message):
    with pytest.raises(AttnsparseError, match=message):
        parse_loss(spec)


def test_functions_reject_bad_k():
    probs = torch.full((1, 4), 0.25)
    visible = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(AttnsparseError):
        topk_tail_mass(probs, visible, 0)
    with pytest.raises(AttnsparseError):
        soft_count_excess(probs, visible, 2, eps=1.0, tau=0.1)


# ---------------------------------------------------------------------------------------------------
# end to end through the attention backend


def test_regularizer_end_to_end_on_tiny_llama():
    """Under the backend the loss reaches q/k projections and equals the brute-force loss of eager attentions."""
    from attnsparse.attention.backend import AttentionChunk, sparse_attention
    from attnsparse.core.tiny import tiny_llama

    assert {"layer_idx", "probs", "visible"} <= set(AttentionChunk.__dataclass_fields__)
    model = tiny_llama(seed=0, layers=2, heads=4, kv_heads=2)  # GQA: 2 query heads per kv head
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    k = 3
    reg = CondensationRegularizer(f"tail:k={k}")
    with sparse_attention(model, "dense", observers=[reg], query_chunk=5):
        model(ids)
    loss = reg.value()
    loss.backward()
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            assert proj.weight.grad is not None
            assert torch.isfinite(proj.weight.grad).all() and proj.weight.grad.abs().sum() > 0
    assert reg.count == 2 * 2 * 4 * (12 - k)  # layers x batch x heads x rows with n_i = i + 1 > k

    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    tails = []
    for probs in attentions:  # (B, H, T, T), causal
        for b, h, i in np.ndindex(probs.shape[:3]):
            if i + 1 > k:
                row = probs[b, h, i, : i + 1].to(torch.float64).numpy()
                tails.append(1.0 - np.sort(row)[::-1][:k].sum())
    assert loss.item() == pytest.approx(float(np.mean(tails)), abs=1e-5)


def test_regularizer_end_to_end_ignores_left_padding():
    """Padded query rows never count; real rows match eager attentions restricted to non-padding keys."""
    from attnsparse.attention.backend import sparse_attention
    from attnsparse.core.tiny import tiny_llama

    model = tiny_llama(seed=1, layers=2, heads=4, kv_heads=1)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding in the second sequence
    k = 2
    reg = CondensationRegularizer(f"tail:k={k}")
    with sparse_attention(model, "dense", observers=[reg], query_chunk=4):
        model(ids, attention_mask=mask)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(ids, attention_mask=mask, output_attentions=True).attentions
    tails = []
    for probs in attentions:
        for b, h, i in np.ndindex(probs.shape[:3]):
            keys = [j for j in range(i + 1) if mask[b, j]]
            if mask[b, i] and len(keys) > k:
                row = probs[b, h, i, keys].to(torch.float64).numpy()
                tails.append(1.0 - np.sort(row)[::-1][:k].sum())
    assert reg.count == len(tails)
    assert reg.value().item() == pytest.approx(float(np.mean(tails)), abs=1e-5)
