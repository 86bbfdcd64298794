"""Validate pass: check a finished :class:`fxswap.swapplan.SwapPlan` against its graph.

Post-conditions, each a :class:`fxswap.errors.PlanError` naming the op (index and name) and unit::

    the plan's decoded_residents are resident weights kept as stored; the graph is checked as the
        plan holds it, with those decoded once (fxswap.passes.decode.decode_residents)
    units partition GraphIR.weights exactly (each weight in one unit, sizes add up), except that a
        weight loaded once per place is in several swapped units, each with a span of its reads:
        the spans start and end at reads, cover every read once and never part a view from the
        read of it (WeightInfo.joined)
    resident unit:  load_at = wait_at = release_after = None (and no node names)
    swapped unit:   0 <= load_at <= wait_at,  release_after < len(ops)
                    for every op i reading one of its weights:  wait_at <= i <= release_after
    carried unit:   loaded at op 0, release_after < carry_at < len(ops)
    simulated peak (fxswap.passes.simulate.simulate_memory; with carried units the steady-state call
    and the bytes between calls, fxswap.passes.warmstart.steady_memory; the upload of the residents
    decoded once, fxswap.passes.decode.upload_bytes) <= max_vram_bytes and == plan.peak_bytes

The validator recomputes everything from the graph; it trusts nothing the planner computed except
the plan itself, so it also checks plans loaded from JSON.
"""

from __future__ import annotations

from fxswap.errors import PlanError
from fxswap.ir import GraphIR
from fxswap.passes.decode import decode_residents, upload_bytes
from fxswap.passes.liveness import analyse_liveness, unit_range
from fxswap.passes.simulate import MemoryTimeline, simulate_memory, unit_windows
from fxswap.passes.warmstart import steady_memory
from fxswap.swapplan import SwapPlan, SwapUnit

__all__ = ["validate_plan"]


def _op(ir: GraphIR, i: int) -> str:
    return (
        f"op {i} ({ir.ops[i].name!r})"
        if 0 <= i < len(ir.ops)
        else f"op {i} (out of range 0..{len(ir.ops) - 1})"
    )


def _check_unit_fields(ir: GraphIR, u: SwapUnit) -> None:
    points = (u.load_at, u.wait_at, u.release_after)
    nodes = (u.load_node, u.wait_node, u.release_node)
    if u.resident:
        if any(p is not None for p in (*points, u.carry_at)) or any(
            n is not None for n in (*nodes, u.carry_node)
        ):
            raise PlanError(f"unit {u.name!r} is resident but has load/wait/release/carry points {points}")
        return
    if u.load_at is None or u.wait_at is None or u.release_after is None:
        raise PlanError(f"unit {u.name!r} is swapped but lacks a load/wait/release point: {points}")
    n = len(ir.ops)
    for label, at in (("load_at", u.load_at), ("wait_at", u.wait_at), ("release_after", u.release_after)):
        if not 0 <= at < n:
            raise PlanError(f"unit {u.name!r}: {label}={at} is outside the graph's ops 0..{n - 1}")
    if u.load_at > u.wait_at:
        raise PlanError(
            f"unit {u.name!r} is waited for before {_op(ir, u.wait_at)} "
            f"but only loaded before {_op(ir, u.load_at)}"
        )
    for label, at, node in (
        ("load_node", u.load_at, u.load_node),
        ("wait_node", u.wait_at, u.wait_node),
        ("release_node", u.release_after, u.release_node),
    ):
        if node != ir.ops[at].name:
            raise PlanError(f"unit {u.name!r}: {label} is {node!r} but {_op(ir, at)} is at that index")
    if u.carry_at is None:
        if u.carry_node is not None:
            raise PlanError(f"unit {u.name!r} has carry_node {u.carry_node!r} but no carry_at")
        return
    if u.load_at != 0 or not u.release_after < u.carry_at < n:
        raise PlanError(
            f"unit {u.name!r}: carry_at={u.carry_at} must follow its release after "
            f"{_op(ir, u.release_after)} (and be an op of the graph), for a unit loaded at op 0"
        )
    expected = ir.ops[u.carry_at].name
    if u.carry_node != expected:
        raise PlanError(
            f"unit {u.name!r}: carry_node is {u.carry_node!r} but carry_at={u.carry_at} is {expected!r}"
        )


