"""Planner: GraphIR + PlanOptions -> SwapPlan, by liveness -> partition -> schedule -> simulate -> validate.

Pure Python on plain data (no torch, no torch.fx). The result for a 3-block chain might read::

    units (first-use order)   resident  load_at  wait_at  release_after
    embed                     yes       -        -        -
    blocks.0                  no        0        1        4
    blocks.1                  no        1        5        8     # depth 1: issued at blocks.0's wait
    head                      yes       -        -        -

Choice per mode. The mode fixes the candidate partitions; the schedule search is the same for all
three, and the cost model (:func:`fxswap.passes.simulate.simulate_time`) decides:

- partitions: layerwise and chunkwise have their one partition; adaptive tries the layerwise
  partition and chunkwise partitions at :func:`fxswap.passes.partition.adaptive_block_sizes`
  (64 MiB .. 2 GiB and the user's block size, identical partitions merged);
- for each partition, the resident placements of :func:`fxswap.passes.schedule.fill_resident`
  ("front", "spread", and "back" with a warm start) at depths 0, 1, ... up to
  ``max_prefetch_depth`` (default 16). Deepening stops
  when the depth no longer fits (deeper never needs less memory), when a schedule has no stall
  left, or after ``DEPTH_PATIENCE`` depths without a faster one;
- reloads (:mod:`fxswap.passes.occurrence`): where a weight is read in separate places, the same
  partitions of the *split* graph (one weight per place) are candidates too, their units holding
  a reloaded weight never resident. They are tried last, and only when the best plan without them
  still stalls on copies, or when nothing else fits the budget: a second load of a weight is worth
  its transfer only if it lowers the peak or the step time;
- the least predicted step time wins (with ``warm_start``, the steady-state call of the cyclic
  schedule, :mod:`fxswap.passes.warmstart`), then the faster first call, then more resident bytes,
  then fewer units, then the earlier candidate (partition order, placements in the order above,
  depths ascending): deterministic.

NOTE (fixed modes): layerwise/chunkwise used to take the largest depth that fits and then fill
resident units. At tight budgets that can leave nothing resident where depth 1 plus a resident
block moves less and runs faster, so they now search depths by the time model like adaptive;
only the partition is fixed by the mode. Their plans therefore depend on the rates as well.

NOTE (depth range): the schedule's depth counts units, resident ones included, so with swapped
units spread among resident ones a depth of 5-10 is what hides a copy that takes several blocks'
compute (slow links) while holding only one or two swapped units in flight. ``max_prefetch_depth``
stays a user cap (0 = load just before use); its default is 16 and the early stops above keep
the search to a few depths per partition in practice (WAN 14B 480p81: ~0.2 s for adaptive).

Minimum budget of a mode: the peak of its partition all swapped at depth 0 (the least over
candidate partitions for adaptive); see the monotonicity NOTE in :mod:`fxswap.passes.simulate`.
Below it :class:`fxswap.errors.BudgetInfeasibleError` says the minimum and what to change.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

from fxswap.errors import BudgetInfeasibleError, PlanError
from fxswap.ir import GraphIR
from fxswap.passes.decode import UPLOAD, choose_decoded, decode_residents, peak_name, upload_bytes
from fxswap.passes.liveness import Liveness, activation_profile, analyse_liveness
from fxswap.passes.occurrence import find_occurrences, real_units, split_graph
from fxswap.passes.partition import (
    UnitSpec,
    adaptive_block_sizes,
    block_labels,
    partition_chunkwise,
    partition_layerwise,
)
from fxswap.passes.schedule import PLACEMENTS, PreparedPartition, Schedule, fill_resident, prepare_partition
from fxswap.passes.simulate import (
    OpCosts,
    TimeReport,
    UnitWindow,
    op_costs,
    simulate_memory,
    simulate_time,
    unit_windows,
)
from fxswap.passes.validate import validate_plan
from fxswap.passes.warmstart import WarmStart, plan_warm_start, simulate_steady, steady_memory
from fxswap.swapplan import (
    SCHEMA_VERSION,
    PlanOptions,
    SwapPlan,
    SwapUnit,
    WeightSpan,
    combine_fingerprint,
    fingerprint_parts,
    format_bytes,
    reloaded_bytes,
)

__all__ = ["build_plan", "candidate_partitions", "mode_min_vram_bytes", "price_blocking_units"]

logger = logging.getLogger("fxswap.planner")
GiB = 2**30
MiB = 2**20


def candidate_partitions(
    mode: str, order: Sequence[str], nbytes: dict[str, int], block_size_bytes: int
) -> list[tuple[str, tuple[UnitSpec, ...]]]:
    """The partitions a mode considers, as ``(label, units)``; identical partitions appear once.

    Args:
        mode: "layerwise", "chunkwise" or "adaptive".
        order: weight names in first-use order.
        nbytes: size of every weight.
        block_size_bytes: the user's block size.
    """
    if mode == "layerwise":
        return [("layerwise", partition_layerwise(order, nbytes))]
    if mode == "chunkwise":
        return [
            (
                f"chunkwise {format_bytes(block_size_bytes)}",
                partition_chunkwise(order, nbytes, block_size_bytes),
            )
        ]
    out = [("layerwise", partition_layerwise(order, nbytes))]
    for size in adaptive_block_sizes(block_size_bytes):
        out.append((f"chunkwise {format_bytes(size)}", partition_chunkwise(order, nbytes, size)))
    seen: set[tuple[tuple[str, ...], ...]] = set()
    unique = []
    for label, units in out:
        key = tuple(u.params for u in units)
        if key not in seen:
            seen.add(key)
            unique.append((label, units))
    return unique


RELOADS = ", reloads"  # label suffix of a partition of the split graph


def _prepare(
    ir: GraphIR, live: Liveness, options: PlanOptions, mode: str, align_blocks: bool = False
) -> list[PreparedPartition]:
    """The mode's partitions of the graph, then those of its split graph that reload a weight."""
    parts = candidate_partitions(mode, live.order, dict(live.nbytes), options.block_size_bytes)
    blocks = block_labels([op.module for op in ir.ops]) if align_blocks else None
    out = [
        prepare_partition(label, units, live, options.reserve_bytes, blocks=blocks) for label, units in parts
    ]
    occurrences = find_occurrences(ir)
    if not occurrences:
        return out
    split = analyse_liveness(split_graph(ir, occurrences))
    for label, units in candidate_partitions(mode, split.order, dict(split.nbytes), options.block_size_bytes):
        real, _, reloaded = real_units(units, occurrences, live.nbytes)
        if not reloaded:
            continue  # every weight's places fell in one unit: nothing is loaded twice
        pinned = {o.name for o in occurrences if o.weight in reloaded}
        # Two places of one weight in one unit share its one copy: size the units as loaded.
        units = tuple(dataclasses.replace(u, bytes=r.bytes) for u, r in zip(units, real, strict=True))
        out.append(
            prepare_partition(
                label + RELOADS,
                units,
                split,
                options.reserve_bytes,
                pinned=pinned,
                occurrences=occurrences,
                blocks=blocks,
            )
        )
    return out


