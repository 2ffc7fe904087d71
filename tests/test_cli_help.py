"""Every registered method is named in the --help of the commands that take it (the help texts are written out)."""

from __future__ import annotations

import pkgutil

from typer.testing import CliRunner

from attnsparse.attention.policies import POLICIES as PREFILL
from attnsparse.cli.app import app
from attnsparse.decode import scorers
from attnsparse.decode.policies import POLICIES as DECODE
from attnsparse.decode.scorers import SCORERS


def _help(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=400)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_evaluate_help_names_every_prefill_policy() -> None:
    text = _help("evaluate")
    for name in PREFILL.names():
        assert f"{name}:" in text or f" {name}," in text, name


def test_generate_help_names_every_decode_policy_and_block_score() -> None:
    text = _help("generate")
    for name in DECODE.names():
        assert f"{name}:" in text or f" {name}," in text, name
    shipped = {m.name for m in pkgutil.iter_modules(scorers.__path__)} - {"base"}  # tests may register their own
    assert shipped <= set(SCORERS.names())
    for name in shipped:
        assert name in text, name