def _check_spans(ir: GraphIR, u: SwapUnit, nbytes: dict[str, int]) -> None:
    n = len(ir.ops)
    for sp in u.spans:
        if sp.weight not in u.params:
            raise PlanError(f"unit {u.name!r} has a span of {sp.weight!r}, which it does not hold")
        if sp.bytes != nbytes[sp.weight]:
            raise PlanError(
                f"unit {u.name!r}: its span of {sp.weight!r} says {sp.bytes} bytes, the weight has "
                f"{nbytes[sp.weight]}"
            )
        if not 0 <= sp.first_use <= sp.last_use < n:
            raise PlanError(
                f"unit {u.name!r}: span of {sp.weight!r} from op {sp.first_use} to op {sp.last_use} is not "
                f"an op range of the graph (0..{n - 1})"
            )
        for label, at, node in (("first", sp.first_use, sp.first_node), ("last", sp.last_use, sp.last_node)):
            if node != ir.ops[at].name:
                raise PlanError(
                    f"unit {u.name!r}: span of {sp.weight!r} names {label} node {node!r} but {_op(ir, at)} "
                    "is at that index"
                )
    if u.spans and u.resident:
        raise PlanError(
            f"unit {u.name!r} is resident but shares {u.spans[0].weight!r} with other units; a weight "
            "loaded once per place is never resident"
        )


def _reader_units(ir: GraphIR, plan: SwapPlan) -> dict[str, list[tuple[int, int, SwapUnit]]]:
    """For every weight, ``(first, last, unit)`` of the units serving its reads, in op order: one
    entry covering every op for a weight held by one unit, one per span for a shared weight."""
    nbytes = {w.name: w.nbytes for w in ir.weights}
    holders: dict[str, list[SwapUnit]] = {}
    for u in plan.units:
        if len(set(u.params)) != len(u.params):
            raise PlanError(f"unit {u.name!r} lists a weight twice")
        for p in u.params:
            if p not in nbytes:
                raise PlanError(f"unit {u.name!r} holds {p!r}, which the graph does not have")
            holders.setdefault(p, []).append(u)
        if u.bytes != sum(nbytes[p] for p in u.params):
            raise PlanError(
                f"unit {u.name!r} says {u.bytes} bytes but its weights add up to a different size"
            )
        _check_unit_fields(ir, u)
        _check_spans(ir, u, nbytes)
    missing = [w for w in nbytes if w not in holders]
    if missing:
        raise PlanError(f"weight {missing[0]!r} is in no unit ({len(missing)} weights missing)")
    reads: dict[str, list[int]] = {}
    for i, op in enumerate(ir.ops):
        for w in op.weights:
            reads.setdefault(w, []).append(i)
    joined = {w.name: w.joined for w in ir.weights}
    out: dict[str, list[tuple[int, int, SwapUnit]]] = {}
    for w, us in holders.items():
        spans = sorted(
            ((sp.first_use, sp.last_use, u) for u in us for sp in u.spans if sp.weight == w),
            key=lambda t: (t[0], t[1]),
        )
        if not spans:
            if len(us) > 1:
                raise PlanError(f"weight {w!r} is in two units: {us[0].name!r} and {us[1].name!r}")
            out[w] = [(0, len(ir.ops), us[0])]
            continue
        bare = [u.name for u in us if not any(sp.weight == w for sp in u.spans)]
        if bare:
            raise PlanError(
                f"weight {w!r} is shared by units with spans but unit {bare[0]!r} has none for it"
            )
        at = reads.get(w, [])
        for (a, b, u), nxt in zip(spans, [*spans[1:], None], strict=True):
            if a not in at or b not in at:
                raise PlanError(
                    f"unit {u.name!r}: span of {w!r} from {_op(ir, a)} to {_op(ir, b)} must start and end "
                    f"at reads of it"
                )
            if nxt is not None and nxt[0] <= b:
                raise PlanError(
                    f"units {u.name!r} and {nxt[2].name!r} both serve reads of {w!r} at {_op(ir, nxt[0])}"
                )
        for a, b in joined.get(w, ()):
            home = [k for k, (f, e, _) in enumerate(spans) if f <= a <= e]
            if home and not spans[home[0]][0] <= b <= spans[home[0]][1]:
                raise PlanError(
                    f"{_op(ir, b)} reads a view of {w!r} made at {_op(ir, a)}, but another unit than "
                    f"{spans[home[0]][2].name!r} serves it: both reads need the same loaded copy"
                )
        out[w] = spans
    return out


