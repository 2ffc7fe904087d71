"""The learned block gate: its KL loss, the recorder's block-pooled target and inputs, save/load, training."""

from __future__ import annotations

import math

import pytest
import torch

from attnsparse.attention.backend import sparse_attention
from attnsparse.errors import AttnsparseError
from attnsparse.gate import BlockGate, GateConfig, block_kl
from attnsparse.gate.model import pool_keys, pool_queries, prepared_kl
from attnsparse.gate.observer import BlockPoolRecorder
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


@pytest.mark.parametrize("sink,local", [(1, 1), (2, 1), (0, 3), (1, 2)])
def test_merged_kl_matches_brute_force_and_never_exceeds_the_row_kl(sink: int, local: int) -> None:
    from attnsparse.gate.model import forced_mask, merged_kl

    torch.manual_seed(sink * 10 + local)
    rows, cols = 5, 7
    query_blocks = torch.tensor([2, 3, 4, 5, 6])
    causal = torch.arange(cols)[None, :] <= query_blocks[:, None]
    target = torch.softmax((torch.randn(2, 3, rows, cols) * 2).masked_fill(~causal, -math.inf), -1)
    log_probs = torch.log_softmax(torch.randn(2, 3, rows, cols).masked_fill(~causal, -math.inf), -1)
    forced = forced_mask(query_blocks, cols, sink, local)
    expected, count = 0.0, 0
    for b in range(2):
        for h in range(3):
            for r in range(rows):
                i = int(query_blocks[r])
                kept = [j for j in range(i + 1) if j < sink or j > i - local]
                t_kept = sum(float(target[b, h, r, j]) for j in kept)
                g_kept = sum(math.exp(float(log_probs[b, h, r, j])) for j in kept)
                kl = t_kept * (math.log(t_kept) - math.log(g_kept))
                kl += sum(float(target[b, h, r, j]) * (math.log(float(target[b, h, r, j])) - float(log_probs[b, h, r, j]))
                          for j in range(i + 1) if j not in kept)
                expected, count = expected + kl, count + 1
    got = merged_kl(target, log_probs, forced)
    assert float(got) == pytest.approx(expected / count, rel=1e-5)
    assert float(got) <= float(block_kl(target, log_probs)) + 1e-6  # merging outcomes never raises a KL


@pytest.mark.parametrize("kind,sink,local", [("merged", 1, 1), ("merged", 2, 3), ("merged", 0, 2), ("whole", 1, 1)])
def test_prepared_target_gives_the_loss_and_gradient_of_the_plain_one(kind: str, sink: int, local: int) -> None:
    """The fit's prepared path (target reduced once) against GateLoss on log-softmax, value and gradient."""
    from attnsparse.gate.observer import PooledLayer
    from attnsparse.gate.train import GateLoss

    torch.manual_seed(7 + sink + 3 * local)
    rows, cols = 5, 9
    query_blocks = torch.tensor([0, 2, 5, 7, 8])  # row 0 sees only the sink block, rows differ in forced count
    causal = torch.arange(cols)[None, :] <= query_blocks[:, None]
    target = torch.softmax((torch.randn(2, 3, rows, cols) * 2).masked_fill(~causal, -math.inf), -1)
    target[0, 1, 3] = torch.where(causal[3], 1.0 / int(causal[3].sum()), 0.0)  # a row with no zero-mass blocks
    record = PooledLayer(target.clone(), torch.zeros(2, 3, rows, 4), torch.zeros(2, 3, cols, 12), query_blocks)
    loss = GateLoss(kind, sink, local)
    logits = (torch.randn(2, 3, rows, cols) * 3).masked_fill(~causal, -math.inf).requires_grad_(True)
    plain = loss(torch.log_softmax(logits, -1), record)
    (want,) = torch.autograd.grad(plain, logits)
    prepared = loss.prepare(record, in_place=True)
    fast = prepared_kl(logits, prepared.target)
    (got,) = torch.autograd.grad(fast, logits)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert torch.equal(record.target, prepared.target.free)  # in place: no second copy of the map


def test_forced_mask_is_the_selection_rule_forced_blocks() -> None:
    from attnsparse.attention.selection.base import BlockGrid, forced_blocks
    from attnsparse.gate.model import forced_mask

    grid = BlockGrid(8, 61, 61)
    for sink, local in [(1, 1), (0, 2), (3, 4)]:
        expected = forced_blocks(grid, sink, local)
        assert torch.equal(forced_mask(torch.arange(grid.query_blocks), grid.key_blocks, sink, local), expected)


