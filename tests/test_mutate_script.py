"""scripts/mutate.py: a mutation whose old text is not found exactly once is stale, never silently skipped."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mutate.py"


def _load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("mutate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_apply_replaces_exactly_once_or_reports_stale(tmp_path: Path) -> None:
    mutate = _load()
    (tmp_path / "src").mkdir()
    target = tmp_path / "src" / "m.py"
    target.write_text("a = 1\nb = 2\nb = 2\n")
    make = lambda old: mutate.Mutation("m", "metrics", "src/m.py", old, "a = 3", ("tests",))
    assert mutate.apply(make("a = 1"), tmp_path) is None and target.read_text().startswith("a = 3\n")
    assert "found 0 times" in mutate.apply(make("a = 1"), tmp_path)
    assert "found 2 times" in mutate.apply(make("b = 2"), tmp_path)
    missing = mutate.Mutation("m", "metrics", "src/gone.py", "x", "y", ("tests",))
    assert "does not exist" in mutate.apply(missing, tmp_path)
    stale = mutate.check(mutate.Mutation("m", "metrics", "src/attnsparse/errors.py", "no such text", "", ("x",)), 60)
    assert stale.status == "stale" and "found 0 times" in stale.detail


def test_every_mutation_applies_to_this_checkout() -> None:
    """Each listed mutation's old text occurs exactly once in the current source (none has gone stale)."""
    mutate = _load()
    names = [m.name for m in mutate.MUTATIONS]
    assert len(names) == len(set(names)) and len(names) >= 16
    root = SCRIPT.parents[1]
    for m in mutate.MUTATIONS:
        text = (root / m.path).read_text(encoding="utf-8")
        found = text.count(m.old)
        assert found == 1, f"scripts/mutate.py: '{m.name}' old text found {found} times in {m.path}; point it at the moved code"
