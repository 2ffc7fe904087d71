"""SmolLM2-135M (the embedded default) through the backend: dense must reproduce transformers' sdpa."""

import pytest
import torch

from attnsparse.attention.backend import sparse_attention
from attnsparse.core.data import load_text, tokenize, windows
from tests.conftest import WIKITEXT_TEST

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("fast_dense", [True, False])
def test_dense_reproduces_sdpa_at_512_tokens(smollm2, fast_dense):
    model = smollm2.model
    text = load_text(str(WIKITEXT_TEST)) if WIKITEXT_TEST.exists() else load_text(None)
    ids = windows(tokenize(smollm2.tokenizer, text[:20_000]), 512, count=1)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        reference = model(ids).logits
        with sparse_attention(model, "dense", query_chunk=128, fast_dense=fast_dense):
            logits = model(ids).logits
    assert (logits - reference).abs().max().item() <= 1e-4
