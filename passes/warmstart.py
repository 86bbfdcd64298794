"""Warm-start pass: the tail of one call prefetches the head units of the next (a cyclic schedule).

A sampling loop calls the same graph 30 to 100 times. Planned one call at a time, every call
starts cold: the units loaded at op 0 (those within the prefetch depth of the start) copy while
compute waits, since nothing before them runs long enough to hide the copy. Seen as a cycle, the
schedule continues across the boundary: with depth ``d`` and ``K`` units in first-use order, the
head unit ``k < d`` has its load issued where the cyclic rule puts it, before the first use of unit
``K + k - d`` of the *previous* call, just like every other unit's ``first_use[k - d]``.

Input: the chosen schedule as :class:`~fxswap.passes.simulate.UnitWindow` records (first-use
order), the activation profile, the reserve, the budget, the op costs and the copy rate.
Output: a :class:`WarmStart` record: per unit the op before which its next-call load is issued
(``carry_at``, an op index), the steady-state peak
and the steady-state time of a call.

Memory (steady state, any call after the first)::

    mem[i] = cold[i] + sum(bytes[k] for carried k with carry_at[k] <= i)       # the tail
    boundary = reserve + resident + act[last] + sum(bytes[k] for carried k)  # between two calls

``cold`` is the one-call model of :func:`~fxswap.passes.simulate.simulate_memory` (the next call
then begins with the carried units already allocated, as the cold call allocated them at op 0, so
its body is unchanged). ``boundary`` is what is allocated once the call has returned: the units in
flight for the next call beside everything the last op saw (the inputs the caller still holds and
the outputs it receives). A carried unit's point never precedes its own release in the same call.

Choice: the head units in first-use order, each at the cyclic point or, when the budget does not
allow it there, at the next later first use that fits; a unit that fits nowhere starts cold. A
carry is always issued before some op of the call, never as the call returns: Inductor's accounting
(``fxswap.fit``) maps every fxswap op of the generated program to an op of the graph. The warm
start is kept only when the time model predicts a faster steady-state call than the cold schedule;
it never raises the peak above the budget.

Time (:func:`simulate_steady`): three consecutive calls on the two-stream model of
:func:`~fxswap.passes.simulate.simulate_time`; the middle call, which both receives carried loads
and issues them, is the steady state.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from fxswap.passes.simulate import OpCosts, Streams, TimeReport, UnitWindow, simulate_memory, simulate_time

__all__ = ["WarmStart", "plan_warm_start", "simulate_steady", "steady_memory"]


@dataclass(frozen=True, slots=True)
class WarmStart:
    """A cyclic schedule's additions to a one-call schedule (units in the given order)."""

    carry_at: tuple[int | None, ...]  # op before which the next call's load is issued; None: cold
    peak_bytes: int  # steady-state peak: the tail with its carried units, and the boundary
    boundary_bytes: int  # allocated between two calls
    carried_bytes: int
    report: TimeReport  # the steady-state call
    cold: TimeReport  # the same schedule, every call cold
    peak_op: int | None = None  # where peak_bytes is reached: an op, or len(act) between calls

    @property
    def enabled(self) -> bool:
        return any(c is not None for c in self.carry_at)


def steady_memory(
    act: Sequence[int], units: Sequence[UnitWindow], reserve_bytes: int, carry_at: Sequence[int | None]
) -> tuple[list[int], int]:
    """Per-op bytes of a steady-state call and the bytes allocated between two calls.

    Args:
        act: activation bytes per op.
        units: the schedule (every unit), as for :func:`~fxswap.passes.simulate.simulate_memory`.
        reserve_bytes: counted at every op.
        carry_at: per unit, where the next call's load is issued (None: not carried).

    Returns:
        ``(mem, boundary)``: ``mem[i]`` the one-call bytes at op ``i`` plus the carried units issued
        at or before it; ``boundary`` = reserve + resident + ``act[-1]`` + every carried unit.
    """
    n = len(act)
    tl = simulate_memory(act, units, reserve_bytes)
    diff = [0] * (n + 1)
    carried = 0
    for u, c in zip(units, carry_at, strict=True):
        if c is not None and not u.resident:
            diff[c] += u.bytes
            carried += u.bytes
    mem = []
    running = 0
    for i in range(n):
        running += diff[i]
        mem.append(tl.total(i) + running)
    last = act[-1] if n else 0
    return mem, reserve_bytes + tl.resident_bytes + last + carried