def mode_min_vram_bytes(ir: GraphIR, options: PlanOptions, mode: str | None = None) -> int:
    """The smallest budget at which ``mode`` (default ``options.mode``) has a plan for this graph,
    with or without ``align_blocks`` (below the aligned minimum :func:`build_plan` plans exact
    positions)."""
    live = analyse_liveness(ir)
    return min(p.min_budget() for p in _prepare(ir, live, options, mode or options.mode))


def _raise_if_infeasible(
    ir: GraphIR, live: Liveness, options: PlanOptions, parts: list[PreparedPartition]
) -> None:
    mins = [p.min_budget() for p in parts]
    best = min(mins)
    if options.max_vram_bytes >= best:
        return
    part = parts[mins.index(best)]
    # Break the minimum down at its peak so that the message says what dominates.
    windows = [
        UnitWindow(u.bytes, False, f, f, ll)
        for u, f, ll in zip(part.units, part.first_use, part.last_use, strict=True)
    ]
    tl = simulate_memory(live.act, windows, options.reserve_bytes)
    at = ir.ops[tl.peak_op].name if tl.peak_op >= 0 else "-"
    biggest = max(part.units, key=lambda u: u.bytes, default=None)
    fixes = [f"raise max_vram_gb to at least {best / GiB:.2f}"]
    if options.mode == "chunkwise" and biggest is not None and not biggest.oversized:
        fixes.append("lower block_size_mb (smaller chunks lower the minimum)")
    if options.mode != "adaptive":
        other = min(p.min_budget() for p in _prepare(ir, live, options, "adaptive"))
        if other < best:
            fixes.append(f"use mode='adaptive' (minimum {other / GiB:.2f} GiB)")
        if options.mode == "chunkwise":
            lw = min(p.min_budget() for p in _prepare(ir, live, options, "layerwise"))
            if lw < best:
                fixes.append(f"use mode='layerwise' (minimum {lw / GiB:.2f} GiB)")
    if options.reserve_bytes:
        fixes.append("lower reserve_mb")
    fixes.append("or use a smaller input (resolution, frames) to shrink activations")
    big = f"; largest unit {biggest.name!r} {biggest.bytes / GiB:.2f} GiB" if biggest is not None else ""
    swapped_at = tl.swapped[tl.peak_op] if tl.peak_op >= 0 else 0
    act_at = tl.act[tl.peak_op] if tl.peak_op >= 0 else 0
    budget = options.max_vram_bytes
    raise BudgetInfeasibleError(
        f"max_vram_bytes={budget} ({budget / GiB:.2f} GiB) is below the smallest budget that works "
        f"for mode {options.mode!r} with this input: {best / GiB:.2f} GiB ({best} bytes). At that "
        f"minimum the peak is at op {tl.peak_op} ({at!r}): reserve {options.reserve_bytes / GiB:.2f} GiB "
        f"+ swapped units in memory {swapped_at / GiB:.2f} GiB + activations {act_at / GiB:.2f} GiB{big}. "
        "Fix: " + "; ".join(fixes),
        min_vram_bytes=best,
        mode=options.mode,
    )


