"""A module that defines a top-level name twice keeps only the last definition: a test written
twice (a merge can do it) silently runs once, and the result-count guard cannot see it (the
shadowed one is never collected). Every test, planner, service and benchmark module is checked."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shadowed(source: str) -> list[str]:
    tree = ast.parse(source)
    names = [n.name for n in tree.body
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return sorted(k for k, v in Counter(names).items() if v > 1)


def test_the_check_finds_a_twice_defined_test():
    assert _shadowed("def test_a():\n    pass\n\n\ndef test_a():\n    pass\n") == ["test_a"]
    assert _shadowed("def test_a():\n    pass\n\n\ndef test_b():\n    pass\n") == []


def test_no_module_defines_a_top_level_name_twice():
    found = {}
    for folder in ("tests", "planner", "service", "benchmarks", "scripts", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            names = _shadowed(path.read_text())
            if names:
                found[str(path.relative_to(ROOT))] = names
    assert found == {}
