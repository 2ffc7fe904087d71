"""The attention backend against transformers' own attention and against brute-force references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import MistralConfig, MistralForCausalLM

from attnsparse.attention.backend import (
    BACKEND_NAME,
    AttentionChunk,
    attention_implementation,
    chunked_attention,
    sparse_attention,
)
from attnsparse.attention.policies import SinkWindow, TopK, parse_policy
from attnsparse.core.tiny import tiny_gpt2, tiny_llama
from attnsparse.errors import AttnsparseError
from tests import reference as R

MODELS = {"llama_gqa": lambda: tiny_llama(heads=6, kv_heads=2), "gpt2": tiny_gpt2}


def tiny_mistral_sliding(window: int = 5):
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                           max_position_embeddings=256, attn_implementation="sdpa")
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("fast_dense", [True, False])
def test_dense_reproduces_sdpa_logits(name, fast_dense):
    model = MODELS[name]()
    ids = torch.randint(0, 97, (2, 48))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding on one row
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        with sparse_attention(model, "dense", query_chunk=5, fast_dense=fast_dense):
            assert model.config._attn_implementation == BACKEND_NAME
            logits = model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "sdpa"  # restored
    assert (logits[1] - reference[1]).abs().max() <= 1e-4
    assert (logits[0, 7:] - reference[0, 7:]).abs().max() <= 1e-4


def test_dense_reproduces_sliding_window_model():
    model = tiny_mistral_sliding(window=5)
    ids = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        reference = model(ids).logits
        with sparse_attention(model, "dense", query_chunk=4, fast_dense=False):
            logits = model(ids).logits
    assert (logits - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("name", sorted(MODELS))
def test_topk_with_k_at_least_n_equals_dense(name):
    model = MODELS[name]()
    ids = torch.randint(0, 97, (1, 32))
    with torch.no_grad():
        reference = model(ids).logits
        with sparse_attention(model, "topk:32", query_chunk=6):
            logits = model(ids).logits
    assert (logits - reference).abs().max() <= 1e-4


def test_cached_generation_matches_sdpa():
    model = tiny_llama(heads=6, kv_heads=2)
    ids = torch.randint(0, 97, (1, 10))
    reference = model.generate(ids, max_new_tokens=12, do_sample=False)
    with sparse_attention(model, "dense", fast_dense=False):
        generated = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(generated, reference)


def test_sparse_attention_takes_a_policy_or_a_spec_and_always_restores():
    """A typed policy reaches the state unchanged; a spec is parsed at the entry; the implementation comes back."""
    model = tiny_llama()
    policy = TopK(4)
    with sparse_attention(model, policy) as state:
        assert state.policy is policy
    with sparse_attention(model, "streaming:1:3") as state:
        assert state.policy == SinkWindow(1, 3)
    with pytest.raises(RuntimeError), sparse_attention(model, "dense"):
        assert model.config._attn_implementation == BACKEND_NAME
        raise RuntimeError("inside the block")
    assert model.config._attn_implementation == "sdpa"


def test_a_refused_switch_is_one_line_and_changes_nothing(monkeypatch):
    model = tiny_llama()

    def refuse(name):
        raise ValueError("this model does not support custom attention\nsee the docs")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    with pytest.raises(AttnsparseError, match="cannot switch") as error, attention_implementation(model, BACKEND_NAME):
        pass
    assert "\n" not in str(error.value) and model.config._attn_implementation == "sdpa"


def expected_topk(q, k, v, visible, scaling, top):
    """Brute-force top-k attention in the backend's (B, Q, H, D) layout."""
    keep = R.topk_keep(R.scores(q, k, scaling), visible, top)
    return R.attention(q, k, v, scaling, keep).transpose(1, 2)


def random_inputs(seed, batch, heads, kv_heads, queries, keys, dim, pad, quantize=False):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, dim, generator=generator)
    k = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    v = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    if quantize:  # coarse values make tied scores common
        q, k = q.round(), k.round()
    positions = torch.arange(queries) + keys - queries
    visible = (torch.arange(keys)[None, :] <= positions[:, None]).expand(batch, 1, queries, keys).clone()
    visible[0, :, :, :pad] = False  # left padding of the first sequence
    return q, k, v, visible


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 9999), kv_heads=st.sampled_from([1, 2]), groups=st.sampled_from([1, 3]),
       queries=st.integers(1, 12), extra_keys=st.integers(0, 5), k=st.integers(1, 8), pad=st.integers(0, 3),
       chunk=st.integers(1, 13), quantize=st.booleans())
def test_topk_matches_brute_force(seed, kv_heads, groups, queries, extra_keys, k, pad, chunk, quantize):
    keys = queries + extra_keys
    q, k_, v, visible = random_inputs(seed, 2, kv_heads * groups, kv_heads, queries, keys, 4, pad, quantize)
    out = chunked_attention(q, k_, v, visible, scaling=0.5, policy=TopK(k), query_chunk=chunk)
    expected = expected_topk(q, k_, v, visible, 0.5, k)
    assert torch.allclose(out, expected, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 9999), kv_heads=st.sampled_from([1, 2]), groups=st.sampled_from([1, 3]),
       queries=st.integers(1, 12), extra_keys=st.integers(0, 5), k=st.integers(1, 8), pad=st.integers(0, 3),
       chunk=st.integers(1, 13), quantize=st.booleans())
