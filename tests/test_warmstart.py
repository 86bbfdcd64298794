"""The warm-start pass (passes/warmstart.py) against brute force that shares no code with it.

Memory: two consecutive calls unrolled op by op, every unit's bytes added at each op it occupies
(the carried ones from their point in the first call through their release in the second).
Time: three calls stepped op by op with an explicit copy queue. Both are written here from the
description of the model, not from the pass's code.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from fxswap.passes.simulate import OpCosts, UnitWindow, load_points
from fxswap.passes.warmstart import plan_warm_start, simulate_steady


@dataclass(frozen=True)
class Case:
    act: list[int]
    units: list[UnitWindow]
    depth: int
    reserve: int
    op_ms: list[float]
    h2d: float
    budget: int


def _windows(
    first: list[int], last: list[int], sizes: list[int], resident: list[bool], depth: int
) -> list[UnitWindow]:
    loads = load_points(first, depth)
    return [
        UnitWindow(b, r, la, f, ll)
        for b, r, la, f, ll in zip(sizes, resident, loads, first, last, strict=True)
    ]


def brute_cold(case: Case) -> list[int]:
    out = []
    for i, a in enumerate(case.act):
        m = case.reserve + a
        for u in case.units:
            if u.resident or u.load_at <= i <= u.release_after:
                m += u.bytes
        out.append(m)
    return out


def brute_steady(case: Case, carry: tuple[int | None, ...]) -> tuple[int, int]:
    """Peak of a call after the first (its tail holding the next call's carried units) and the
    bytes allocated between two calls."""
    n = len(case.act)
    cold = brute_cold(case)
    peak = 0
    for i in range(n):
        m = cold[i]
        for u, c in zip(case.units, carry, strict=True):
            if c is not None and c <= i:
                m += u.bytes
        peak = max(peak, m)
    boundary = (
        case.reserve
        + case.act[-1]
        + sum(u.bytes for u, c in zip(case.units, carry, strict=True) if u.resident or c is not None)
    )
    return max(peak, boundary), boundary


def brute_time(case: Case, carry: tuple[int | None, ...], calls: int = 3) -> list[float]:
    """Stall of each call, stepping ops one by one with a FIFO copy engine."""
    n = len(case.op_ms)
    clock = 0.0
    copy_free = 0.0
    ready: dict[tuple[int, int], float] = {}
    stalls = []

    def issue(key: tuple[int, int], nbytes: int) -> None:
        nonlocal copy_free
        begin = max(clock, copy_free)
        copy_free = begin + nbytes / (case.h2d * 1e9) * 1e3
        ready[key] = copy_free

    for j in range(calls):
        stall = 0.0
        for i in range(n + 1):  # slot n: the end of the call
            # this call's own loads first, then the loads it carries for the next call
            for k, u in enumerate(case.units):
                if i < n and not u.resident and u.load_at == i and (carry[k] is None or j == 0):
                    issue((j, k), u.bytes)
            for k, u in enumerate(case.units):
                if not u.resident and carry[k] == i and j + 1 < calls:
                    issue((j + 1, k), u.bytes)
            if i == n:
                break
            for k, u in enumerate(case.units):
                if not u.resident and u.wait_at == i and ready[(j, k)] > clock:
                    stall += ready[(j, k)] - clock
                    clock = ready[(j, k)]
            clock += case.op_ms[i]
        stalls.append(stall)
    return stalls


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(2, 24))
    k = draw(st.integers(1, 6))
    first = sorted(draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k)))
    last = [draw(st.integers(f, n - 1)) for f in first]
    sizes = draw(st.lists(st.integers(1, 50), min_size=k, max_size=k))
    resident = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    depth = draw(st.integers(0, k))
    units = _windows(first, last, sizes, resident, depth)
    act = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    op_ms = draw(st.lists(st.floats(0.01, 5.0), min_size=n, max_size=n))
    reserve = draw(st.integers(0, 5))
    base = Case(act, units, depth, reserve, op_ms, 1.0, 0)
    cold_peak = max(brute_cold(base))
    budget = cold_peak + draw(st.integers(0, sum(sizes)))
    # h2d in GB/s: a unit of 50 bytes takes 50 / (h2d * 1e6) ms; pick rates that make copies
    # comparable to the ops' times.
    h2d = draw(st.sampled_from([1e-6, 1e-5, 1e-4]))
    return Case(act, units, depth, reserve, op_ms, h2d, budget)


def _costs(case: Case) -> OpCosts:
    return OpCosts.from_op_ms(case.op_ms)


@given(cases())
def test_steady_state_memory_matches_brute_force_and_fits(case: Case) -> None:
    ws = plan_warm_start(case.act, case.units, case.reserve, case.budget, case.depth, _costs(case), case.h2d)
    cold = max(brute_cold(case))
    event("warm start" if ws.enabled else "cold")
    if not ws.enabled:
        assert ws.peak_bytes == cold
        return
    peak, boundary = brute_steady(case, ws.carry_at)
    assert ws.peak_bytes == peak
    assert ws.boundary_bytes == boundary
    assert peak <= case.budget
    # where: the first op reaching the peak, or len(act) when only the boundary does
    cold_ops = brute_cold(case)
    per_op = [
        m + sum(u.bytes for u, c in zip(case.units, ws.carry_at, strict=True) if c is not None and c <= i)
        for i, m in enumerate(cold_ops)
    ]
    assert ws.peak_op == (len(per_op) if boundary > max(per_op) else per_op.index(max(per_op)))
    for u, c in zip(case.units, ws.carry_at, strict=True):
        if c is not None:
            # only the head units, carried after their own release in the same call
            assert not u.resident and u.load_at == 0 and c > u.release_after


@given(cases())
def test_steady_state_time_matches_brute_force(case: Case) -> None:
    ws = plan_warm_start(case.act, case.units, case.reserve, case.budget, case.depth, _costs(case), case.h2d)
    total = sum(case.op_ms)
    cold_stall = brute_time(case, (None,) * len(case.units))[1]
    assert ws.cold.step_ms == pytest.approx(total + cold_stall, rel=1e-9, abs=1e-9)
    if ws.enabled:
        warm_stall = brute_time(case, ws.carry_at)[1]
        assert ws.report.step_ms == pytest.approx(total + warm_stall, rel=1e-9, abs=1e-9)
        assert warm_stall < cold_stall  # kept only when the steady call is faster


@given(cases(), st.data())
def test_simulate_steady_for_any_carry_points(case: Case, data: st.DataObject) -> None:
    n = len(case.act)
    carry = tuple(
        data.draw(st.one_of(st.none(), st.integers(u.release_after + 1, n)))
        if not u.resident and u.load_at == 0 and u.release_after + 1 <= n
        else None
        for u in case.units
    )
    report = simulate_steady(_costs(case), case.units, carry, case.h2d)
    stall = brute_time(case, carry)[1]
    assert report.stall_ms == pytest.approx(stall, rel=1e-9, abs=1e-9)
    assert report.step_ms == pytest.approx(sum(case.op_ms) + stall, rel=1e-9, abs=1e-9)


def test_a_cold_start_stall_is_hidden_in_the_previous_tail() -> None:
    # embed (resident, 1 op), three swapped blocks of 4 ops each, head (resident, 1 op); depth 1.
    first = [0, 1, 5, 9, 13]
    last = [0, 4, 8, 12, 13]
    sizes = [10, 100, 100, 100, 10]
    resident = [True, False, False, False, True]
    units = _windows(first, last, sizes, resident, 2)
    act = [5] * 14
    op_ms = [0.25] * 14  # a block computes in 1 ms; its copy takes 1 ms at this rate
    h2d = 1e-4
    cold_peak = max(brute_cold(Case(act, units, 2, 0, op_ms, h2d, 0)))
    ws = plan_warm_start(act, units, 0, cold_peak, 2, OpCosts.from_op_ms(op_ms), h2d)
    assert ws.enabled and ws.carry_at[1] is not None
    assert ws.report.stall_ms < ws.cold.stall_ms
    assert ws.peak_bytes <= cold_peak
    # No room at all beside the cold peak's tail and boundary: every call stays cold.
    tight = plan_warm_start(act, units, 0, 0, 2, OpCosts.from_op_ms(op_ms), h2d)
    assert not tight.enabled and tight.report == tight.cold


def test_depth_zero_has_nothing_to_carry() -> None:
    units = _windows([0, 2], [1, 3], [10, 10], [False, False], 0)
    ws = plan_warm_start([1, 1, 1, 1], units, 0, 10**6, 0, OpCosts.from_op_ms([1.0] * 4), 1e-6)
    assert not ws.enabled