# Without a warm start every call starts cold, and "back" (first units swapped) cannot win.
COLD_PLACEMENTS = ("front", "spread")

# Stop deepening one (partition, placement) after this many depths without a faster schedule.
DEPTH_PATIENCE = 2


def _choose(
    parts: list[PreparedPartition], options: PlanOptions, costs: OpCosts, h2d: float, act: Sequence[int]
) -> tuple[PreparedPartition, Schedule, TimeReport, WarmStart | None]:
    budget = options.max_vram_bytes
    Best = tuple[
        tuple[float, float, int, int, int], PreparedPartition, Schedule, TimeReport, WarmStart | None
    ]
    best: Best | None = None
    index = 0
    for part in parts:
        if part.occurrences and best is not None and (best[4].report if best[4] else best[3]).stall_ms <= 0:
            # No copy stalls without reloads: loading a weight twice could only move more bytes.
            # (The split graph's partitions come last in ``parts``.)
            break
        for placement in PLACEMENTS if options.warm_start else COLD_PLACEMENTS:
            fastest = math.inf
            stale = 0
            for depth in range(options.max_prefetch_depth + 1):
                if placement == "back" and depth == 0:
                    index += 1
                    continue  # nothing to carry at depth 0, and cold it is never faster than "front"
                sched = fill_resident(part, depth, budget, placement)
                index += 1
                if sched is None:
                    break  # a deeper prefetch never needs less memory (monotonicity NOTE)
                report = simulate_time(costs, sched.windows(), h2d)
                warm: WarmStart | None = None
                if options.warm_start and report.stall_ms > 0:
                    # Ranked by the steady-state call: a sampling loop runs the graph many times.
                    warm = plan_warm_start(
                        act, sched.windows(), options.reserve_bytes, budget, depth, costs, h2d, report,
                        sched.peak_bytes,
                    )  # fmt: skip
                    if not warm.enabled:
                        warm = None
                timing = report if warm is None else warm.report
                # Rounded so that float noise between equal timings does not beat the tie-breaks.
                step = round(timing.step_ms, 9)
                # Equal steady steps: the faster first call (a cold schedule's first call is its
                # steady one), then more resident bytes (fewer moved), fewer units, the earlier one.
                first = round(report.step_ms, 9)
                key = (step, first, -sched.resident_bytes, len(sched.units), index)
                if best is None or key < best[0]:
                    best = (key, part, sched, report, warm)
                if timing.stall_ms <= 0:
                    break  # nothing left to hide; deeper only risks fewer resident bytes
                if step < fastest:
                    fastest, stale = step, 0
                else:
                    stale += 1
                    if stale >= DEPTH_PATIENCE:
                        break
    assert best is not None, "unreachable: some candidate fits whenever the budget is >= the minimum"
    return best[1], best[2], best[3], best[4]


