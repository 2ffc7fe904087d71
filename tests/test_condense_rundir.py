"""condense's run directory on a tiny Llama: resuming a finished run does nothing, leftovers of an interrupted
checkpoint rotation are cleaned, a truncated newest checkpoint falls back to the previous one, a failed start is
reusable, Ctrl-C says which checkpoint was kept, and settings that cannot work are refused up front."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from transformers import TrainerCallback
from typer.testing import CliRunner

from attnsparse.cli.condense import condense_command
from attnsparse.condense import CondenseConfig, condense
from attnsparse.core.runs import RUNNING, RunInterrupted, read_run
from attnsparse.errors import AttnsparseError

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 30


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _config(tiny_dir: Path, text_file: Path, **overrides) -> CondenseConfig:  # type: ignore[no-untyped-def]
    settings = {"model": str(tiny_dir), "data": str(text_file), "k": 4, "steps": 4, "batch_size": 2, "seq_len": 32,
                "lr": 5e-3, "lam": 2.0, "save_steps": 2, "save_total_limit": None, "warmup_steps": 1,
                "lr_scheduler": "linear"}
    return CondenseConfig(**(settings | overrides))


class Stop(TrainerCallback):
    """Stops the run at the start of a given step, as a crash (RuntimeError) or Ctrl-C (KeyboardInterrupt)."""

    def __init__(self, at_step: int, error: type[BaseException] = RuntimeError) -> None:
        self.at_step, self.error = at_step, error

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.at_step:
            raise self.error("simulated stop")


def _snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("condense")(condense_command)
    app.command("noop")(lambda: None)
    return app


def test_resuming_a_finished_run_does_nothing(tiny_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["condense", str(tiny_dir), "--data", str(text_file), "--out", str(out), "--k", "4", "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--save-steps", "1", "--no-progress"]
    assert CliRunner().invoke(_app(), args).exit_code == 0
    before = _snapshot(out)
    for _ in range(2):
        again = CliRunner().invoke(_app(), [*args, "--resume"])
        assert again.exit_code == 0, again.output
        assert "already finished (2 steps); nothing to do" in again.output
    assert _snapshot(out) == before  # no step trained, model/ and the log untouched
    assert read_run(out).config["steps"] == 2
    both = CliRunner().invoke(_app(), [*args, "--resume", "--overwrite"])
    lines = [line for line in both.output.splitlines() if line.strip()]
    assert both.exit_code == 2 and len(lines) == 1 and "--resume" in lines[0] and "--overwrite" in lines[0]


def test_resume_cleans_rotation_leftovers_and_falls_back_from_a_truncated_checkpoint(
        tiny_dir: Path, text_file: Path, tmp_path: Path) -> None:
    config = _config(tiny_dir, text_file, steps=6)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated stop"):
        condense(config, out, progress=False, callbacks=[Stop(at_step=5)])
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    (root / "checkpoint-1").mkdir()  # what an interrupted rotation left: an emptied checkpoint, a renamed one
    (root / ".trash-checkpoint-0").mkdir()
    weights = root / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # the newest was cut short
    notes: list[str] = []
    result = condense(config, out, resume=True, progress=False, echo=notes.append)
    assert result.resumed_from == root / "checkpoint-2" and result.steps == 6
    assert notes == [("checkpoint-4 cannot be resumed from (model.safetensors is truncated); removed it, "
                      "resuming from checkpoint-2")]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert read_run(out).finished


def test_bad_input_writes_nothing_and_a_failed_start_is_reusable(tiny_dir: Path, text_file: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(AttnsparseError, match="does not exist"):
        condense(_config(tmp_path / "no-model", text_file), out, progress=False)
    short = tmp_path / "short.txt"
    short.write_text("short")
    with pytest.raises(AttnsparseError, match="fewer than one window"):
        condense(_config(tiny_dir, short), out, progress=False)
    assert not out.exists()
    with pytest.raises(RuntimeError, match="simulated stop"):  # stopped before its first checkpoint
        condense(_config(tiny_dir, text_file), out, progress=False, callbacks=[Stop(at_step=1)])
    assert read_run(out).status == RUNNING
    result = condense(_config(tiny_dir, text_file, steps=2), out, progress=False)  # nothing to keep: reused
    assert result.steps == 2 and read_run(out).finished


def test_ctrl_c_names_the_last_checkpoint(tiny_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted, match=r"keeps .*checkpoint-2; pass --resume to continue from it"):
        condense(_config(tiny_dir, text_file), out, progress=False, callbacks=[Stop(3, KeyboardInterrupt)])
    assert read_run(out).status == RUNNING
    with pytest.raises(AttnsparseError, match="unfinished condense run.*--resume"):
        condense(_config(tiny_dir, text_file), out, progress=False)


def test_settings_that_cannot_work_are_refused(tiny_dir: Path, text_file: Path) -> None:
    with pytest.raises(AttnsparseError, match="--keep-checkpoints 0: keep at least 1"):
        _config(tiny_dir, text_file, save_total_limit=0).validate()
    with pytest.raises(AttnsparseError, match="query chunk 0 must be >= 1"):
        _config(tiny_dir, text_file, query_chunk=0).validate()