def simulate_steady(
    costs: OpCosts, units: Sequence[UnitWindow], carry_at: Sequence[int | None], h2d_gbps: float
) -> TimeReport:
    """Time of a steady-state call: the middle one of three consecutive calls.

    Args:
        costs: per-op compute times.
        units: the schedule (first-use order), as for :func:`~fxswap.passes.simulate.simulate_time`.
        carry_at: per unit, the op of the previous call before which its load is issued (None: the
            unit is loaded at its own ``load_at`` in every call).
        h2d_gbps: copy rate.

    Returns:
        The middle call's :class:`~fxswap.passes.simulate.TimeReport`: its compute, the stalls of
        its waits, the bytes it moves (its carried loads included), and per unit its load's start
        and end relative to the call's start (negative: issued in the previous call).
    """
    n = len(costs.op_ms)
    per_call = costs.prefix_ms[-1]
    byte_ms = 1e3 / (h2d_gbps * 1e9)
    m = len(units)
    calls = 3
    # Events on a global op index (call j, op i) -> j * (n + 1) + i; the slot n of each call is its
    # end, where loads carried "at the end" are issued. Loads first, then waits, at equal index.
    events: list[tuple[int, int, int, int]] = []  # (global op, kind 0 load / 1 wait, call, unit)
    for j in range(calls):
        for k, u in enumerate(units):
            if u.resident:
                continue
            carried = carry_at[k] is not None
            if not carried or j == 0:
                events.append((j * (n + 1) + u.load_at, 0, j, k))
            if carried and j + 1 < calls:
                events.append((j * (n + 1) + int(carry_at[k] or 0), 0, j + 1, k))
            events.append((j * (n + 1) + u.wait_at, 1, j, k))
    # Collectives (sequence parallelism) run in every call, issued and waited for in that call;
    # kinds 2 and 3 as in simulate_time, after the loads and their waits at the same op.
    colls = costs.collectives
    for j in range(calls):
        for k, c in enumerate(colls):
            events.append((j * (n + 1) + c.issue_op, 2, j, k))
            events.append((j * (n + 1) + c.wait_op, 3, j, k))
    events.sort()
    prefix = costs.prefix_ms
    stall = [0.0] * calls  # cumulative stall at the start of each call is folded into `offset`
    coll_stall = [0.0] * calls
    done: dict[tuple[int, int], float] = {}
    start: dict[tuple[int, int], float] = {}
    coll_done: dict[tuple[int, int], float] = {}
    stall_k = [0.0] * m
    streams = Streams()
    total_stall = 0.0
    call_start = [0.0] * calls
    for g, kind, j, k in events:
        call, i = divmod(g, n + 1)
        base = call * per_call + total_stall
        now = base + (prefix[i] if i < n else per_call)
        if kind == 0:
            start[j, k], done[j, k] = streams.load(now, units[k].bytes * byte_ms)
            continue
        if kind == 2:
            coll_done[j, k] = streams.collective(now, colls[k])
            continue
        end = done[j, k] if kind == 1 else coll_done[j, k]
        if end > now:
            total_stall += end - now
            if kind == 3:
                coll_stall[j] += end - now
                continue
            stall[j] += end - now
            if j == 1:
                stall_k[k] = end - now
    for j in range(1, calls):
        call_start[j] = j * per_call + sum(stall[:j]) + sum(coll_stall[:j])
    mid = call_start[1]
    moved = sum(u.bytes for u in units if not u.resident)
    return TimeReport(
        per_call + stall[1] + coll_stall[1],
        per_call,
        stall[1],
        moved,
        tuple(start.get((1, k), 0.0) - mid for k in range(m)),
        tuple(done.get((1, k), 0.0) - mid for k in range(m)),
        tuple(stall_k),
        sum((c.ms for c in colls), 0.0),
        coll_stall[1],
    )


