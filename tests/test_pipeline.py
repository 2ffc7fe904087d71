"""The main job end to end on a tiny model: inputs checked first, every stage, the report, resuming stage by stage."""

import json

import pytest
from typer.testing import CliRunner

from attnsparse.cli.app import app
from attnsparse.core.tiny import save_tiny, tiny_llama

runner = CliRunner()


def test_run_pipeline_on_tiny_model_then_resume(tmp_path):
    model_dir = save_tiny(str(tmp_path / "tiny"), tiny_llama(heads=4, kv_heads=2, max_positions=2048))
    args = ["run", model_dir, "--out", str(tmp_path / "run"), "--preset", "smollm2-cpu-smoke", "--steps", "2",
            "--lr", "3e-4", "--ctx", "64", "--measure-windows", "2", "--eval-windows", "2", "--task-lengths", "400",
            "--task-trials", "1", "--task-plans", "block:4:0.25", "--policies", "dense,topk:4"]
    out = tmp_path / "run"
    # Bad input is refused before anything is written, so the corrected command can use the same --out.
    for option, bad in (("--ctx", "0"), ("--preset", "no-such-preset"), ("--task-lengths", "4096"),
                        ("--task-plans", "block:x"), ("--task-trials", "0")):
        failed = runner.invoke(app, [*args[:args.index(option) + 1], bad, *args[args.index(option) + 2:]])
        last = failed.output.strip().splitlines()[-1]
        assert failed.exit_code == 2 and last.startswith("error:") and (option in last or bad in last), last
        assert not (out / "config.json").exists()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for stage in ("measure_before", "evaluate_before", "tasks_before", "condense", "measure_after", "evaluate_after",
                  "tasks_after"):
        assert (out / stage / "config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["before"]["perplexity"]) == {"dense", "topk:4"}
    # Behaviour of both models, dense and under the decode plan, 3 depths x 1 trial each.
    for when in ("before", "after"):
        assert {policy: cell[1] for policy, cell in summary[when]["tasks"]["passkey"].items()} == {
            "dense": 3, "plan:block:4:0.25": 3}
    verdict = summary["verdict"]
    assert verdict["policy"] == "topk:4" and verdict["sentence"].startswith("The condensed model is ")
    assert verdict["dense_ratio"] == summary["after"]["perplexity"]["dense"] / summary["before"]["perplexity"]["dense"]
    assert len(summary["after"]["k_per_layer"]) == 2
    assert json.loads((out / "condense" / "config.json").read_text())["config"]["settings"]["lr"] == 3e-4  # preset: 2e-4
    stages = ("measure_before", "evaluate_before", "tasks_before", "condense", "measure_after", "evaluate_after",
              "tasks_after")
    assert set(summary["stage_seconds"]) == set(stages) and all(v > 0 for v in summary["stage_seconds"].values())
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 3 and "before and after condensation" in report
    assert report.index("Should you condense?") < report.index("Keys needed per layer")
    assert "condensed / own dense" in report and "passkey" in report
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
    timed = json.loads((out / "summary.json").read_text())["stage_seconds"]
    assert timed["evaluate_after"] > summary["stage_seconds"]["evaluate_after"]  # the rerun's time is added
    assert timed["condense"] == summary["stage_seconds"]["condense"]
    # Other settings in the same directory are refused without --overwrite.
    changed = runner.invoke(app, [*args[:-1], "dense"])
    assert changed.exit_code == 2 and "different settings" in changed.output


def _summary(dense: float, top8: float, passkey: int) -> dict:
    return {"perplexity": {"dense": dense, "topk:8": top8, "topk:16": top8 * 0.9},
            "density": {"dense": 1.0, "topk:8": 0.016, "topk:16": 0.031},
            "tasks": {"passkey": {"dense": [passkey, 20], "plan:block:16:0.0625": [passkey, 20]}}}


@pytest.mark.parametrize("after, better, reason", [
    (_summary(10.05, 11.0, 20), True, "tasks kept within one trial"),
    (_summary(10.05, 12.0, 20), False, "x1.200 of the original's dense against x1.200"),  # equal is not better
    (_summary(10.2, 11.0, 20), False, "dense x1.020 (more than x1.01)"),
    (_summary(10.0, 11.0, 18), False, "tasks lost: passkey dense 18/20 vs 20/20"),
    (_summary(10.0, 11.0, 19), True, "tasks kept within one trial"),
])
def test_verdict_needs_lower_sparse_perplexity_kept_dense_and_kept_tasks(after, better, reason):
    from attnsparse.pipeline import _verdict

    verdict = _verdict(_summary(10.0, 12.0, 20), after, k=8)
    assert verdict["policy"] == "topk:8" and verdict["better"] is better
    assert reason in verdict["sentence"] and verdict["sentence"].startswith(
        f"The condensed model is {'better' if better else 'not better'} than training-free")
    # A k that was not evaluated compares at the sparsest policy both have.
    assert _verdict(_summary(10.0, 12.0, 20), after, k=4)["policy"] == "topk:8"
