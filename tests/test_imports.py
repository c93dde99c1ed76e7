"""Imports point one way (cli -> stages -> modeling -> kernels): no cycle among the project's modules, counting
the imports inside functions too (a lazy import still ties the two modules together)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def package_dirs() -> dict[str, Path]:
    """Package name -> folder, as pyproject.toml maps them (kernels/, recipes/ and evals/ install under lt2convert)."""
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {name: ROOT / folder for name, folder in settings["tool"]["setuptools"]["package-dir"].items()}


def project_modules() -> dict[str, Path]:
    """Every module of the installed project by its dotted name."""
    modules = {}
    for package, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((package, *parts))] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            # `from package import submodule` names the submodule; otherwise the deepest module named
            graph[name] |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_among_the_project_modules():
    assert cycles(import_graph()) == []


def test_the_cycle_check_sees_lazy_imports():
    """Guards the test above: an import inside a function is an edge, and a two-module cycle is found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert cycles(graph) == [["a", "b"]]
    graph = import_graph()
    assert "lt2convert.sensitivity" in graph["lt2convert.cli"]  # imported inside the plan command
    assert "lt2convert.recipes" in graph["lt2convert.plan"]  # packages mapped from other folders are in the graph
