"""The measure pipeline end to end on tiny models: run directory, CLI, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from attnsparse.cli.measure import measure_command
from attnsparse.core.models import LoadedModel
from attnsparse.core.tiny import save_tiny, tiny_gpt2, tiny_llama, tiny_tokenizer
from attnsparse.errors import AttnsparseError
from attnsparse.measure.run import measure

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def loaded(model: torch.nn.Module | None = None) -> LoadedModel:
    model = model if model is not None else tiny_llama(layers=2, heads=4, kv_heads=2, max_positions=128)
    return LoadedModel(model, tiny_tokenizer(), "tiny-llama", "directory", 0.0)


@pytest.fixture()
def text_file(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_measure_writes_a_complete_run_directory(tmp_path, text_file, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    profile = measure(loaded(), str(text_file), ctx=64, windows=3, out=out, batch_size=2, query_chunk=16,
                      progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "profile.json", "profile.csv", "profile_state.npz", "report.html", "plots"} <= names
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert pngs == ["coverage_curves.png", "head_classes.png", "heatmap_C.png", "heatmap_k.png", "k_vs_position.png"]
    for png in (out / "plots").iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "measure"
    assert config["config"]["ctx"] == 64 and config["config"]["windows"] == 3
    assert config["config"]["metrics"]["ks"] == [1, 2, 4, 8, 16, 32, 64]
    data = json.loads((out / "profile.json").read_text())
    assert data["layers"] == 2 and data["heads"] == 4 and data["kv_heads"] == 2 and data["windows"] == 3
    assert len(data["per_head"]) == 8
    head = data["per_head"][0]
    assert set(head["k_at_coverage"]) == {"0.99", "0.95", "0.9"}
    assert head["rows"] == 3 * 64
    assert head["class"] in {"streaming", "other"}
    csv_lines = (out / "profile.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 8 and csv_lines[0].startswith("layer,head,class")
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "<table>" in html
    printed = capsys.readouterr().out
    assert "k0.95 mean" in printed and "streaming heads" in printed
    assert profile.to_dict()["per_head"][0]["rows"] == 192


def test_measure_on_gpt2_and_token_ids() -> None:
    model = tiny_gpt2(layers=2, heads=4, hidden=32, max_positions=64)
    ids = torch.randint(0, 97, (500,), generator=torch.Generator().manual_seed(0))
    profile = measure(loaded(model), ids, ctx=32, windows=2, progress=False, echo=None)
    data = profile.to_dict()
    assert data["kv_heads"] == 4 and data["rows_per_head"] == 64


def test_context_above_the_model_maximum_is_refused(text_file) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AttnsparseError, match="exceeds the model's maximum of 128"):
        measure(loaded(), str(text_file), ctx=256, windows=1, progress=False, echo=None)


def test_empty_k_list_is_refused(text_file) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AttnsparseError, match="k list is empty"):
        measure(loaded(), str(text_file), ctx=32, windows=1, ks=[], progress=False, echo=None)


def test_foreign_output_directory_is_refused_and_overwrite_replaces_a_measure_run(tmp_path, text_file) -> None:  # type: ignore[no-untyped-def]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(AttnsparseError, match="not a previous 'measure' run"):
        measure(loaded(), str(text_file), ctx=32, windows=1, out=foreign, progress=False, echo=None)
    with pytest.raises(AttnsparseError, match="not a previous 'measure' run"):
        measure(loaded(), str(text_file), ctx=32, windows=1, out=foreign, overwrite=True, progress=False, echo=None)
    run = tmp_path / "run"
    measure(loaded(), str(text_file), ctx=32, windows=1, out=run, progress=False, echo=None)
    with pytest.raises(AttnsparseError, match="--overwrite"):
        measure(loaded(), str(text_file), ctx=32, windows=1, out=run, progress=False, echo=None)
    measure(loaded(), str(text_file), ctx=32, windows=2, out=run, overwrite=True, progress=False, echo=None)
    assert json.loads((run / "profile.json").read_text())["windows"] == 2


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("measure")(measure_command)

    @app.command("noop")
    def noop() -> None:  # a second command so typer keeps "measure" as a subcommand name
        """Unused."""

    return app


def test_cli_measure_on_a_local_model_directory(tmp_path, text_file) -> None:  # type: ignore[no-untyped-def]
    model_dir = save_tiny(str(tmp_path / "tiny"), tiny_llama(layers=2, heads=4, kv_heads=2, max_positions=128))
    out = tmp_path / "run"
    runner = CliRunner()
    args = ["measure", model_dir, "--data", str(text_file), "--ctx", "48", "--windows", "2", "--out", str(out),
            "--no-progress", "--k", "1,4,16", "--query-chunk", "8"]
    result = runner.invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert "streaming heads" in result.output
    data = json.loads((out / "profile.json").read_text())
    assert data["config"]["ks"] == [1, 4, 16] and data["ctx"] == 48
    # errors: one line, exit status 2
    again = runner.invoke(_app(), args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    too_long = runner.invoke(_app(), ["measure", model_dir, "--data", str(text_file), "--ctx", "4096",
                                      "--out", str(tmp_path / "other"), "--no-progress"])
    assert too_long.exit_code == 2 and "exceeds the model's maximum" in too_long.output
    empty_k = runner.invoke(_app(), ["measure", model_dir, "--data", str(text_file), "--k", ",",
                                     "--out", str(tmp_path / "third"), "--no-progress"])
    assert empty_k.exit_code == 2 and "empty --k list" in empty_k.output
    for bad in (too_long, empty_k):
        assert "Traceback" not in bad.output
