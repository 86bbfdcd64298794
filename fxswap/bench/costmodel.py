"""Cost model: from a captured graph and a hardware profile to milliseconds and a physical bound.

The per-op time itself is the planner's (:func:`fxswap.passes.simulate.op_costs`: an op takes
``max(flops / compute rate, mem_bytes / device-memory rate)``; FLOPs of matmul, conv and attention
come from shapes at capture, everything else is costed by the bytes it moves). This module only
feeds it a :class:`fxswap.bench.hardware.HardwareProfile`, so that the planner, the peers and the bench
price every op the same way.

Physical bound of one call (one forward of the traced graph)::

    bound = max(compute_ms, min_swapped_bytes / pinned H2D rate)
    min_swapped_bytes = max(0, weight_bytes - (budget - reserve - max_i act[i]))

Why it is a lower bound for every schedule the simulator can express: compute cannot go faster
than the ops; every swapped byte crosses the single copy stream once per call; and at the op with
the most live activations the device holds at least ``reserve + resident + act``, so no schedule
keeps more than ``budget - reserve - max act`` bytes resident. It ignores the bytes of the units
in flight at that op, which a real schedule also needs, so it is optimistic (never above what a
schedule can reach) - which is what a bound must be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fxswap.bench.hardware import HardwareProfile
from fxswap.ir import GraphIR
from fxswap.passes.liveness import activation_profile
from fxswap.passes.simulate import OpCosts, op_costs

__all__ = [
    "PhysicalBound",
    "copy_ms",
    "graph_costs",
    "link_rates",
    "physical_bound",
    "plan_rates",
    "resident_compute_ms",
    "wan_block_flops",
]


def graph_costs(ir: GraphIR, hw: HardwareProfile) -> OpCosts:
    """Per-op compute times of ``ir`` on ``hw`` (the planner's op model with the profile's rates),
    and its collectives on the profile's link."""
    return op_costs(ir.ops, hw.compute_tflops, hw.mem_gbps, hw.p2p_rate, hw.nvlink)


def resident_compute_ms(ir: GraphIR, hw: HardwareProfile) -> float:
    """Time of one call with every weight resident: the sum of the op times."""
    return graph_costs(ir, hw).prefix_ms[-1]


def copy_ms(nbytes: int, gbps: float) -> float:
    """Milliseconds to move ``nbytes`` at ``gbps`` (1e9 bytes per second)."""
    if gbps <= 0:
        raise ValueError(f"gbps={gbps!r} must be > 0")
    return nbytes * 1e3 / (gbps * 1e9)


def plan_rates(hw: HardwareProfile) -> dict[str, float]:
    """The ``PlanOptions`` rates that make adaptive planning price ops and copies as ``hw`` does.

    fxswap keeps host copies of swapped weights pinned, so the pinned rate is the one that applies.
    """
    return {
        "h2d_gbps": hw.pinned_h2d_gbps,
        "compute_tflops": hw.compute_tflops,
        "device_mem_gbps": hw.mem_gbps,
    }


def link_rates(hw: HardwareProfile) -> dict[str, float | bool]:
    """The ``PlanOptions`` link of ``hw`` for sequence parallelism's collectives (``p2p_gbps``,
    ``nvlink``); kept apart from :func:`plan_rates`, whose rates every plan uses."""
    return {"p2p_gbps": hw.p2p_rate, "nvlink": hw.nvlink}


@dataclass(frozen=True, slots=True)
class PhysicalBound:
    """The physical bound of one call and its parts. ``feasible`` is False when the activations
    alone do not fit the budget (then ``bound_ms`` is ``inf``)."""

    compute_ms: float
    max_resident_bytes: int
    min_swapped_bytes: int
    copy_ms: float
    bound_ms: float
    feasible: bool


def physical_bound(
    ir: GraphIR,
    hw: HardwareProfile,
    budget_bytes: int,
    reserve_bytes: int,
    act: tuple[int, ...] | None = None,
) -> PhysicalBound:
    """The bound of the module docstring for ``ir`` on ``hw`` under ``budget_bytes``.

    Args:
        ir: the captured graph.
        hw: the hardware profile (compute rates and pinned H2D rate).
        budget_bytes: the VRAM budget.
        reserve_bytes: workspace and allocator slack, the same the planner counts.
        act: activation bytes per op, when the caller already has them.
    """
    if act is None:
        act = activation_profile(ir)
    compute = resident_compute_ms(ir, hw)
    room = budget_bytes - reserve_bytes - (max(act) if act else 0)
    weights = ir.weight_bytes
    if room < 0:
        return PhysicalBound(compute, 0, weights, math.inf, math.inf, False)
    resident = min(weights, room)
    swapped = weights - resident
    copy = copy_ms(swapped, hw.pinned_h2d_gbps)
    return PhysicalBound(compute, resident, swapped, copy, max(compute, copy), True)


def wan_block_flops(
    dim: int,
    ffn_dim: int,
    tokens: int,
    text_tokens: int = 512,
    image_tokens: int = 0,
    *,
    sla_topk: float | None = None,
    head_dim: int = 128,
    sla_block_q: int = 128,
    sla_block_k: int = 64,
) -> float:
    """FLOPs of one WAN transformer block forward (B=1; one multiply-add = 2 FLOPs).

    With ``L`` = tokens, ``D`` = dim, ``F`` = ffn_dim, ``T`` text and ``I`` image tokens: self-attention
    ``8 L D^2`` (q, k, v, o) plus ``4 L^2 D`` (scores and values over all heads), cross-attention
    ``4 L D^2 + 4 T D^2 + 4 L T D`` (+ ``4 I D^2 + 4 L I D`` for the Wan2.1 I2V image branch), FFN
    ``4 L D F``. WAN 14B at 480x832x81 (L = 32,760): 41.96 TFLOP per block (``docs/benchmarks.md``).
    Used to cross-check the FLOPs that capture derives from shapes; elementwise work is ignored
    there as here (< 1%). ``sla_topk``: the block's self-attention is SLA (TurboWan) with that
    key-block fraction; its attention core (block scoring, sparse and linear branches, ``proj_l``)
    is :func:`fxswap.models.sla.attention_flops`, about ``sla_topk * 4 L^2 D`` instead of ``4 L^2 D``.
    """
    d, f, n, t, i = dim, ffn_dim, tokens, text_tokens, image_tokens
    if sla_topk is None:
        core = float(4 * n * n * d)
    else:
        from fxswap.models.sla import attention_flops  # lazy: the cost model needs no model code otherwise

        core = attention_flops(n, d, head_dim, sla_topk, sla_block_q, sla_block_k)
    self_attn = 8 * n * d * d + core
    cross_attn = 4 * n * d * d + 4 * t * d * d + 4 * n * t * d + 4 * i * d * d + 4 * n * i * d
    ffn = 4 * n * d * f
    return float(self_attn + cross_attn + ffn)