def test_gathered_topk_matches_brute_force(seed, kv_heads, groups, queries, extra_keys, k, pad, chunk, quantize):
    """The gather path (forced on for every row width) keeps exactly the brute-force keys, ties included."""
    from unittest import mock

    from attnsparse.attention import backend

    keys = queries + extra_keys
    q, k_, v, visible = random_inputs(seed, 2, kv_heads * groups, kv_heads, queries, keys, 4, pad, quantize)
    with mock.patch.object(backend, "GATHER_MIN_RATIO", 1):
        out = chunked_attention(q, k_, v, visible, scaling=0.5, policy=TopK(k), query_chunk=chunk)
    expected = expected_topk(q, k_, v, visible, 0.5, k)
    assert torch.allclose(out, expected, atol=1e-5)


def test_gathered_topk_gradient_equals_mask_path():
    """Sparse-aware training differentiates through the gather path: same gradients as the masked softmax."""
    from unittest import mock

    from attnsparse.attention import backend

    def grads(ratio):
        q, k, v, visible = random_inputs(7, 2, 6, 2, 40, 40, 8, pad=3)
        for t in (q, k, v):
            t.requires_grad_(True)
        with mock.patch.object(backend, "GATHER_MIN_RATIO", ratio):
            out = chunked_attention(q, k, v, visible, scaling=0.4, policy=TopK(3), query_chunk=16)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [t.grad for t in (q, k, v)]

    out_gather, grads_gather = grads(1)
    out_mask, grads_mask = grads(10**9)
    assert torch.allclose(out_gather, out_mask, atol=1e-5)
    for a, b in zip(grads_gather, grads_mask):
        assert torch.allclose(a, b, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 9999), queries=st.integers(1, 20), chunk=st.integers(1, 25),
       policy=st.sampled_from(["dense", "topk:3", "sink+window:2:4"]), softcap=st.sampled_from([None, 5.0]))
def test_chunking_never_changes_results(seed, queries, chunk, policy, softcap):


    q, k, v, visible = random_inputs(seed, 2, 4, 2, queries, queries + 3, 8, pad=2)
    seen: dict[int, list[torch.Tensor]] = {}

    def run(query_chunk):
        probs: list[torch.Tensor] = []
        out = chunked_attention(q, k, v, visible, scaling=0.3, softcap=softcap, policy=parse_policy(policy),
                                observers=[lambda c: probs.append(c.probs)], query_chunk=query_chunk)
        seen[query_chunk] = probs
        return out

    whole, chunked = run(queries), run(chunk)
    assert torch.allclose(whole, chunked, atol=1e-6)

    def full_width(parts):  # chunks omit keys past their last query; those are invisible, i.e. zero
        width = k.shape[2]
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts], dim=2)

    assert torch.allclose(full_width(seen[queries]), full_width(seen[chunk]), atol=1e-6)


def test_softcap_matches_eager_formula():
    q, k, v, visible = random_inputs(3, 1, 4, 2, 9, 9, 8, pad=0)
    out = chunked_attention(q * 4, k * 4, v, visible, scaling=0.35, softcap=2.0, query_chunk=4)
    expected = R.attention(q * 4, k * 4, v, 0.35, visible, softcap=2.0).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-5)


def test_observers_see_every_layer_with_contract_shapes():
    model = tiny_llama(layers=3, heads=6, kv_heads=2)
    chunks: list[AttentionChunk] = []
    with torch.no_grad(), sparse_attention(model, "topk:4", observers=[chunks.append], query_chunk=8):
        model(torch.randint(0, 97, (2, 20)))
    assert sorted({c.layer_idx for c in chunks}) == [0, 1, 2]
    assert len(chunks) == 3 * 3  # 3 layers x ceil(20 / 8) chunks
    first = chunks[0]
    assert first.probs.shape == (2, 6, 8, 8) and first.visible.shape[-2:] == (8, 8)  # keys past query 7 skipped
    assert chunks[2].probs.shape == (2, 6, 4, 20)
    assert first.kept is not None and first.kept.sum(-1).max() <= 4
    assert torch.allclose(first.probs.sum(-1), torch.ones(2, 6, 8))
    assert first.query_positions.tolist() == list(range(8)) and first.num_key_value_groups == 3


def test_regularizer_gradient_flows_through_backend():
    model = tiny_llama().train()
    values: list[torch.Tensor] = []
    with sparse_attention(model, "dense", observers=[lambda c: values.append(c.probs.max(-1).values.mean())]):
        model(torch.randint(0, 97, (1, 12)))
    torch.stack(values).sum().backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
