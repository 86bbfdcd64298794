"""passes/schedule.py: placement order of swapped units, load points, the greedy resident fill."""

from __future__ import annotations

import itertools

import pytest

from fxswap.passes.planner import build_plan
from fxswap.passes.schedule import spread_rank
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
