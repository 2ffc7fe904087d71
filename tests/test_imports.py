"""The package's import graph: no cycles (imports inside functions count too) and only a handful of top-level modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "attnsparse"
TOP_LEVEL = {"__init__", "errors", "specs", "pipeline"}  # everything else lives in a role package


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the attnsparse modules it imports anywhere in its body (`from a import b` counts a.b if a module)."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {_owner(t, files) for t in targets if _owner(t, files)} - {name}
    return graph


def _owner(target: str, files: dict[str, Path]) -> str | None:
    """The attnsparse module a dotted import names (a.b.func -> a.b), or None outside the package."""
    while target:
        if target in files:
            return target
        target = target.rpartition(".")[0]
    return None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_only_a_handful_of_top_level_modules() -> None:
    top = {path.stem for path in PACKAGE.glob("*.py")}
    assert top <= TOP_LEVEL, f"modules at the package top level beyond {sorted(TOP_LEVEL)}: {sorted(top - TOP_LEVEL)}"


def test_cycle_finder_sees_function_level_and_submodule_imports(tmp_path: Path) -> None:
    """A cycle closed by an import inside a function, through `from pkg.sub import module`, is found."""
    root = tmp_path / "attnsparse"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "a.py").write_text("from attnsparse.sub import b\n")
    (root / "sub" / "b.py").write_text("def f():\n    from attnsparse.sub.a import thing\n")
    assert find_cycle(import_graph(root)) == ["attnsparse.sub.a", "attnsparse.sub.b", "attnsparse.sub.a"]
    (root / "sub" / "b.py").write_text("def f():\n    from . import c\n")
    (root / "sub" / "c.py").write_text("import attnsparse.sub.a as a\n")
    assert find_cycle(import_graph(root)) == ["attnsparse.sub.a", "attnsparse.sub.b", "attnsparse.sub.c",
                                              "attnsparse.sub.a"]
