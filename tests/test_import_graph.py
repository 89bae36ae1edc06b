"""The import graph of ``core``, ``web`` and ``worker``, read from the source: no two modules import
each other, however long the circle, and inside ``core`` the packages depend on each other in one
direction only (the order written in ``core/__init__.py``).

Imports inside functions count: they run later, but a circle through them is still a circle.
``from a import b`` is an import of the module ``a.b`` when there is one, else of ``a``.
``web -> core <- worker`` is checked by ``tests/core/test_package_boundaries.py``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "web", "worker")

# Which of core's packages each may import (besides itself). Read top to bottom: a package may
# import only those above it; cli, at the bottom, starts everything.
CORE_LAYERS: dict[str, set[str]] = {
    "runtime": set(),
    "db": {"runtime"},
    "storage": {"runtime"},
    "diffusion": {"runtime"},
    "queue": {"runtime", "db"},
    "services": {"runtime", "db", "storage", "queue"},
    "upkeep": {"runtime", "db", "storage", "queue", "services"},
    "cli": {"runtime", "db", "storage", "diffusion", "queue", "services", "upkeep"},
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's imports of other modules of ours (the nearest enclosing module we have)."""

    def ours(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(ours(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        here = here.rpartition(".")[0]
                    base = f"{here}.{base}" if base else here
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    edges.add(full if full in mods else ours(base))
        graph[name] = {e for e in edges if e and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    mods = {"p": tmp_path / "p.py", "p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    mods["p"].write_text("from p import a\n")
    mods["p.a"].write_text("def f():\n    from p.b import thing\n")
    mods["p.b"].write_text("from . import a\nimport os\n")
    graph = import_graph(mods)
    assert graph == {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.a"}}
    assert cycles(graph) == [["p.a", "p.b"]]


def test_no_import_cycles_in_core_web_or_worker() -> None:
    graph = import_graph(modules())
    assert len(graph) > 80
    assert cycles(graph) == []


def test_core_top_level_is_a_handful_of_packages_each_saying_what_it_owns() -> None:
    entries = sorted(
        p.name for p in (ROOT / "core").iterdir() if p.name not in ("__init__.py", "__pycache__")
    )
    assert entries == sorted(CORE_LAYERS)
    for name in entries:
        init = ROOT / "core" / name / "__init__.py"
        assert init.is_file(), f"core/{name} is not a package"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, f"core/{name}/__init__.py says nothing of what it owns"


@pytest.mark.parametrize("package", sorted(CORE_LAYERS))
def test_each_package_of_core_imports_only_the_layers_above_it(package: str) -> None:
    graph = import_graph(modules())
    wrong = sorted(
        f"{src} imports {dst}"
        for src, dsts in graph.items()
        if src.startswith(f"core.{package}.") or src == f"core.{package}"
        for dst in dsts
        if dst.startswith("core.") and dst.split(".")[1] not in CORE_LAYERS[package] | {package}
    )
    assert wrong == []
