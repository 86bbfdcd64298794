"""The import graph of the package: no cycles, lower layers never import upper ones, tooling stays out.

The graph is built from the source with ``ast`` (no module is imported), counting every import: at
module level, inside functions (lazy imports hide a cycle from Python, not from a reader) and under
``if TYPE_CHECKING:`` (a type-only import is still a dependency). ``passes/x.py`` is
``fxswap.passes.x``, as installed. The package's lazy export table (``_LAZY`` in
``fxswap/__init__.py``: the module behind each public name, imported on first use) counts as imports
of ``fxswap``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The lower layers: plain data and the passes. Prefixes match by string, so a module split into
#: ``fxswap/plan_*.py`` or a ``fxswap/plan/`` package is covered too.
LOWER = ("fxswap.ir", "fxswap.errors", "fxswap.options", "fxswap.passes", "fxswap.swapplan", "fxswap.plan")
#: What the lower layers must never import: the runtime, the compiled module, the front doors and
#: the tooling.
UPPER = (
    "fxswap.runtime",
    "fxswap.capture",
    "fxswap.graph_cache",
    "fxswap.build",
    "fxswap.fit",
    "fxswap.replay",
    "fxswap.compiled",
    "fxswap.compiler",
    "fxswap.experts",
    "fxswap.cli",
    "fxswap.bench",
    "fxswap.integrations",
    "fxswap.comfyui",
)
TOOLING = "fxswap.bench"
#: The only modules outside the tooling that may import it, and why.
FRONT_DOORS = {
    "fxswap.cli": "the bench, calibrate and recommend subcommands; plan --card and --plot",
    "fxswap": "the public name fxswap.recommend, in the lazy export table",
}


def _matches(module: str, prefixes: tuple[str, ...] | str) -> bool:
    return module.startswith(prefixes)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> source file, for ``fxswap/`` and for ``passes/`` as ``fxswap.passes``."""
    out: dict[str, Path] = {}
    trees = ((root / "fxswap", "fxswap"), (root / "passes", "fxswap.passes"))
    for base, package in trees:
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            if rel.parts[0] == "passes" and package == "fxswap":
                continue  # fxswap/passes is the symlink to passes/, read once below
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join((package, *parts))] = path
    return out


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that ``name`` is or lies in (``fxswap.x.Name`` -> ``fxswap.x``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, source: str, known: set[str], is_package: bool = False) -> set[str]:
    """Every module of ``known`` that ``source`` (the text of ``module``) imports, at any depth."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, known)
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            for alias in node.names:
                # `from pkg import sub` imports the submodule; `from mod import Name` the module
                target = _resolve(f"{base}.{alias.name}", known) or _resolve(base, known)
                if target:
                    found.add(target)
    if module == "fxswap":
        found |= {m for m in _lazy_table(tree) if m in known}
    found.discard(module)
    return found


def _lazy_table(tree: ast.Module) -> set[str]:
    """The module names in the package's ``_LAZY`` export table (empty if there is none)."""
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        named = any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in targets)
        value = getattr(node, "value", None) if named else None
        if isinstance(value, ast.Dict):
            return {v.value for v in value.values if isinstance(v, ast.Constant) and isinstance(v.value, str)}
    return set()


def build_graph(root: Path = ROOT) -> nx.DiGraph:
    """The package's import graph: an edge ``a -> b`` when module ``a`` imports module ``b``."""
    files = module_files(root)
    known = set(files)
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for module, path in files.items():
        source = path.read_text()
        for target in imports_of(module, source, known, is_package=path.name == "__init__.py"):
            graph.add_edge(module, target)
    return graph


def cycles(graph: nx.DiGraph, limit: int = 10) -> list[list[str]]:
    """Up to ``limit`` import cycles, each as the list of its modules."""
    out = []
    for cycle in nx.simple_cycles(graph):
        out.append(cycle)
        if len(out) == limit:
            break
    return out


