"""The package's layers contract: every import in ``realm/`` points down, no cycles, no private
name crosses a file, no file over 500 lines (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "realm"

#: Top-level modules of the base floor: every layer may import them.
BASE = {"version", "errors", "config", "fsutil", "artifacts", "cards", "precision", "cache",
        "hub", "losses", "tracking", "metrics"}
#: Floors, bottom up; a module may import its own floor (no cycles) and the floors below.
FLOORS = [BASE, {"data"}, {"index"}, {"modeling"}, {"retrieval"},
          {"qa", "evaluate", "refresh", "report"}, {"training"}, {"cli", "__main__"}]
#: Function-level imports of realm modules are for the CLI's lazy stage table only.
LAZY_IMPORTERS = {"realm", "realm.cli", "realm.__main__", "realm.refresh.cli"}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _floor(module: str) -> int:
    if module == "realm":
        return len(FLOORS)  # the package's own __init__ sits above everything
    if module.rpartition(".")[2] in ("cli", "__main__"):
        return len(FLOORS) - 1  # a package's command line sits with the CLI
    head = module.split(".")[1]
    for i, names in enumerate(FLOORS):
        if head in names:
            return i
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in {__file__}")


def _imports(module: str):
    """``(target module, imported name or None, line, at top level)`` for each realm import."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != "realm" and not target.startswith("realm."):
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if full in MODULES:
                    yield full, None, node.lineno, id(node) in top
                else:
                    yield target, alias.name, node.lineno, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "realm" or alias.name.startswith("realm."):
                    yield alias.name, None, node.lineno, id(node) in top


GRAPH = {m: sorted({t for t, *_ in _imports(m) if t in MODULES and t != m}) for m in MODULES}


def test_every_import_points_down():
    upward = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {m} imports {t}"
              for m in MODULES for t, _, line, _ in _imports(m)
              if t in MODULES and _floor(t) > _floor(m)]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_import_cycle():
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in GRAPH[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_crosses_a_file():
    crossing = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {name} from {t}"
                for m in MODULES for t, name, line, _ in _imports(m)
                if name and name.startswith("_") and not name.startswith("__")]
    assert not crossing, "private names imported from another file:\n" + "\n".join(crossing)


def test_realm_imports_sit_at_module_level():
    lazy = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {t}"
            for m in MODULES if m not in LAZY_IMPORTERS
            for t, _, line, top in _imports(m) if not top]
    assert not lazy, ("realm imports inside functions (only the CLI's stage table may defer "
                      "them):\n" + "\n".join(lazy))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_file_over_500_lines(module):
    lines = MODULES[module].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines (at most {MAX_LINES})"


def test_the_contract_catches_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a data module importing training is upward, and two modules
    importing each other are a cycle."""
    assert _floor("realm.data.store") < _floor("realm.training.core")
    assert _floor("realm.errors") == 0 and _floor("realm.cli") == len(FLOORS) - 1
    graph = {"a": ["b"], "b": ["a"]}
    monkeypatch.setattr(__import__(__name__), "GRAPH", graph, raising=False)
    monkeypatch.setattr(__import__(__name__), "MODULES", {"a": None, "b": None}, raising=False)
    with pytest.raises(AssertionError, match="a -> b -> a"):
        test_no_import_cycle()
