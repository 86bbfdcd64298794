"""passes/simulate.py: load points, memory and time simulated on graphs small enough to check by hand."""

from __future__ import annotations

import pytest

from fxswap.passes.simulate import UnitWindow, load_points, op_costs, simulate_memory, simulate_time
from tests.graphs import OpSpec, build_graph


def test_prefetch_load_points() -> None:
    assert load_points([2, 5, 9, 12], 0) == [2, 5, 9, 12]
    assert load_points([2, 5, 9, 12], 1) == [0, 2, 5, 9]
    assert load_points([2, 5, 9, 12], 2) == [0, 0, 2, 5]


def test_simulate_memory_by_hand() -> None:
    act = [1, 2, 3, 0]
    units = [UnitWindow(10, True), UnitWindow(5, False, 0, 1, 1), UnitWindow(7, False, 1, 2, 3)]
    tl = simulate_memory(act, units, reserve_bytes=100)
    assert tl.swapped == (5, 12, 7, 7)
    assert [tl.total(i) for i in range(4)] == [116, 124, 120, 117]
    assert (tl.peak_bytes, tl.peak_op) == (124, 1)
    assert "<- peak" in tl.to_table(["a", "b", "c", "d"])


def test_simulate_time_by_hand() -> None:
    # 3 ops of 1 ms each (1e6 flops at 1e9 FLOP/s); copies at 1 GB/s: 1e6 bytes = 1 ms
    g = build_graph([], [OpSpec((), flops=1e6), OpSpec((), flops=1e6), OpSpec((), flops=1e6)])
    costs = op_costs(g.ops, compute_tflops=1e-3, device_mem_gbps=1.0)
    assert costs.prefix_ms == pytest.approx((0.0, 1.0, 2.0, 3.0))
    # unit A (2 ms copy) issued at op 0, waited at op 1; unit B (1 ms) issued at op 0, waited at op 2
    units = [UnitWindow(2_000_000, False, 0, 1, 1), UnitWindow(1_000_000, False, 0, 2, 2)]
    rep = simulate_time(costs, units, h2d_gbps=1.0)
    assert rep.load_start_ms == pytest.approx((0.0, 2.0)) and rep.load_end_ms == pytest.approx((2.0, 3.0))
    # A: compute reaches op 1 at 1 ms, stalls 1 ms; B: compute reaches op 2 at 3 ms, no stall
    assert rep.stall_ms == pytest.approx(1.0) and rep.step_ms == pytest.approx(4.0)
    assert rep.moved_bytes == 3_000_000
