"""Plans that hold under Inductor: plan, compile, replay the generated program, re-plan until it fits.

Shared by :class:`fxswap.compiler.SwapModule` and the ``torch.compile`` backend
(:mod:`fxswap.integrations.dynamo`). The caller supplies ``build(plan)``, which registers the plan's
units, rewrites and compiles the graph and returns what the replay needs; this module decides which
plans to try and what the plan finally promises. The memory model behind it is in
``docs/memory_model.md``.

1. Plan on the FX model; build; replay. The program's peak fits the budget: done.
2. Else re-plan on the activations the replay showed (merged with every earlier round's, so each
   round is at least as cautious as the last), at most :data:`ROUNDS` times.
3. Else (or when the FX model finds the budget infeasible) take the FX model's least-memory
   schedule and measure it, then try steps 1-2 at one byte under each measured peak while they
   succeed (at most :data:`DESCENT` times): the least peak found is the smallest budget fxswap
   can deliver under Inductor. If it fits the budget it is the plan; if not,
   :class:`fxswap.errors.BudgetInfeasibleError` says that minimum.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from fxswap.errors import BudgetInfeasibleError
from fxswap.ir import BufferInfo, GraphIR
from fxswap.ops import UnitHandle, bound_units
from fxswap.passes.device_rules import KEPT_WORKSPACE
from fxswap.swapplan import PlanOptions, SwapPlan

__all__ = ["DESCENT", "ROUNDS", "Built", "account", "fit"]

GiB = 2**30
# Re-plans on Inductor's measured activations before falling back to the least-memory schedule.
# Four since the programs are compiled region by region (fxswap.regional): a round recompiles only
# the blocks whose code changed, and regions materialise their outputs, so the first re-plan lands
# a little above the budget more often (tiny WAN, chunkwise: the fourth round found the warm plan).
ROUNDS = 4
# Budgets tried below the least-memory schedule's measured peak (see fit), each up to ROUNDS builds.
DESCENT = 2

logger = logging.getLogger("fxswap.fit")

H = TypeVar("H")


@dataclass
class Built(Generic[H]):
    """What ``build(plan)`` returns: the caller's handle, the compiled program, the flat inputs of a
    call (resident weights on the device, the caller's tensors), the units' op ids and, for
    build-local (negative) ids, the unit table to bind while the program runs
    (:func:`fxswap.ops.bound_units`)."""

    handle: H
    fn: Callable[..., Any]
    flat: Sequence[Any]
    unit_ids: Mapping[str, int]
    units: Mapping[int, UnitHandle] = dataclasses.field(default_factory=dict)


def _per_op(ir: GraphIR, act: Sequence[int]) -> GraphIR:
    return dataclasses.replace(
        ir,
        ops=tuple(dataclasses.replace(o, workspace_bytes=0) for o in ir.ops),
        buffers=tuple(
            BufferInfo(f"inductor@{o.name}", a, i, i)
            for i, (o, a) in enumerate(zip(ir.ops, act, strict=True))
        ),
    )


def account(
    plan: SwapPlan,
    ir: GraphIR,
    built: Built[Any],
    input_buffers: Collection[str],
    device: torch.device,
) -> tuple[SwapPlan, GraphIR]:
    """The plan as Inductor's program really holds it, and the per-op activations that say so.

    The program is replayed on fake tensors (:mod:`fxswap.replay`); the returned plan's
    ``peak_bytes`` is that program's peak (plus resident weights, reserve and the caller's inputs,
    named by ``input_buffers``), and the returned IR's activation profile reproduces it in the
    plan's simulator. The plan is validated against that IR when it fits its budget.
    """
    from fxswap.passes.decode import UPLOAD, decode_residents, peak_name, upload_bytes
    from fxswap.passes.liveness import activation_profile, analyse_liveness
    from fxswap.passes.simulate import simulate_memory, unit_windows
    from fxswap.passes.validate import validate_plan
    from fxswap.passes.warmstart import steady_memory
    from fxswap.replay import inductor_activations, replay

    with bound_units(built.units):
        result = replay(built.fn, list(built.flat), device)
    windows = unit_windows(plan.units)
    # The caller's inputs and the library workspace kept across calls (passes.device_rules) are held
    # for the whole call; the replay sees neither (they exist before it starts).
    held = sum(b.nbytes for b in ir.buffers if b.name in input_buffers or b.name == KEPT_WORKSPACE)
    n = len(ir.ops)
    carry_at = [u.carry_at for u in plan.units]
    # Swapped bytes the plan holds at each op, the units a warm start carries for the next call
    # included (from their point to the end): the replay allocates those too.
    carried = [0] * (n + 1)
    for u, c in zip(plan.units, carry_at, strict=True):
        if c is not None:
            carried[c] += u.bytes
    units_at = list(simulate_memory(analyse_liveness(ir).act, windows, plan.reserve_bytes).swapped)
    running = 0
    for i in range(n):
        running += carried[i]
        units_at[i] += running
    event_ops: dict[tuple[str, int], int] = {}
    for u in plan.units:
        if not u.resident:
            uid = built.unit_ids[u.name]
            event_ops[("load", uid)] = u.load_at or 0
            event_ops[("wait", uid)] = u.wait_at or 0
            event_ops[("release", uid)] = u.release_after or 0
            if u.carry_at is not None:
                event_ops[("carry", uid)] = u.carry_at  # always an op of the graph (warmstart)
    act = inductor_activations(result, n, event_ops, units_at)
    real_ir = _per_op(ir, [a + held for a in act])
    real_act = activation_profile(real_ir)
    tl = simulate_memory(real_act, windows, plan.reserve_bytes)
    peak, peak_op, boundary = tl.peak_bytes, tl.peak_op, 0
    if plan.carried_bytes:
        mem, boundary = steady_memory(real_act, windows, plan.reserve_bytes, carry_at)
        top = max(mem, default=0)
        peak, peak_op = max(top, boundary), (mem.index(top) if top >= boundary else n)
    # Residents decoded once are decoded before the call (the replay sees them as inputs): the
    # upload is counted as the plan counts it, on the measured activations.
    upload = upload_bytes(decode_residents(ir, plan.decoded_residents), real_act, tl.resident_bytes)
    if upload > peak:
        peak, peak_op = upload, UPLOAD
    real = dataclasses.replace(
        plan,
        peak_bytes=peak,
        peak_op=peak_name([o.name for o in ir.ops], peak_op),
        activation_peak_bytes=max(tl.act, default=0),
        boundary_bytes=boundary,
    )
    if real.peak_bytes <= real.max_vram_bytes:
        validate_plan(real_ir, real)
    return real, real_ir


def _merge(a: GraphIR, b: GraphIR) -> GraphIR:
    from fxswap.passes.liveness import activation_profile

    return _per_op(a, [max(x, y) for x, y in zip(activation_profile(a), activation_profile(b), strict=True)])


def _rounds(
    ir: GraphIR,
    opts: PlanOptions,
    build: Callable[[SwapPlan], Built[H]],
    input_buffers: Collection[str],
    device: torch.device,
    align_blocks: bool,
) -> tuple[Built[H], SwapPlan] | None:
    """Steps 1 and 2: plan, build, replay and re-plan on what the replay showed; None if no round fits."""
    from fxswap.passes.planner import build_plan

    model_ir = ir
    for _ in range(ROUNDS):
        try:
            plan = build_plan(model_ir, opts, align_blocks=align_blocks)
        except BudgetInfeasibleError:
            return None
        built = build(plan)
        real, real_ir = account(plan, ir, built, input_buffers, device)
        if real.peak_bytes <= opts.max_vram_bytes:
            return built, real
        logger.debug(
            "fxswap.fit: the program of a plan for %d bytes peaks at %d (planned %d); planning again",
            opts.max_vram_bytes,
            real.peak_bytes,
            plan.peak_bytes,
        )
        model_ir = _merge(model_ir, real_ir)
    return None


def fit(
    ir: GraphIR,
    opts: PlanOptions,
    build: Callable[[SwapPlan], Built[H]],
    input_buffers: Collection[str],
    device: torch.device,
    *,
    align_blocks: bool = False,
) -> tuple[Built[H], SwapPlan]:
    """Plan ``ir`` under ``opts`` so that Inductor's real program fits (see the module docstring).

    ``align_blocks``: plan every unit's swap ops at the edges of the blocks that read it
    (:func:`fxswap.passes.planner.build_plan`), for a program compiled block by block.

    Returns:
        The build that fits and its plan, accounted by :func:`account`.

    Raises:
        BudgetInfeasibleError: even the least-memory schedule's program peaks above the budget;
            ``min_vram_bytes`` is that measured peak.
    """
    from fxswap.passes.planner import build_plan, mode_min_vram_bytes

    budget = opts.max_vram_bytes
    found = _rounds(ir, opts, build, input_buffers, device, align_blocks)
    if found is not None:
        return found
    floor = mode_min_vram_bytes(ir, opts)
    low = build_plan(ir, dataclasses.replace(opts, max_vram_bytes=floor), align_blocks=align_blocks)
    built = build(low)
    real, _ = account(low, ir, built, input_buffers, device)
    # The FX model's least-memory schedule need not be the least-memory program: fusion frees other
    # intermediates, so a plan made for a budget just under that program's peak can peak lower
    # (observed with reloads, whose plans differ most between the two models). Descend while the
    # rounds meet such a budget, so that the minimum reported is one the rounds cannot beat: asked
    # for one byte less, fit takes this same path and refuses it with the same figure.
    for _ in range(DESCENT):
        if real.peak_bytes <= budget or real.peak_bytes - 1 < floor:
            break
        lower = _rounds(
            ir,
            dataclasses.replace(opts, max_vram_bytes=real.peak_bytes - 1),
            build,
            input_buffers,
            device,
            align_blocks,
        )
        if lower is None:
            break
        built, real = lower
    real_min = real.peak_bytes
    if real_min <= budget:
        return built, dataclasses.replace(real, max_vram_bytes=budget, min_vram_bytes=real_min)
    raise BudgetInfeasibleError(
        f"max_vram_bytes={budget} ({budget / GiB:.2f} GiB) is below the smallest budget that works "
        f"for mode {opts.mode!r} under Inductor with this input: {real_min / GiB:.4f} GiB ({real_min} "
        f"bytes), the measured peak of Inductor's program for the least-memory schedule found (the FX "
        f"model alone would say {floor} bytes). Fix: raise max_vram_gb to at least "
        f"{real_min / GiB:.4f}, or use backend='eager' (minimum {floor} bytes), or a smaller input.",
        min_vram_bytes=real_min,
        mode=opts.mode,
    )
