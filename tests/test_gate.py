"""The learned block gate: its KL loss, the recorder's block-pooled target and inputs, save/load, training."""

from __future__ import annotations

import math

import pytest
import torch

from attnsparse.attention.backend import sparse_attention
from attnsparse.errors import AttnsparseError
from attnsparse.gate import BlockGate, BlockPoolRecorder, GateConfig, block_kl
from attnsparse.gate.train import collect_features, features_kl, fit_gate, stack_windows
from tests.model_reference import float64_twin, reference_attention, sharpened_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def test_block_kl_matches_brute_force() -> None:
    torch.manual_seed(0)
    target = torch.softmax(torch.randn(3, 5, 6) * 2, -1)
    target[0, 1, 2] = 0.0  # a zero target entry contributes nothing
    target = target / target.sum(-1, keepdim=True)
    logits = torch.randn(3, 5, 6)
    logits[..., 5] = -math.inf  # a causally hidden block
    target[..., 5] = 0.0
    target = target / target.sum(-1, keepdim=True)
    log_probs = torch.log_softmax(logits, -1)
    expected = 0.0
    for row in range(15):
        t, g = target.view(15, 6)[row], log_probs.view(15, 6)[row]
        expected += sum(float(t[j]) * (math.log(float(t[j])) - float(g[j])) for j in range(6) if t[j] > 0)
    assert float(block_kl(target, log_probs)) == pytest.approx(expected / 15, rel=1e-5)


def _captured(model: torch.nn.Module, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (q, k) in float64 from brute-force attention on the model's float64 twin."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rule(layer: int, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor):
        seen[layer] = (q, k)
        return visible

    twin = float64_twin(model)
    with torch.no_grad(), reference_attention(twin, rule):
        twin(ids)
    return seen


def _pooled_by_loops(q: torch.Tensor, k: torch.Tensor, block: int, groups: int):
    """Brute force from the definition: full causal softmax, then per (head, query block, key block) the mass on
    the key block averaged over the block's queries; mean query per block, [mean | max | min] key per block."""
    heads, length, dim = q.shape[1], q.shape[2], q.shape[3]
    scores = (q[0] @ k[0].repeat_interleave(groups, 0).transpose(-1, -2)) * dim**-0.5
    causal = torch.arange(length)[None, :] <= torch.arange(length)[:, None]
    probs = torch.softmax(scores.masked_fill(~causal, -math.inf), -1)
    blocks = -(-length // block)
    target = torch.zeros(heads, blocks, blocks, dtype=torch.float64)
    pooled_q = torch.zeros(heads, blocks, dim, dtype=torch.float64)
    for h in range(heads):
        for i in range(blocks):
            rows = range(i * block, min((i + 1) * block, length))
            pooled_q[h, i] = sum(q[0, h, r] for r in rows) / len(rows)
            for j in range(blocks):
                cols = slice(j * block, min((j + 1) * block, length))
                target[h, i, j] = sum(float(probs[h, r, cols].sum()) for r in rows) / len(rows)
    pooled_k = torch.stack([torch.cat([k[0, :, j * block:(j + 1) * block].mean(1),
                                       k[0, :, j * block:(j + 1) * block].amax(1),
                                       k[0, :, j * block:(j + 1) * block].amin(1)], -1) for j in range(blocks)], 1)
    return target, pooled_q, pooled_k


@pytest.mark.parametrize("query_chunk", [3, 64])
def test_recorder_matches_full_attention(query_chunk: int) -> None:
    model = sharpened_llama(seed=1)
    ids = torch.randint(0, 97, (1, 22), generator=torch.Generator().manual_seed(0))
    block = 4
    recorder = BlockPoolRecorder(block)
    with torch.no_grad(), sparse_attention(model, "dense", observers=[recorder], query_chunk=query_chunk):
        model(ids)
    records = recorder.layers()
    assert sorted(records) == [0, 1]
    for layer, (q, k) in _captured(model, ids).items():
        target, pooled_q, pooled_k = _pooled_by_loops(q, k, block, q.shape[1] // k.shape[1])
        record = records[layer]
        uniform, _, _ = _pooled_by_loops(torch.zeros_like(q), k, block, q.shape[1] // k.shape[1])
        assert float((target - uniform).abs().amax()) > 0.3  # far from uniform rows: a wrong pooling would show
        torch.testing.assert_close(record.target[0].double(), target, atol=2e-5, rtol=0)
        torch.testing.assert_close(record.pooled_q[0].double(), pooled_q, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(record.pooled_k[0].double(), pooled_k, atol=2e-5, rtol=1e-5)
        assert record.query_blocks.tolist() == list(range(6))
        torch.testing.assert_close(record.target.sum(-1), torch.ones(1, 4, 6), atol=1e-5, rtol=0)


def test_gate_save_load_round_trip(tmp_path) -> None:
    gate = BlockGate(GateConfig(2, 4, 2, 8, block=4, rank=3, model="tiny"), seed=3)
    gate.save(tmp_path / "g", notes={"tokens": 7})
    loaded = BlockGate.load(tmp_path / "g")
    assert loaded.config == gate.config
    torch.testing.assert_close(loaded.wq, gate.wq, rtol=0, atol=0)
    torch.testing.assert_close(loaded.wk, gate.wk, rtol=0, atol=0)
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 24)
    torch.testing.assert_close(loaded.log_probs(1, q, k), gate.log_probs(1, q, k), rtol=0, atol=0)


def test_gate_load_errors(tmp_path) -> None:
    with pytest.raises(AttnsparseError, match="has no gate.json"):
        BlockGate.load(tmp_path / "absent")
    BlockGate(GateConfig(2, 4, 2, 8)).save(tmp_path / "a")
    BlockGate(GateConfig(2, 4, 2, 8, rank=5)).save(tmp_path / "b")
    (tmp_path / "a" / "gate.safetensors").write_bytes((tmp_path / "b" / "gate.safetensors").read_bytes())
    with pytest.raises(AttnsparseError, match="different gates"):
        BlockGate.load(tmp_path / "a")
    with pytest.raises(AttnsparseError, match="trained for 2 layers x 4 heads"):
        GateConfig(2, 4, 2, 8).check_model(3, 4, 2, 8)
    with pytest.raises(AttnsparseError, match="--block 16"):
        GateConfig(2, 4, 2, 8, block=64).check_block(16, "block:16:0.0625:gate")


def test_training_lowers_the_kl() -> None:
    model = sharpened_llama(seed=2, factor=6.0)
    ids = torch.randint(0, 97, (6, 64), generator=torch.Generator().manual_seed(1))
    train = stack_windows([collect_features(model, ids[i : i + 1], 8) for i in range(6)])
    weights = [p.clone() for p in model.parameters()]
    gate = BlockGate(GateConfig(2, 4, 2, 8, block=8, rank=4), seed=0)
    with torch.no_grad():
        before = float(features_kl(gate, train))
    fit_gate(gate, train, steps=30, lr=5e-2)
    with torch.no_grad():
        after = float(features_kl(gate, train))
    assert after < 0.6 * before
    assert not gate.wq.requires_grad and gate.wq.grad is not None
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # the model is never touched
