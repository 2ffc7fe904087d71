"""evaluate: perplexity vs density for several policies and protocols, run-directory outputs, CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from attnsparse.attention.policies import parse_policy
from attnsparse.cli.evaluate import evaluate_command
from attnsparse.core.models import load_model
from attnsparse.errors import AttnsparseError
from attnsparse.evaluate.perplexity import perplexity
from attnsparse.evaluate.run import evaluate, parse_protocol

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps by the fire. " * 16


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def loaded(tiny_dir: Path):
    return load_model(str(tiny_dir))


def test_rows_match_perplexity_and_density(loaded, text_file: Path, tmp_path: Path) -> None:
    result = evaluate(loaded, str(text_file), 64, "topk:4,topk:64,sink+window:2:8", windows=[None, 5],
                      out=tmp_path / "run", batch_size=8, progress=False)
    protocols = [r.protocol for r in result.rows]
    assert protocols == ["all"] * 4 + ["windows:5"] * 4
    assert [r.policy for r in result.rows[:4]] == ["dense", "topk:4", "topk:64", "sink+window:2:8"]
    dense = result.row("dense", "all")
    assert dense.ratio_to_dense == pytest.approx(1.0)
    assert dense.density == 1.0 and dense.windows == len(TEXT) // 64
    # top-k with k >= ctx keeps every key: identical to dense
    assert result.row("topk:64", "all").perplexity == pytest.approx(dense.perplexity, rel=1e-5)
    top4 = result.row("topk:4", "all")
    assert top4.density == pytest.approx(sum(min(4, i + 1) for i in range(64)) / (64 * 65 / 2))
    assert top4.ratio_to_dense == pytest.approx(top4.perplexity / dense.perplexity)
    # the evenly spaced protocol scores exactly the windows data.windows(count=5) gives
    from attnsparse.core.data import tokenize, windows

    ids = tokenize(loaded.tokenizer, TEXT)
    direct = perplexity(loaded.model, windows(ids, 64, count=5), parse_policy("topk:4"), progress=False)
    assert result.row("topk:4", "windows:5").perplexity == pytest.approx(direct.perplexity, rel=1e-6)
    assert result.row("topk:4", "windows:5").windows == 5


def test_policies_are_parsed_once_at_the_edge(loaded, text_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate parses each spec once; perplexity and the backend get the typed Policy, never the string."""
    from attnsparse.attention.policies import POLICIES

    parsed: list[str] = []
    original = POLICIES.parse

    def counting_parse(text: str):
        parsed.append(text)
        return original(text)

    monkeypatch.setattr(POLICIES, "parse", counting_parse)
    evaluate(loaded, str(text_file), 32, "topk:4,streaming:1:4", windows=2, progress=False)
    assert parsed == ["topk:4", "streaming:1:4"]


def test_outputs_written(loaded, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = evaluate(loaded, str(text_file), 32, ["dense", "topk:2"], windows=3, out=out, batch_size=4, progress=False)
    for name in ("results.json", "results.csv", "ppl_vs_density.png", "config.json"):
        assert (out / name).is_file(), name
    stored = json.loads((out / "results.json").read_text())
    assert [r["policy"] for r in stored["rows"]] == ["dense", "topk:2"]
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and float(rows[1]["perplexity"]) == pytest.approx(result.rows[1].perplexity)
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "evaluate" and config["config"]["protocols"] == ["windows:3"]
    assert (out / "ppl_vs_density.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(AttnsparseError, match="--overwrite"):
        evaluate(loaded, str(text_file), 32, "dense", windows=3, out=out, batch_size=4, progress=False)
    evaluate(loaded, str(text_file), 32, "dense", windows=3, out=out, overwrite=True, progress=False)


def test_bad_input(loaded, text_file: Path) -> None:
    with pytest.raises(AttnsparseError, match="exceeds"):
        evaluate(loaded, str(text_file), 100_000, "dense", progress=False)
    with pytest.raises(AttnsparseError, match="k must be >= 1"):
        evaluate(loaded, str(text_file), 32, "topk:0", progress=False)
    with pytest.raises(AttnsparseError):
        parse_protocol("x")
    assert parse_protocol("all") is None and parse_protocol("8") == 8


def test_cli(tiny_dir: Path, text_file: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("evaluate")(evaluate_command)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["evaluate", str(tiny_dir), "--data", str(text_file), "--ctx", "32",
                                 "--policies", "topk:2", "--windows", "4", "--windows", "all",
                                 "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "topk:2" in result.output and "windows:4" in result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 4 and all(math.isfinite(r["perplexity"]) for r in rows)
    bad = runner.invoke(app, ["evaluate", str(tiny_dir), "--data", str(text_file), "--ctx", "32",
                              "--policies", "topk:-1", "--no-progress"])
    assert bad.exit_code == 2 and "error:" in bad.output and "Traceback" not in bad.output
    planned = runner.invoke(app, ["evaluate", str(tiny_dir), "--data", str(text_file), "--ctx", "32",
                                  "--policies", "dense", "--windows", "2", "--plans", "streaming:2:4,block:4:8",
                                  "--decode-tokens", "6", "--no-progress"])
    assert planned.exit_code == 0, planned.output
    assert "plan:streaming:2:4" in planned.output and "plan:block:4:8" in planned.output


def test_decode_plans_score_the_decoded_tail(loaded, text_file: Path, tmp_path: Path) -> None:
    """plan:dense equals the full forward's NLL on the last N tokens; a plan that keeps every key equals dense;
    a plan file loads; a streaming plan reads less and changes the result."""
    import torch
    import torch.nn.functional as F

    from attnsparse.core.data import tokenize, windows
    from attnsparse.decode.backend import make_plan

    plan_file = tmp_path / "stream.json"
    make_plan(loaded.model, "streaming:2:6").save(plan_file)
    result = evaluate(loaded, str(text_file), 48, "dense", windows=3, progress=False, decode_tokens=10,
                      plans=["block:4:48", str(plan_file)])
    rows = [r for r in result.rows if r.policy.startswith("plan:")]
    assert [r.policy for r in rows] == ["plan:dense", "plan:block:4:48", "plan:stream.json"]
    assert all(r.tokens == 30 and r.windows == 3 for r in rows)
    batch = windows(tokenize(loaded.tokenizer, TEXT), 48, count=3)
    with torch.no_grad():
        logits = loaded.model(batch).logits.float()
    expected = F.cross_entropy(logits[:, 37:47].reshape(-1, logits.shape[-1]), batch[:, 38:].reshape(-1))
    dense = result.row("plan:dense")
    assert dense.mean_nll == pytest.approx(float(expected), rel=1e-4)
    assert result.row("plan:block:4:48").perplexity == pytest.approx(dense.perplexity, rel=1e-4)
    stream = result.row("plan:stream.json")
    assert stream.density < 0.5 and stream.ratio_to_dense != pytest.approx(1.0, rel=1e-4)
    with pytest.raises(AttnsparseError, match="decode tokens"):
        evaluate(loaded, str(text_file), 48, "dense", windows=1, progress=False, decode_tokens=48, plans=["dense"])


@pytest.mark.slow
def test_smollm2_two_windows(smollm2, wikitext_test: Path, tmp_path: Path) -> None:
    """SmolLM2 on two short wikitext windows (or the stand-in): top-8 is worse than dense, and no worse than ×2."""
    result = evaluate(smollm2, str(wikitext_test), 256, "topk:8", windows=2, out=tmp_path / "run", progress=False)
    dense, top8 = result.rows
    assert 5 < dense.perplexity < 100
    assert 1.0 < top8.ratio_to_dense < 2.0
