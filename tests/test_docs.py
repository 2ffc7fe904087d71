"""The docs name only what exists: every `attnsparse.<name>` resolves, every repository path is there, and README's
Python example and Commands table match the code."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOTTED = re.compile(r"\battnsparse(?:\.[A-Za-z_]\w*)+")
# paths in the repository that the docs point readers at (run outputs such as runs/... are not checked)
REPO_PATH = re.compile(r"(?<![\w/.-])((?:src|tests|benchmarks|scripts|docs)/[\w./*-]*[\w*])")
GENERATED = ("benchmarks/results/runs/",)  # written by the commands the docs show, not committed


def resolves(name: str) -> bool:
    """True when `name` is a module, or an attribute chain under the longest importable module prefix."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if isinstance(obj, ModuleType) and not hasattr(obj, attr):
                try:  # a submodule the package does not import itself
                    obj = importlib.import_module(f"{obj.__name__}.{attr}")
                    continue
                except ModuleNotFoundError:
                    return False
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def dotted_names(text: str) -> set[str]:
    return set(DOTTED.findall(text))


def test_every_dotted_name_in_the_docs_resolves():
    missing = [f"{doc.relative_to(ROOT)}: {name}" for doc in DOCS for name in sorted(dotted_names(doc.read_text()))
               if not resolves(name)]
    assert not missing, "docs name what does not exist:\n" + "\n".join(missing)


def test_the_checker_rejects_a_wrong_name():
    assert resolves("attnsparse.measure.rowstats") and resolves("attnsparse.attention.backend.sparse_attention")
    assert resolves("attnsparse.core.tiny.tiny_llama")
    assert not resolves("attnsparse.metrics")  # the module's old name
    assert not resolves("attnsparse.decode.backend.cache_from_kv")  # lives in attnsparse.decode.generate
    assert dotted_names("see `attnsparse.theory.run.run_theory`.") == {"attnsparse.theory.run.run_theory"}


def test_every_repository_path_in_the_docs_exists():
    docs = [*DOCS, ROOT / "benchmarks" / "README.md"]
    missing = []
    for doc in docs:
        for path in sorted(set(REPO_PATH.findall(doc.read_text()))):
            if path.startswith(GENERATED):
                continue
            if not (any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not missing, "docs point at files that do not exist:\n" + "\n".join(missing)


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def test_readme_python_example_runs(tiny_dir: Path, capsys: pytest.CaptureFixture[str]):
    block = re.search(r"```python\n(.*?)```", readme_section("Python API"), re.DOTALL)
    assert block, "README's Python API section has no python block"
    code = block.group(1).replace('"smollm2-135m"', repr(str(tiny_dir)))
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102  (the README example is what is tested)
    assert capsys.readouterr().out.strip(), "the example's observer printed nothing"


def test_readme_commands_table_matches_the_cli():
    """Every command has a row, and every option a row shows is one of its command's options."""
    import typer.main

    from attnsparse.cli.app import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    rows = re.findall(r"^\| `attnsparse (\w+)([^`]*)`", readme_section("Commands"), re.MULTILINE)
    assert {name for name, _ in rows} == set(commands)
    unknown = []
    for name, usage in rows:
        options = {opt for param in commands[name].params for opt in (*param.opts, *param.secondary_opts)}
        unknown += [f"{name} {flag}" for flag in re.findall(r"--[\w-]+", usage) if flag not in options]
    assert not unknown, f"README's Commands table shows options the CLI lacks: {unknown}"
