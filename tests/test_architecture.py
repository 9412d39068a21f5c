"""The planner's shape: six packages in layers, imports in one direction, no cycles.

catalog (what is asked) <- machine (how a step is replayed and compiled) <- step (the reference
step that is replayed) <- hf (the transformers implementation's step, traced) <- layouts (how
ranks and stages compose) <- routes (the routes' planners). A module may import its own package and the packages below it, never above; within
a package the modules' imports (lazy ones included) form no cycle; the planner never imports the
service; and no module grows past a size a reader takes in at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "planner"
LAYERS = ["catalog", "machine", "step", "hf", "layouts", "routes"]
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (lazy imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names
                       if f"{node.module}.{a.name}" in MODULES)
    return out


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "planner" else None


def test_every_module_is_in_a_layer():
    loose = [m for m in MODULES if m != "planner" and _package(m) not in LAYERS]
    assert not loose, f"modules outside the layered packages: {loose}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "planner"))
def test_imports_point_down(module):
    layer = LAYERS.index(_package(module))
    for target in _imports(MODULES[module]):
        assert not target.startswith("service"), f"{module} imports the service ({target})"
        pkg = _package(target)
        if pkg is None or target == "planner":
            continue
        assert pkg in LAYERS and LAYERS.index(pkg) <= layer, \
            f"{module} ({LAYERS[layer]}) imports {target} ({pkg}): imports go downwards only"


def test_no_import_cycles():
    graph = {m: {t for t in _imports(p) if t in MODULES and t != m and _package(t)}
             for m, p in MODULES.items() if m != "planner"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t.count(".") == 1:  # a package's __init__: its docstring only
                continue
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if not state.get(t):
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines (at most {MAX_LINES}): split it by concept"
