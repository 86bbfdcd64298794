"""The offloaders people use today, as unit schedules on fxswap's own simulator.

Each peer policy becomes a list of :class:`fxswap.passes.simulate.UnitWindow` (which weights form a
unit, which units stay resident, where each load is issued, waited for and released) plus the
per-op costs its runtime adds that fxswap's two-stream model has no slot for. Memory is always
:func:`fxswap.passes.simulate.simulate_memory` (the one memory simulator); time is
:func:`fxswap.passes.simulate.simulate_time` on per-op costs to which :func:`evaluate` adds:

- ``copies_on_compute_stream``: the H2D copy of a unit is serialised with compute at its issue op
  (added to that op's time); the copy stream then carries nothing for it.
- ``d2h_after_use``: a device-to-host copy of the unit after its last use, on the compute stream.
- ``sync_at_wait`` / ``sync_after_use``: a host synchronisation (``hw.sync_overhead_ms`` of idle
  GPU while the host launches the next kernel) before the first use / after the last use.

Each peer is modelled from its own code at the version ``docs/benchmarks.md`` ("Peers") names, with
the files read; the behaviour that matters here is restated below. Every peer gets the best
setting of its knob that fits the budget (the knob its users tune by hand); where even its most
frugal setting exceeds the budget, the result says ``feasible=False`` and reports that setting's
peak, instead of hiding the row.

- ``wvw-blockswap-p0`` / ``-p1`` (ComfyUI-WanVideoWrapper ``WanVideoBlockSwap``): the *last*
  ``blocks_to_swap`` blocks are swapped, N the smallest that fits; non-block weights resident;
  ``prefetch_blocks`` 0 or 1 (the load of block b+1 is issued at the start of block b). The
  stream is ``None``, so copies run on the compute stream; each swapped block is copied back with
  ``.to(offload_device)`` after use (a real D2H copy); ``events[b].synchronize()`` before use.
  Modelled with ``use_non_blocking=True`` (pinned host memory, the faster setting).
- ``diffusers-group`` (diffusers ``apply_group_offloading(block_level, use_stream=True)``): every
  block is a group of one and is swapped; the non-block weights form the "unmatched" group, loaded at
  the start of the call and released at its end; each group prefetches the next one on a side
  stream; ``stream.synchronize()`` before each use and ``current_stream().synchronize()`` after
  each use (``record_stream=False``). Pre-pinned host copies, so the pinned rate applies.
- ``mmgp`` (Wan2GP's offloader): non-block weights ("base") resident; P "preloaded" floors spread
  evenly over the tower, P the largest that fits; other floors through the one-block-ahead shuttle
  on a transfer stream; ``torch.cuda.synchronize()`` before each floor. NOTE: with one load in
  flight, the full device sync waits for exactly the load the floor needs, so it is modelled as the
  floor's wait plus the sync overhead. The circular prefetch of the first floor of the *next* call
  is not modelled (no policy here, fxswap included, carries loads across calls).
- ``comfyui-lowvram`` (ComfyUI's classic lowvram mode): weighted leaf modules sorted largest first are
  loaded while they fit ``lowvram_model_memory`` (greedy: a module that does not fit is skipped, smaller
  ones after it may still fit); the rest are cast per forward. The cast stream first
  ``wait_stream``s the compute stream, so a cast copy starts only when compute reaches the layer
  (load at first use, depth 0), and compute waits for it on the GPU (no host sync). Pinned copies
  (the default since ComfyUI PR #10656). ``lowvram_model_memory`` is searched for the largest value
  that fits (ComfyUI's own estimate is a heuristic that may over- or under-shoot).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fxswap.errors import PlanError
from fxswap.ir import GraphIR
from fxswap.passes.liveness import Liveness, analyse_liveness, unit_range
from fxswap.passes.partition import UnitSpec, partition_layerwise
from fxswap.passes.simulate import (
    MemoryTimeline,
    OpCosts,
    UnitWindow,
    simulate_memory,
    simulate_time,
)

__all__ = [
    "PEER_POLICIES",
    "GraphContext",
    "PeerSchedule",
    "PolicyTiming",
    "build_peer",
    "comfyui_lowvram",
    "diffusers_group",
    "evaluate",
    "mmgp",
    "wvw_blockswap",
]

PEER_POLICIES = ("wvw-blockswap-p0", "wvw-blockswap-p1", "diffusers-group", "mmgp", "comfyui-lowvram")

# A copy stream this fast moves nothing in measurable time: used when a peer's copies are charged to
# the compute stream instead (see ``copies_on_compute_stream``).
_INSTANT_GBPS = 1e15


@dataclass(frozen=True, slots=True)
class PeerSchedule:
    """A peer policy on one graph and budget: units in first-use order and its runtime's extras."""

    policy: str
    names: tuple[str, ...]
    units: tuple[UnitWindow, ...]
    feasible: bool
    peak_bytes: int
    setting: str  # the knob value chosen, e.g. "blocks_to_swap=23"
    copies_on_compute_stream: bool = False
    d2h_after_use: bool = False
    sync_at_wait: bool = False
    sync_after_use: bool = False
    sync_at_ops: tuple[int, ...] = ()  # extra host/device synchronisations (mmgp: every floor start)


