"""``fxswap bench --sim``: fxswap's schedules against the peers' policies, predicted, no GPU needed.

For every model x case (resolution, frames) x dtype x card x budget, every policy (fxswap
adaptive / layerwise / chunkwise and the peers of :mod:`fxswap.bench.peers`) is scheduled on the
same captured graph and evaluated by the same memory simulator and the same two-stream time model
with the same hardware profile. A row is one policy on one such setting.

Definitions (one *call* = one forward of the traced graph = one CFG branch of one denoising step;
a CFG step is two calls, which doubles step time, compute and bytes moved alike):

- ``step_ms``: predicted time of one call (compute + stalls + whatever the policy serialises).
- ``resident_compute_ms``: the same call with every weight resident (no copies).
- ``bound_ms``: :func:`fxswap.bench.costmodel.physical_bound` for the row's budget.
- ``peak_bytes``: the simulated peak; ``feasible`` is False when it exceeds the budget (peers at
  their most frugal setting) or when fxswap reports the budget infeasible (then step fields are null).
- ``moved_bytes``: host-to-device bytes per call; ``d2h_bytes`` device-to-host (WanVideoWrapper).
- fp8 rows: the bf16 graph with every 2-D ``*.weight`` (the Linear weights) at 1 byte per element,
  as ComfyUI/WVW fp8 checkpoints store them (``docs/benchmarks.md``, "fp8"); biases, norms,
  modulation and the patch-embedding conv stay 2 bytes; each Linear op holds a transient bf16 copy
  of its weight (the upcast). Compute is still priced at the bf16 rate (fp8 tensor-core matmuls are
  not modelled).
- A14B rows (``wan2.2-t2v-a14b``): one expert (the two share the architecture). The rows are per
  call of the active expert; switching experts (once per generation, at the boundary step) costs
  loading the other expert's resident set, reported separately as ``switch_ms`` = resident bytes
  / pinned H2D rate and not included in ``step_ms``.
- TI2V-5B uses a VAE stride of 16, so its "720p" case is the model's native 1280x704.

The graphs come from :mod:`fxswap.bench.graphs`; :mod:`fxswap.bench.report` writes and summarises
the rows and :mod:`fxswap.bench.runner` is the command.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypedDict

from fxswap.bench.costmodel import graph_costs, physical_bound, plan_rates
from fxswap.bench.hardware import HardwareProfile
from fxswap.bench.peers import PEER_POLICIES, GraphContext, build_peer, evaluate
from fxswap.errors import BudgetInfeasibleError, FxswapError
from fxswap.ir import GraphIR
from fxswap.passes.liveness import activation_profile
from fxswap.passes.planner import build_plan
from fxswap.passes.simulate import OpCosts, simulate_memory, simulate_time, unit_windows
from fxswap.swapplan import PlanOptions

__all__ = ["FXSWAP_POLICIES", "BenchRow", "bench_graph"]

GiB = 2**30
FXSWAP_POLICIES = ("fxswap-adaptive", "fxswap-layerwise", "fxswap-chunkwise")


@dataclass(frozen=True, slots=True)
class BenchRow:
    """One policy on one (model, case, dtype, card, budget). See the module docstring."""

    model: str
    resolution: str
    frames: int
    dtype: str
    card: str
    budget_gb: float
    policy: str
    feasible: bool
    step_ms: float | None
    resident_compute_ms: float
    bound_ms: float | None
    peak_bytes: int | None
    moved_bytes: int | None
    weight_bytes: int
    d2h_bytes: int | None
    stall_ms: float | None
    resident_bytes: int | None
    switch_ms: float | None  # A14B only: loading the other expert's resident set once per generation
    setting: str  # partition/depth for fxswap, the knob value for a peer, or why it is infeasible

    @property
    def over_compute(self) -> float | None:
        return None if self.step_ms is None else self.step_ms / self.resident_compute_ms

    @property
    def over_bound(self) -> float | None:
        if self.step_ms is None or not self.bound_ms or not math.isfinite(self.bound_ms):
            return None
        return self.step_ms / self.bound_ms


class _Setting(TypedDict):
    """The fields every policy's row shares on one (model, case, dtype, card, budget)."""

    model: str
    resolution: str
    frames: int
    dtype: str
    card: str
    budget_gb: float
    resident_compute_ms: float
    bound_ms: float | None
    weight_bytes: int


