"""Liveness pass: when each weight is read, and how many activation bytes are live at each op.

Input is plain data (:class:`fxswap.ir.GraphIR`); output is plain data (:class:`Liveness`). Nothing
here imports torch. Op indices are positions in ``GraphIR.ops`` (execution order)::

    ops:      0 embed(W_e)   1 linear(W_q)   2 gelu   3 linear(W_q)
    weights:  W_e -> first 0, last 0;  W_q -> first 1, last 3
    buffers:  x [0..2], y [1..3]  ->  act = [|x|, |x|+|y|, |x|+|y|, |y|]

NOTE: a weight read twice far apart (tied or shared weights) is live here from its first to its last
use. Loading it once per place instead is the occurrence pass's job (:mod:`fxswap.passes.occurrence`):
it hands the planner a graph in which each place reads a weight of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fxswap.errors import PlanError
from fxswap.ir import GraphIR

__all__ = ["Liveness", "activation_profile", "analyse_liveness", "unit_range"]


@dataclass(frozen=True, slots=True)
class Liveness:
    """First and last op index at which each weight is read, plus the activation profile.

    ``order`` lists every weight of the graph sorted by first use (ties: position in
    ``GraphIR.weights``). Weights the graph lists but no op reads are placed at the end of ``order``
    and are absent from ``first_use`` / ``last_use``.
    """

    first_use: Mapping[str, int]
    last_use: Mapping[str, int]
    order: tuple[str, ...]
    nbytes: Mapping[str, int]
    act: tuple[int, ...]  # act[i]: activation bytes live while op i runs


def activation_profile(ir: GraphIR) -> tuple[int, ...]:
    """Bytes of activation storage live at each op (difference array over buffer live ranges).

    Args:
        ir: the captured graph.

    Returns:
        A tuple of length ``len(ir.ops)``; entry i is the sum of ``nbytes`` over buffers with
        ``start <= i <= end``, plus op i's own ``workspace_bytes`` (scratch it frees before
        returning, live beside its inputs and outputs).

    Raises:
        PlanError: a buffer has a negative size or a range outside the op list.
    """
    n = len(ir.ops)
    diff = [0] * (n + 1)
    for buf in ir.buffers:
        if buf.nbytes < 0 or buf.start < 0 or buf.end < buf.start or buf.end >= max(n, 1):
            raise PlanError(
                f"buffer {buf.name!r} has nbytes={buf.nbytes}, start={buf.start}, end={buf.end} but the "
                f"graph has {n} ops; capture must give 0 <= start <= end < {n} and nbytes >= 0"
            )
        if n == 0:
            continue
        diff[buf.start] += buf.nbytes
        diff[buf.end + 1] -= buf.nbytes
    out = []
    running = 0
    for i, op in enumerate(ir.ops):
        if op.workspace_bytes < 0:
            raise PlanError(
                f"op {i} ({op.name!r}) has workspace_bytes={op.workspace_bytes}; sizes must be >= 0"
            )
        running += diff[i]
        out.append(running + op.workspace_bytes)
    return tuple(out)


def analyse_liveness(ir: GraphIR) -> Liveness:
    """Compute first/last use of every weight and the activation profile.

    Args:
        ir: the captured graph.

    Returns:
        The :class:`Liveness` record.

    Raises:
        PlanError: an op reads a weight missing from ``ir.weights``, or weight names repeat.
    """
    nbytes: dict[str, int] = {}
    position: dict[str, int] = {}
    for i, w in enumerate(ir.weights):
        if w.name in nbytes:
            raise PlanError(f"weight {w.name!r} appears twice in GraphIR.weights; capture must list it once")
        if w.nbytes < 0:
            raise PlanError(f"weight {w.name!r} has nbytes={w.nbytes}; sizes must be >= 0")
        nbytes[w.name] = w.nbytes
        position[w.name] = i
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, op in enumerate(ir.ops):
        for name in op.weights:
            if name not in nbytes:
                raise PlanError(
                    f"op {i} ({op.name!r}) reads weight {name!r}, which is not in GraphIR.weights; "
                    "capture must list every weight an op reads"
                )
            if name not in first:
                first[name] = i
            last[name] = i
    used = sorted(first, key=lambda w: (first[w], position[w]))
    unused = [w.name for w in ir.weights if w.name not in first]
    return Liveness(
        first_use=first,
        last_use=last,
        order=tuple(used + unused),
        nbytes=nbytes,
        act=activation_profile(ir),
    )


def unit_range(
    params: Sequence[str], live: Liveness, spans: Sequence[tuple[str, int, int]] = ()
) -> tuple[int, int]:
    """First and last op index at which a unit's weights are read.

    ``spans``: ``(weight, first, last)`` for weights the unit shares with other units (each loads
    its own copy, :mod:`fxswap.passes.occurrence`); only those reads count for such a weight.

    A unit whose weights no op reads gets ``(0, 0)``: it is never needed, so it is scheduled at the
    first op, where it costs the least time, and the validator has nothing to check for it.
    """
    shared = {w for w, _, _ in spans}
    firsts = [live.first_use[p] for p in params if p in live.first_use and p not in shared]
    lasts = [live.last_use[p] for p in params if p in live.last_use and p not in shared]
    firsts += [f for _, f, _ in spans]
    lasts += [e for _, _, e in spans]
    if not firsts:
        return 0, 0
    return min(firsts), max(lasts)
