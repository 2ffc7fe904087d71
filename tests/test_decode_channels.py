"""Block top-k with channel-subset scores (score "channels"): store, scores, compiled kernel, plan specs."""

import pytest
import torch

from attnsparse.decode import kernels as K
from attnsparse.decode.cache import PENDING, SparseLayer
from attnsparse.decode.plan import DecodePlan, parse_head_policy
from attnsparse.decode.policies import BlockPolicy
from attnsparse.decode.scorers import ChannelScore
from attnsparse.decode.stores import BlockStore
from tests import reference as R

pytestmark = pytest.mark.usefixtures("one_thread")


def channel_scores_brute(q: torch.Tensor, keys: torch.Tensor, n: int, block: int, r: int) -> torch.Tensor:
    """Per (batch, kv head): pick the r channels of largest summed |q|, score every key on them, max per block."""
    batch, heads = q.shape[:2]
    blocks = -(-n // block)
    out = torch.empty(batch, heads, blocks)
    for b in range(batch):
        for h in range(heads):
            chosen = q[b, h].abs().sum(0).topk(r).indices
            sub_k = keys[b, h, :n][:, chosen].half().float()
            scores = q[b, h][:, chosen] @ sub_k.T  # (G, n)
            for j in range(blocks):
                out[b, h, j] = scores[:, j * block : (j + 1) * block].max()
    return out


@pytest.mark.parametrize("r", [1, 5, 16])
@pytest.mark.parametrize("n", [48, 45])
def test_channel_scores_equal_brute_force(r, n):
    torch.manual_seed(r + n)
    keys, q = torch.randn(2, 3, 64, 16), torch.randn(2, 3, 3, 16)
    sketch = keys.transpose(-1, -2).half().contiguous()
    expected = channel_scores_brute(q, keys, n, 8, r)
    assert torch.allclose(K.block_channel_scores(q, sketch, n, 8, r), expected, atol=1e-5)


def test_all_channels_rank_by_the_exact_block_max():
    torch.manual_seed(3)
    keys, q = torch.randn(1, 2, 64, 8).half().float(), torch.randn(1, 2, 3, 8)
    exact = (q @ keys.transpose(-1, -2)).view(1, 2, 3, 8, 8).amax(-1).amax(-2)
    scores = K.block_channel_scores(q, keys.transpose(-1, -2).half().contiguous(), 64, 8, 8)
    assert torch.allclose(scores, exact, atol=1e-5)


@pytest.mark.parametrize("prompt", [1, 16, 37])
def test_incremental_sketch_equals_keys_transposed(prompt):
    torch.manual_seed(prompt)
    keys, values = torch.randn(2, 3, 1500, 8), torch.randn(2, 3, 1500, 8)
    store = BlockStore(BlockPolicy(8, budget=16, score=ChannelScore(4)), [0, 1, 2])
    store.append(keys[:, :, :prompt], values[:, :, :prompt])
    for t in range(prompt, 1500):  # grows past the first buffer: the sketch is copied with the keys
        store.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    assert store.selection.dtype == torch.float16
    assert torch.equal(store.selection[..., :1500], keys.transpose(-1, -2).half())
    assert (store.selection[..., 1500:] == 0).all()


def test_channel_selection_attends_to_the_chosen_blocks():
    torch.manual_seed(11)
    size, n = 4, 40
    store = BlockStore(BlockPolicy(size, budget=12, sink_blocks=1, recent_blocks=1, score=ChannelScore(3)), [0, 1])
    keys, values = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    store.append(keys, values)
    q = torch.randn(1, 2, 2, 8)
    scores = channel_scores_brute(q, keys, n, size, 3)
    keep = torch.zeros(1, 2, 1, n, dtype=torch.bool)
    for h in range(2):
        chosen = {0, 9} | set((scores[0, h, 1:9].topk(1).indices + 1).tolist())
        for b in chosen:
            keep[0, h, 0, b * size : (b + 1) * size] = True
    assert torch.allclose(store.attend(q, 0.3), R.attention(q, keys, values, 0.3, keep), atol=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_covering_channel_policy_equals_dense(native, monkeypatch):
    if not native:
        monkeypatch.setattr(K, "_native_channel_decode", lambda: None)
        monkeypatch.setattr(K, "_native_block_attend", lambda: None)
    torch.manual_seed(6)
    keys, values = torch.randn(2, 3, 77, 16), torch.randn(2, 3, 77, 16)
    layer = SparseLayer([parse_head_policy("block:8:1.0:channels4")] * 3)
    layer.update(keys[:, :, :13], values[:, :, :13])
    for t in range(13, 77):
        layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    PENDING.clear()
    q = torch.randn(2, 9, 1, 16)
    qg = q.view(2, 3, 3, 16)
    ref = R.attention(qg, keys, values, 0.25).reshape(2, 1, 9, 16)
    assert torch.allclose(layer.attend(q, 0.25), ref, atol=1e-5)


@pytest.mark.parametrize(("n", "count", "r", "threads", "groups"),
                         [(1000, 8, 16, 1, 3), (997, 8, 5, 1, 3), (40, 8, 64, 1, 3), (8190, 100, 16, 2, 3),
                          (8190, 100, 24, 3, 3), (997, 8, 7, 1, 10), (333, 4, 9, 1, 1)])
@pytest.mark.usefixtures("kernel_build")
def test_native_channel_decode_equals_torch_selection_and_attention(n, count, r, threads, groups, block_kv):
    """Rows scored four at a time in registers (and the remainder one by one), any group size, threads merged."""
    q, keys, kb, vb = block_kv(n, groups, seed=n + r)
    size = kb.shape[-2]
    sketch = keys.transpose(-1, -2).half().contiguous()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native = K.channel_block_decode(q, kb, vb, sketch, n, count, 1, 2, r, 0.125)
    finally:
        torch.set_num_threads(previous)
    if native is None:
        pytest.skip("no C compiler: the torch selection and attention are used")
    index = K.select_blocks(K.block_channel_scores(q, sketch, n, size, r), count, 1, 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "_native_block_attend", lambda: None)
        expected = K.block_decode(q, kb, vb, index, n, 0.125)
    assert torch.allclose(native, expected, atol=2e-5, rtol=1e-4)


def test_channel_spec_round_trips_and_bytes_count_the_sketch(tmp_path):
    policy = parse_head_policy("block:16:0.0625:channels24")
    assert (policy.score, policy.spec) == (ChannelScore(24), "block:16:0.0625:channels24")
    assert parse_head_policy("block:16:64:channels").score == ChannelScore(16)
    plan = DecodePlan.uniform(policy, 2, 3)
    plan.save(tmp_path / "plan.json")
    assert DecodePlan.load(tmp_path / "plan.json").heads[1][2] == policy
    store = BlockStore(BlockPolicy(16, budget=64, score=ChannelScore(8)), [0])
    keys = torch.randn(1, 1, 1000, 32)
    store.append(keys, keys)
    assert store.bytes_read(1) == 8 * 1000 * 2 + 2 * 64 * 32 * 4
    with pytest.raises(Exception, match="channels"):
        BlockPolicy(16, budget=64, score=ChannelScore(0))


@pytest.mark.usefixtures("kernel_build")
def test_portable_half_conversion_matches_torch_on_every_bit_pattern():
    from attnsparse.core import native

    convert = native.function("blockattn", "half_to_float_portable", "pnp")
    if convert is None:
        pytest.skip("no C compiler")
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    out = torch.empty(65536)
    convert(bits.data_ptr(), 65536, out.data_ptr())
    expected = bits.view(torch.float16).float()
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out[~out.isnan()], expected[~expected.isnan()])


def test_channel_policy_runs_in_bfloat16_on_the_torch_path():
    torch.manual_seed(2)
    keys, values = torch.randn(1, 2, 100, 16).bfloat16(), torch.randn(1, 2, 100, 16).bfloat16()
    store = BlockStore(BlockPolicy(8, budget=32, score=ChannelScore(4)), [0, 1])
    store.append(keys, values)
    out = store.attend(torch.randn(1, 2, 3, 16).bfloat16(), 0.25)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