@dataclass(frozen=True, slots=True)
class PolicyTiming:
    """Time of one call under a policy (ms) and the bytes it moves each way."""

    step_ms: float
    compute_ms: float
    stall_ms: float  # step - compute: waits for copies, serialised copies and synchronisations
    moved_bytes: int  # host to device
    d2h_bytes: int


class GraphContext:
    """What every peer needs from one graph, computed once: liveness, the layerwise units split into
    blocks and non-block units, and the weight groups per owning module (ComfyUI's cast unit).

    Not a frozen record: a per-graph cache that the bench builds once and shares between budgets.
    """

    def __init__(self, ir: GraphIR, reserve_bytes: int) -> None:
        self.ir = ir
        self.reserve = reserve_bytes
        self.live: Liveness = analyse_liveness(ir)
        self.act = self.live.act
        self.n = len(ir.ops)
        units = partition_layerwise(self.live.order, dict(self.live.nbytes))
        self.layer_units: tuple[UnitSpec, ...] = units
        self.layer_range = tuple(unit_range(u.params, self.live) for u in units)
        self.is_block = tuple(any(p.isdigit() for p in u.name.split(".")) for u in units)
        if not any(self.is_block):
            raise PlanError(
                "the graph has no numbered blocks (weights named like 'blocks.3.*'); the peer policies "
                "swap transformer blocks and cannot be modelled on it"
            )
        module_of = {w.name: w.module for w in ir.weights}
        groups: dict[str, list[str]] = {}
        for name in self.live.order:
            groups.setdefault(module_of.get(name, "") or name, []).append(name)
        specs = [UnitSpec(m, tuple(ps), sum(self.live.nbytes[p] for p in ps)) for m, ps in groups.items()]
        ranges = [unit_range(s.params, self.live) for s in specs]
        order = sorted(range(len(specs)), key=lambda k: (ranges[k][0], k))
        self.module_units = tuple(specs[k] for k in order)
        self.module_range = tuple(ranges[k] for k in order)

    def memory(self, units: Sequence[UnitWindow]) -> MemoryTimeline:
        return simulate_memory(self.act, units, self.reserve)


def _swapped(first: int, last: int, size: int, load_at: int | None = None) -> UnitWindow:
    return UnitWindow(size, False, first if load_at is None else load_at, first, last)


def _resident(size: int) -> UnitWindow:
    return UnitWindow(size, True)


def wvw_blockswap(ctx: GraphContext, budget: int, prefetch_blocks: int) -> PeerSchedule:
    """WanVideoWrapper block swap: the last N blocks swapped, N the smallest that fits."""
    if prefetch_blocks < 0:
        raise PlanError(f"prefetch_blocks={prefetch_blocks}; pass 0 or more")
    blocks = [k for k, b in enumerate(ctx.is_block) if b]
    pos = {k: i for i, k in enumerate(blocks)}

    def schedule(n_swap: int) -> list[UnitWindow]:
        swapped = set(blocks[len(blocks) - n_swap :])
        out = []
        for k, u in enumerate(ctx.layer_units):
            first, last = ctx.layer_range[k]
            if k not in swapped:
                out.append(_resident(u.bytes))
                continue
            i = pos[k]
            # prefetch_blocks=p: block b is loaded at the start of block b - p (the loop prefetches
            # b+1..b+p when it reaches b); block 0 and p=0 load at the block's own start.
            src = blocks[max(0, i - prefetch_blocks)]
            out.append(_swapped(first, last, u.bytes, ctx.layer_range[src][0]))
        return out

    name = f"wvw-blockswap-p{prefetch_blocks}"
    return _smallest_fit(
        ctx,
        name,
        budget,
        range(len(blocks) + 1),
        schedule,
        "blocks_to_swap",
        dict(copies_on_compute_stream=True, d2h_after_use=True, sync_at_wait=True),
    )