def _fxswap_rows(
    ir: GraphIR,
    mode: str,
    budget: int,
    hw: HardwareProfile,
    reserve: int,
    base: _Setting,
    costs: OpCosts,
    act: tuple[int, ...],
    block_size_bytes: int,
    cache: dict[Any, Any],
) -> BenchRow:
    rates = plan_rates(hw)
    # Every mode picks its prefetch depth and resident placement with the card's rates, so plans are
    # cached per card.
    key = (mode, budget, hw.name)
    if key not in cache:
        opts = PlanOptions(
            mode=mode,
            max_vram_bytes=budget,
            reserve_bytes=reserve,
            block_size_bytes=block_size_bytes,
            h2d_gbps=rates["h2d_gbps"],
            compute_tflops=rates["compute_tflops"],
            device_mem_gbps=rates["device_mem_gbps"],
        )
        try:
            cache[key] = build_plan(ir, opts)
        except BudgetInfeasibleError as exc:
            cache[key] = exc
    plan = cache[key]
    if isinstance(plan, BudgetInfeasibleError):
        return BenchRow(
            **base,
            policy=f"fxswap-{mode}",
            feasible=False,
            step_ms=None,
            peak_bytes=None,
            moved_bytes=None,
            d2h_bytes=None,
            stall_ms=None,
            resident_bytes=None,
            switch_ms=None,
            setting=f"infeasible: min {plan.min_vram_bytes / GiB:.2f} GiB",
        )
    windows = unit_windows(sorted(plan.units, key=lambda u: u.first_use))
    mem = simulate_memory(act, windows, reserve)
    t = simulate_time(costs, windows, hw.pinned_h2d_gbps)
    return BenchRow(
        **base,
        policy=f"fxswap-{mode}",
        feasible=mem.peak_bytes <= budget,
        step_ms=t.step_ms,
        peak_bytes=mem.peak_bytes,
        moved_bytes=t.moved_bytes,
        d2h_bytes=0,
        stall_ms=t.stall_ms,
        resident_bytes=mem.resident_bytes,
        switch_ms=None,
        setting=f"{plan.partition}, depth {plan.prefetch_depth}",
    )


def bench_graph(
    ir: GraphIR,
    *,
    model: str,
    resolution: str,
    frames: int,
    dtype: str,
    cards: Sequence[HardwareProfile],
    budgets_gb: Sequence[float],
    policies: Sequence[str],
    reserve_bytes: int = 256 * 2**20,
    block_size_bytes: int = 300 * 2**20,
    experts: int = 1,
) -> list[BenchRow]:
    """Every policy on ``ir`` for every card and every budget that fits the card's VRAM.

    Args:
        ir: the graph (already rescaled for fp8 when ``dtype`` says so).
        model, resolution, frames, dtype: labels copied into the rows.
        cards: hardware profiles; a budget above a card's VRAM is skipped for that card.
        budgets_gb: budgets in GiB.
        policies: names from :data:`FXSWAP_POLICIES` and :data:`fxswap.bench.peers.PEER_POLICIES`.
        reserve_bytes: the workspace reserve every policy is charged (the planner's default).
        block_size_bytes: the chunkwise block size.
        experts: 2 for A14B: rows get ``switch_ms`` (module docstring).
    """
    unknown = [p for p in policies if p not in FXSWAP_POLICIES and p not in PEER_POLICIES]
    if unknown:
        raise FxswapError(f"policies {unknown} are unknown; use {', '.join(FXSWAP_POLICIES + PEER_POLICIES)}")
    ctx = GraphContext(ir, reserve_bytes) if any(p in PEER_POLICIES for p in policies) else None
    act = ctx.act if ctx else activation_profile(ir)
    rows: list[BenchRow] = []
    plan_cache: dict[Any, Any] = {}
    peer_cache: dict[Any, Any] = {}
    for hw in cards:
        costs = graph_costs(ir, hw)
        compute = costs.prefix_ms[-1]
        for gb in budgets_gb:
            budget = round(gb * GiB)
            if budget > hw.vram_bytes:
                continue
            bound = physical_bound(ir, hw, budget, reserve_bytes, act)
            base = _Setting(
                model=model,
                resolution=resolution,
                frames=frames,
                dtype=dtype,
                card=hw.name,
                budget_gb=gb,
                resident_compute_ms=compute,
                bound_ms=bound.bound_ms if bound.feasible else None,
                weight_bytes=ir.weight_bytes,
            )
            for policy in policies:
                if policy in FXSWAP_POLICIES:
                    row = _fxswap_rows(
                        ir,
                        policy.removeprefix("fxswap-"),
                        budget,
                        hw,
                        reserve_bytes,
                        base,
                        costs,
                        act,
                        block_size_bytes,
                        plan_cache,
                    )
                else:
                    assert ctx is not None
                    if (policy, budget) not in peer_cache:
                        peer_cache[policy, budget] = build_peer(policy, ctx, budget)
                    sched = peer_cache[policy, budget]
                    t = evaluate(sched, costs, hw.pinned_h2d_gbps, hw.d2h_gbps, hw.sync_overhead_ms)
                    resident = sum(u.bytes for u in sched.units if u.resident)
                    row = BenchRow(
                        **base,
                        policy=policy,
                        feasible=sched.feasible,
                        step_ms=t.step_ms,
                        peak_bytes=sched.peak_bytes,
                        moved_bytes=t.moved_bytes,
                        d2h_bytes=t.d2h_bytes,
                        stall_ms=t.stall_ms,
                        resident_bytes=resident,
                        switch_ms=None,
                        setting=sched.setting,
                    )
                if experts > 1 and row.resident_bytes is not None:
                    row = replace(row, switch_ms=row.resident_bytes * 1e3 / (hw.pinned_h2d_gbps * 1e9))
                rows.append(row)
    return rows
