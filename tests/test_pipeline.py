"""The main job end to end on a tiny model: every stage, the report, and resuming a finished run."""

import json

from typer.testing import CliRunner

from attnsparse.cli.app import app
from attnsparse.core.tiny import save_tiny, tiny_llama

runner = CliRunner()


def test_run_pipeline_on_tiny_model_then_resume(tmp_path):
    model_dir = save_tiny(str(tmp_path / "tiny"), tiny_llama(heads=4, kv_heads=2))
    args = ["run", model_dir, "--out", str(tmp_path / "run"), "--preset", "smollm2-cpu-smoke", "--steps", "2",
            "--ctx", "64", "--measure-windows", "2", "--eval-windows", "2", "--policies", "dense,topk:4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    for stage in ("measure_before", "evaluate_before", "condense", "measure_after", "evaluate_after"):
        assert (out / stage / "config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["before"]["perplexity"]) == {"dense", "topk:4"}
    assert len(summary["after"]["k_per_layer"]) == 2
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 3 and "before and after condensation" in report
    # Same command again: every stage is reused, nothing is recomputed.
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "== " not in again.output
    # Other settings in the same directory are refused without --overwrite.
    changed = runner.invoke(app, [*args[:-1], "dense"])
    assert changed.exit_code == 2 and "different settings" in changed.output
