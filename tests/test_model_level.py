"""Model-level numbers on a sharpened tiny Llama against independent float64 references.

Each test first shows that the quantity it checks is sensitive (a 1% score-scaling error, or top-4 attention,
moves the logits by far more than the tolerance), then compares with a tolerance relative to the logit scale.
Perplexities are recomputed by hand (logsumexp minus the target logit) from the reference logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnsparse.attention.backend import sparse_attention
from attnsparse.core.tiny import tiny_tokenizer
from attnsparse.evaluate.run import evaluate
from tests.model_reference import (
    Separation,
    float64_twin,
    logit_scale,
    next_token_nll,
    reference_attention,
    reference_logits,
    sharpened_llama,
    topk_rule,
)

# float32 logits of these models are within ~4e-7 of float64 relative to their scale; 1e-5 leaves room for
# other BLAS orderings, and is still ~500 times below what a 1% scaling error moves
RELATIVE_TOL = 1e-5
TEXT = "It was the best of times, it was the worst of times; it was the age of wisdom, the age of foolishness. " * 6


@pytest.fixture(scope="module")
def sharp():
    return sharpened_llama(seed=0, factor=20.0)


@pytest.fixture(scope="module")
def twin(sharp):
    return float64_twin(sharp)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(1, 97, (2, 96), generator=torch.Generator().manual_seed(0))


def test_chunked_dense_equals_float64_model_and_feels_a_one_percent_scaling_error(sharp, twin, ids, one_thread):
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: the backend's explicit-mask path
    with torch.no_grad():
        reference = twin(ids, attention_mask=mask).logits
        with sparse_attention(sharp, "dense", fast_dense=False, query_chunk=7):
            chunked = sharp(ids, attention_mask=mask).logits
    tol = RELATIVE_TOL * logit_scale(reference)
    with torch.no_grad(), reference_attention(twin, None, score_factor=1.01):
        mis_scaled = twin(ids, attention_mask=mask).logits
    assert (mis_scaled - reference)[:, 5:].abs().max() > 100 * tol  # the test can see a 1% scaling error
    assert (chunked - reference)[1].abs().max() <= tol
    assert (chunked - reference)[0, 5:].abs().max() <= tol


@pytest.mark.parametrize(("k", "chunk"), [(4, 16), (2, 32)])  # k=2 with width >= 64: the gathered path
def test_topk_equals_brute_force_model(sharp, twin, ids, k, chunk, one_thread):
    separation = Separation()
    reference = reference_logits(twin, ids, topk_rule(k, separation))
    dense = reference_logits(twin, ids)
    with torch.no_grad(), sparse_attention(sharp, f"topk:{k}", query_chunk=chunk):
        got = sharp(ids).logits
    tol = RELATIVE_TOL * logit_scale(reference)
    assert separation.smallest > 1e-5  # no near-tie at the top-k boundary (float32 scores agree to ~1e-7)
    assert (reference - dense).abs().max() > 100 * tol  # dropping keys matters on this model
    assert (got - reference).abs().max() <= tol


def _windows_by_definition(ids: torch.Tensor, ctx: int, count: int | None) -> torch.Tensor:
    """Whole text: windows at 0, ctx, 2ctx, ... (the partial last one dropped); M windows: start i * (len // M)."""
    total = ids.numel()
    starts = range(0, total - ctx + 1, ctx) if count is None else [i * (total // count) for i in range(count)]
    return torch.stack([ids[s : s + ctx] for s in starts])


@pytest.mark.parametrize("protocol", [None, 3])
def test_evaluate_perplexity_equals_nll_by_hand(sharp, twin, protocol, tmp_path, one_thread):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    tokenizer = tiny_tokenizer()
    ctx = 48
    result = evaluate(sharp, str(path), ctx, "topk:4", windows=protocol, tokenizer=tokenizer, batch_size=2,
                      progress=False)
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    batch = _windows_by_definition(ids, ctx, protocol)
    name = "all" if protocol is None else f"windows:{protocol}"
    rules = {"dense": None, "topk:4": topk_rule(4)}
    expected = {}
    for policy, rule in rules.items():
        nll, tokens = next_token_nll(reference_logits(twin, batch, rule), batch)
        expected[policy] = nll / tokens
        row = result.row(policy, name)
        assert row.tokens == tokens == batch.shape[0] * (ctx - 1) and row.windows == batch.shape[0]
        assert row.mean_nll == pytest.approx(nll / tokens, rel=1e-5)
        assert row.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert abs(expected["topk:4"] - expected["dense"]) > 1e-4 * expected["dense"]  # 10x the tolerance
