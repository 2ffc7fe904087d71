"""`generate` command and the passkey evaluation, on a tiny saved model with a character tokenizer."""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from attnsparse.cli.generate import generate_command
from attnsparse.core.tiny import save_tiny, tiny_llama, tiny_tokenizer
from attnsparse.decode.plan import DecodePlan
from attnsparse.errors import AttnsparseError
from attnsparse.evaluate.passkey import accuracy_table, passkey_prompt, run_passkey

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny")), tiny_llama(heads=6, kv_heads=2, head_dim=16))


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("generate")(generate_command)

    @app.callback()
    def _root() -> None:
        """Lets the single command be called by name, as in the real CLI."""

    return app


def test_generate_command_prints_text_and_json(tiny_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The grass is green. " * 6)
    plan_path = tmp_path / "plan.json"
    runner = CliRunner()
    result = runner.invoke(cli(), ["generate", tiny_dir, "--prompt-file", str(prompt), "--policy", "block:8:32",
                                   "--max-new-tokens", "5", "--json", "--save-plan", str(plan_path)])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["new_tokens"] >= 1 and record["prompt_tokens"] == 120
    assert DecodePlan.load(plan_path).counts() == {"block:8:32": 4}
    again = runner.invoke(cli(), ["generate", tiny_dir, "--prompt-file", str(prompt), "--policy", str(plan_path),
                                  "--max-new-tokens", "3"])
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("args, message", [
    (["--prompt-file", "missing.txt"], "does not exist"),
    (["--policy", "block:0:1"], "block size"),
    (["--max-new-tokens", "600"], "exceeds the model's maximum"),
    # generate has no --ctx: the advice names its own options
    (["--max-new-tokens", "600"], "lower --max-new-tokens to 501 or shorten the prompt file"),
    (["--save-plan", "."], "--save-plan . is a directory; give a file path such as plan.json"),
    (["--save-plan", "no/such/dir/plan.json"], "directory no/such/dir does not exist"),
])
def test_generate_command_bad_input_is_one_line(tiny_dir, tmp_path, args, message):
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello world")
    base = ["generate", tiny_dir, "--prompt-file", str(prompt)]
    result = CliRunner().invoke(cli(), base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output and "--ctx" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]  # beside loading bars
    assert len(errors) == 1 and message in errors[0]


def test_generate_prompt_longer_than_the_model_names_the_prompt(tiny_dir, tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("x" * 600)  # the character tokenizer: 600 tokens, the model holds 512
    result = CliRunner().invoke(cli(), ["generate", tiny_dir, "--prompt-file", str(prompt)])
    assert result.exit_code == 2, result.output
    assert "shorten the prompt file to fewer than 512 tokens" in result.output and "--ctx" not in result.output


def test_passkey_prompt_places_needle():
    tokenizer = tiny_tokenizer()
    for depth in (0.0, 0.5, 1.0):
        ids = passkey_prompt(tokenizer, 900, depth, 12345)
        assert ids.numel() == 900
        text = tokenizer.decode(ids)
        at = text.index("12345") / len(text)
        assert abs(at - (0.1 + 0.8 * depth)) < 0.15
        assert text.endswith("The pass key is")
    with pytest.raises(AttnsparseError):
        passkey_prompt(tokenizer, 50, 0.5, 1)


def test_run_passkey_same_answer_for_covering_policies():
    model, tokenizer = tiny_llama(heads=6, kv_heads=2, head_dim=16), tiny_tokenizer()
    torch.manual_seed(0)
    results = run_passkey(model, tokenizer, {"dense": "dense", "block": "block:8:1.0"}, [400], [0.5], trials=2,
                          answer_tokens=4, progress=False)
    assert len(results) == 4
    by_policy = {(r.trial, r.policy): r.answer for r in results}
    assert by_policy[(0, "dense")] == by_policy[(0, "block")] and by_policy[(1, "dense")] == by_policy[(1, "block")]
    assert set(accuracy_table(results)) == {"dense", "block"}


def synthetic_profile(layers: int = 2, heads: int = 6, kv_heads: int = 2) -> dict:
    """The fields of a measure profile.json that readers rely on (every head retrieval but layer 0, group 0)."""
    per_head = [{"layer": layer, "head": head, "class": "streaming" if layer == 0 and head < 3 else "retrieval",
                 "C": 0.5, "k_at_coverage": {"0.95": {"mean": 4.0}}}
                for layer in range(layers) for head in range(heads)]
    return {"model": "tiny", "ctx": 64, "layers": layers, "heads": heads, "kv_heads": kv_heads, "per_head": per_head}


@pytest.mark.parametrize("field", ["layer", "head", "class", "C", "k_at_coverage"])
def test_generate_profile_with_a_head_row_lacking_a_field_is_one_line(tiny_dir, tmp_path, field):
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello world")
    profile = synthetic_profile()
    base = ["generate", tiny_dir, "--prompt-file", str(prompt), "--max-new-tokens", "2", "--profile"]
    good = tmp_path / "profile.json"
    good.write_text(json.dumps(profile))
    result = CliRunner().invoke(cli(), base + [str(good), "--json"])
    assert result.exit_code == 0, result.output
    assert "streaming" in json.loads(result.output[result.output.index("{"):])["plan"]
    del profile["per_head"][3][field]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(profile))
    result = CliRunner().invoke(cli(), base + [str(bad)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"per_head[3] lacks '{field}'" in errors[0] and "Traceback" not in result.output
