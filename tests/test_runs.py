"""The run-directory protocol (RunDir) and the commands that follow it: measure, evaluate, theory.

Checked: inputs and the output path are refused before anything is written or computed, config.json says
running first and finished last, an interrupted run is replaced by the next one, non-finite results stop with
one line, too many windows are refused with the maximum, and Ctrl-C says what was kept.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from attnsparse.cli.evaluate import evaluate_command
from attnsparse.cli.measure import measure_command
from attnsparse.core.runs import FINISHED, RUNNING, RunDir, RunInterrupted, read_run
from attnsparse.core.tiny import save_tiny, tiny_llama
from attnsparse.errors import AttnsparseError
from attnsparse.evaluate.run import evaluate, parse_protocol
from attnsparse.measure.run import measure
from attnsparse.theory.lab import TheoryConfig
from attnsparse.theory.run import run_theory

TEXT = "The quick brown fox jumps over the lazy dog. " * 12  # 540 characters = tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def nan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose weights are all NaN (corrupt weights), saved like any other."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, max_positions=128)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    return Path(save_tiny(str(tmp_path_factory.mktemp("nan") / "model"), model))


def _app(name: str, command) -> typer.Typer:  # type: ignore[no-untyped-def]
    app = typer.Typer()
    app.command(name)(command)
    app.command("noop")(lambda: None)
    return app


def _lines(output: str) -> list[str]:
    """What a command printed, without the weight-loading progress bar."""
    return [line for line in output.splitlines() if line.strip() and not line.startswith("Loading weights")]


def _no_forward(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise AssertionError("a forward pass started")


# ---- the protocol itself -------------------------------------------------------------------------------------


def test_status_running_first_finished_last_and_what_each_state_allows(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = RunDir(out, "demo").check()
    assert not out.exists()  # check writes nothing
    run.start({"x": 1})
    assert read_run(out).status == RUNNING and not read_run(out).finished
    RunDir(out, "demo").check()  # an interrupted run is replaced by the next one without --overwrite
    (out / "partial.txt").write_text("left by the interrupted run")
    RunDir(out, "demo").check().start({"x": 2})
    assert not (out / "partial.txt").exists()  # replacing a run empties its directory
    run = RunDir(out, "demo")
    run.check().start({"x": 2})
    run.finish({"x": 2, "done": True})
    record = read_run(out)
    assert record.status == FINISHED and record.finished and record.config == {"x": 2, "done": True}
    with pytest.raises(AttnsparseError, match="finished 'demo' run; pass --overwrite"):
        RunDir(out, "demo").check()
    RunDir(out, "demo").check(overwrite=True)
    with pytest.raises(AttnsparseError, match="not a previous 'other' run"):
        RunDir(out, "other").check(overwrite=True)  # --overwrite replaces only a run of the same kind


def test_an_impossible_or_unwritable_out_is_refused_before_anything(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(AttnsparseError, match=r"is a file, not a directory"):
        RunDir(a_file / "sub" / "run", "demo").check()
    with pytest.raises(AttnsparseError, match="exists and is not a directory"):
        RunDir(a_file, "demo").check()

    def read_only(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("attnsparse.core.runs.tempfile.mkstemp", read_only)
    with pytest.raises(AttnsparseError, match=r"not writable \(Read-only file system\)"):
        RunDir(tmp_path / "new", "demo").check()
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_a_directory_without_write_permission_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(AttnsparseError, match="not writable"):
        RunDir(locked / "run", "demo").check()


# ---- measure ---------------------------------------------------------------------------------------------


def test_measure_refuses_bad_out_and_too_many_windows_before_any_forward(tiny_dir: Path, text_file: Path,
                                                                         tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("attnsparse.measure.run._run", _no_forward)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(AttnsparseError, match="is a file"):
        measure(str(tiny_dir), str(text_file), ctx=32, windows=2, out=a_file / "run", progress=False, echo=None)
    out = tmp_path / "run"
    with pytest.raises(AttnsparseError, match=r"--windows 1000000: .*at most 509\)"):
        measure(str(tiny_dir), str(text_file), ctx=32, windows=1_000_000, out=out, progress=False, echo=None)
    with pytest.raises(AttnsparseError, match=r"at most 509\); use --windows 509"):
        measure(str(tiny_dir), str(text_file), ctx=32, windows=510, out=out, progress=False, echo=None)
    assert not out.exists()  # refused before anything was written


def test_measure_of_a_nan_model_stops_with_one_line_and_stays_unfinished(nan_dir: Path, tiny_dir: Path,
                                                                        text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(AttnsparseError, match=r"attention is not finite: layer 0 head 0 has topk_mass.*= nan"):
        measure(str(nan_dir), str(text_file), ctx=32, windows=2, out=out, progress=False, echo=None)
    assert read_run(out).status == RUNNING and sorted(p.name for p in out.iterdir()) == ["config.json"]
    measure(str(tiny_dir), str(text_file), ctx=32, windows=2, out=out, progress=False, echo=None)  # reusable
    assert read_run(out).finished


def test_measure_killed_after_profile_json_is_rerun_into_the_same_out(tiny_dir: Path, text_file: Path,
                                                                     tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"

    def killed(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("attnsparse.measure.plots.write_plots", killed)
        with pytest.raises(KeyboardInterrupt, match="keeps the unfinished 'measure' run"):
            measure(str(tiny_dir), str(text_file), ctx=32, windows=2, out=out, progress=False, echo=None)
    assert (out / "profile.json").is_file() and not read_run(out).finished
    measure(str(tiny_dir), str(text_file), ctx=32, windows=2, out=out, progress=False, echo=None)
    assert read_run(out).finished and (out / "report.html").is_file()


def test_bad_input_writes_nothing_and_a_failed_start_is_reusable(tiny_dir: Path, text_file: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(AttnsparseError, match="does not exist"):
        measure(str(tmp_path / "no-model"), str(text_file), ctx=32, windows=2, out=out, progress=False, echo=None)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(AttnsparseError, match="fewer than one window"):
        measure(str(tiny_dir), str(short), ctx=32, windows=1, out=out, progress=False, echo=None)
    assert not out.exists()
    out.mkdir()  # what an earlier start that failed on bad input left: status running, no results
    (out / "config.json").write_text(json.dumps({"kind": "measure", "status": "running", "config": {}}))
    measure(str(tiny_dir), str(text_file), ctx=32, windows=2, out=out, progress=False, echo=None)
    assert read_run(out).finished


def test_cli_ctrl_c_says_what_was_kept_and_exits_130(tiny_dir: Path, text_file: Path, tmp_path: Path,
                                                     monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr("attnsparse.measure.run._run", interrupted)
    out = tmp_path / "run"
    result = CliRunner().invoke(_app("measure", measure_command), [
        "measure", str(tiny_dir), "--data", str(text_file), "--ctx", "32", "--windows", "2", "--out", str(out),
        "--no-progress"])
    assert result.exit_code == 130
    lines = _lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("interrupted: ") and str(out) in lines[0]
    assert read_run(out).status == RUNNING


# ---- evaluate --------------------------------------------------------------------------------------------


def test_evaluate_window_counts_are_checked_before_any_forward(tiny_dir: Path, text_file: Path,
                                                               tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("attnsparse.evaluate.run.perplexity", _no_forward)
    out = tmp_path / "run"
    with pytest.raises(AttnsparseError, match=r"--windows 1000000: .*at most 509\)"):
        evaluate(str(tiny_dir), str(text_file), 32, "dense", windows=[2, 1_000_000], out=out, progress=False)
    assert not out.exists()
    with pytest.raises(AttnsparseError, match="--windows all for the whole text"):
        parse_protocol("0")
    result = CliRunner().invoke(_app("evaluate", evaluate_command), [
        "evaluate", str(tiny_dir), "--data", str(text_file), "--ctx", "32", "--windows", "0", "--no-progress"])
    assert result.exit_code == 2 and result.output.startswith("error: --windows 0")
    assert parse_protocol("all") is None and parse_protocol("whole") is None


def test_evaluate_of_a_nan_model_names_the_policy_and_writes_no_results(nan_dir: Path, text_file: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(_app("evaluate", evaluate_command), [
        "evaluate", str(nan_dir), "--data", str(text_file), "--ctx", "32", "--windows", "2", "--policies",
        "topk:4", "--out", str(out), "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = _lines(result.output)
    assert len(lines) == 1 and "policy dense under windows:2 gives a non-finite score (mean NLL nan" in lines[0]
    assert read_run(out).status == RUNNING and not (out / "results.json").exists()


def test_evaluate_killed_after_results_json_is_rerun_into_the_same_out(tiny_dir: Path, text_file: Path,
                                                                      tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"

    def killed(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("attnsparse.evaluate.run.plot_ppl_vs_density", killed)
        with pytest.raises(RunInterrupted):
            evaluate(str(tiny_dir), str(text_file), 32, "dense", windows=2, out=out, progress=False)
    assert (out / "results.json").is_file() and not read_run(out).finished
    evaluate(str(tiny_dir), str(text_file), 32, "dense", windows=2, out=out, progress=False)
    assert read_run(out).finished and (out / "ppl_vs_density.png").is_file()


# ---- theory ----------------------------------------------------------------------------------------------


def test_theory_follows_the_protocol(tmp_path: Path) -> None:
    cfg = TheoryConfig(n=[16, 32], d=8, sigma_x=[1.0], sigmas=[1.0], growth=[], C=[0.5], k_const=4, rows=16)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(AttnsparseError, match="is a file"):
        run_theory(cfg, a_file / "run", plots=False)
    out = tmp_path / "run"
    run_theory(cfg, out, plots=False)
    assert read_run(out).finished and (out / "theory.json").is_file()
    with pytest.raises(AttnsparseError, match="--overwrite"):
        run_theory(cfg, out, plots=False)
