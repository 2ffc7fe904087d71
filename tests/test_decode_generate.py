"""Sparse decoding through model.generate() and the plan JSON, on tiny random models."""

import json

import pytest
import torch

from attnsparse.core.tiny import tiny_gpt2, tiny_llama
from attnsparse.decode.backend import sparse_decoding
from attnsparse.decode.cache import SparseCache
from attnsparse.decode.generate import generate, generate_hf
from attnsparse.decode.plan import DecodePlan, parse_head_policy, plan_from_profile, resolve_plan
from attnsparse.decode.policies import BlockPolicy
from attnsparse.decode.scorers import BoundScore, MeanScore
from attnsparse.errors import AttnsparseError
from attnsparse.measure.profile import ProfileView

pytestmark = pytest.mark.usefixtures("one_thread")

COVERING = ["dense", "topk:1000", "block:4:1000", "block:8:1.0:bound", "streaming:4:1000"]


def llama():
    model = tiny_llama(heads=6, kv_heads=2, head_dim=16)
    model.generation_config.eos_token_id = None  # never stop early: compare full sequences
    return model


def mixed_covering_plan() -> DecodePlan:
    return DecodePlan([[parse_head_policy("streaming:2:1000"), parse_head_policy("block:4:1.0")],
                       [parse_head_policy("topk:1000"), parse_head_policy("dense")]])


def hf_generate(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("plan", COVERING + ["mixed"])
def test_generate_with_covering_policy_equals_dense(plan):
    model = llama()
    torch.manual_seed(0)
    ids = torch.randint(1, 97, (2, 29))
    reference = hf_generate(model, ids)
    spec = mixed_covering_plan() if plan == "mixed" else plan
    out = generate_hf(model, ids, spec, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                      output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(out.sequences, reference.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, reference.logits)) <= 1e-4
    assert model.config._attn_implementation == "sdpa"  # restored


def test_own_loop_equals_full_forward_and_gpt2_scaling():
    for model in (llama(), tiny_gpt2()):
        torch.manual_seed(1)
        ids = torch.randint(1, 97, (1, 21))
        result = generate(model, ids, "block:4:1.0" if model.config.model_type == "llama" else "topk:999",
                          max_new_tokens=6, keep_logits=True)
        assert result.new_tokens == 6
        with torch.no_grad():
            for step, logits in enumerate(result.logits):
                full = model(result.sequences[:, : 21 + step]).logits[:, -1]
                assert (logits - full).abs().max() <= 1e-4


def test_sparse_policies_run_and_cut_bytes():
    model = llama()
    ids = torch.randint(1, 97, (1, 200))
    dense = generate(model, ids, "dense", max_new_tokens=4)
    block = generate(model, ids, "block:8:32", max_new_tokens=4)
    stream = generate(model, ids, "streaming:4:28", max_new_tokens=4)
    assert block.attention_bytes_per_step < dense.attention_bytes_per_step / 3
    assert stream.kv_bytes_held < dense.kv_bytes_held / 5
    assert block.sequences.shape == stream.sequences.shape == (1, 204)


def test_padding_and_wrong_backend_are_clear_errors():
    model = llama()
    ids = torch.randint(1, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(AttnsparseError, match="padded"):
        generate_hf(model, ids, "dense", attention_mask=mask, max_new_tokens=3, pad_token_id=0)
    cache = SparseCache(DecodePlan.uniform("dense", 2, 2), model.config)
    with pytest.raises(AttnsparseError, match="attnsparse-decode"), torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)


def test_plan_json_roundtrip_and_validation(tmp_path):
    plan = mixed_covering_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = DecodePlan.load(path)
    assert loaded.heads == plan.heads
    assert resolve_plan(str(path), 2, 2).heads == plan.heads
    with pytest.raises(AttnsparseError, match="covers"):
        resolve_plan(str(path), 30, 3)
    data = json.loads(path.read_text())
    data["heads"][0]["policy"] = "nonsense"
    path.write_text(json.dumps(data))
    with pytest.raises(AttnsparseError, match="unknown decode policy"):
        DecodePlan.load(path)
    for bad in ["topk:0", "block:0:10", "block:16:0", "block:16:64:best", "streaming:1", "magic"]:
        with pytest.raises(AttnsparseError):
            parse_head_policy(bad)
    assert BlockPolicy(16, density=0.0625).selected_blocks(32768) == 128
    assert parse_head_policy("block:16:64:bound").score == BoundScore() and parse_head_policy("block:16:64").score == MeanScore()


def test_plan_from_profile_marks_whole_groups():
    per_head = [{"layer": layer, "head": head, "class": "streaming" if (layer, head) != (1, 4) else "retrieval",
                 "C": None, "k_at_coverage": {"0.95": {"mean": 1.0}}} for layer in range(2) for head in range(6)]
    profile = ProfileView.from_dict({"model": "m", "ctx": 64, "layers": 2, "heads": 6, "kv_heads": 2,
                                     "per_head": per_head})
    plan = plan_from_profile(profile, "dense", "streaming:4:64")
    kinds = [[head.kind for head in row] for row in plan.heads]
    assert kinds == [["streaming", "streaming"], ["streaming", "dense"]]


def test_sparse_decoding_restores_implementation_on_error():
    model = llama()
    with pytest.raises(RuntimeError), sparse_decoding(model, "dense"):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
