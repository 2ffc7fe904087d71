"""Sparse decoding end to end on a sharpened tiny Llama against a brute-force recomputation.

The reference runs the float64 twin over the whole generated sequence once, with attention that keeps, for
every decoded row, exactly the keys the policy reads at that step (chosen in the test from the definitions in
docs/decode.md: sink/recent/best blocks by each scorer, the streaming sink and window, per-head top-k). So
each decode step's logits must equal the reference's logits at that position. Every plan here really drops
keys: the test asserts that its reference differs from dense by far more than the tolerance.
"""

from __future__ import annotations

import pytest
import torch

from attnsparse.decode.backend import make_plan
from attnsparse.decode.eval import decode_perplexity
from attnsparse.decode.generate import generate
from attnsparse.decode.plan import DecodePlan, parse_head_policy
from tests.model_reference import (
    Separation,
    decode_rule,
    float64_twin,
    logit_scale,
    next_token_nll,
    reference_logits,
    sharpened_llama,
)

RELATIVE_TOL = 1e-5  # of the logit scale; float32 decoding agrees with the float64 reference to ~5e-7
PROMPT, NEW = 40, 12


@pytest.fixture(scope="module")
def sharp():
    return sharpened_llama(seed=1, factor=20.0)


@pytest.fixture(scope="module")
def twin(sharp):
    return float64_twin(sharp)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(1, 97, (2, PROMPT), generator=torch.Generator().manual_seed(4))


def mixed_plan(model: object) -> DecodePlan:
    """Every policy kind in one plan, different per (layer, kv head)."""
    heads = [["block:4:20", "streaming:2:8"], ["block:4:16:channels3", "topk:5"]]
    return DecodePlan([[parse_head_policy(spec) for spec in row] for row in heads])  # 2 layers x 2 kv heads


PLANS = {
    "block-mean": "block:4:20",
    "block-bound": "block:4:20:bound",
    "block-channels": "block:4:20:channels3",
    "streaming": "streaming:2:8",
    "topk": "topk:5",
    "mixed": mixed_plan,
}


@pytest.mark.parametrize("kernel_build", ["native", "portable", "off"], indirect=True)  # every kernel path
@pytest.mark.parametrize("name", sorted(PLANS))
def test_decoded_logits_equal_recomputation_with_the_kept_keys(sharp, twin, prompt, name, kernel_build, one_thread):
    spec = PLANS[name]
    plan = spec(sharp) if callable(spec) else make_plan(sharp, spec)
    result = generate(sharp, prompt, plan, max_new_tokens=NEW, keep_logits=True)
    decoded = torch.stack(result.logits, dim=1)  # (B, NEW, V): the logits at positions PROMPT - 1 ...
    sequence = result.sequences[:, :-1]
    separation = Separation()
    reference = reference_logits(twin, sequence, decode_rule(plan, PROMPT, separation))[:, PROMPT - 1:]
    dense = reference_logits(twin, sequence)[:, PROMPT - 1:]
    tol = RELATIVE_TOL * logit_scale(reference)
    assert separation.smallest > 1e-5  # no near-tie in any selection: float32 and float64 choose alike
    assert (reference - dense).abs().max() > 100 * tol  # the plan drops keys that matter
    assert (decoded - reference).abs().max() <= tol


def test_decode_perplexity_equals_nll_by_hand(sharp, twin, one_thread):
    ctx, new = 48, 10
    windows = torch.randint(1, 97, (2, ctx), generator=torch.Generator().manual_seed(9))
    specs = ["streaming:2:6", "block:4:16"]
    results = {r.policy: r for r in decode_perplexity(sharp, windows, specs, new, progress=False)}
    assert list(results) == ["plan:dense", "plan:streaming:2:6", "plan:block:4:16"]
    prompt = ctx - new
    nlls = {}
    for label, spec in zip(results, ["dense", *specs]):
        logits = reference_logits(twin, windows, decode_rule(make_plan(sharp, spec), prompt))
        nll, tokens = next_token_nll(logits[:, prompt - 1:], windows[:, prompt - 1:])
        nlls[label] = nll
        got = results[label]
        assert got.tokens == tokens == 2 * new and got.windows == 2
        assert got.nll_sum == pytest.approx(nll, rel=1e-5)
        assert got.mean_nll == pytest.approx(nll / tokens, rel=1e-5)
    assert abs(nlls["plan:streaming:2:6"] - nlls["plan:dense"]) > 1e-3 * nlls["plan:dense"]
    assert results["plan:streaming:2:6"].density < 1.0 and results["plan:dense"].density == 1.0  # KV bytes read


def test_decode_perplexity_keeps_every_plan_object(sharp, one_thread):
    """Plan objects carry no name; two of them are two rows (a plan's label once made the second one vanish)."""
    windows = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    plans = [DecodePlan.uniform(spec, 2, 2) for spec in ("streaming:2:6", "block:4:16")]
    results = decode_perplexity(sharp, windows, plans, 6, progress=False)
    assert [r.policy for r in results] == ["plan:dense", "plan:custom", "plan:custom-2"]
    by_spec = decode_perplexity(sharp, windows, ["streaming:2:6", "block:4:16"], 6, progress=False)
    assert [r.nll_sum for r in results] == pytest.approx([r.nll_sum for r in by_spec], rel=1e-6)
