"""`decodeblock:B:BUDGET[:SCORE]`: a prefill keeps, row by row, exactly what block top-k decoding reads."""

from __future__ import annotations

import pytest
import torch

from attnsparse.attention.backend import chunked_attention, sparse_attention
from attnsparse.attention.policies import DecodeBlock, parse_policy
from attnsparse.core.tiny import tiny_llama
from attnsparse.decode.backend import sparse_decoding
from attnsparse.decode.generate import decode_step
from attnsparse.errors import AttnsparseError
from tests.reference import attention, decode_block_keep

pytestmark = pytest.mark.usefixtures("one_thread")


def qk(seed: int, n: int = 45, heads: int = 6, kv_heads: int = 2, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, n, dim, generator=generator), torch.randn(2, kv_heads, n, dim, generator=generator))


def keep_mask(policy: DecodeBlock, q: torch.Tensor, k: torch.Tensor, chunk: int = 7) -> torch.Tensor:
    """The policy's mask over the whole causal call, asked chunk by chunk as the backend does."""
    n = q.shape[2]
    call = policy.prepare(q, k, scaling=1.0, layer_idx=0)
    rows = []
    for start in range(0, n, chunk):
        positions = torch.arange(start, min(start + chunk, n))
        visible = (torch.arange(n)[None, :] <= positions[:, None])[None, None]
        scores = torch.zeros(q.shape[0], q.shape[1], len(positions), n)
        rows.append(call.keep_mask(scores, visible, positions))
    return torch.cat(rows, dim=2)


def store_keep(policy: DecodeBlock, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Row t's keys from the decode store itself: a BlockStore holding t + 1 keys, asked for its blocks."""
    rule, size = policy.rule, policy.rule.block_size
    batch, heads, n, _ = q.shape
    kv_heads = k.shape[1]
    keep = torch.zeros(batch, heads, n, n, dtype=torch.bool)
    for t in range(n):
        store = rule.store(list(range(kv_heads)))
        store.append(k[:, :, : t + 1], k[:, :, : t + 1])
        grouped = q[:, :, t].reshape(batch, kv_heads, heads // kv_heads, -1)
        if rule.selected_blocks(t + 1) >= -(-(t + 1) // size):
            keep[:, :, t, : t + 1] = True
            continue
        index = store.select(grouped)  # (B, Hkv, C)
        for b in range(batch):
            for h in range(kv_heads):
                for j in index[b, h].tolist():
                    keep[b, h * (heads // kv_heads) : (h + 1) * (heads // kv_heads), t, j * size : min((j + 1) * size, t + 1)] = True
    return keep


@pytest.mark.parametrize("spec", ["decodeblock:4:24", "decodeblock:4:0.4", "decodeblock:3:0.35"])
@pytest.mark.parametrize("ties", [False, True])
def test_mask_equals_the_row_by_row_definition(spec: str, ties: bool) -> None:
    policy = parse_policy(spec)
    q, k = qk(0)
    if ties:  # every full block has the same key sum: the lower blocks win
        k = torch.ones_like(k)
    rule = policy.rule
    expected = decode_block_keep(q, k, rule.block_size, rule.budget, rule.density, rule.sink_blocks,
                                 rule.recent_blocks)
    got = keep_mask(policy, q, k)
    assert torch.equal(got, expected)
    forced_only = decode_block_keep(q, k, rule.block_size, 1, 0.0, rule.sink_blocks, rule.recent_blocks)
    assert not torch.equal(expected, forced_only)  # rows choose blocks beyond the sink and recent ones
    rows = torch.arange(1, q.shape[2] + 1)
    assert torch.equal(policy.kept_per_row(rows), expected[0, 0].sum(-1))


@pytest.mark.parametrize("spec", ["decodeblock:4:20", "decodeblock:4:0.4:bound", "decodeblock:4:20:channels3"])
def test_mask_equals_the_decode_store_selection(spec: str) -> None:
    policy = parse_policy(spec)
    q, k = qk(1, n=40)
    assert torch.equal(keep_mask(policy, q, k, chunk=9), store_keep(policy, q, k))


def test_attention_is_differentiable_through_kept_scores() -> None:
    policy = parse_policy("decodeblock:4:20")
    q, k = qk(2, n=30)
    v = torch.randn(2, 2, 30, 8)
    q.requires_grad_(True)
    out = chunked_attention(q, k, v, None, scaling=0.5, policy=policy, query_chunk=8)  # (B, Q, H, D)
    keep = decode_block_keep(q.detach(), k, 4, budget=20)
    assert torch.allclose(out.transpose(1, 2), attention(q.detach(), k, v, 0.5, keep), atol=1e-5)
    out.square().sum().backward()
    assert q.grad is not None and bool(q.grad.abs().sum() > 0)


@pytest.mark.parametrize("spec", ["4:20", "4:0.4", "4:20:channels5"])
def test_prefill_logits_equal_decoding_token_by_token(spec: str) -> None:
    model = tiny_llama(heads=6, kv_heads=2, head_dim=16)
    ids = torch.randint(1, 97, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with sparse_attention(model, f"decodeblock:{spec}", query_chunk=16):
            prefill = model(ids).logits[0]
        dense = model(ids).logits[0]
        steps = []
        with sparse_decoding(model, f"block:{spec}", reserve=ids.shape[1]) as cache:
            for t in range(ids.shape[1]):
                steps.append(decode_step(model, cache, ids[:, t : t + 1])[0])
    decoded = torch.stack(steps)
    assert (prefill - decoded).abs().max() <= 1e-4
    assert (dense - decoded).abs().max() > 1e-2  # the selection matters on this input


def test_spec_round_trip_and_one_line_errors() -> None:
    for spec in ("decodeblock:16:0.0625", "decodeblock:16:64", "decodeblock:8:0.1:channels32", "decodeblock:4:8:bound"):
        assert parse_policy(spec).spec == spec and parse_policy(parse_policy(spec).spec) == parse_policy(spec)
    for bad in ("decodeblock:16", "decodeblock:16:0.0625:nosuch", "decodeblock:0:8", "decodeblock:16:0.0",
                "decodeblock:16:64:gate"):
        with pytest.raises(AttnsparseError) as error:
            parse_policy(bad)
        assert "\n" not in str(error.value)
