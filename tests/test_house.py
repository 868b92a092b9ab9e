"""The house's import graph, read from the source (lazy imports inside functions count too): rooms import
each other one way only, and the DP mechanism (privacy/) knows no training loop or application."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dpdiff"
# what privacy/ may stand on: the model layer and the basics, nothing that trains, samples or tunes
BELOW_PRIVACY = {"adapters", "families", "errors", "io", "run_files"}


def room(module: str) -> str:
    """dpdiff.<room>[.<module>]: a sub-package or a top-level module."""
    return module.split(".")[1]


def import_graph() -> dict[str, set[str]]:
    graph = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        here = room(".".join(("dpdiff", *path.relative_to(PACKAGE).with_suffix("").parts, "x")))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("dpdiff.") and room(name) != here:
                    graph[here].add(room(name))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as a list of rooms, or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_find_cycle_sees_a_circle_and_none_in_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_the_rooms_import_each_other_one_way_only():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle between rooms: " + " -> ".join(cycle)


def test_privacy_imports_nothing_above_the_model_layer():
    above = import_graph()["privacy"] - BELOW_PRIVACY
    assert not above, f"dpdiff/privacy/ imports {sorted(above)}: move that code out of the mechanism's room"


def test_every_benchmark_is_the_projects_not_its_diary():
    """A script in benchmarks/ writes a table that docs/ shows or is run by a test; a `_helper` is imported by one.
    A one-off study leaves: its numbers stay in the docs, its code in git history."""
    root = PACKAGE.parent
    docs = "\n".join(p.read_text() for p in (root / "docs").glob("*.md"))
    tests = "\n".join(p.read_text() for p in (root / "tests").glob("*.py"))
    scripts = sorted((root / "benchmarks").glob("*.py"))
    sources = "\n".join(p.read_text() for p in scripts if not p.name.startswith("_"))
    orphans = []
    for path in scripts:
        if path.name.startswith("_"):
            used = f"from {path.stem} import" in sources or f"import {path.stem}" in sources
        else:
            used = f"benchmarks/{path.name}" in docs or path.name in tests
        if not used:
            orphans.append(path.name)
    assert not orphans, f"benchmarks no docs table or test depends on: {orphans}"
