"""Occurrence pass: a weight read in separate places of the graph, seen as one weight per place.

Liveness makes a weight live from its first read to its last. For a weight read in two separate
places (a tied input embedding and output head, a table every block reads, a module called once
early and once late) that keeps it on the device in between, where loading it a second time may
lower the peak or free room for resident units. This pass finds each weight's *occurrences*:
maximal groups of its reads that no other block interrupts. :func:`split_graph` then gives the
graph in which each occurrence reads a weight of its own (a *virtual* weight, same size), so that
partition, schedule and simulation plan reloads without knowing about them::

    ops      0 emb(E)   1-8 blocks.0 .. blocks.3   9 out(E)       E: 512 MiB, tied
    blocks   emb        blocks.0 .. blocks.3       out
    occurrences of E:  "emb.@E" reads op 0,  "out.@E" reads op 9
    split graph: op 0 reads "emb.@E", op 9 reads "out.@E"; E is no longer a weight of it

Rules:

- Two consecutive reads of a weight belong to one occurrence when every op from the first to the
  second lies in the same block (:func:`fxswap.passes.partition.block_key` of the op's module), or
  when a value aliasing the weight is passed between them (``WeightInfo.joined``: the later op
  reads a view of the copy the earlier op saw, so a second copy cannot take over in between).
- A virtual weight is named ``<module of its first read>.@<weight>`` (``@<weight>`` at the root),
  so that the partition groups it with the block that reads it; ``#2``, ``#3`` ... keep names
  unique. ``@`` never occurs in a module path, so the names cannot clash with real weights.
- A weight whose reads form one occurrence is left alone.

The planner (:mod:`fxswap.passes.planner`) plans the split graph beside the original one and lets
its cost model choose. A weight whose occurrences land in two or more units is loaded once per
unit: those units are never resident (two resident copies would be a waste, and one resident copy
could not serve the other unit's reads), and the plan states each unit's share of the weight's
reads as spans (``SwapUnit.spans``). Occurrences that land in one unit merge back into the weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fxswap.ir import GraphIR, OpInfo, WeightInfo
from fxswap.passes.partition import UnitSpec, block_key

__all__ = ["Occurrence", "find_occurrences", "real_units", "split_graph"]


@dataclass(frozen=True, slots=True)
class Occurrence:
    """One occurrence of a weight: a virtual weight read from op ``first`` to op ``last``."""

    weight: str
    name: str
    first: int
    last: int


def find_occurrences(ir: GraphIR) -> tuple[Occurrence, ...]:
    """The occurrences of every weight read in two or more separate places, by weight then op.

    Args:
        ir: the captured graph.

    Returns:
        Occurrences (two or more per weight) of the weights that have several; empty when every
        weight is read in one place.
    """
    reads: dict[str, list[int]] = {}
    for i, op in enumerate(ir.ops):
        for name in op.weights:
            reads.setdefault(name, []).append(i)
    # run[i]: the number of block changes before op i, so ops i..j share a block iff run[i] == run[j]
    run: list[int] = []
    prev: str | None = None
    for op in ir.ops:
        key = block_key(op.module) if op.module else ""
        run.append((run[-1] if run else 0) + (key != prev and prev is not None))
        prev = key
    joined = {w.name: w.joined for w in ir.weights}
    taken = {w.name for w in ir.weights}
    out: list[Occurrence] = []
    for w in ir.weights:
        at = reads.get(w.name)
        if not at:
            continue
        groups = [[at[0]]]
        for r, s in zip(at, at[1:], strict=False):
            together = run[r] == run[s] or any(a <= r and s <= b for a, b in joined[w.name])
            if together:
                groups[-1].append(s)
            else:
                groups.append([s])
        if len(groups) < 2:
            continue
        for g in groups:
            module = ir.ops[g[0]].module
            base = f"{module}.@{w.name}" if module else f"@{w.name}"
            name, k = base, 1
            while name in taken:
                k += 1
                name = f"{base}#{k}"
            taken.add(name)
            out.append(Occurrence(w.name, name, g[0], g[-1]))
    return tuple(out)


def split_graph(ir: GraphIR, occurrences: Sequence[Occurrence]) -> GraphIR:
    """``ir`` with every occurrence reading a virtual weight of its own (same shape and size).

    Args:
        ir: the captured graph.
        occurrences: from :func:`find_occurrences` on ``ir``.

    Returns:
        The split graph: equal to ``ir`` except for the weights that have occurrences, each of which
        is replaced (in ``weights`` and in every op's reads) by its virtual weights.
    """
    if not occurrences:
        return ir
    by_weight: dict[str, list[Occurrence]] = {}
    for o in occurrences:
        by_weight.setdefault(o.weight, []).append(o)

    def virtual(w: str, i: int) -> str:
        for o in by_weight[w]:
            if o.first <= i <= o.last:
                return o.name
        raise AssertionError(f"op {i} reads {w!r} outside its occurrences")  # find_occurrences covers all

    ops: list[OpInfo] = []
    for i, op in enumerate(ir.ops):
        if any(w in by_weight for w in op.weights):
            names = tuple(dict.fromkeys(virtual(w, i) if w in by_weight else w for w in op.weights))
            op = dataclasses.replace(op, weights=names)
        ops.append(op)
    weights: list[WeightInfo] = []
    for w in ir.weights:
        if w.name not in by_weight:
            weights.append(w)
            continue
        for o in by_weight[w.name]:
            module = ir.ops[o.first].module
            weights.append(dataclasses.replace(w, name=o.name, module=module, joined=()))
    return dataclasses.replace(ir, ops=tuple(ops), weights=tuple(weights))


def real_units(
    units: Sequence[UnitSpec], occurrences: Sequence[Occurrence], nbytes: Mapping[str, int]
) -> tuple[tuple[UnitSpec, ...], tuple[tuple[tuple[str, int, int], ...], ...], frozenset[str]]:
    """Units of the split graph as units of real weights.

    Args:
        units: a partition of the split graph's weights.
        occurrences: the occurrences it was split by.
        nbytes: the size of every real weight.

    Returns:
        ``(units, spans, reloaded)``: the units with real weight names (each weight once per unit,
        in first-read order); per unit, the ``(weight, first, last)`` op ranges of the reloaded
        weights it holds; the reloaded weights, those whose occurrences are in two or more units.
        A weight whose occurrences all fall in one unit is that unit's weight again, without spans.
    """
    occ = {o.name: o for o in occurrences}
    homes: dict[str, set[int]] = {}
    for k, u in enumerate(units):
        for p in u.params:
            if p in occ:
                homes.setdefault(occ[p].weight, set()).add(k)
    reloaded = frozenset(w for w, ks in homes.items() if len(ks) > 1)
    out: list[UnitSpec] = []
    spans: list[tuple[tuple[str, int, int], ...]] = []
    for u in units:
        params = tuple(dict.fromkeys(occ[p].weight if p in occ else p for p in u.params))
        own = sorted(
            (occ[p].weight, occ[p].first, occ[p].last)
            for p in u.params
            if p in occ and occ[p].weight in reloaded
        )
        out.append(UnitSpec(u.name, params, sum(nbytes[p] for p in params), u.oversized))
        spans.append(tuple(own))
    return tuple(out), tuple(spans), reloaded
