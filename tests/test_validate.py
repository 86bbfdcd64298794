"""passes/validate.py: the validator names the op and unit of every violation."""

from __future__ import annotations

import dataclasses

import pytest

from fxswap.errors import PlanError
from fxswap.passes.planner import build_plan
from fxswap.passes.validate import validate_plan
from fxswap.swapplan import PlanOptions
from tests.graphs import chain_graph

MiB = 2**20
GiB = 2**30


def opts(mode: str = "adaptive", budget: int = 4 * GiB, **kw: object) -> PlanOptions:
    kw.setdefault("reserve_bytes", 0)
    return PlanOptions(mode=mode, max_vram_bytes=budget, **kw)  # type: ignore[arg-type]


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