def diffusers_group(ctx: GraphContext, budget: int) -> PeerSchedule:
    """diffusers group offloading, block_level, use_stream=True: everything swapped, one group ahead."""
    non_block = [k for k, b in enumerate(ctx.is_block) if not b]
    blocks = [k for k, b in enumerate(ctx.is_block) if b]
    names = ["(unmatched)"] + [ctx.layer_units[k].name for k in blocks]
    base_bytes = sum(ctx.layer_units[k].bytes for k in non_block)
    units = [UnitWindow(base_bytes, False, 0, 0, max(ctx.n - 1, 0))]
    for i, k in enumerate(blocks):
        first, last = ctx.layer_range[k]
        load = 0 if i == 0 else ctx.layer_range[blocks[i - 1]][0]
        units.append(_swapped(first, last, ctx.layer_units[k].bytes, load))
    mem = ctx.memory(units)
    return PeerSchedule(
        "diffusers-group",
        tuple(names),
        tuple(units),
        mem.peak_bytes <= budget,
        mem.peak_bytes,
        "num_blocks_per_group=1",
        sync_at_wait=True,
        sync_after_use=True,
    )


def _spread(n_blocks: int, n_pre: int) -> set[int]:
    """Positions of ``n_pre`` preloaded floors spread evenly over ``n_blocks`` (mmgp space_between)."""
    if n_pre <= 0:
        return set()
    return {min(n_blocks - 1, math.floor((i + 0.5) * n_blocks / n_pre)) for i in range(n_pre)}


def mmgp(ctx: GraphContext, budget: int) -> PeerSchedule:
    """mmgp: base resident, evenly spread preloaded floors, one-block-ahead shuttle, sync per floor."""
    blocks = [k for k, b in enumerate(ctx.is_block) if b]

    def schedule(n_swap: int) -> list[UnitWindow]:
        pre = {blocks[i] for i in _spread(len(blocks), len(blocks) - n_swap)}
        out = []
        prev_first = 0
        for k, u in enumerate(ctx.layer_units):
            first, last = ctx.layer_range[k]
            if not ctx.is_block[k] or k in pre:
                out.append(_resident(u.bytes))
            else:
                # The first floor's load is issued at op 0: mmgp's circular shuttle prefetches it during
                # the last floor of the previous call, which the per-call model cannot carry over.
                out.append(_swapped(first, last, u.bytes, prev_first if k != blocks[0] else 0))
            if ctx.is_block[k]:
                prev_first = first
        return out

    syncs = tuple(ctx.layer_range[k][0] for k in blocks)
    return _smallest_fit(
        ctx, "mmgp", budget, range(len(blocks) + 1), schedule, "swapped_floors", dict(sync_at_ops=syncs)
    )


def comfyui_lowvram(ctx: GraphContext, budget: int) -> PeerSchedule:
    """ComfyUI classic lowvram: largest modules resident first, the rest cast per forward."""
    specs, ranges = ctx.module_units, ctx.module_range
    by_size = sorted(range(len(specs)), key=lambda k: (-specs[k].bytes, k))

    def schedule_for(limit: int) -> list[UnitWindow]:
        loaded: set[int] = set()
        counter = 0
        for k in by_size:
            if counter + specs[k].bytes < limit:  # ComfyUI casts when mem_counter + size >= limit
                loaded.add(k)
                counter += specs[k].bytes
        return [
            _resident(s.bytes) if k in loaded else _swapped(ranges[k][0], ranges[k][1], s.bytes)
            for k, s in enumerate(specs)
        ]

    names = tuple(s.name for s in specs)
    lo_units = schedule_for(0)
    lo_peak = ctx.memory(lo_units).peak_bytes
    if lo_peak > budget:
        return PeerSchedule(
            "comfyui-lowvram", names, tuple(lo_units), False, lo_peak, "lowvram_model_memory=0"
        )
    # Binary search on the limit; the greedy set is not strictly monotone in the limit, so the final
    # choice is re-simulated and the search only keeps limits whose schedule was seen to fit.
    lo, hi = 0, ctx.ir.weight_bytes + 1
    best, best_units, best_peak = 0, lo_units, lo_peak
    while hi - lo > 1 << 20:
        mid = (lo + hi) // 2
        units = schedule_for(mid)
        peak = ctx.memory(units).peak_bytes
        if peak <= budget:
            lo, best, best_units, best_peak = mid, mid, units, peak
        else:
            hi = mid
    return PeerSchedule(
        "comfyui-lowvram",
        names,
        tuple(best_units),
        True,
        best_peak,
        f"lowvram_model_memory={best / 2**30:.2f}GiB",
    )


