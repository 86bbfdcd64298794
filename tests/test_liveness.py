"""passes/liveness.py: weight use ranges (first to last use, unread weights, unknown weights) and the
activation profile."""

from __future__ import annotations

import pytest

from fxswap.errors import PlanError
from fxswap.passes.liveness import activation_profile
from fxswap.passes.planner import build_plan
from fxswap.passes.validate import validate_plan
from fxswap.swapplan import PlanOptions
from tests.graphs import OpSpec, build_graph

MiB = 2**20
GiB = 2**30


def opts(mode: str = "adaptive", budget: int = 4 * GiB, **kw: object) -> PlanOptions:
    kw.setdefault("reserve_bytes", 0)
    return PlanOptions(mode=mode, max_vram_bytes=budget, **kw)  # type: ignore[arg-type]


def test_shared_weight_is_live_from_first_to_last_use() -> None:
    sizes = [("emb.w", 100 * MiB), ("blocks.0.w", 100 * MiB), ("blocks.1.w", 100 * MiB)]
    ops = [OpSpec(("emb.w",)), OpSpec(("blocks.0.w",)), OpSpec(("blocks.1.w",)), OpSpec(("emb.w",))]
    g = build_graph(sizes, ops)
    plan = build_plan(g, opts("layerwise", 250 * MiB, max_prefetch_depth=0))
    emb = next(u for u in plan.units if u.name == "emb")
    assert (emb.first_use, emb.last_use) == (0, 3)


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


def test_activation_profile_by_hand() -> None:
    g = build_graph([], [OpSpec((), 4, end=2), OpSpec((), 8), OpSpec((), 16)], input_bytes=1)
    assert activation_profile(g) == (1 + 4, 1 + 4 + 8, 4 + 8 + 16)
