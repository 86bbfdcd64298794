"""The checks stay independent of what they check: the import graph, read from the source with ``ast``.

``fxswap.oracle`` is the allocator measure the tests and benchmarks hold fxswap's plans against;
``fxswap.alloc_probe`` is the probe the planner measures op workspace with. If either reached the
other (directly or through any chain of imports) a bug in the shared code would be invisible: the
plan and its check would agree because they are the same function. So:

- the oracle imports no fxswap module at all, transitively;
- no fxswap module outside the benchmark tooling (``fxswap/bench``) reaches the oracle, transitively
  (the planner, the probe, the runtime and the compiled module among them).

Imports inside functions count as much as module-level ones (``ast.walk`` sees them all), and so
does a module named in a string (``importlib.import_module``, the package's lazy export table).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fxswap"
ORACLE = "fxswap.oracle"
PROBE = "fxswap.alloc_probe"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = ["fxswap", *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    # fxswap/passes is a symlink to ../passes: rglob does not follow it, so walk it explicitly
    files = list(PKG.rglob("*.py")) + [PKG / "passes" / p.name for p in (ROOT / "passes").glob("*.py")]
    return {_module_name(p): p for p in files}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fxswap modules ``name`` imports (absolute and relative, at any depth of the file)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            # a module named as a string: importlib.import_module, the package's lazy export table
            targets = [node.value]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t == "passes" or t.startswith("passes."):
                t = "fxswap." + t
            # `import fxswap.a.b` imports fxswap, fxswap.a and fxswap.a.b
            parts = t.split(".")
            for k in range(1, len(parts) + 1):
                mod = ".".join(parts[:k])
                if mod in known:
                    out.add(mod)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    src = _sources()
    known = set(src)
    return {name: _imports(name, path, known) for name, path in src.items()}


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        m = todo.pop()
        for n in graph.get(m, ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_the_walk_sees_the_package() -> None:
    g = _graph()
    # the walk itself works: known edges are found (else the tests below would pass vacuously)
    assert {ORACLE, PROBE, "fxswap.workspace", "fxswap.replay", "fxswap.passes.planner"} <= set(g)
    assert PROBE in g["fxswap.workspace"] and PROBE in g["fxswap.replay"]
    assert "fxswap.passes.liveness" in _reach(g, "fxswap.fit")
    assert "fxswap.compiler" in g["fxswap"]  # through the lazy export table's strings


def test_the_oracle_imports_no_fxswap_module() -> None:
    g = _graph()
    # `fxswap` itself is the package __init__: importing `fxswap.oracle` runs it, but the oracle's
    # code uses nothing from it; what matters is the oracle's own source
    assert _reach(g, ORACLE) - {"fxswap"} == set(), _reach(g, ORACLE)


def test_nothing_outside_the_bench_tooling_reaches_the_oracle() -> None:
    g = _graph()
    # the package __init__ re-exports the public API; it must not pull the oracle in either
    offenders = sorted(
        name
        for name in g
        if name != ORACLE
        and not name.startswith("fxswap.bench")
        and ORACLE in _reach({k: v for k, v in g.items() if not k.startswith("fxswap.bench")}, name)
    )
    assert offenders == [], f"these modules reach {ORACLE}: {offenders}"


def test_the_probe_and_the_oracle_are_apart() -> None:
    g = _graph()
    assert ORACLE not in _reach(g, PROBE)
    assert PROBE not in _reach(g, ORACLE)


def test_the_probe_reads_the_allocator_on_the_cpu() -> None:
    """Two pieces of hand-known size: 1000 float32 (4,000 bytes) freed before 250 int64 (2,000
    bytes) is allocated; a piece's peak is its own, not its neighbour's."""
    import torch

    from fxswap.alloc_probe import pieces

    with pieces("cpu") as probe:
        with probe.piece("a"):
            t = torch.empty(1000, dtype=torch.float32)
            del t
            u = torch.empty(250, dtype=torch.int64)
            del u
        with probe.piece("b"):
            v = torch.empty(10, dtype=torch.float64)
            del v
    assert probe.peak == {"a": 4000, "b": 80}