def _smallest_fit(
    ctx: GraphContext,
    policy: str,
    budget: int,
    candidates: range,
    schedule: Callable[[int], list[UnitWindow]],
    knob: str,
    extras: dict[str, object],
) -> PeerSchedule:
    """The first candidate (fewest swapped) whose peak fits, else the last one marked infeasible."""
    names = tuple(u.name for u in ctx.layer_units)
    units: list[UnitWindow] = []
    peak = 0
    n = candidates.start
    for n in candidates:
        units = schedule(n)
        peak = ctx.memory(units).peak_bytes
        if peak <= budget:
            break
    return PeerSchedule(
        policy,
        names,
        tuple(units),
        peak <= budget,
        peak,
        f"{knob}={n}",
        **extras,  # type: ignore[arg-type]
    )


def build_peer(policy: str, ctx: GraphContext, budget: int) -> PeerSchedule:
    """The schedule of ``policy`` (one of :data:`PEER_POLICIES`) on ``ctx`` under ``budget`` bytes."""
    if policy == "wvw-blockswap-p0":
        return wvw_blockswap(ctx, budget, 0)
    if policy == "wvw-blockswap-p1":
        return wvw_blockswap(ctx, budget, 1)
    if policy == "diffusers-group":
        return diffusers_group(ctx, budget)
    if policy == "mmgp":
        return mmgp(ctx, budget)
    if policy == "comfyui-lowvram":
        return comfyui_lowvram(ctx, budget)
    raise PlanError(f"policy={policy!r} is not a peer policy; use one of {', '.join(PEER_POLICIES)}")


def evaluate(
    sched: PeerSchedule,
    costs: OpCosts,
    pinned_h2d_gbps: float,
    d2h_gbps: float,
    sync_overhead_ms: float,
) -> PolicyTiming:
    """Time of one call under ``sched``: the planner's two-stream model on costs with the peer's extras.

    Args:
        sched: the peer schedule.
        costs: per-op compute times (:func:`fxswap.bench.costmodel.graph_costs`).
        pinned_h2d_gbps: host-to-device rate of the peer's (pinned) host copies.
        d2h_gbps: device-to-host rate, for peers that copy back.
        sync_overhead_ms: GPU idle time per host synchronisation.
    """
    n = len(costs.op_ms)
    extra = [0.0] * n
    h2d_ms = 1e3 / (pinned_h2d_gbps * 1e9)
    d2h_ms = 1e3 / (d2h_gbps * 1e9)
    d2h_bytes = 0
    if n:
        for u in sched.units:
            if u.resident:
                continue
            if sched.copies_on_compute_stream:
                extra[u.load_at] += u.bytes * h2d_ms
            if sched.d2h_after_use:
                extra[u.release_after] += u.bytes * d2h_ms
                d2h_bytes += u.bytes
            if sched.sync_at_wait:
                extra[u.wait_at] += sync_overhead_ms
            if sched.sync_after_use:
                extra[u.release_after] += sync_overhead_ms
        for op in sched.sync_at_ops:
            extra[op] += sync_overhead_ms
    with_extras = OpCosts.from_op_ms([t + e for t, e in zip(costs.op_ms, extra, strict=True)])
    rate = _INSTANT_GBPS if sched.copies_on_compute_stream else pinned_h2d_gbps
    report = simulate_time(with_extras, sched.units, rate)
    compute = costs.prefix_ms[-1]
    return PolicyTiming(report.step_ms, compute, report.step_ms - compute, report.moved_bytes, d2h_bytes)
