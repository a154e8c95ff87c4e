"""The module map docs/architecture.md draws: no import loop, nothing below resolve takes the Recipe, small modules."""
from __future__ import annotations

import ast

from .conftest import ROOT

PACKAGE = ROOT / "samsum_tuner"
# Modules that run what resolve.py builds: they take TrainingArguments, a ModelLoad, a BatchingSpec or their own
# section of the recipe, never the whole Recipe.
BELOW_RESOLVE = ("model", "model_source", "smollm2", "shapes", "batching", "data", "trainer", "callbacks", "memory",
                 "guards", "checkpoint", "resume", "rundir", "launch", "hub", "errors", "varlen")
MAX_LINES = 420


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        graph[path.stem] = deps - {path.stem}
    return graph


def test_no_import_loop_even_through_function_level_imports():
    graph, state = _imports(), {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join(trail + [module])
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            visit(dep, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_nothing_below_resolve_takes_the_recipe():
    graph = _imports()
    for module in BELOW_RESOLVE:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        args = {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in n.args + n.kwonlyargs}
        assert "Recipe" not in names and "recipe" not in args, module
        assert not graph[module] & {"resolve", "recipe", "api", "planner", "planning", "cli"}, module


def test_no_module_is_long():
    lengths = {p.name: p.read_text().count("\n") for p in PACKAGE.glob("*.py")}
    assert not {name: n for name, n in lengths.items() if n > MAX_LINES}
