"""SmolLM2-135M (the embedded default) through the backend: dense must reproduce transformers' sdpa."""

import math

import pytest
import torch

from attnsparse.attention.backend import sparse_attention
from attnsparse.core.data import load_text, tokenize, windows

pytestmark = pytest.mark.slow

TOKENS, LAYERS = 512, 30
# Two float32 evaluations of one model differ only by rounding. A float32 sum of n terms is off by about
# eps·sqrt(n) of its magnitude (rounding errors add as a random walk); every layer sums n = 512 weighted values
# in attention (and 576 or 1536 products in its projections, alike), and the 30 layers add their errors to the
# residual stream, so the logits differ by about eps·sqrt(n·L) ≈ 1.5e-5 of their scale. A factor 4 covers the
# later layers amplifying earlier errors. Another CPU (other BLAS blocking) reorders the same sums: the size of
# the rounding stays, its value changes. Measured: 5.7e-5 at a logit scale of 41 (1.4e-6 of it) on one machine,
# 1.35e-4 on logits of magnitude ~15 on another; a 1% error in the attention scaling moves the logits by 2e-2 of
# their scale, over 300 times this bound.
RELATIVE_TOL = 4 * torch.finfo(torch.float32).eps * math.sqrt(TOKENS * LAYERS)


@pytest.fixture(scope="module")
def token_ids(smollm2, wikitext_test) -> torch.Tensor:
    text = load_text(str(wikitext_test))
    return windows(tokenize(smollm2.tokenizer, text[:20_000]), TOKENS, count=1)


@pytest.fixture(scope="module")
def sdpa_logits(smollm2, token_ids) -> torch.Tensor:
    smollm2.model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return smollm2.model(token_ids).logits


def _tolerance(reference: torch.Tensor) -> float:
    return RELATIVE_TOL * float(reference.abs().max())


def test_tolerance_sees_a_one_percent_attention_scaling_error(smollm2, token_ids, sdpa_logits):
    """Queries scaled by 1.01 (scores x 1.01, what a wrong `scaling` does) move the logits far past the bound."""
    model = smollm2.model
    assert model.config.num_hidden_layers == LAYERS
    originals = [layer.self_attn.q_proj.weight.detach().clone() for layer in model.model.layers]
    try:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(1.01)
            mis_scaled = model(token_ids).logits
    finally:
        with torch.no_grad():
            for layer, original in zip(model.model.layers, originals):
                layer.self_attn.q_proj.weight.copy_(original)  # exactly the weights the other tests use
    assert (mis_scaled - sdpa_logits).abs().max().item() > 100 * _tolerance(sdpa_logits)


@pytest.mark.parametrize("fast_dense", [True, False])
def test_dense_reproduces_sdpa_at_512_tokens(smollm2, token_ids, sdpa_logits, fast_dense):
    model = smollm2.model
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), sparse_attention(model, "dense", query_chunk=128, fast_dense=fast_dense):
        logits = model(token_ids).logits
    assert (logits - sdpa_logits).abs().max().item() <= _tolerance(sdpa_logits)
