"""Sparse decoding cache and kernels against brute-force references (no model)."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnsparse.attention.backend import chunked_attention
from attnsparse.attention.policies import SinkWindow
from attnsparse.decode import kernels as K
from attnsparse.decode.cache import PENDING, SparseLayer
from attnsparse.decode.policies import BlockPolicy, DensePolicy, StreamingPolicy, TopkPolicy
from attnsparse.decode.scorers import parse_scorer
from attnsparse.decode.stores import BlockStore, FullStore, StreamStore
from attnsparse.errors import AttnsparseError
from tests import reference as R

pytestmark = pytest.mark.usefixtures("one_thread")


def feed(layer: SparseLayer, keys: torch.Tensor, values: torch.Tensor, prompt: int) -> None:
    """Prefill `prompt` tokens, then the rest one token per step."""
    layer.update(keys[:, :, :prompt], values[:, :, :prompt])
    for t in range(prompt, keys.shape[2]):
        layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    PENDING.clear()


@pytest.mark.parametrize("prompt", [1, 5, 16, 37])
@pytest.mark.parametrize("score", ["bound", "mean"])
def test_incremental_block_summaries_equal_recomputed(prompt, score):
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 123, 8), torch.randn(2, 3, 123, 8)
    store = BlockStore(BlockPolicy(8, budget=16, score=parse_scorer(score)), [0, 1, 2])
    store.append(keys[:, :, :prompt], values[:, :, :prompt])
    for t in range(prompt, 123):
        store.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        used = math.ceil(store.n / 8)
        if score == "bound":
            kmin, kmax = K.block_summaries(store.key_blocks(), store.n)
            held_max, held_min = store.selection[:, :, :used].chunk(2, dim=-1)  # [kmax | kmin]
            assert torch.equal(held_min, kmin) and torch.equal(held_max, kmax)
        else:  # a running sum: equal up to float rounding order
            assert torch.allclose(store.selection[:, :, :used], K.block_sums(store.key_blocks(), store.n), atol=1e-5)
    assert torch.equal(store.keys[:, :, :123], keys) and torch.equal(store.values[:, :, :123], values)


def test_mean_score_selects_blocks_with_highest_mean_key_score():
    torch.manual_seed(7)
    store = BlockStore(BlockPolicy(4, budget=16, sink_blocks=1, recent_blocks=1), [0])
    keys = torch.randn(1, 1, 40, 8)
    store.append(keys, keys)
    q = torch.randn(1, 1, 2, 8)
    means = keys.view(1, 1, 10, 4, 8).mean(-2)
    score = (q @ means.transpose(-1, -2)).amax(-2)[0, 0]  # (10,)
    expected = {0, 9} | set((score[1:9].topk(2).indices + 1).tolist())
    assert set(store.select(q)[0, 0].tolist()) == expected


def test_cache_contents_after_many_steps_with_eviction():
    torch.manual_seed(1)
    policies = [StreamingPolicy(3, 7), BlockPolicy(4, budget=8), StreamingPolicy(3, 7), TopkPolicy(5)]
    layer = SparseLayer(policies)
    keys, values = torch.randn(2, 4, 90, 8), torch.randn(2, 4, 90, 8)
    feed(layer, keys, values, prompt=20)
    assert layer.get_seq_length() == 90
    for store in layer.stores:
        index = torch.tensor(store.heads)
        ref_k, ref_v = keys[:, index], values[:, index]
        if isinstance(store, StreamStore):
            positions = store.held_positions()
            assert store.keys.shape[2] == 10  # evicted entries are not held: sink + window slots only
            assert sorted(positions.tolist()) == [0, 1, 2] + list(range(83, 90))
            assert torch.equal(store.keys, ref_k[:, :, positions]) and torch.equal(store.values, ref_v[:, :, positions])
        else:
            assert torch.equal(store.keys[:, :, :90], ref_k) and torch.equal(store.values[:, :, :90], ref_v)


def test_stream_prefill_longer_than_window_equals_stepwise():
    torch.manual_seed(2)
    keys, values = torch.randn(1, 2, 50, 4), torch.randn(1, 2, 50, 4)
    a, b = StreamStore(StreamingPolicy(2, 5), [0, 1]), StreamStore(StreamingPolicy(2, 5), [0, 1])
    a.append(keys, values)
    for t in range(50):
        b.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    for store in (a, b):
        assert torch.equal(store.keys, keys[:, :, store.held_positions()])


def test_streaming_decode_equals_backend_sink_window():
    torch.manual_seed(3)
    batch, kv, groups, n, dim = 1, 2, 3, 60, 8
    keys, values = torch.randn(batch, kv, n, dim), torch.randn(batch, kv, n, dim)
    q = torch.randn(batch, kv * groups, 1, dim)
    layer = SparseLayer([StreamingPolicy(4, 9)] * kv)
    feed(layer, keys, values, prompt=30)
    out = layer.attend(q, 0.3)
    ref = chunked_attention(q, keys, values, None, scaling=0.3, policy=SinkWindow(4, 9),
                            query_chunk=1)
    assert torch.allclose(out, ref, atol=1e-5)


def test_topk_decode_equals_masked_reference():
    torch.manual_seed(4)
    q, keys, values = torch.randn(2, 3, 3, 16), torch.randn(2, 3, 70, 16), torch.randn(2, 3, 70, 16)
    scores = q @ keys.transpose(-1, -2)
    keep = scores >= scores.topk(6, dim=-1).values[..., -1:]
    assert torch.allclose(K.topk_decode(q, keys, values, 6, 0.25), R.attention(q, keys, values, 0.25, keep),
                          atol=1e-5)


def test_block_bounds_are_upper_bounds_and_selection_matches_brute_force():
    torch.manual_seed(5)
    size, n, dim = 4, 45, 8
    policy = BlockPolicy(size, budget=12, sink_blocks=1, recent_blocks=1, score=parse_scorer("bound"))
    store = BlockStore(policy, [0, 1])
    keys, values = torch.randn(1, 2, n, dim), torch.randn(1, 2, n, dim)
    store.append(keys[:, :, :10], values[:, :, :10])
    for t in range(10, n):
        store.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    q = torch.randn(1, 2, 3, dim)
    blocks = math.ceil(n / size)
    bounds = K.block_bounds(q, store.selection[:, :, :blocks])
    true = (q @ keys.transpose(-1, -2))  # (1, 2, 3, n)
    padded = torch.full((1, 2, 3, blocks * size), float("-inf"))
    padded[..., :n] = true
    per_block = padded.view(1, 2, 3, blocks, size).amax(-1).amax(-2)
    assert (bounds >= per_block - 1e-5).all()
    chosen = store.select(q)
    assert chosen.shape[-1] == 3
    for h in range(2):
        picked = set(chosen[0, h].tolist())
        assert {0, blocks - 1} <= picked  # sink and recent always kept
        middle = bounds[0, h, 1 : blocks - 1]
        assert picked - {0, blocks - 1} == {int(middle.argmax()) + 1}
    keep = torch.zeros(1, 2, 1, n, dtype=torch.bool)
    for h in range(2):
        for b in chosen[0, h].tolist():
            keep[0, h, 0, b * size : min((b + 1) * size, n)] = True
    out = store.attend(q, 0.35)
    assert torch.allclose(out, R.attention(q, keys, values, 0.35, keep), atol=1e-5)


@pytest.mark.parametrize("policy", ["dense", "topk:500", "block:8:500", "block:8:1.0:bound", "streaming:4:500"])
def test_covering_policies_equal_dense_kernel(policy):
    from attnsparse.decode.plan import parse_head_policy

    torch.manual_seed(6)
    keys, values = torch.randn(2, 3, 77, 16), torch.randn(2, 3, 77, 16)
    layer = SparseLayer([parse_head_policy(policy)] * 3)
    feed(layer, keys, values, prompt=13)
    q = torch.randn(2, 9, 1, 16)
    ref = R.attention(q.view(2, 3, 3, 16), keys, values, 0.25).reshape(2, 1, 9, 16)
    assert torch.allclose(layer.attend(q, 0.25), ref, atol=1e-5)


def test_bytes_read_and_held():
    size, n, dim = 16, 1000, 8
    block = BlockStore(BlockPolicy(size, budget=64, score=parse_scorer("bound")), [0])
    mean = BlockStore(BlockPolicy(size, budget=64), [0])
    stream = StreamStore(StreamingPolicy(4, 60), [0])
    dense = FullStore(DensePolicy(), [0])
    keys = torch.randn(1, 1, n, dim)
    for store in (block, mean, stream, dense):
        store.append(keys, keys)
    assert mean.bytes_read(1) == 63 * dim * 4 + 2 * 64 * dim * 4
    assert dense.bytes_read(1) == 2 * n * dim * 4
    assert block.bytes_read(1) == 2 * 63 * dim * 4 + 2 * 64 * dim * 4
    assert stream.bytes_read(1) == 2 * 64 * dim * 4
    assert stream.keys.numel() == 64 * dim


def test_multi_token_continuation_and_head_mismatch_are_refused():
    layer = SparseLayer([DensePolicy()] * 2)
    layer.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(AttnsparseError, match="one token per step"):
        layer.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(AttnsparseError, match="kv heads"):
        layer.update(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))


def test_unused_buffer_is_zero_so_masked_tail_cannot_poison_output():
    store = BlockStore(BlockPolicy(8, budget=16), [0])
    store.reserve(torch.empty(1, 1, 1, 4), 100)
    store.append(torch.randn(1, 1, 13, 4), torch.randn(1, 1, 13, 4))
    assert (store.values[:, :, 13:] == 0).all() and (store.keys[:, :, 13:] == 0).all()
    assert torch.isfinite(store.attend(torch.randn(1, 1, 2, 4), 0.5)).all()


def test_reset_empties_the_layer_and_keeps_its_plan():
    layer = SparseLayer([StreamingPolicy(1, 3), BlockPolicy(4, budget=8)])
    feed(layer, torch.randn(1, 2, 12, 4), torch.randn(1, 2, 12, 4), prompt=5)
    layer.reset()
    assert layer.get_seq_length() == 0 and [s.policy.kind for s in layer.stores] == ["streaming", "block"]
    feed(layer, torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), prompt=2)
    assert layer.get_seq_length() == 6


@pytest.mark.parametrize("n", [64, 61, 5])
@pytest.mark.usefixtures("kernel_build")
def test_native_block_kernel_equals_gather_and_sdpa(n):
    """The compiled kernel (blocks read in place) equals the torch path (gathered copy + SDPA), partial block too."""
    gen = torch.Generator().manual_seed(n)
    batch, kv_heads, groups, dim, size, capacity = 2, 3, 3, 64, 8, 80
    keys = torch.randn(batch, kv_heads, capacity, dim, generator=gen)
    values = torch.randn(batch, kv_heads, capacity, dim, generator=gen)
    q = torch.randn(batch, kv_heads, groups, dim, generator=gen) * 2
    used = -(-n // size)
    count = min(4, used)
    index = torch.stack([torch.randperm(used - 1, generator=gen)[: count - 1] for _ in range(batch * kv_heads)])
    index = torch.cat([index, torch.full((batch * kv_heads, 1), used - 1)], dim=1).view(batch, kv_heads, count)
    kb = keys.view(batch, kv_heads, capacity // size, size, dim)
    vb = values.view(batch, kv_heads, capacity // size, size, dim)
    if K._native_block_attend() is None:
        pytest.skip("no C compiler: block_decode uses the torch path only")
    native = K.block_decode(q, kb, vb, index, n, 0.125)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "_native_block_attend", lambda: None)
        torch_path = K.block_decode(q, kb, vb, index, n, 0.125)
    assert torch.allclose(native, torch_path, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("dim", "size", "groups", "n"), [(64, 16, 3, 1000), (128, 8, 1, 997), (24, 5, 4, 401),
                                                         (12, 16, 2, 520), (72, 4, 3, 333)])
@pytest.mark.usefixtures("kernel_build")
def test_native_block_kernel_any_shape_equals_gather_and_sdpa(dim, size, groups, n):
    """Head dims with and without a vector tail, blocks walked eight at a time or alone, the partial last block."""
    if K._native_block_attend() is None:
        pytest.skip("no C compiler: block_decode uses the torch path only")
    gen = torch.Generator().manual_seed(dim + n)
    capacity = -(-n // size) * size
    keys, values = (torch.randn(2, 3, capacity, dim, generator=gen) for _ in range(2))
    q = torch.randn(2, 3, groups, dim, generator=gen)
    used = capacity // size
    count = used // 2 + 3  # several groups of eight plus a remainder
    picks = [torch.cat([torch.randperm(used - 1, generator=gen)[: count - 1], torch.tensor([used - 1])]) for _ in range(6)]
    index = torch.stack(picks).view(2, 3, count)
    kb, vb = keys.view(2, 3, used, size, dim), values.view(2, 3, used, size, dim)
    native = K.block_decode(q, kb, vb, index, n, dim**-0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "_native_block_attend", lambda: None)
        torch_path = K.block_decode(q, kb, vb, index, n, dim**-0.5)
    assert torch.allclose(native, torch_path, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("n", "count", "threads"), [(1000, 8, 1), (997, 8, 1), (40, 8, 1), (8190, 100, 2),
                                                     (8190, 100, 3)])
@pytest.mark.usefixtures("kernel_build")
def test_native_mean_block_decode_equals_torch_selection_and_attention(n, count, threads, block_kv):
    """One compiled call (mean-key selection + attention, split over threads for large steps and merged) equals
    block_means + select_blocks + block_decode."""
    q, _, kb, vb = block_kv(n, 3, seed=n)
    size = kb.shape[-2]
    sums = K.block_sums(kb, n)
    sums = torch.cat([sums, torch.zeros(*sums.shape[:2], kb.shape[2] - sums.shape[2], sums.shape[-1])], dim=2)
    sink, recent = 1, 2
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native = K.mean_block_decode(q, kb, vb, sums, n, count, sink, recent, 0.125)
    finally:
        torch.set_num_threads(previous)
    if native is None:
        pytest.skip("no C compiler: the torch selection and attention are used")
    used = -(-n // size)
    index = K.select_blocks(K.block_means(q, sums[:, :, :used]), count, sink, recent)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "_native_block_attend", lambda: None)
        expected = K.block_decode(q, kb, vb, index, n, 0.125)
    assert torch.allclose(native, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("batch", "groups", "dim", "n"), [(1, 3, 64, 1000), (2, 1, 128, 77), (3, 4, 12, 5)])
@pytest.mark.usefixtures("kernel_build")
def test_dense_decode_on_buffer_prefix_equals_sdpa(batch, groups, dim, n):
    """The compiled dense kernel reads the first n tokens of larger buffers in place; SDPA is the reference."""
    gen = torch.Generator().manual_seed(n)
    keys, values = (torch.randn(batch, 3, n + 40, dim, generator=gen) for _ in range(2))
    q = torch.randn(batch, 3, groups, dim, generator=gen)
    k, v = keys[:, :, :n], values[:, :, :n]
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert K._token_rows(k) == n + 40 or K._native_dense_decode() is None
    assert torch.allclose(K.dense_decode(q, k, v, 0.3), expected, atol=2e-5, rtol=1e-4)
    other = keys.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :n]  # same values, token stride 1
    assert K._token_rows(other) is None
    assert torch.allclose(K.dense_decode(q, other, v, 0.3), expected, atol=2e-5, rtol=1e-4)


def _picks_lower_index_first(scores: torch.Tensor, count: int, sink: int, recent: int) -> torch.Tensor:
    """Brute-force selection: sink and recent blocks, then the best scores, ties to the lower block index."""
    scores = scores.clone()
    scores[..., :sink] = float("inf")
    scores[..., scores.shape[-1] - recent:] = float("inf")
    blocks = scores.shape[-1]
    order = torch.arange(blocks, dtype=torch.float64) / blocks  # < 1: breaks ties only (scores are integers)
    return (scores.double() - order).topk(count, dim=-1).indices.sort(dim=-1).values


@pytest.mark.parametrize("case", ["ties", "best_off_sample", "best_on_sample"])
@pytest.mark.usefixtures("kernel_build")
def test_native_picks_are_exact_when_the_sampled_threshold_is_off(case, block_kv):
    """2048 blocks: the kernel pre-filters with a threshold from a 1-in-8 sample. Integer keys and queries make the
    scores exact (many ties); the best blocks are placed off or on the sampled positions to mislead the sample."""
    n, count, sink, recent, size = 2048 * 16, 128, 1, 2, 16
    gen = torch.Generator().manual_seed(7)
    keys = torch.randint(-1, 2, (1, 3, n, 64), generator=gen).float()
    q = torch.randint(-2, 3, (1, 3, 3, 64), generator=gen).float()
    if case != "ties":
        keys *= 0.0
        best = torch.randperm(255, generator=gen)[:count] * 8 + (1 if case == "best_off_sample" else 0) + 8
        keys.view(1, 3, -1, size, 64)[:, :, best] += q[:, :, :1].unsqueeze(2)  # aligned with the first query head
    values = torch.randn(1, 3, n, 64, generator=gen)
    kb, vb = keys.view(1, 3, -1, size, 64), values.view(1, 3, -1, size, 64)
    sums = K.block_sums(kb, n).contiguous()
    native = K.mean_block_decode(q, kb, vb, sums, n, count, sink, recent, 0.125)
    if native is None:
        pytest.skip("no C compiler")
    index = _picks_lower_index_first(K.block_means(q, sums), count, sink, recent)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "_native_block_attend", lambda: None)
        expected = K.block_decode(q, kb, vb, index, n, 0.125)
    assert torch.allclose(native, expected, atol=2e-5, rtol=1e-4)