def build_plan(ir: GraphIR, options: PlanOptions, *, align_blocks: bool = False) -> SwapPlan:
    """Plan which units stay resident and when the others are loaded, waited for and released.

    Args:
        ir: the captured graph (plain data).
        options: mode, budget, block size, reserve, prefetch depth and cost-model rates.
        align_blocks: every unit read in blocks (a whole block or, chunkwise, a part of one) is
            waited for at the first op of the first block that reads it and released after the
            last op of the last (the loads anchored on it with it), so that compiled block
            programs hold no swap op and blocks alike share one program
            (:func:`fxswap.passes.schedule.prepare_partition`). The windows are planned as
            widened; ``fxswap.compile`` asks for it under Inductor. Below the smallest budget the
            widened windows fit, the plan keeps the exact positions.

    Returns:
        A validated :class:`fxswap.swapplan.SwapPlan` whose simulated peak is within the budget.

    Raises:
        BudgetInfeasibleError: the budget is below the mode's minimum for this graph; the message
            and ``.min_vram_bytes`` state that minimum.
        PlanError: the graph is malformed (a weight read but not listed, a bad buffer range), or
            the plan failed validation (a bug: please report it with the graph).
    """
    if not ir.ops and ir.weights:
        raise PlanError(
            f"the graph has {len(ir.weights)} weights but no ops; capture produced an empty graph"
        )
    live = analyse_liveness(ir)
    parts = _prepare(ir, live, options, options.mode, align_blocks)
    if align_blocks and options.max_vram_bytes < min(p.min_budget() for p in parts):
        # Aligned windows hold a unit over a few more ops; where that no longer fits, the exact
        # positions may: alignment saves compile time, it must not cost a budget that works.
        parts = _prepare(ir, live, options, options.mode)
    _raise_if_infeasible(ir, live, options, parts)
    min_vram = min(p.min_budget() for p in parts)
    costs = op_costs(
        ir.ops, options.compute_tflops, options.device_mem_gbps, options.p2p_gbps, options.nvlink
    )
    part, sched, report, warm = _choose(parts, options, costs, options.h2d_gbps, live.act)
    timeline = simulate_memory(live.act, sched.windows(), options.reserve_bytes)
    if timeline.peak_bytes != sched.peak_bytes:
        raise PlanError(
            f"internal: segment model peak {sched.peak_bytes} != per-op simulation {timeline.peak_bytes}; "
            "please report this graph"
        )
    first_report = report
    carry_at: tuple[int | None, ...] = (None,) * len(sched.units)
    peak_bytes, peak_op, boundary = timeline.peak_bytes, timeline.peak_op, 0
    if warm is not None:
        report, carry_at, boundary = warm.report, warm.carry_at, warm.boundary_bytes
        if warm.peak_bytes > peak_bytes and warm.peak_op is not None:
            peak_bytes, peak_op = warm.peak_bytes, warm.peak_op
    names = [op.name for op in ir.ops]

    def node_at(i: int | None) -> str | None:
        return None if i is None else names[i]

    specs: Sequence[UnitSpec] = sched.units
    shares: Sequence[Sequence[tuple[str, int, int]]] = [()] * len(specs)
    if part.occurrences:
        specs, shares, _ = real_units(sched.units, part.occurrences, live.nbytes)
    # Resident weights kept as stored: decoded once for the whole call where that fits
    # (fxswap.passes.decode); the plan is then simulated on the IR with that change.
    windows = sched.windows()
    decoded = choose_decoded(
        ir,
        windows,
        [u.params for u in specs],
        options.reserve_bytes,
        options.max_vram_bytes,
        carry_at if warm is not None else None,
    )
    if decoded:
        eff = decode_residents(ir, decoded)
        held = {w.name: w.nbytes for w in eff.weights}
        specs = [
            dataclasses.replace(u, bytes=sum(held[p] for p in u.params)) if res else u
            for u, res in zip(specs, sched.resident, strict=True)
        ]
        windows = [
            dataclasses.replace(wd, bytes=u.bytes) if wd.resident else wd
            for wd, u in zip(windows, specs, strict=True)
        ]
        act = activation_profile(eff)
        timeline = simulate_memory(act, windows, options.reserve_bytes)
        peak_bytes, peak_op = timeline.peak_bytes, timeline.peak_op
        costs = op_costs(
            eff.ops, options.compute_tflops, options.device_mem_gbps, options.p2p_gbps, options.nvlink
        )
        first_report = report = simulate_time(costs, windows, options.h2d_gbps)
        if warm is not None:
            report = simulate_steady(costs, windows, carry_at, options.h2d_gbps)
            steady, boundary = steady_memory(act, windows, options.reserve_bytes, carry_at)
            top = max(steady, default=0)
            if max(top, boundary) > peak_bytes:
                peak_bytes = max(top, boundary)
                peak_op = len(names) if boundary > top else steady.index(top)
        upload = upload_bytes(eff, act, sum(u.bytes for u, r in zip(specs, sched.resident, strict=True) if r))
        if upload > peak_bytes:
            peak_bytes, peak_op = upload, UPLOAD
        if peak_bytes > options.max_vram_bytes:
            raise PlanError(
                f"internal: keeping {len(decoded)} resident weights decoded peaks at {peak_bytes} bytes, "
                f"above the budget {options.max_vram_bytes}; please report this graph"
            )
    units = []
    reads_first, reads_last = part.reads()
    for u, share, res, la, f, ll, ca, rf, rl in zip(
        specs,
        shares,
        sched.resident,
        sched.load_at,
        sched.first_use,
        sched.last_use,
        carry_at,
        reads_first,
        reads_last,
        strict=True,
    ):
        units.append(
            SwapUnit(
                name=u.name,
                params=u.params,
                bytes=u.bytes,
                resident=res,
                oversized=u.oversized,
                first_use=rf,
                last_use=rl,
                load_at=None if res else la,
                wait_at=None if res else f,
                release_after=None if res else ll,
                load_node=None if res else names[la],
                wait_node=None if res else names[f],
                release_node=None if res else names[ll],
                carry_at=ca,
                carry_node=node_at(ca),
                spans=tuple(WeightSpan(w, live.nbytes[w], a, b, names[a], names[b]) for w, a, b in share),
            )
        )
    fparts = fingerprint_parts(ir, options)
    resident = sum(u.bytes for u in units if u.resident)
    plan = SwapPlan(
        schema_version=SCHEMA_VERSION,
        fingerprint=combine_fingerprint(fparts),
        fingerprint_parts=tuple(fparts.items()),
        mode=options.mode,
        partition=part.label,
        max_vram_bytes=options.max_vram_bytes,
        block_size_bytes=options.block_size_bytes,
        reserve_bytes=options.reserve_bytes,
        prefetch_depth=sched.depth,
        peak_bytes=peak_bytes,
        # len(names): the peak is between two calls (a warm start's carried units beside the outputs)
        peak_op=peak_name(names, peak_op),
        resident_bytes=resident,
        swapped_bytes=sum(u.bytes for u in units) - resident - reloaded_bytes(units),
        weight_bytes=sum(u.bytes for u in units) - reloaded_bytes(units),
        activation_peak_bytes=max(timeline.act, default=0),
        min_vram_bytes=min_vram,
        moved_bytes_per_call=report.moved_bytes,
        predicted_step_ms=report.step_ms,
        predicted_compute_ms=report.compute_ms,
        predicted_stall_ms=report.stall_ms,
        warm_start=options.warm_start,
        carried_bytes=0 if warm is None else warm.carried_bytes,
        boundary_bytes=boundary,
        predicted_first_step_ms=first_report.step_ms,
        h2d_gbps=options.h2d_gbps,
        compute_tflops=options.compute_tflops,
        device_mem_gbps=options.device_mem_gbps,
        num_ops=len(ir.ops),
        units=tuple(units),
        p2p_gbps=options.p2p_gbps,
        nvlink=options.nvlink,
        predicted_collective_ms=report.collective_ms,
        predicted_collective_stall_ms=report.collective_stall_ms,
        decoded_residents=decoded,
    )
    validate_plan(ir, plan)
    logger.info(
        "fxswap: %s (%s, depth %d): %d units, %d swapped, peak %.2f GiB (budget %.2f GiB, min %.2f GiB), "
        "%.2f GiB moved per call, predicted %.1f ms",
        options.mode,
        part.label,
        sched.depth,
        len(units),
        sum(not u.resident for u in units),
        plan.peak_bytes / GiB,
        plan.max_vram_bytes / GiB,
        min_vram / GiB,
        plan.moved_bytes_per_call / GiB,
        plan.predicted_step_ms,
    )
    return plan