def layer_violations(graph: nx.DiGraph) -> list[str]:
    """Imports from a lower layer into an upper one."""
    return sorted(f"{a} -> {b}" for a, b in graph.edges if _matches(a, LOWER) and _matches(b, UPPER))


def tooling_violations(graph: nx.DiGraph) -> list[str]:
    """Imports of the tooling by a module that is neither tooling nor a front door."""
    return sorted(
        f"{a} -> {b}"
        for a, b in graph.edges
        if _matches(b, TOOLING) and not _matches(a, TOOLING) and a not in FRONT_DOORS
    )


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    return build_graph()


def test_graph_covers_the_package_and_every_kind_of_import(graph: nx.DiGraph) -> None:
    assert {"fxswap", "fxswap.ir", "fxswap.passes.planner", "fxswap.bench.runner", "fxswap.cli"} <= set(graph)
    assert not any(m.startswith("passes") for m in graph)  # passes/ only under its installed name
    edges = set(graph.edges)
    assert ("fxswap.passes.planner", "fxswap.ir") in edges  # module level
    assert ("fxswap.cli", "fxswap.bench.runner") in edges  # inside a function
    assert ("fxswap.bench.plots", "fxswap.bench.rows") in edges  # under TYPE_CHECKING
    assert ("fxswap", "fxswap.bench.recommendations") in edges  # the lazy export table
    assert ("fxswap.monitoring", "fxswap.runtime") in edges  # `from fxswap import runtime`


def test_import_graph_is_acyclic(graph: nx.DiGraph) -> None:
    found = cycles(graph)
    assert not found, "import cycles (function-level and TYPE_CHECKING imports count):\n" + "\n".join(
        " -> ".join([*c, c[0]]) for c in found
    )


def test_lower_layers_never_import_upper_ones(graph: nx.DiGraph) -> None:
    assert layer_violations(graph) == []


def test_only_the_front_doors_import_the_tooling(graph: nx.DiGraph) -> None:
    assert tooling_violations(graph) == []
    # the front doors do use it (otherwise the exemption is stale)
    for door in FRONT_DOORS:
        assert any(_matches(b, TOOLING) for b in graph.successors(door)), door


def test_the_checks_fail_on_an_injected_edge(graph: nx.DiGraph) -> None:
    bad = graph.copy()
    bad.add_edge("fxswap.passes.planner", "fxswap.runtime")  # lower -> upper
    assert layer_violations(bad) == ["fxswap.passes.planner -> fxswap.runtime"]
    bad = graph.copy()
    bad.add_edge("fxswap.api", "fxswap.bench.costmodel")  # core -> tooling
    assert tooling_violations(bad) == ["fxswap.api -> fxswap.bench.costmodel"]
    bad = graph.copy()
    bad.add_edge("fxswap.ir", "fxswap.passes.planner")  # the planner imports ir: a cycle
    before = {frozenset(c) for c in cycles(graph, limit=1000)}
    new = [set(c) for c in cycles(bad, limit=1000) if frozenset(c) not in before]
    assert new and all({"fxswap.ir", "fxswap.passes.planner"} <= c for c in new)


def test_parser_resolves_lazy_type_only_and_relative_imports() -> None:
    known = {"fxswap", "fxswap.ir", "fxswap.runtime", "fxswap.models", "fxswap.models.wan", "fxswap.errors"}
    source = """
from typing import TYPE_CHECKING
import torch
from . import wan
from ..errors import FxswapError
if TYPE_CHECKING:
    from fxswap.ir import GraphIR
def f():
    import fxswap.runtime as rt
"""
    assert imports_of("fxswap.models.sla", source, known) == {
        "fxswap.models.wan", "fxswap.errors", "fxswap.ir", "fxswap.runtime",
    }  # fmt: skip
    # in a package's __init__, `from . import x` is relative to the package itself
    assert imports_of("fxswap.models", "from . import wan\n", known, is_package=True) == {"fxswap.models.wan"}
