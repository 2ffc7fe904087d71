"""The main job end to end on a tiny model: inputs checked first, every stage, the report, resuming stage by stage."""

import json

from typer.testing import CliRunner

from attnsparse.cli.app import app
from attnsparse.core.tiny import save_tiny, tiny_llama

runner = CliRunner()


def test_run_pipeline_on_tiny_model_then_resume(tmp_path):
    model_dir = save_tiny(str(tmp_path / "tiny"), tiny_llama(heads=4, kv_heads=2))
    args = ["run", model_dir, "--out", str(tmp_path / "run"), "--preset", "smollm2-cpu-smoke", "--steps", "2",
            "--ctx", "64", "--measure-windows", "2", "--eval-windows", "2", "--policies", "dense,topk:4"]
    out = tmp_path / "run"
    # Bad input is refused before anything is written, so the corrected command can use the same --out.
    for option, bad in (("--ctx", "0"), ("--preset", "no-such-preset")):
        failed = runner.invoke(app, [*args[:args.index(option) + 1], bad, *args[args.index(option) + 2:]])
        assert failed.exit_code == 2 and failed.output.startswith("error:"), failed.output
        assert not (out / "config.json").exists()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
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
    # A stage killed after its results but before it finished is run again, and only that stage.
    marker = out / "evaluate_after" / "config.json"
    marker.write_text(json.dumps(json.loads(marker.read_text()) | {"status": "running"}))
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert [line[line.index("== "):] for line in resumed.output.splitlines() if "== " in line] == [
        "== evaluate the condensed model"]
    assert json.loads(marker.read_text())["status"] == "finished"
    # Other settings in the same directory are refused without --overwrite.
    changed = runner.invoke(app, [*args[:-1], "dense"])
    assert changed.exit_code == 2 and "different settings" in changed.output
