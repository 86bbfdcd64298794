"""passes/planner.py, table-driven: edge cases, budgets at the minimum, depth and placement choices,
planning speed. The other passes have their own files (test_partition, test_schedule, test_liveness,
test_simulate, test_validate); options and the plan record: test_options, test_swapplan, test_plan_json."""

from __future__ import annotations

import dataclasses
import itertools
import time

import pytest

from fxswap.errors import BudgetInfeasibleError
from fxswap.ir import GraphIR
from fxswap.passes.liveness import analyse_liveness
from fxswap.passes.planner import build_plan, candidate_partitions, mode_min_vram_bytes
from fxswap.passes.schedule import fill_resident, prepare_partition
from fxswap.passes.simulate import op_costs, simulate_time
from fxswap.passes.validate import validate_plan
from fxswap.swapplan import MODES, PlanOptions
from tests.graphs import OpSpec, build_graph, chain_graph, transformer_graph

MiB = 2**20
GiB = 2**30


def opts(mode: str = "adaptive", budget: int = 4 * GiB, **kw: object) -> PlanOptions:
    kw.setdefault("reserve_bytes", 0)
    return PlanOptions(mode=mode, max_vram_bytes=budget, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("mode", MODES)
def test_everything_fits_all_resident_nothing_moved(mode: str) -> None:
    g = chain_graph(3)
    plan = build_plan(g, opts(mode, 8 * GiB, block_size_bytes=150 * MiB))
    assert all(u.resident for u in plan.units)
    assert plan.moved_bytes_per_call == 0 and plan.swapped_bytes == 0
    assert plan.predicted_stall_ms == 0.0
    assert plan.resident_bytes == g.weight_bytes
    assert all(u.load_at is None and u.wait_at is None and u.release_after is None for u in plan.units)


@pytest.mark.parametrize("mode", MODES)
def test_one_tensor_larger_than_budget_is_infeasible(mode: str) -> None:
    g = chain_graph(2, weight_bytes=3 * GiB, act_bytes=MiB)
    with pytest.raises(BudgetInfeasibleError) as info:
        build_plan(g, opts(mode, 2 * GiB, reserve_bytes=256 * MiB))
    err = info.value
    assert err.mode == mode
    assert err.min_vram_bytes >= 3 * GiB + 256 * MiB
    msg = str(err)
    assert f"{err.min_vram_bytes / GiB:.2f} GiB" in msg and f"{err.min_vram_bytes} bytes" in msg
    assert "max_vram_gb" in msg


@pytest.mark.parametrize("mode", MODES)
def test_zero_weight_graph(mode: str) -> None:
    g = build_graph([], [OpSpec((), 10 * MiB), OpSpec((), 20 * MiB, end=2), OpSpec((), 5 * MiB)])
    plan = build_plan(g, opts(mode, GiB, reserve_bytes=MiB))
    assert plan.units == () and plan.weight_bytes == 0
    # op1: buffers of op0 (ends at op1) and op1 are live
    assert plan.peak_bytes == MiB + 30 * MiB == plan.min_vram_bytes


def test_empty_graph_plans_to_reserve_only() -> None:
    plan = build_plan(build_graph([], []), opts("adaptive", GiB, reserve_bytes=3))
    assert plan.peak_bytes == 3 and plan.peak_op == "" and plan.units == ()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reserve", [0, 256 * MiB])
def test_budget_exactly_at_minimum(mode: str, reserve: int) -> None:
    g = chain_graph(4, weight_bytes=200 * MiB, act_bytes=30 * MiB)
    o = opts(mode, 64 * GiB, reserve_bytes=reserve, block_size_bytes=300 * MiB)
    low = mode_min_vram_bytes(g, o)
    plan = build_plan(g, dataclasses.replace(o, max_vram_bytes=low))
    assert plan.peak_bytes <= low and plan.min_vram_bytes == low
    with pytest.raises(BudgetInfeasibleError) as info:
        build_plan(g, dataclasses.replace(o, max_vram_bytes=low - 1))
    assert info.value.min_vram_bytes == low


def test_infeasible_message_suggests_other_modes() -> None:
    g = chain_graph(4, sublayers=("attn", "ffn", "norm"), weight_bytes=200 * MiB, act_bytes=MiB)
    o = opts("layerwise", 64 * GiB)
    low = mode_min_vram_bytes(g, o)
    with pytest.raises(BudgetInfeasibleError, match="mode='adaptive'"):
        build_plan(g, dataclasses.replace(o, max_vram_bytes=low - 1))


def test_tight_budget_swaps_and_stays_within() -> None:
    g = chain_graph(6, weight_bytes=100 * MiB, act_bytes=20 * MiB)
    plan = build_plan(g, opts("layerwise", 1000 * MiB))
    assert any(not u.resident for u in plan.units) and any(u.resident for u in plan.units)
    assert plan.peak_bytes <= 1000 * MiB
    assert plan.moved_bytes_per_call == plan.swapped_bytes > 0
    validate_plan(g, plan)


def test_fixed_modes_use_only_depths_that_fit() -> None:
    g = chain_graph(6, weight_bytes=100 * MiB, act_bytes=0, embed_bytes=0, head_bytes=0)
    # one block is 200 MiB; depth d keeps up to d+1 blocks in memory at a block boundary
    for mode in ("layerwise", "chunkwise"):
        assert build_plan(g, opts(mode, 400 * MiB, max_prefetch_depth=2)).prefetch_depth <= 1
        assert build_plan(g, opts(mode, 200 * MiB, max_prefetch_depth=2)).prefetch_depth == 0


def _schedule_ms(
    g: GraphIR, o: PlanOptions, depth: int, placement: str = "front"
) -> tuple[float, int] | None:
    """(predicted ms, resident bytes) of one candidate of the mode's first partition; None if it
    does not fit."""
    live = analyse_liveness(g)
    (label, units), *_ = candidate_partitions(o.mode, live.order, dict(live.nbytes), o.block_size_bytes)
    part = prepare_partition(label, units, live, o.reserve_bytes)
    sched = fill_resident(part, depth, o.max_vram_bytes, placement)
    if sched is None:
        return None
    costs = op_costs(g.ops, o.compute_tflops, o.device_mem_gbps)
    return simulate_time(costs, sched.windows(), o.h2d_gbps).step_ms, sched.resident_bytes


@pytest.mark.parametrize("mode", ["layerwise", "chunkwise"])
def test_fixed_modes_pick_depth_by_time_not_largest_that_fits(mode: str) -> None:
    # At 600 MiB depth 2 fits only with nothing resident (3 blocks in flight); depth 1 keeps a block
    # resident and moves 200 MiB less per call. The old rule "largest depth that fits" took depth 2.
    g = chain_graph(6, weight_bytes=100 * MiB, act_bytes=0, embed_bytes=0, head_bytes=0)
    o = opts(mode, 600 * MiB, max_prefetch_depth=2)
    deepest = _schedule_ms(g, o, 2)
    assert deepest is not None and deepest[1] == 0
    plan = build_plan(g, o)
    assert plan.prefetch_depth < 2 and plan.resident_bytes > 0
    assert plan.predicted_step_ms < deepest[0]
    validate_plan(g, plan)


def test_spread_placement_hides_copies_behind_resident_compute() -> None:
    # Copy-bound: each 100 MiB copy (~4.8 ms at 22 GB/s) outlasts a block's compute (2 ms), so
    # swapped blocks bunched at the end (front placement) stall on every copy; spread among resident
    # blocks, a few units of prefetch depth overlap each copy with the resident blocks before it.
    g = chain_graph(24, sublayers=("w",), weight_bytes=100 * MiB, act_bytes=0, flops=1.5e11)
    o = opts("layerwise", 1800 * MiB, max_prefetch_depth=8)
    front = min(t for d in range(9) if (t := _schedule_ms(g, o, d, "front")) is not None)
    spread = min(t for d in range(9) if (t := _schedule_ms(g, o, d, "spread")) is not None)
    assert spread[0] < 0.9 * front[0]
    plan = build_plan(g, o)
    assert plan.predicted_step_ms <= spread[0] + 1e-9
    swapped = [k for k, u in enumerate(plan.units) if not u.resident]
    assert len(swapped) >= 2 and max(b - a for a, b in itertools.pairwise(swapped)) > 1  # not bunched
    validate_plan(g, plan)


# ---------------------------------------------------------------- speed (printed, not asserted)


def test_build_plan_time_on_14b_sized_graph(capsys: pytest.CaptureFixture[str]) -> None:
    g = transformer_graph()
    assert 6_500 <= len(g.ops) <= 7_500 and 1_000 <= len(g.weights) <= 1_200
    times = {}
    for mode in MODES:
        t0 = time.perf_counter()
        plan = build_plan(g, PlanOptions.from_user(mode=mode, max_vram_gb=16))
        times[mode] = time.perf_counter() - t0
        assert plan.peak_bytes <= 16 * GiB
    with capsys.disabled():
        print(
            f"\nbuild_plan on {len(g.ops)} ops / {len(g.weights)} weights, 16 GiB: "
            + ", ".join(f"{m} {t * 1e3:.0f} ms" for m, t in times.items())
        )