def test_a_gate_started_at_the_mean_key_is_the_mean_estimator(tmp_path) -> None:
    """`start_at_mean_key` makes the gate compute the `mean` estimator exactly (whole blocks), so training starts
    from the training-free estimate; a rank below the head dim is refused."""
    from attnsparse.attention.selection import BlockGrid, parse_estimator

    gate = BlockGate(GateConfig(2, 4, 2, 8, block=8, rank=10, model="tiny"), seed=3).start_at_mean_key(0.3)
    gate.requires_grad_(False).save(tmp_path / "gate")
    torch.manual_seed(4)
    q, k = torch.randn(1, 4, 32, 8), torch.randn(1, 2, 32, 8)
    grid = BlockGrid(8, 32, 32)
    want = parse_estimator("mean").log_mass(q, k, grid, scaling=0.3, layer_idx=1).exp()
    got = parse_estimator(f"gate:path={tmp_path / 'gate'}").log_mass(q, k, grid, scaling=0.3, layer_idx=1).exp()
    torch.testing.assert_close(got * grid.causal(), want * grid.causal(), atol=2e-3, rtol=0)  # the 1e-2 extra columns
    with pytest.raises(AttnsparseError, match="--rank >= the head dim 8"):
        BlockGate(GateConfig(2, 4, 2, 8, rank=4)).start_at_mean_key(0.3)


