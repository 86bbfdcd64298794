"""Table-driven planner tests: edge cases, partitions, schedules, options, errors, the simulators."""

from __future__ import annotations

import dataclasses
import itertools
import time

import pytest

from fxswap.errors import BudgetInfeasibleError, PlanError
from fxswap.ir import GraphIR
from fxswap.passes.liveness import activation_profile, analyse_liveness
from fxswap.passes.partition import block_key, partition_chunkwise, partition_layerwise
from fxswap.passes.planner import build_plan, candidate_partitions, mode_min_vram_bytes
from fxswap.passes.schedule import fill_resident, prepare_partition, spread_rank
from fxswap.passes.simulate import UnitWindow, load_points, op_costs, simulate_memory, simulate_time
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


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 40, 41, 566])
def test_spread_rank_is_a_permutation_with_evenly_spaced_prefixes(n: int) -> None:
    rank = spread_rank(n)
    assert sorted(rank) == list(range(n))
    for r in range(1, n + 1):
        chosen = sorted(k for k in range(n) if rank[k] < r)
        gaps = [b - a for a, b in itertools.pairwise([*chosen, chosen[0] + n])]
        assert max(gaps) <= 2 * -(-n // r), (n, r, gaps)  # no gap more than twice the even spacing


# ---------------------------------------------------------------- partitions


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("blocks.3.self_attn.q.weight", "blocks.3"),
        ("layers.0.weight", "layers.0"),
        ("0.weight", "0"),
        ("head.head.weight", "head"),
        ("text_embedding.0.weight", "text_embedding.0"),
        ("pos_embed", "pos_embed"),
    ],
)
def test_block_key(name: str, key: str) -> None:
    assert block_key(name) == key


def test_layerwise_units_per_block_and_top_module() -> None:
    g = chain_graph(3)
    live = analyse_liveness(g)
    units = partition_layerwise(live.order, dict(live.nbytes))
    assert [u.name for u in units] == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert units[1].params == ("blocks.0.attn.weight", "blocks.0.ffn.weight")


def test_layerwise_without_numbered_containers() -> None:
    sizes = {"conv1.weight": 1, "conv1.bias": 1, "fc.weight": 2, "scale": 3}
    units = partition_layerwise(list(sizes), sizes)
    assert [(u.name, u.bytes) for u in units] == [("conv1", 2), ("fc", 2), ("scale", 3)]


@pytest.mark.parametrize(
    ("block", "names"),
    [
        (1000 * MiB, ["embed..head"]),
        (300 * MiB, ["embed..blocks.0", "blocks.1", "blocks.2..head"]),
        (249 * MiB, ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]),
        (450 * MiB, ["embed..blocks.1", "blocks.2..head"]),
        (150 * MiB, ["embed", *[f"blocks.{b}.{s}" for b in range(3) for s in ("attn", "ffn")], "head"]),
    ],
)
def test_chunkwise_cuts(block: int, names: list[str]) -> None:
    g = chain_graph(3, weight_bytes=100 * MiB, embed_bytes=50 * MiB, head_bytes=50 * MiB)
    live = analyse_liveness(g)
    units = partition_chunkwise(live.order, dict(live.nbytes), block)
    assert [u.name for u in units] == names
    assert all(u.bytes <= block for u in units)
    assert [p for u in units for p in u.params] == list(live.order)


def test_chunkwise_numbered_range_and_oversized() -> None:
    sizes = {f"blocks.{b}.w": 10 for b in range(6)} | {"big.weight": 500, "big.bias": 1}
    order = [*sizes]
    units = partition_chunkwise(order, sizes, 30)
    assert [u.name for u in units] == ["blocks.0-2", "blocks.3-5", "big.weight", "big.bias"]
    assert [u.oversized for u in units] == [False, False, True, False]


def test_chunkwise_recurses_into_children() -> None:
    sizes = {"blocks.0.ffn.0.weight": 60, "blocks.0.ffn.2.weight": 60, "blocks.0.attn.q": 30}
    units = partition_chunkwise(list(sizes), sizes, 70)
    assert [u.name for u in units] == ["blocks.0.ffn.0", "blocks.0.ffn.2", "blocks.0.attn"]


def test_oversized_tensor_reported_in_summary() -> None:
    g = chain_graph(2, weight_bytes=400 * MiB)
    plan = build_plan(g, opts("chunkwise", 2 * GiB, block_size_bytes=300 * MiB))
    over = [u for u in plan.units if u.oversized]
    assert len(over) == 4
    assert "oversized: blocks.0.attn.weight" in plan.summary()


# ---------------------------------------------------------------- schedule details


def test_prefetch_load_points() -> None:
    assert load_points([2, 5, 9, 12], 0) == [2, 5, 9, 12]
    assert load_points([2, 5, 9, 12], 1) == [0, 2, 5, 9]
    assert load_points([2, 5, 9, 12], 2) == [0, 0, 2, 5]


