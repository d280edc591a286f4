"""Imports run downward only (docs/architecture.md): no module of gpuwheel imports, directly or
through others, a module that imports it back.

The graph is read from the source with `ast`, every import counts: at module level, under
`if TYPE_CHECKING:`, and inside functions. An import moved into a function to dodge a cycle is still
a cycle a reader must untangle; one there for start-up time or an optional library points downward
like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "builder" / "gpuwheel"


def module_names(package: Path) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, not `.__init__`)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(package: Path) -> dict[str, set[str]]:
    """module → the modules of the same package it imports when loaded."""
    modules = module_names(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # The package a relative import starts from: a package's own name, else the module's parent.
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from a import b` loads the module a.b when there is one, else takes a name of a.
                candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in modules:  # `import a.b.name`: the module a.b
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> dict[frozenset[str], list[str]]:
    """Each group of modules that import each other (a strongly connected component of more than
    one module), with one cycle through it written out: a → b → a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return {frozenset(group): _one_cycle(graph, group) for group in groups}


def _one_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest way from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for imported in sorted(graph[module] & group):
                if imported == start:
                    return [*paths[module], start]
                if imported not in paths:
                    paths[imported] = [*paths[module], imported]
                    following.append(imported)
        frontier = following
    raise AssertionError(f"{sorted(group)} is not a cycle")


def _describe(cycles: dict[frozenset[str], list[str]]) -> str:
    return "; ".join(" → ".join(cycles[group]) for group in sorted(cycles, key=sorted))


def test_gpuwheel_imports_have_no_cycles():
    cycles = import_cycles(import_graph(PACKAGE))
    assert not cycles, f"import cycles: {_describe(cycles)}"


def test_a_cycle_is_found_and_named(tmp_path):
    """The check itself: a cycle through a type-checking import and a relative one is found, so is one
    through a function-level import; a package that imports its own modules is no cycle."""
    package = tmp_path / "demo"
    (package / "sub").mkdir(parents=True)
    (package / "cli").mkdir()
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from demo.sub import leaf\n")
    (package / "sub" / "leaf.py").write_text("import json\n")
    (package / "plan.py").write_text("from .sub.leaf import json\nfrom . import patches\n")
    (package / "patches.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from demo.plan import Plan\n"
    )
    (package / "cli" / "__init__.py").write_text("def main(): ...\ndef register():\n    from demo.cli import run\n")
    (package / "cli" / "run.py").write_text("from ..cli import main\nfrom demo.sub.leaf import json\n")

    cycles = import_cycles(import_graph(package))
    assert _describe(cycles) == "demo.cli → demo.cli.run → demo.cli; demo.patches → demo.plan → demo.patches"