def _decoded_ir(ir: GraphIR, plan: SwapPlan) -> GraphIR:
    """``ir`` as the plan holds it: its ``decoded_residents`` decoded once (fxswap.passes.decode),
    each of them a resident weight kept as stored."""
    plan.check_decoded_residents()
    ir = decode_residents(ir, plan.decoded_residents)
    once = sorted(w.name for w in ir.weights if w.decoded_once)
    if once != sorted(plan.decoded_residents):
        raise PlanError(
            f"the graph holds {once} decoded once but the plan's `decoded_residents` is "
            f"{list(plan.decoded_residents)}; re-create the plan"
        )
    return ir


def validate_plan(ir: GraphIR, plan: SwapPlan, *, memory: bool = True) -> MemoryTimeline:
    """Check ``plan`` against ``ir``; return the simulated memory timeline.

    Args:
        ir: the graph the plan was made for.
        plan: the plan to check.
        memory: also check the simulated peak against ``plan.peak_bytes`` and the budget. Off for a
            plan handed to ``fxswap.compile(plan=...)``: its peak may be the one measured on the
            activations of the device or of Inductor's program, which ``ir`` does not hold, while
            every structural check (who serves each read, and when) still applies.

    Returns:
        The per-op :class:`fxswap.passes.simulate.MemoryTimeline` of the plan.

    Raises:
        PlanError: the first violation found, naming the op and the unit.
    """
    ir = _decoded_ir(ir, plan)
    served = _reader_units(ir, plan)
    live = analyse_liveness(ir)
    for u in plan.units:
        first, last = unit_range(u.params, live, [(sp.weight, sp.first_use, sp.last_use) for sp in u.spans])
        if (u.first_use, u.last_use) != (first, last):
            raise PlanError(
                f"unit {u.name!r} says it is used from op {u.first_use} to op {u.last_use}, but the graph "
                f"reads it from {_op(ir, first)} to {_op(ir, last)}"
            )
    for i, op in enumerate(ir.ops):
        for w in op.weights:
            if w not in served:
                raise PlanError(f"{_op(ir, i)} reads {w!r}, which is in no unit")
            owners = [u for a, b, u in served[w] if a <= i <= b]
            if not owners:
                raise PlanError(f"{_op(ir, i)} reads {w!r}, but no unit's span of it covers that op")
            unit = owners[0]
            if unit.resident:
                continue
            assert unit.wait_at is not None and unit.release_after is not None  # checked above
            if i < unit.wait_at:
                raise PlanError(
                    f"{_op(ir, i)} reads {w!r} of unit {unit.name!r} before its wait "
                    f"at {_op(ir, unit.wait_at)}"
                )
            if i > unit.release_after:
                raise PlanError(
                    f"{_op(ir, i)} reads {w!r} of unit {unit.name!r} after its release after "
                    f"{_op(ir, unit.release_after)}"
                )
    windows = unit_windows(plan.units)
    if not memory:
        return simulate_memory(live.act, windows, plan.reserve_bytes)
    timeline = simulate_memory(live.act, windows, plan.reserve_bytes)
    peak, where = (
        timeline.peak_bytes,
        _op(ir, timeline.peak_op) if timeline.peak_op >= 0 else "the empty graph",
    )
    if plan.carried_bytes:
        steady, boundary = steady_memory(
            live.act, windows, plan.reserve_bytes, [u.carry_at for u in plan.units]
        )
        if boundary != plan.boundary_bytes:
            raise PlanError(
                f"plan says boundary_bytes={plan.boundary_bytes} but the simulation gives {boundary}"
            )
        top = max(steady, default=0)
        if max(top, boundary) > peak:
            peak = max(top, boundary)
            where = (
                "the bytes between two calls"
                if boundary > top
                else f"{_op(ir, steady.index(top))} (steady state)"
            )
    elif plan.boundary_bytes:
        raise PlanError(f"plan says boundary_bytes={plan.boundary_bytes} but carries no unit")
    upload = upload_bytes(ir, live.act, timeline.resident_bytes)
    if upload > peak:
        peak, where = upload, "the upload of the residents decoded once"
    if peak > plan.max_vram_bytes:
        worst = [
            u.name
            for u in plan.units
            if not u.resident
            and u.load_at is not None
            and u.release_after is not None
            and u.load_at <= timeline.peak_op <= u.release_after
        ]
        raise PlanError(
            f"simulated peak {peak} bytes at {where} exceeds the budget "
            f"{plan.max_vram_bytes} bytes; swapped units in memory there: {worst[:8]}"
        )
    if peak != plan.peak_bytes:
        raise PlanError(f"plan says peak_bytes={plan.peak_bytes} but the simulation gives {peak} at {where}")
    return timeline