def test_swapped_unit_points_follow_prefetch_rule() -> None:
    g = chain_graph(5, weight_bytes=100 * MiB, act_bytes=0, embed_bytes=0, head_bytes=0)
    plan = build_plan(g, opts("layerwise", 600 * MiB, max_prefetch_depth=1))
    units = plan.units
    assert plan.prefetch_depth == 1
    for k, u in enumerate(units):
        if u.resident:
            continue
        assert u.wait_at == u.first_use and u.release_after == u.last_use
        assert u.load_at == (units[k - 1].first_use if k >= 1 else 0)
        assert u.wait_node == g.ops[u.first_use].name


def test_greedy_keeps_largest_units_resident_first() -> None:
    sizes = [("a.w", 100 * MiB), ("b.w", 300 * MiB), ("c.w", 200 * MiB)]
    g = build_graph(sizes, [OpSpec(("a.w",)), OpSpec(("b.w",)), OpSpec(("c.w",))])
    plan = build_plan(g, opts("layerwise", 500 * MiB, max_prefetch_depth=0))
    assert {u.name: u.resident for u in plan.units} == {"a": False, "b": True, "c": False}


def test_shared_weight_is_live_from_first_to_last_use() -> None:
    sizes = [("emb.w", 100 * MiB), ("blocks.0.w", 100 * MiB), ("blocks.1.w", 100 * MiB)]
    ops = [OpSpec(("emb.w",)), OpSpec(("blocks.0.w",)), OpSpec(("blocks.1.w",)), OpSpec(("emb.w",))]
    g = build_graph(sizes, ops)
    plan = build_plan(g, opts("layerwise", 250 * MiB, max_prefetch_depth=0))
    emb = next(u for u in plan.units if u.name == "emb")
    assert (emb.first_use, emb.last_use) == (0, 3)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "blockwise"),
        ("max_vram_bytes", 0),
        ("max_vram_bytes", 1.5),
        ("block_size_bytes", -1),
        ("reserve_bytes", -1),
        ("max_prefetch_depth", -1),
        ("max_prefetch_depth", True),
        ("h2d_gbps", 0.0),
        ("compute_tflops", float("nan")),
        ("device_mem_gbps", float("inf")),
    ],
)
def test_plan_options_validation_names_field(field: str, value: object) -> None:
    kw: dict[str, object] = {"max_vram_bytes": GiB, field: value}
    with pytest.raises(ValueError, match=f"`{field}` is") as info:
        PlanOptions(**kw)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"max_vram_gb": 0}, "max_vram_gb"),
        ({"max_vram_gb": 16, "block_size_mb": -3}, "block_size_mb"),
        ({"max_vram_gb": 16, "reserve_mb": -1}, "reserve_mb"),
        ({"max_vram_gb": "16"}, "max_vram_gb"),
    ],
)
def test_from_user_validation_names_user_argument(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        PlanOptions.from_user(**kw)  # type: ignore[arg-type]


def test_from_user_uses_binary_units() -> None:
    o = PlanOptions.from_user(mode="layerwise", max_vram_gb=16, block_size_mb=300, reserve_mb=256)
    assert o.max_vram_bytes == 16 * GiB and o.block_size_bytes == 300 * MiB and o.reserve_bytes == 256 * MiB
    assert o.mode == "layerwise" and isinstance(o.h2d_gbps, float)


# ---------------------------------------------------------------- summary


def test_summary_states_units_traffic_peak_min_and_time() -> None:
    g = chain_graph(6, weight_bytes=100 * MiB, act_bytes=20 * MiB)
    plan = build_plan(g, opts("layerwise", 700 * MiB))
    s = plan.summary()
    n_swapped = sum(not u.resident for u in plan.units)
    assert f"units: {len(plan.units)} ({len(plan.units) - n_swapped} resident, {n_swapped} swapped)" in s
    # a 700 MiB budget: the summary prints every size in MiB
    assert f"resident {plan.resident_bytes / MiB:.2f} MiB" in s
    assert f"moved per call {plan.moved_bytes_per_call / MiB:.2f} MiB" in s
    assert f"peak {plan.peak_bytes / MiB:.2f} MiB" in s and f"budget {plan.max_vram_bytes / MiB:.2f} MiB" in s
    assert f"minimum budget for mode layerwise with this input: {plan.min_vram_bytes / MiB:.2f} MiB" in s
    assert f"predicted step {plan.predicted_step_ms:.1f} ms" in s


# ---------------------------------------------------------------- graph errors and validation


def test_weight_no_op_reads_is_still_planned() -> None:
    g = build_graph([("a.w", 10), ("b.w", 20)], [OpSpec(("a.w",)), OpSpec(())])
    assert [w.name for w in g.weights] == ["a.w", "b.w"]
    # NOTE: an unread unit is placed at op 0 (conservative: it costs memory there, never time)
    plan = build_plan(g, opts("layerwise", 30, max_prefetch_depth=0))
    b = next(u for u in plan.units if u.name == "b")
    assert (b.first_use, b.last_use) == (0, 0)
    validate_plan(g, plan)
    assert plan.min_vram_bytes == 30


def test_op_reading_unknown_weight_names_op() -> None:
    g = build_graph([("a.w", 1)], [OpSpec(("a.w",)), OpSpec(("ghost.w",))])
    with pytest.raises(PlanError, match=r"op 1 \('op1'\) reads weight 'ghost.w'"):
        build_plan(g, opts())


def test_validator_names_op_and_unit_for_use_before_wait() -> None:
    g = chain_graph(4, weight_bytes=100 * MiB, act_bytes=0)
    plan = build_plan(g, opts("layerwise", 500 * MiB))
    k, u = next((k, u) for k, u in enumerate(plan.units) if not u.resident)
    assert u.wait_at is not None
    late = dataclasses.replace(u, wait_at=u.wait_at + 1, wait_node=g.ops[u.wait_at + 1].name)
    bad = dataclasses.replace(plan, units=plan.units[:k] + (late,) + plan.units[k + 1 :])
    with pytest.raises(PlanError, match=rf"op {u.wait_at} \('{g.ops[u.wait_at].name}'\).*unit '{u.name}'"):
        validate_plan(g, bad)


def test_validator_names_unit_and_ops_for_a_wrong_use_range() -> None:
    g = chain_graph(4, weight_bytes=100 * MiB, act_bytes=0)
    plan = build_plan(g, opts("layerwise", 500 * MiB))
    k, u = 1, plan.units[1]
    shifted = dataclasses.replace(u, first_use=u.first_use + 1)
    bad = dataclasses.replace(plan, units=plan.units[:k] + (shifted,) + plan.units[k + 1 :])
    where = rf"op {u.first_use} \('{g.ops[u.first_use].name}'\)"
    with pytest.raises(PlanError, match=rf"unit '{u.name}'.*{where}"):
        validate_plan(g, bad)


def test_validator_names_op_and_unit_for_use_after_release() -> None:
    g = chain_graph(4, weight_bytes=100 * MiB, act_bytes=0)
    plan = build_plan(g, opts("layerwise", 500 * MiB))
    k, u = next((k, u) for k, u in enumerate(plan.units) if not u.resident and u.last_use > u.first_use)
    assert u.release_after is not None
    early = dataclasses.replace(
        u, release_after=u.release_after - 1, release_node=g.ops[u.release_after - 1].name
    )
    bad = dataclasses.replace(plan, units=plan.units[:k] + (early,) + plan.units[k + 1 :])
    with pytest.raises(
        PlanError, match=rf"after its release.*unit '{u.name}'|unit '{u.name}'.*after its release"
    ):
        validate_plan(g, bad)


def test_validator_refuses_over_budget_and_lost_weights() -> None:
    g = chain_graph(4, weight_bytes=100 * MiB, act_bytes=0)
    plan = build_plan(g, opts("layerwise", 500 * MiB))
    with pytest.raises(PlanError, match="exceeds the budget"):
        validate_plan(g, dataclasses.replace(plan, max_vram_bytes=plan.peak_bytes - 1))
    with pytest.raises(PlanError, match="is in no unit"):
        validate_plan(g, dataclasses.replace(plan, units=plan.units[1:]))


# ---------------------------------------------------------------- simulators by hand


def test_simulate_memory_by_hand() -> None:
    act = [1, 2, 3, 0]
    units = [UnitWindow(10, True), UnitWindow(5, False, 0, 1, 1), UnitWindow(7, False, 1, 2, 3)]
    tl = simulate_memory(act, units, reserve_bytes=100)
    assert tl.swapped == (5, 12, 7, 7)
    assert [tl.total(i) for i in range(4)] == [116, 124, 120, 117]
    assert (tl.peak_bytes, tl.peak_op) == (124, 1)
    assert "<- peak" in tl.to_table(["a", "b", "c", "d"])


def test_activation_profile_by_hand() -> None:
    g = build_graph([], [OpSpec((), 4, end=2), OpSpec((), 8), OpSpec((), 16)], input_bytes=1)
    assert activation_profile(g) == (1 + 4, 1 + 4 + 8, 4 + 8 + 16)


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


def test_byte_formatting_picks_a_readable_unit() -> None:
    from fxswap.swapplan import byte_unit, format_bytes

    assert format_bytes(512) == "512 B"
    assert format_bytes(300 * 2**20) == "300.00 MiB"
    assert format_bytes(int(15.82 * 2**30)) == "15.82 GiB"
    assert byte_unit(2**20 - 1) == ("KiB", 2**10)
