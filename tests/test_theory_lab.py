"""The theory lab end to end on small n: scenarios, claims, run directory, profile overlay, errors and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from attnsparse.cli.theory import theory_command
from attnsparse.errors import AttnsparseError
from attnsparse.theory import stats as ts
from attnsparse.theory.lab import (
    Head,
    TheoryConfig,
    load_profile_overlay,
    measure_chunk,
    pipeline_rows,
    simulate,
)
from attnsparse.theory.run import run_theory


def small_config(**kw: object) -> TheoryConfig:
    base = {"n": [64, 128, 256], "sigmas": [2.0], "growth": [0.5], "sigma_x": [1.0], "rows": 32, "d": 16}
    base.update(kw)
    return TheoryConfig(**base)  # type: ignore[arg-type]


def write_profile(path: Path, ctx: int = 256) -> Path:
    heads = []
    for i, c in enumerate([0.2, 0.5, None, 0.8]):
        heads.append({"layer": 0, "head": i, "C": c, "C_r2": 0.9, "class": "retrieval",
                      "k_at_coverage": {"0.99": {"mean": 20.0}, "0.95": {"mean": 5.0 + i}, "0.9": {"mean": 3.0}}})
    path.write_text(json.dumps({"model": "toy", "ctx": ctx, "layers": 1, "heads": 4, "kv_heads": 2,
                                "per_head": heads}))
    return path


def test_pipeline_rows_match_a_full_causal_matrix() -> None:
    """Chunked pipeline rows equal the last rows of the full causal score matrix of the same draw."""
    gen = torch.Generator().manual_seed(0)
    head = Head(torch.randn((8, 4), generator=gen, dtype=torch.float64),
                torch.randn((8, 4), generator=gen, dtype=torch.float64))
    n, rows = 96, 48  # block = min(n // 16, rows / 8) = 6 rows from each sequence
    chunks = list(pipeline_rows(n, head, 1.3, rows, torch.Generator().manual_seed(5)))
    x = torch.randn((n, 8), generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1.3
    full = (x @ head.w_q) @ (x @ head.w_k).T / 2.0
    full = full.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    scores = chunks[0][0]  # the first sequence's block
    assert torch.allclose(scores, full[n - 6:])
    m = measure_chunk(scores, torch.isfinite(scores), small_config())
    probs = torch.softmax(full[n - 6:], dim=-1)
    brute_k = [next(k for k in range(1, n + 1) if probs[i].sort(descending=True).values[:k].sum() >= 0.95 - 1e-12)
               for i in range(6)]
    assert m["k"].tolist() == brute_k
    assert m["n"].tolist() == list(range(n - 5, n + 1))


def test_simulate_small_lab_shapes_and_regimes() -> None:
    result = simulate(small_config())
    names = [s["name"] for s in result.scenarios]
    assert names == ["gaussian σ=2", "gaussian σ=√(2·0.5·log n)", "pipeline σx=1", "pipeline σ=√(2·0.5·log n)"]
    for sc in result.scenarios:
        assert [r["n"] for r in sc["per_n"]] == [64, 128, 256]
        for r in sc["per_n"]:
            assert r["rows"] == 32
            assert 1 <= r["k"]["mean"] <= r["n"]
            assert set(r["rules"]) == {"log", "n^0.25", "n^0.5", "n^0.75", "const16"}
            assert r["rules"]["log"]["k"] == math.ceil(math.log(r["n"]))
    fixed = result.scenario("gaussian σ=2")
    growing = result.scenario("gaussian σ=√(2·0.5·log n)")
    assert fixed["fit"]["C"] > growing["fit"]["C"]  # the growing scale makes attention sparser with n
    assert {c["claim"] for c in result.claims} >= {"keeping ⌈n^C⌉ keys, the error falls as n grows",
                                                  "keeping ⌈log n⌉ keys leaves an error that does not vanish"}


def test_simulation_is_reproducible_and_seed_dependent() -> None:
    a = simulate(small_config(sigma_x=[], growth=[]))
    b = simulate(small_config(sigma_x=[], growth=[]))
    c = simulate(small_config(sigma_x=[], growth=[], seed=1))
    key = lambda r: [x["k"]["mean"] for x in r.scenarios[0]["per_n"]]
    assert key(a) == key(b)
    assert key(a) != key(c)


def test_run_writes_run_directory_and_refuses_to_clobber(tmp_path: Path) -> None:
    profile = write_profile(tmp_path / "profile.json")
    out = tmp_path / "lab"
    result = run_theory(small_config(profile=str(profile)), out)
    for name in ("config.json", "theory.json", "theory_per_n.csv", "theory.html", "theory_k_vs_n.png",
                 "theory_heads.png", "theory_tails.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "theory.json").read_text())
    assert saved["overlay"]["ctx"] == 256 and len(saved["overlay"]["heads"]) == 3  # the null-C head is skipped
    assert json.loads((out / "config.json").read_text())["kind"] == "theory"
    assert "Real heads on the same axes" in (out / "theory.html").read_text()
    assert result.files["html"] == "theory.html"
    with pytest.raises(AttnsparseError, match="--overwrite"):
        run_theory(small_config(), out)
    run_theory(small_config(), out, overwrite=True, plots=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(AttnsparseError, match="not a previous 'theory' run"):
        run_theory(small_config(), other)


def test_profile_overlay_normalises_to_the_mean_k(tmp_path: Path) -> None:
    overlay = load_profile_overlay(write_profile(tmp_path / "p.json", ctx=64), 0.05)
    assert overlay["coverage_key"] == "0.95"
    h = overlay["heads"][1]
    mean_k = sum(h["A"] * n ** h["C"] for n in range(1, 65)) / 64
    assert mean_k == pytest.approx(h["k_mean"])


@pytest.mark.parametrize("kw,match", [
    ({"n": [1, 128]}, "--n lengths must be > 1"),
    ({"n": [128]}, "at least two lengths"),
    ({"eps": 1.0}, "--eps must lie strictly between 0 and 1"),
    ({"eps": 0.0}, "--eps"),
    ({"d": 0}, "--d must be a positive integer"),
    ({"sigmas": [-1.0]}, "--sigma values must be finite and > 0"),
    ({"C": [1.5]}, "--C must lie strictly between 0 and 1"),
    ({"rows": 0}, "--rows"),
    ({"sigmas": [], "growth": [], "sigma_x": []}, "nothing to simulate"),
])
def test_bad_input_is_one_line_error(kw: dict, match: str) -> None:
    with pytest.raises(AttnsparseError, match=match) as info:
        simulate(small_config(**kw))
    assert "\n" not in str(info.value)


def test_bad_profile_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(AttnsparseError, match="does not exist"):
        load_profile_overlay(tmp_path / "missing.json", 0.05)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AttnsparseError, match="not readable JSON"):
        load_profile_overlay(bad, 0.05)
    bad.write_text(json.dumps({"ctx": 8, "per_head": [{"layer": 0}]}))
    with pytest.raises(AttnsparseError, match=r"per_head\[0\] lacks 'head'"):
        load_profile_overlay(bad, 0.05)
    with pytest.raises(AttnsparseError):  # a bad profile fails before the out dir is created
        run_theory(small_config(profile=str(bad)), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("theory")(theory_command)

    @app.command("noop")
    def noop() -> None:  # a second command keeps typer from collapsing the app into one command
        pass

    return app


def test_cli_runs_and_reports_claims(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    res = CliRunner().invoke(_app(), ["theory", "--out", str(out), "--n", "64,128", "--sigma", "2", "--growth", "",
                                      "--sigma-x", "1", "--rows", "16", "--d", "8", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "keeping ⌈log n⌉ keys" in res.output
    assert (out / "theory.json").is_file()


@pytest.mark.parametrize("args,match", [
    (["--n", "64,abc"], "bad --n list '64,abc'"),
    (["--n", "1,64"], "--n lengths must be > 1"),
    (["--eps", "2"], "--eps must lie strictly between 0 and 1"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str], match: str) -> None:
    res = CliRunner().invoke(_app(), ["theory", "--out", str(tmp_path / "x"), "--no-progress"] + args)
    assert res.exit_code == 2
    assert match in res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_report_numbers_agree_with_stats() -> None:
    """The per-n predicted fraction is the mean of Φc(σ̂ + Φ⁻¹(ε)) over the rows (spot check with σ̂ summary)."""
    result = simulate(small_config(sigma_x=[], growth=[], n=[512, 1024], rows=64))
    r = result.scenarios[0]["per_n"][-1]
    approx = float(ts.predicted_fraction(r["sigma_hat"]["mean"], 0.05))
    assert r["pred_frac"] == pytest.approx(approx, rel=0.02)
