"""fxswap/swapplan.py: the plan summary and byte formatting."""

from __future__ import annotations

from fxswap.passes.planner import build_plan
from fxswap.swapplan import PlanOptions
from tests.graphs import chain_graph

MiB = 2**20
GiB = 2**30


def opts(mode: str = "adaptive", budget: int = 4 * GiB, **kw: object) -> PlanOptions:
    kw.setdefault("reserve_bytes", 0)
    return PlanOptions(mode=mode, max_vram_bytes=budget, **kw)  # type: ignore[arg-type]


def test_oversized_tensor_reported_in_summary() -> None:
    g = chain_graph(2, weight_bytes=400 * MiB)
    plan = build_plan(g, opts("chunkwise", 2 * GiB, block_size_bytes=300 * MiB))
    over = [u for u in plan.units if u.oversized]
    assert len(over) == 4
    assert "oversized: blocks.0.attn.weight" in plan.summary()


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


def test_byte_formatting_picks_a_readable_unit() -> None:
    from fxswap.swapplan import byte_unit, format_bytes

    assert format_bytes(512) == "512 B"
    assert format_bytes(300 * 2**20) == "300.00 MiB"
    assert format_bytes(int(15.82 * 2**30)) == "15.82 GiB"
    assert byte_unit(2**20 - 1) == ("KiB", 2**10)