def test_kept_mass_matches_a_brute_force_selection() -> None:
    """Kept mass: forced blocks plus the best other blocks of the whole (batch, group) map by estimated mass, the
    true per-head mass on them averaged over heads and rows; the oracle keeps the most, a covering density all."""
    from attnsparse.gate.kept import kept_mass, mean_key_estimate, oracle_estimate
    from attnsparse.gate.observer import PooledLayer

    torch.manual_seed(6)
    blocks, heads, kv_heads, dim = 6, 4, 2, 5
    causal = torch.arange(blocks)[None, :] <= torch.arange(blocks)[:, None]
    target = torch.softmax((torch.randn(1, heads, blocks, blocks) * 3).masked_fill(~causal, -math.inf), -1)
    record = PooledLayer(target, torch.randn(1, heads, blocks, dim), torch.randn(1, kv_heads, blocks, 3 * dim),
                         torch.arange(blocks))
    estimates = {"mean": mean_key_estimate(0.4), "exact": oracle_estimate}
    mean_k = record.pooled_k[..., :dim].repeat_interleave(2, 1)
    guess = torch.softmax((record.pooled_q @ mean_k.transpose(-1, -2) * 0.4).masked_fill(~causal, -math.inf), -1)
    for per, size in (("group", 2), ("head", 1)):
        report = kept_mass(estimates, [record], block=4, ctx=24, density=0.5, per=per)
        for name, estimate in (("mean", guess), ("exact", target)):
            total = 0.0
            for g in range(heads // size):
                group = estimate[0, size * g:size * (g + 1)].mean(0)
                forced = [(r, c) for r in range(blocks) for c in range(r + 1) if c == 0 or c == r]
                others = sorted(((float(group[r, c]), r, c) for r in range(blocks) for c in range(1, r)),
                                reverse=True)
                budget = math.floor(0.5 * 21 + 0.5) - len(forced)
                chosen = forced + [(r, c) for _, r, c in others[:budget]]
                total += sum(float(target[0, h, r, c]) for h in range(size * g, size * (g + 1)) for r, c in chosen)
            assert report[name]["mean"] == pytest.approx(total / (heads * blocks), rel=1e-5), (per, name)
        assert report["exact"]["mean"] >= report["mean"]["mean"]
    covered = kept_mass(estimates, [record], block=4, ctx=24, density=1.0)
    assert covered["mean"]["mean"] == pytest.approx(1.0, rel=1e-6)
    seen: list[int] = []
    kept_mass({"spy": lambda layer, *rest: seen.append(layer) or oracle_estimate(layer, *rest)}, [record, record],
              block=4, ctx=24, density=0.5, layers=[7, 3])
    assert seen == [7, 3]  # each record's estimate is asked for the model layer it came from


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


def test_fit_step_takes_the_gradient_of_the_mean_layer_kl() -> None:
    """Layer-by-layer backward (one layer's graph alive at a time) is the gradient of features_kl."""
    from attnsparse.gate.train import fit_step

    model = sharpened_llama(seed=2, factor=6.0)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    train = stack_windows([collect_features(model, ids[i : i + 1], 8) for i in range(2)])
    gate = BlockGate(GateConfig(2, 4, 2, 8, block=8, rank=4), seed=1).requires_grad_(True)
    expected_loss = features_kl(gate, train)
    expected = torch.autograd.grad(expected_loss, [gate.wq, gate.wk])
    loss = fit_step(gate, torch.optim.SGD(gate.parameters(), lr=0.0), train)
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-6, atol=0)
    for got, want in zip((gate.wq.grad, gate.wk.grad), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


# --- the gate as a selector: prefill estimator `gate:path=DIR`, decode block score `gate` -------------------------


@pytest.fixture
def tiny_gate(tmp_path):
    """A random gate for the default tiny Llama (2 layers, 4 heads / 2 kv heads, D 8), blocks of 8."""
    gate = BlockGate(GateConfig(2, 4, 2, 8, block=8, rank=4, model="tiny"), seed=5).requires_grad_(False)
    gate.save(tmp_path / "gate")
    return gate, str(tmp_path / "gate")


def _gate_log_mass_by_hand(gate, layer, q, k, block):
    """Per head: softmax over causal key blocks of (mean q Wq) . ([mean|max|min] k Wk) / sqrt(r); group mean."""
    heads, kv_heads, length = q.shape[1], k.shape[1], q.shape[2]
    blocks = -(-length // block)
    out = torch.zeros(1, kv_heads, blocks, blocks)
    rank = gate.config.rank
    for g in range(kv_heads):
        for h in range(g * heads // kv_heads, (g + 1) * heads // kv_heads):
            for i in range(blocks):
                qi = q[0, h, i * block:(i + 1) * block].mean(0) @ gate.wq[layer, h] / math.sqrt(rank)
                logits = []
                for j in range(i + 1):
                    keys = k[0, g, j * block:(j + 1) * block]
                    pooled = torch.cat([keys.mean(0), keys.amax(0), keys.amin(0)])
                    logits.append(float(qi @ (pooled @ gate.wk[layer, g].detach())))
                out[0, g, i, : i + 1] += torch.softmax(torch.tensor(logits), 0) / (heads // kv_heads)
    return out


def test_prefill_estimator_is_the_gate_distribution(tiny_gate) -> None:
    from attnsparse.attention.selection import BlockGrid, Density, parse_estimator, select_blocks

    gate, path = tiny_gate
    q, k = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 20, 8)
    grid = BlockGrid(8, 20, 20)
    log_mass = parse_estimator(f"gate:path={path}").log_mass(q, k, grid, scaling=8**-0.5, layer_idx=1)
    expected = _gate_log_mass_by_hand(gate, 1, q, k, 8)
    causal = grid.causal()
    torch.testing.assert_close(log_mass.exp() * causal, expected, atol=1e-5, rtol=1e-5)
    kept = select_blocks(log_mass, grid, Density(0.5))
    assert not bool((kept & ~causal).any()) and bool(kept[..., 0].all())  # causal, sink kept


def test_prefill_estimator_per_head_is_each_heads_gate_distribution(tiny_gate) -> None:
    """Under blocksparse per=head the keys arrive repeated per query head; the gate scores each head on its own."""
    from attnsparse.attention.selection import BlockGrid, parse_estimator

    gate, path = tiny_gate
    torch.manual_seed(7)
    q, k = torch.randn(1, 4, 24, 8), torch.randn(1, 2, 24, 8)
    grid = BlockGrid(8, 24, 24)
    log_mass = parse_estimator(f"gate:path={path}").log_mass(q, k.repeat_interleave(2, 1), grid, scaling=8**-0.5,
                                                             layer_idx=0)
    assert log_mass.shape == (1, 4, 3, 3)
    causal = grid.causal()
    log_mass = torch.log_softmax(log_mass.masked_fill(~causal, float("-inf")), -1)  # as the selection reads it
    for h in range(4):  # head h alone: a "group" of one head on its kv head's keys
        alone = GateConfig(1, 1, 1, 8, block=8, rank=4)
        single = BlockGate(alone)
        single.wq.data[0, 0], single.wk.data[0, 0] = gate.wq[0, h], gate.wk[0, h // 2]
        expected = _gate_log_mass_by_hand(single, 0, q[:, h:h + 1], k[:, h // 2:h // 2 + 1], 8)
        torch.testing.assert_close(log_mass[:, h:h + 1].exp() * causal, expected, atol=1e-5, rtol=1e-5)


def test_prefill_with_a_covering_gate_budget_equals_dense(tiny_gate) -> None:
    from attnsparse.core.tiny import tiny_llama

    _, path = tiny_gate
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_attention(model, f"blocksparse:8:1.0:gate:path={path}"):
            sparse = model(ids).logits
        with sparse_attention(model, f"blocksparse:8:0.2:gate:path={path}"):
            thinned = model(ids).logits
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    assert float((thinned - dense).abs().max()) > 1e-3  # the low budget does drop blocks


def test_prefill_estimator_errors(tiny_gate, tmp_path) -> None:
    from attnsparse.attention.policies import parse_policy
    from attnsparse.attention.selection import BlockGrid, parse_estimator

    _, path = tiny_gate
    with pytest.raises(AttnsparseError, match="gate:path=DIR"):
        parse_policy("blocksparse:8:0.1:gate")
    with pytest.raises(AttnsparseError, match="has no gate.json"):
        parse_policy(f"blocksparse:8:0.1:gate:path={tmp_path / 'none'}")
    estimator = parse_estimator(f"gate:path={path}")
    with pytest.raises(AttnsparseError, match="--block 16"):
        estimator.log_mass(torch.randn(1, 4, 32, 8), torch.randn(1, 2, 32, 8), BlockGrid(16, 32, 32), scaling=1.0,
                           layer_idx=0)
    with pytest.raises(AttnsparseError, match="train a gate for this model"):
        estimator.log_mass(torch.randn(1, 6, 32, 8), torch.randn(1, 2, 32, 8), BlockGrid(8, 32, 32), scaling=1.0,
                           layer_idx=0)


def test_decode_scorer_scores_are_the_gate_distribution(tiny_gate) -> None:
    """Data kept by prompt and single-token appends scores every block as the gate does, from the held keys."""
    from attnsparse.decode.plan import DecodePlan
    from attnsparse.decode.stores import BlockStore

    gate, path = tiny_gate
    policy = DecodePlan.uniform("block:8:16:gate", 2, 2).with_gate(path).heads[1][0]
    store = BlockStore(policy, [0, 1])
    store.bind(1)
    keys, values = torch.randn(1, 2, 29, 8), torch.randn(1, 2, 29, 8)
    store.append(keys[:, :, :21], values[:, :, :21])  # the prompt: a partial third block
    for t in range(21, 29):  # decode steps fill it and open a fourth
        store.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    q = torch.randn(1, 2, 2, 8)  # (B, kv heads, G, D)
    scores = store.scorer.scores(store.selection, store.key_blocks(), q, store.n)
    expected = torch.zeros(1, 2, 4)
    for g in range(2):
        for h in range(2):
            logits = []
            for j in range(4):
                held = keys[0, g, j * 8:min((j + 1) * 8, 29)]
                pooled = torch.cat([held.mean(0), held.amax(0), held.amin(0)])
                logits.append(float((q[0, g, h] @ gate.wq[1, 2 * g + h]) @ (pooled @ gate.wk[1, g])) / 2.0)
            expected[0, g] += torch.softmax(torch.tensor(logits), 0) / 2
    torch.testing.assert_close(scores.exp(), expected, atol=1e-5, rtol=1e-5)


def test_decode_with_gate_selects_and_covers(tiny_gate) -> None:
    from attnsparse.core.tiny import tiny_llama
    from attnsparse.decode.generate import generate
    from attnsparse.decode.plan import DecodePlan

    _, path = tiny_gate
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(4))
    dense = generate(model, ids, "dense", max_new_tokens=6, keep_logits=True)
    covering = generate(model, ids, DecodePlan.uniform("block:8:1.0:gate", 2, 2).with_gate(path), max_new_tokens=6,
                        keep_logits=True)
    torch.testing.assert_close(torch.stack(covering.logits), torch.stack(dense.logits), atol=1e-4, rtol=1e-4)
    sparse = generate(model, ids, DecodePlan.uniform("block:8:24:gate", 2, 2).with_gate(path), max_new_tokens=6)
    assert sparse.attention_bytes_per_step < dense.attention_bytes_per_step
    with pytest.raises(AttnsparseError, match="needs a trained gate"):
        generate(model, ids, "block:8:24:gate", max_new_tokens=2)
    with pytest.raises(AttnsparseError, match="blocks of 8"):
        generate(model, ids, DecodePlan.uniform("block:16:32:gate", 2, 2).with_gate(path), max_new_tokens=2)


def test_generate_gate_option_errors(tiny_dir, tiny_gate, tmp_path) -> None:
    from typer.testing import CliRunner

    from attnsparse.cli.app import app

    _, path = tiny_gate
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the quick brown fox jumps over the lazy dog " * 3)
    base = ["generate", str(tiny_dir), "--prompt-file", str(prompt), "--max-new-tokens", "2"]
    other = BlockGate(GateConfig(3, 4, 2, 8, block=8))
    other.save(tmp_path / "other")
    for args, message in [
        (["--policy", "block:8:16:gate", "--gate", str(tmp_path / "none")], "has no gate.json"),
        (["--policy", "block:8:16", "--gate", path], "no head's block score is gate"),
        (["--policy", "block:8:16:gate"], "needs a trained gate"),
        (["--policy", "block:16:32:gate", "--gate", path], "--block 16"),
        (["--policy", "block:8:16:gate", "--gate", str(tmp_path / "other")], "trained for 3 layers"),
    ]:
        result = CliRunner().invoke(app, base + args)
        assert result.exit_code == 2, (args, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]  # beside loading bars
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output, result.output
    result = CliRunner().invoke(app, [*base, "--policy", "block:8:16:gate", "--gate", path, "--json"])
    assert result.exit_code == 0, result.output


def test_gate_command_run_directory_resume_and_errors(tiny_dir, tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from attnsparse.cli.app import app
    from attnsparse.core.runs import read_run

    out, text = tmp_path / "run", tmp_path / "prose.txt"
    words = [f"{a}{b}" for a in ("amber", "basil", "cedar", "delta", "ember", "frost", "grove", "haven")
             for b in ("ling", "wood", "stone", "field", "brook", "ridge")]
    text.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(6)) + "." for i in range(120)))
    base = ["gate", str(tiny_dir), "--data", str(text), "--ctx", "64", "--windows", "3", "--holdout", "1",
            "--block", "8", "--steps", "3", "--no-progress", "--out", str(out)]
    for args, message in [(["--holdout", "3"], "--holdout 3"), (["--ctx", "8"], "two blocks"),
                          (["--positions", "32"], "--positions 32"), (["--rank", "4"], "--rank >= the head dim 8"),
                          (["--loss", "mse"], "--loss mse"), (["--density", "0"], "--density 0")]:
        result = CliRunner().invoke(app, base + args)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], result.output
        assert not out.exists()  # refused before anything is written
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 0, result.output
    assert read_run(out).finished and BlockGate.load(out).config.block == 8
    again = CliRunner().invoke(app, base)
    assert again.exit_code == 2 and "--overwrite" in again.output
    record = json.loads((out / "config.json").read_text())  # an interrupted run of the same settings ...
    (out / "config.json").write_text(json.dumps(record | {"status": "running"}))
    (out / "gate.json").unlink()
    resumed = CliRunner().invoke(app, base)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "gate.json").read_text())["notes"]["windows_reused"] == 3  # ... reuses its features


@pytest.mark.parametrize("length,block", [(32, 8), (37, 8), (5, 8), (16, 16)])
def test_pooled_keys_are_each_blocks_mean_max_and_min(length, block):
    """The gate's key features, with and without a partial last block, against a loop over each block's own keys."""
    key = torch.randn(2, 3, length, 4, generator=torch.Generator().manual_seed(length))
    got, got_q = pool_keys(key, block), pool_queries(key, block)
    for j in range(-(-length // block)):
        own = key[:, :, j * block:(j + 1) * block]
        expected = torch.cat([own.mean(2), own.amax(2), own.amin(2)], dim=-1)
        torch.testing.assert_close(got[:, :, j], expected)
        torch.testing.assert_close(got_q[:, :, j], own.mean(2))
