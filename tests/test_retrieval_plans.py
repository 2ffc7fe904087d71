"""Retrieval scores in profiles and plans that protect retrieval heads at a stated average density.

The density arithmetic is checked against the bytes a real SparseCache reports (`bytes_read_per_step`), the
budget search against enumerating every block count.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import typer
from typer.testing import CliRunner

from attnsparse.cli.generate import generate_command
from attnsparse.core.models import LoadedModel
from attnsparse.core.tiny import save_tiny, tiny_llama, tiny_tokenizer
from attnsparse.decode.cache import SparseCache
from attnsparse.decode.plan import DecodePlan, parse_head_policy, plan_density, plan_from_profile
from attnsparse.decode.policies import BlockPolicy, DensePolicy
from attnsparse.errors import AttnsparseError
from attnsparse.measure.profile import ProfileView, attach_retrieval

MIX = ["dense", "topk:5", "block:16:0.0625", "block:8:40:bound", "block:16:0.25:channels8", "streaming:4:60"]


def profile_doc(layers: int = 4, heads: int = 6, kv_heads: int = 2, scores: list[list[float]] | None = None,
                streaming: set[tuple[int, int]] = frozenset()) -> dict:  # type: ignore[assignment]
    """The fields plan_from_profile reads; with `scores`, a retrieval section (as `attach_retrieval` writes it)."""
    per_head = [{"layer": layer, "head": head, "class": "streaming" if (layer, head) in streaming else "other",
                 "C": 0.5, "k_at_coverage": {"0.95": {"mean": 4.0}}}
                for layer in range(layers) for head in range(heads)]
    data = {"model": "m", "ctx": 1024, "layers": layers, "heads": heads, "kv_heads": kv_heads, "per_head": per_head}
    if scores is not None:
        for row in per_head:
            row["retrieval_score"] = scores[row["layer"]][row["head"]]
        data["retrieval"] = {"threshold": 0.1}
    return data


def scores_of(layers: int = 4, heads: int = 6) -> list[list[float]]:
    generator = torch.Generator().manual_seed(3)
    return (torch.rand(layers, heads, generator=generator) * 0.3).tolist()


@pytest.mark.parametrize("n", [1, 37, 200, 1000])
def test_plan_density_is_the_bytes_a_sparse_cache_reads(n):
    layers, kv_heads, heads, dim = 3, 2, 6, 16
    heads_of = [parse_head_policy(MIX[(layer * kv_heads + kv) % len(MIX)]) for layer in range(layers)
                for kv in range(kv_heads)]
    plan = DecodePlan([heads_of[layer * kv_heads:(layer + 1) * kv_heads] for layer in range(layers)])
    config = tiny_llama(layers=layers, heads=heads, kv_heads=kv_heads, head_dim=dim).config

    def read(p: DecodePlan) -> int:
        cache = SparseCache(p, None)
        for layer in range(layers):
            cache.update(torch.randn(1, kv_heads, n, dim), torch.randn(1, kv_heads, n, dim), layer)
        cache._config = config
        return cache.bytes_read_per_step()

    dense = read(DecodePlan.uniform("dense", layers, kv_heads))
    assert plan_density(plan, n, dim, 4, heads // kv_heads) == pytest.approx(read(plan) / dense, rel=1e-12)


@pytest.mark.parametrize("context,protect", [(1024, 1), (4096, 3), (8192, 0.28)])
def test_average_density_budget_is_the_largest_whole_block_count_that_fits(context, protect):
    view = ProfileView.from_dict(profile_doc(16, scores=scores_of(16), streaming={(0, 0), (0, 1), (0, 2)}))
    target = 0.3
    plan = plan_from_profile(view, "block:16:0.0625", "streaming:4:60", protect=protect, average_density=target,
                             context=context, head_dim=16)
    other = next(h for row in plan.heads for h in row if isinstance(h, BlockPolicy))
    fits = []
    for blocks in range(1, context // 16 + 1):  # brute force: every whole block count, plan density of each
        trial = DecodePlan([[replace(other, budget=blocks * 16) if isinstance(h, BlockPolicy) else h for h in row]
                            for row in plan.heads])
        if plan_density(trial, context, 16) <= target:
            fits.append(blocks)
    assert other.budget == max(fits) * 16
    assert plan.notes["density"] == pytest.approx(plan_density(plan, context, 16))
    assert plan.counts()["streaming:4:60"] == 1  # layer 0 group 0 is streaming


def test_protected_plan_reads_what_a_uniform_plan_reads():
    scores = scores_of(30)
    view = ProfileView.from_dict(profile_doc(30, scores=scores))
    context, dim = 8192, 64
    uniform = DecodePlan.uniform("block:16:0.0625", 30, 2)
    target = plan_density(uniform, context, dim)
    plan = plan_from_profile(view, "block:16:0.0625", None, protect=2, average_density=target, context=context,
                             head_dim=dim)
    kv_best = sorted(((max(scores[layer][kv * 3:(kv + 1) * 3]), layer, kv) for layer in range(30) for kv in range(2)),
                     reverse=True)
    dense = {(layer, kv) for layer, row in enumerate(plan.heads) for kv, h in enumerate(row) if h == DensePolicy()}
    assert dense == {(layer, kv) for _, layer, kv in kv_best[:2]}
    reached = plan_density(plan, context, dim)
    step = 58 * 2 * 16 * dim * 4 / (60 * 2 * context * dim * 4)  # one more block for each of the 58 other heads
    assert target - step < reached <= target
    assert plan.notes["protected_heads"] == 2 and plan.notes["other"].startswith("block:16:")
    marked = plan_from_profile(view, "block:16:64", None, protect=kv_best[2][0], protected="block:16:512")
    assert marked.counts() == {"block:16:512": 3, "block:16:64": 57}  # a threshold: every kv head reaching it


@pytest.mark.parametrize("kwargs,message", [
    ({"protect": 3, "average_density": 0.0625, "context": 1024, "head_dim": 64}, "too low"),
    ({"protect": 8, "average_density": 0.5, "head_dim": 64}, "every kv head is protected"),
    ({"protect": 9}, "cannot protect 9 kv heads"),
    ({"protect": 1.5}, "threshold 1.5"),
    ({"average_density": 0.1}, "needs the model's head_dim"),
    ({"average_density": 0.0, "head_dim": 64}, "must be in (0, 1]"),
    ({"average_density": 0.99, "head_dim": 64, "streaming": "streaming:4:60"}, "lower it"),
])
def test_plan_from_profile_errors_are_one_line(kwargs, message):
    streaming = {(layer, head) for layer in range(3) for head in range(6)}  # 6 of 8 kv heads read 64 tokens
    view = ProfileView.from_dict(profile_doc(scores=scores_of(), streaming=streaming))
    kwargs = {"streaming": None} | kwargs
    with pytest.raises(AttnsparseError) as error:
        plan_from_profile(view, "block:16:0.0625", **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_protect_needs_scores_and_density_needs_a_block_policy():
    view = ProfileView.from_dict(profile_doc())
    with pytest.raises(AttnsparseError, match="no retrieval scores"):
        plan_from_profile(view, protect=2)
    with pytest.raises(AttnsparseError, match="give them a block policy"):
        plan_from_profile(view, "topk:8", None, average_density=0.1, head_dim=64)


def test_head_classes_put_retrieval_first_and_old_profiles_still_read():
    data = profile_doc(layers=1, heads=3, kv_heads=1)
    for row, mass in zip(data["per_head"], (0.95, 0.95, 0.5)):
        row["sink_local_mass"] = mass
    data["config"] = {"stream_delta": 0.1}
    attach_retrieval(data, [[0.3, 0.05, 0.1]], {"tasks": ["passkey"]}, threshold=0.1)
    assert [r["class"] for r in data["per_head"]] == ["retrieval", "streaming", "retrieval"]
    assert data["retrieval"]["heads_above"] == [[0, 0], [0, 2]] and data["summary"]["retrieval_heads"] == 2
    view = ProfileView.from_dict(data)
    assert [(h.kind, h.retrieval_score) for h in view.per_head] == [("retrieval", 0.3), ("streaming", 0.05),
                                                                     ("retrieval", 0.1)]
    old = profile_doc(layers=1, heads=3, kv_heads=1)
    old["per_head"][2]["class"] = "retrieval"  # written before retrieval scores: it meant "not streaming"
    assert [h.kind for h in ProfileView.from_dict(old).per_head] == ["other", "other", "other"]
    del data["per_head"][1]["retrieval_score"]
    with pytest.raises(AttnsparseError, match=r"per_head\[1\]: 'retrieval_score'"):
        ProfileView.from_dict(data)


def test_measure_retrieval_stores_scores_in_the_profile(tmp_path, monkeypatch):
    from attnsparse.measure import run

    monkeypatch.setattr(run, "RETRIEVAL_TASKS", "passkey")  # the shortest task keeps ctx (and the test) small
    loaded = LoadedModel(tiny_llama(layers=1, heads=4, kv_heads=2, max_positions=512), tiny_tokenizer(), "tiny",
                         "directory", 0.0)
    profile = run.measure(loaded, None, ctx=340, windows=1, progress=False, echo=None, retrieval=True,
                          retrieval_trials=1, retrieval_threshold=0.0)
    data = profile.to_dict()
    assert data["retrieval"]["samples"] == {"passkey": 3} and data["retrieval"]["seed"] == 1
    assert data["retrieval"]["heads_above_threshold"] == 4 and {r["class"] for r in data["per_head"]} == {"retrieval"}
    assert all(0.0 <= r["retrieval_score"] <= 1.0 for r in data["per_head"])
    header, rows = profile.csv_rows()
    assert header[-1] == "retrieval_score" and [row[2] for row in rows] == ["retrieval"] * 4
    assert ProfileView.from_dict(data).per_head[0].retrieval_score == data["per_head"][0]["retrieval_score"]
    with pytest.raises(AttnsparseError, match="too short"):
        run.measure(loaded, None, ctx=256, windows=1, out=tmp_path / "short", progress=False, echo=None,
                    retrieval=True)
    assert not (tmp_path / "short").exists()


def test_generate_protects_retrieval_heads_at_an_average_density(tmp_path):
    app = typer.Typer()
    app.command("generate")(generate_command)
    app.callback()(lambda: None)
    model_dir = save_tiny(str(tmp_path / "tiny"), tiny_llama(heads=6, kv_heads=2, head_dim=16))
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello world " * 30)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(profile_doc(layers=2, scores=scores_of(2))))
    base = ["generate", model_dir, "--prompt-file", str(prompt), "--max-new-tokens", "2", "--policy", "block:16:0.0625",
            "--profile", str(profile)]
    plan_path = tmp_path / "plan.json"
    result = CliRunner().invoke(app, base + ["--protect-retrieval", "1", "--average-density", "0.5",
                                             "--density-context", "360", "--save-plan", str(plan_path), "--json"])
    assert result.exit_code == 0, result.output
    plan = DecodePlan.load(plan_path)
    assert plan.notes["protected_heads"] == 1 and plan.notes["context"] == 360
    assert plan_density(plan, 360, 16) == pytest.approx(plan.notes["density"]) and plan.notes["density"] <= 0.5
    no_scores = tmp_path / "plain.json"
    no_scores.write_text(json.dumps(profile_doc(layers=2)))
    result = CliRunner().invoke(app, base[:-1] + [str(no_scores), "--protect-retrieval", "0.1"])
    assert result.exit_code != 0 and "has none" in result.output
    result = CliRunner().invoke(app, base[:-2] + ["--average-density", "0.1"])
    assert result.exit_code != 0 and "give --profile" in result.output