def price_blocking_units(ir: GraphIR, plan: SwapPlan, blocking: set[str] | frozenset[str]) -> SwapPlan:
    """``plan`` with its predicted times for the swapped units named in ``blocking`` copied without
    overlap (their host memory could not be pinned: see :class:`passes.simulate.UnitWindow`).

    The extra time is the difference of two runs of the cold-call model, with and without those
    units blocking; it is added to every predicted step (a warm start's steady call included: a
    carried unit's copy blocks the host as much as a cold one's). The units and peaks are unchanged.
    """
    if not any(u.name in blocking and not u.resident for u in plan.units):
        return plan
    costs = op_costs(
        decode_residents(ir, plan.decoded_residents).ops,
        plan.compute_tflops,
        plan.device_mem_gbps,
        plan.p2p_gbps,
        plan.nvlink,
    )
    windows = unit_windows(plan.units)
    plain = simulate_time(costs, windows, plan.h2d_gbps)
    blocked = simulate_time(
        costs,
        [
            dataclasses.replace(w, blocking=u.name in blocking and not u.resident)
            for u, w in zip(plan.units, windows, strict=True)
        ],
        plan.h2d_gbps,
    )
    extra = blocked.step_ms - plain.step_ms
    logger.warning(
        "fxswap: %d swapped units have pageable host copies: their copies cannot overlap compute "
        "(predicted step +%.1f ms)",
        sum(u.name in blocking and not u.resident for u in plan.units),
        extra,
    )
    return dataclasses.replace(
        plan,
        predicted_step_ms=plan.predicted_step_ms + extra,
        predicted_stall_ms=plan.predicted_stall_ms + extra,
        predicted_first_step_ms=plan.predicted_first_step_ms + extra,
    )
