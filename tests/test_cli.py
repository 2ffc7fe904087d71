"""The command line: version, help, info, and one-line errors with exit status 2."""

import json

import pytest
from typer.testing import CliRunner

from attnsparse import __version__
from attnsparse.cli.app import app
from attnsparse.core.tiny import save_tiny, tiny_llama

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"attnsparse {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "info" in result.output


def test_generate_help_prints_spec_grammar_as_written():
    """`:B:` is an emoji code and `[...]` a style tag to rich markup; the help must show the grammar literally."""
    result = runner.invoke(app, ["generate", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "block:B:BUDGET[:mean|bound|channelsR|gate]" in result.output and "\N{NEGATIVE SQUARED LATIN CAPITAL LETTER B}" not in result.output


def test_info_on_a_local_directory(tmp_path):
    save_tiny(str(tmp_path / "m"), tiny_llama(heads=6, kv_heads=3))
    result = runner.invoke(app, ["info", str(tmp_path / "m"), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output[result.output.index("{"):])
    assert facts["query_heads"] == 6 and facts["kv_heads"] == 3 and facts["backend_supported"] is True
    assert facts["max_context"] == 512 and facts["parameters"] > 0


def test_info_on_a_model_without_attention_reports_it_unsupported(tmp_path):
    """A state-space model states no heads or context: info shows what it can and says the backend cannot serve it."""
    from transformers import MambaConfig, MambaForCausalLM

    from attnsparse.core.tiny import tiny_tokenizer

    MambaForCausalLM(MambaConfig(vocab_size=97, hidden_size=16, num_hidden_layers=2, state_size=4)).save_pretrained(
        tmp_path / "mamba")
    tiny_tokenizer().save_pretrained(tmp_path / "mamba")
    result = runner.invoke(app, ["info", str(tmp_path / "mamba"), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output[result.output.index("{"):])
    assert facts["architecture"] == "MambaForCausalLM" and facts["layers"] == 2 and facts["max_context"] is None
    assert facts["backend_supported"] is False and "only 0 of 2 layers route attention" in facts["backend_error"]


def test_info_bad_path_is_one_line_and_status_2(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model path") and "does not exist" in lines[0]


@pytest.mark.parametrize("args,message", [
    (["measure", "--out", "{out}", "--deltas", "0.1,x"], "bad --deltas list '0.1,x'"),
    (["measure", "--out", "{out}", "--k", "4,,"], None),  # empty items are skipped: --k 4
    (["measure", "--out", "{out}", "--k", "4,y"], "bad --k list '4,y'"),
    (["condense", "--out", "{out}", "--layers", "0,a"], "bad --layers list '0,a'"),
    (["theory", "--out", "{out}", "--C", "0.5,z"], "bad --C list '0.5,z'"),
])
def test_comma_lists_are_one_line_errors_before_anything_is_written(tmp_path, args, message):
    """Every command's comma-separated options go through specs.split_list: a bad item names the option."""
    args = [a.replace("{out}", str(tmp_path / "out")) for a in args]
    parsed = message is None
    if parsed:  # a good list gets past parsing (the missing model then stops it)
        args = [args[0], str(tmp_path / "no-model")] + args[1:]
        message = "does not exist"
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output
    assert parsed or not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["info", "run", "measure", "evaluate", "condense", "generate", "theory", "gate"])
def test_every_command_reads_its_annotations(command, tmp_path):
    """Options are annotated `X | None` under `from __future__ import annotations`: typer must resolve each to X
    (a help page, and `--k abc` refused as not an integer rather than passed on as text)."""
    assert runner.invoke(app, [command, "--help"]).exit_code == 0
    if command == "condense":
        result = runner.invoke(app, ["condense", "--out", str(tmp_path / "out"), "--k", "abc"])
        assert result.exit_code == 2 and "valid integer" in result.output