def plan_warm_start(
    act: Sequence[int],
    units: Sequence[UnitWindow],
    reserve_bytes: int,
    budget: int,
    depth: int,
    costs: OpCosts,
    h2d_gbps: float,
    cold: TimeReport | None = None,
    cold_peak: int | None = None,
) -> WarmStart:
    """Carry points for the head units of ``units`` under ``budget`` (see the module docstring).

    Args:
        act: activation bytes per op.
        units: the one-call schedule, every unit (resident ones included), in first-use order.
        reserve_bytes: counted at every op, as in the one-call model.
        budget: the peak the steady state must stay within.
        depth: the schedule's prefetch depth (counted in units, resident ones included).
        costs, h2d_gbps: the time model's rates.
        cold: the schedule's one-call :func:`~fxswap.passes.simulate.simulate_time` report, if the
            caller has it (the planner does; computed otherwise).
        cold_peak: the schedule's one-call peak, if the caller has it (likewise).

    Returns:
        The :class:`WarmStart`; ``enabled`` is False when nothing can be carried or carrying does not
        make a call faster.
    """
    n = len(act)
    cold_report = cold if cold is not None else simulate_time(costs, units, h2d_gbps)
    none: tuple[int | None, ...] = (None,) * len(units)
    resident = sum(u.bytes for u in units if u.resident)
    last_act = act[-1] if n else 0
    head = [
        k
        for k, u in enumerate(units)
        if k < depth and not u.resident and u.load_at == 0
        and reserve_bytes + resident + last_act + u.bytes <= budget
    ]  # fmt: skip
    if n == 0 or not head:
        # nothing could be carried: the one-call peak is the plan's (cheap exit, the planner asks
        # for every candidate schedule)
        peak = cold_peak if cold_peak is not None else simulate_memory(act, units, reserve_bytes).peak_bytes
        return WarmStart(none, peak, 0, 0, cold_report, cold_report)
    cold_tl = simulate_memory(act, units, reserve_bytes)
    off = WarmStart(none, cold_tl.peak_bytes, 0, 0, cold_report, cold_report)
    base = reserve_bytes + resident
    steady = [base + sw + a for sw, a in zip(cold_tl.swapped, act, strict=True)]  # plus carried tails
    firsts = sorted({u.wait_at for u in units})
    big_k = len(units)
    carry: list[int | None] = list(none)
    carried_total = 0

    def suffix_max() -> list[int]:
        # out[i] = max(steady[i:]); out[n] = 0: a point at the end adds to the boundary only
        return [*reversed(list(itertools.accumulate(reversed(steady), max))), 0]

    after = suffix_max()
    for k in head:
        u = units[k]
        cyclic = big_k + k - depth
        point = max(units[cyclic].wait_at if cyclic >= 0 else 0, u.release_after + 1)
        if base + last_act + carried_total + u.bytes > budget:
            continue  # the bytes between two calls would not fit
        for p in [q for q in firsts if point <= q < n]:
            if after[p] + u.bytes <= budget:
                steady[p:] = [v + u.bytes for v in steady[p:]]
                after = suffix_max()
                carry[k] = p
                carried_total += u.bytes
                break
    if carried_total == 0:
        return off
    warm_report = simulate_steady(costs, units, carry, h2d_gbps)
    if round(warm_report.step_ms, 9) >= round(cold_report.step_ms, 9):
        return off
    boundary = base + last_act + carried_total
    top = after[0]
    return WarmStart(
        tuple(carry),
        max(top, boundary),
        boundary,
        carried_total,
        warm_report,
        cold_report,
        n if boundary > top else steady.index(top),
    )
