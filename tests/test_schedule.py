"""passes/schedule.py: placement order of swapped units, load points, the greedy resident fill."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

from fxswap.ir import GraphIR
from fxswap.passes.planner import build_plan, mode_min_vram_bytes
from fxswap.passes.schedule import block_windows, spread_rank
from fxswap.swapplan import PlanOptions
from tests.graphs import OpSpec, build_graph, chain_graph

MiB = 2**20
GiB = 2**30


def opts(mode: str = "adaptive", budget: int = 4 * GiB, **kw: object) -> PlanOptions:
    kw.setdefault("reserve_bytes", 0)
    return PlanOptions(mode=mode, max_vram_bytes=budget, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 40, 41, 566])
def test_spread_rank_is_a_permutation_with_evenly_spaced_prefixes(n: int) -> None:
    rank = spread_rank(n)
    assert sorted(rank) == list(range(n))
    for r in range(1, n + 1):
        chosen = sorted(k for k in range(n) if rank[k] < r)
        gaps = [b - a for a, b in itertools.pairwise([*chosen, chosen[0] + n])]
        assert max(gaps) <= 2 * -(-n // r), (n, r, gaps)  # no gap more than twice the even spacing


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


# ------------------------------------------------------------------------------- align_blocks
def _blocks_graph() -> tuple[GraphIR, list[str]]:
    """embed, three blocks of five ops (norm, up, act, down, residual add), head; modules by hand.

    Op indices: embed 0; block b: norm 1+5b, up 2+5b, act 3+5b (no module), down 4+5b, add 5+5b;
    head 16.
    """
    weights = [("embed.w", 8 * MiB), ("head.w", 8 * MiB)]
    ops = [OpSpec(("embed.w",), MiB, module="embed")]
    for b in range(3):
        weights += [(f"blocks.{b}.up.w", 16 * MiB), (f"blocks.{b}.down.w", 16 * MiB)]
        ops += [
            OpSpec((), MiB, module=f"blocks.{b}.norm"),
            OpSpec((f"blocks.{b}.up.w",), 2 * MiB, module=f"blocks.{b}.up"),
            OpSpec((), 2 * MiB, module=""),
            OpSpec((f"blocks.{b}.down.w",), MiB, module=f"blocks.{b}.down"),
            OpSpec((), MiB, module=f"blocks.{b}"),
        ]
    ops.append(OpSpec(("head.w",), MiB, module="head"))
    ir = build_graph(weights, ops, input_bytes=MiB)
    return ir, [op.name for op in ir.ops]


def _brute_peak(ir: GraphIR, plan: Any) -> int:
    """The plan's memory at every op, summed from scratch: reserve, resident units, swapped units
    from their load to their release, and every activation buffer over its live range."""
    peak = 0
    for i in range(len(ir.ops)):
        total = plan.reserve_bytes
        for u in plan.units:
            if u.resident or (u.load_at <= i <= u.release_after):
                total += u.bytes
        total += sum(b.nbytes for b in ir.buffers if b.start <= i <= b.end)
        peak = max(peak, total)
    return peak


def test_align_blocks_waits_and_releases_at_the_edges_of_a_whole_block_unit() -> None:
    ir, names = _blocks_graph()
    opts = PlanOptions(mode="layerwise", max_vram_bytes=90 * MiB, reserve_bytes=0, warm_start=False)
    exact = build_plan(ir, opts)
    aligned = build_plan(ir, opts, align_blocks=True)
    swapped = [u for u in aligned.units if not u.resident and u.name.startswith("blocks.")]
    assert swapped, "the budget must swap at least one block"
    for u in swapped:
        b = int(u.name.split(".")[1])
        # the reads are unchanged (up at 2+5b, down at 4+5b) ...
        assert (u.first_use, u.last_use) == (2 + 5 * b, 4 + 5 * b)
        # ... the wait and the release move to the block's first op (norm) and last op (add)
        assert (u.wait_node, u.release_node) == (names[1 + 5 * b], names[5 + 5 * b])
        # and a load is issued at op 0 or at the first op of a block, never inside one
        assert u.load_at in (0, 1, 6, 11)
    for u in exact.units:
        if not u.resident and u.name.startswith("blocks."):
            b = int(u.name.split(".")[1])
            assert (u.wait_node, u.release_node) == (names[2 + 5 * b], names[4 + 5 * b])
    # the plan pays for the wider windows: its peak is the one summed here, within the budget
    assert _brute_peak(ir, aligned) == aligned.peak_bytes <= opts.max_vram_bytes


def test_align_blocks_moves_units_that_share_a_block_to_its_edges_too() -> None:
    # Chunkwise at 16 MiB cuts each block into its two weights. Aligned, both are held over their
    # whole block: every swapped unit's wait is at its block's first op (norm), its release after
    # the block's last (add), whichever weight it is, so no swap op is left inside a block.
    ir, names = _blocks_graph()
    opts = PlanOptions(
        mode="chunkwise",
        max_vram_bytes=50 * MiB,
        block_size_bytes=16 * MiB,
        reserve_bytes=0,
        warm_start=False,
    )
    aligned = build_plan(ir, opts, align_blocks=True)
    exact = build_plan(ir, opts)
    swapped = [u for u in aligned.units if not u.resident and u.name.startswith("blocks.")]
    assert any(".up" in u.name for u in swapped) and any(".down" in u.name for u in swapped)
    for u in swapped:
        b = int(u.name.split(".")[1])
        assert (u.wait_node, u.release_node) == (names[1 + 5 * b], names[5 + 5 * b])
        assert u.load_at in (0, 1, 6, 11)
    # the exact plan waits for `down` at op 4+5b, inside the block
    assert any(
        u.wait_node == names[4 + 5 * int(u.name.split(".")[1])]
        for u in exact.units
        if not u.resident and ".down" in u.name
    )
    assert _brute_peak(ir, aligned) == aligned.peak_bytes <= opts.max_vram_bytes


def test_block_windows_by_hand() -> None:
    blocks = ["", "b.0", "b.0", "b.0", "b.1", "b.1", "b.2", "b.2", ""]
    # unit A reads op 2 only (alone in b.0), B reads 4..7 (alone in b.1 and b.2), C reads op 8
    assert block_windows(blocks, [2, 4, 8], [2, 7, 8], [True] * 3) == [(1, 3), (4, 7), (8, 8)]
    # two units in b.0: both widen to the whole block; an unused unit (0, 0) keeps its window
    assert block_windows(blocks, [0, 1, 3], [0, 2, 3], [False, True, True]) == [(0, 0), (1, 3), (1, 3)]
    # a unit read from b.0 into the head (op 8, outside any block) widens at its block end only
    assert block_windows(blocks, [2], [8], [True]) == [(1, 8)]


def test_align_blocks_never_costs_a_budget_the_exact_positions_fit() -> None:
    # All swapped, depth 0, by hand: the exact windows hold a block's 32 MiB from its `up` to its
    # `down`; widened, over its whole block. Budgets from the exact minimum up: the aligned request
    # always plans (the exact positions where the widened windows do not fit), within the budget
    # by the brute-force sum.
    ir, names = _blocks_graph()
    base = PlanOptions(mode="layerwise", max_vram_bytes=1, reserve_bytes=0, warm_start=False)
    low = mode_min_vram_bytes(ir, base)
    for budget in range(low, low + 4 * MiB, MiB // 4):
        opts = dataclasses.replace(base, max_vram_bytes=budget)
        aligned = build_plan(ir, opts, align_blocks=True)
        assert _brute_peak(ir, aligned) == aligned.peak_bytes <= budget
