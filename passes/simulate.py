"""The one memory and time model of fxswap: planner, validator, tests and CLI all use it.

Memory (bytes on the device while op ``i`` runs)::

    mem[i] = reserve + resident + sum(bytes[k] for swapped k with load_at[k] <= i <= release_after[k])
             + act[i]

``reserve`` is workspace plus allocator slack, ``resident`` the units kept on the device for the whole
call, ``act`` the live activations (:func:`fxswap.passes.liveness.activation_profile`). A swapped unit
is allocated when its load is issued (before op ``load_at``) and freed after op ``release_after``.

Prefetch (:func:`load_points`): units sorted by first use; with depth ``d`` the load of unit ``k`` is
issued before the first use of unit ``k - d`` (op 0 when ``k < d``); ``d = 0`` loads just before use.

NOTE (monotonicity; the brute-force property test checks it): making a unit resident widens its
interval to the whole call, and a larger depth moves every ``load_at`` earlier (or keeps it), so
neither lowers ``mem[i]`` at any op. Hence for a fixed partition the smallest budget that any
schedule fits is the peak of the all-swapped, depth-0 schedule, and :class:`SegmentModel` can
check a candidate resident unit in O(segments) without re-simulating.

Time (:func:`simulate_time`), three streams:

- compute runs ops in order; op time = max(flops / compute rate, mem_bytes / device memory rate);
  a collective op costs nothing here (its transfer is the collectives stream's);
- copy runs loads in issue order; a load starts when compute has reached ``load_at`` and the copy
  stream is free, and takes ``bytes / h2d rate``;
- before op ``wait_at`` compute stalls until that load has finished;
- a *blocking* load (pageable host memory, staged by the host) stalls compute at ``load_at``
  until it has finished: it overlaps nothing;
- collectives (sequence parallelism's all-to-alls, :class:`CollectiveCost`) run in issue order on
  a stream of their own: one starts when compute has reached its op and the stream is free, and
  takes ``latency + max(sent, received) / p2p rate`` (an all-to-all sends and receives at once,
  each direction at the link's per-direction rate); compute stalls at its ``wait_tensor`` until it
  has finished (a functional collective's result is needed there, not before);
- the link (``nvlink=False``, consumer cards): a rank's all-to-all crosses its PCIe link, the
  received bytes in the host-to-device direction that the weight copies use. That direction is
  one resource served in issue order: a load or a collective starts only when it is free, and
  holds it until it ends. Serving in order rather than interleaving moves the same bytes at the
  same rates, so while the direction is busy both finish no later than the sum of their times;
  only which one finishes first can differ. With NVLink (``nvlink=True``) the collectives use
  their own link and share nothing with the copies.

A graph without collectives is priced exactly as by the two-stream model (compute and copy).

Resident units are loaded once, outside the step, and are not counted per call. Loading the first
units of the *next* call during the tail of this one is not modelled (each call starts cold).

NOTE: the planner evaluates dozens of candidates on graphs of ~7,000 ops, so :class:`SegmentModel`
compresses the timeline to segments between unit events (which depend only on the units' first
and last uses, not on residency or depth) and precomputes the activation maximum per segment once.
:func:`simulate_memory` is the per-op reference used for reports and validation.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fxswap.ir import OpInfo
from fxswap.options import DEFAULT_DEVICE_MEM_GBPS, DEFAULT_P2P_GBPS

if TYPE_CHECKING:
    from fxswap.swapplan import SwapUnit

__all__ = [
    "COLLECTIVE_LATENCY_MS",
    "CollectiveCost",
    "DEFAULT_DEVICE_MEM_GBPS",
    "MemoryTimeline",
    "OpCosts",
    "SegmentModel",
    "Streams",
    "TimeReport",
    "UnitWindow",
    "load_points",
    "op_costs",
    "simulate_memory",
    "simulate_time",
    "unit_windows",
]


@dataclass(frozen=True, slots=True)
class UnitWindow:
    """A scheduled unit as the simulators see it (op indices into the graph)."""

    bytes: int
    resident: bool
    load_at: int = 0  # ignored when resident
    wait_at: int = 0
    release_after: int = 0
    # The copy cannot overlap compute: its host memory is pageable, so the host stages it and
    # blocks from the load until it has landed (fxswap.runtime's staging ring).
    blocking: bool = False


def unit_windows(units: Iterable[SwapUnit]) -> list[UnitWindow]:
    """The units of a :class:`fxswap.swapplan.SwapPlan` as the simulators take them, in the given order."""
    return [
        UnitWindow(u.bytes, True)
        if u.resident
        else UnitWindow(u.bytes, False, u.load_at or 0, u.wait_at or 0, u.release_after or 0)
        for u in units
    ]


def load_points(first_uses: Sequence[int], depth: int) -> list[int]:
    """Op index before which each unit's load is issued, for units sorted by first use.

    Args:
        first_uses: first use of every unit (resident ones included), non-decreasing.
        depth: prefetch depth; 0 loads each unit just before its first use.

    Returns:
        ``load_at[k] = first_uses[k - depth]`` (0 when ``k < depth``).
    """
    return [first_uses[k - depth] if k >= depth else 0 for k in range(len(first_uses))]


@dataclass(frozen=True, slots=True)
class MemoryTimeline:
    """Per-op memory, split into its parts. ``peak_op`` is -1 for a graph without ops."""

    reserve_bytes: int
    resident_bytes: int
    swapped: tuple[int, ...]  # bytes of swapped units allocated (in flight or live) at op i
    act: tuple[int, ...]
    peak_bytes: int
    peak_op: int

    def total(self, i: int) -> int:
        return self.reserve_bytes + self.resident_bytes + self.swapped[i] + self.act[i]

    def to_table(self, op_names: Sequence[str] | None = None, limit: int = 40) -> str:
        """A fixed-width table of the ``limit`` ops around the peak (GiB)."""
        n = len(self.act)
        lo = max(0, min(self.peak_op - limit // 2, n - limit))
        rows = [f"{'op':>6} {'name':<32} {'resident':>9} {'swapped':>9} {'act':>9} {'total':>9}"]
        for i in range(lo, min(n, lo + limit)):
            name = op_names[i] if op_names is not None else ""
            mark = " <- peak" if i == self.peak_op else ""
            rows.append(
                f"{i:>6} {name[:32]:<32} {self.resident_bytes / 2**30:>9.3f} "
                f"{self.swapped[i] / 2**30:>9.3f} {self.act[i] / 2**30:>9.3f} "
                f"{self.total(i) / 2**30:>9.3f}{mark}"
            )
        return "\n".join(rows)


def simulate_memory(act: Sequence[int], units: Sequence[UnitWindow], reserve_bytes: int) -> MemoryTimeline:
    """Per-op memory of a schedule (difference array; O(ops + units)).

    Args:
        act: activation bytes per op.
        units: every unit, resident or swapped.
        reserve_bytes: workspace and allocator slack counted at every op.

    Returns:
        The :class:`MemoryTimeline`; for a graph without ops the peak is reserve + resident.
    """
    n = len(act)
    resident = sum(u.bytes for u in units if u.resident)
    diff = [0] * (n + 1)
    for u in units:
        if not u.resident and n:
            diff[u.load_at] += u.bytes
            diff[u.release_after + 1] -= u.bytes
    swapped = []
    running = 0
    peak, peak_op = reserve_bytes + resident, -1
    for i in range(n):
        running += diff[i]
        swapped.append(running)
        total = reserve_bytes + resident + running + act[i]
        if peak_op < 0 or total > peak:
            peak, peak_op = total, i
    return MemoryTimeline(reserve_bytes, resident, tuple(swapped), tuple(act), peak, peak_op)


# Fixed cost of one collective (launch and handshake), ms. [guess] NCCL's small-message all-to-all
# latency is tens of microseconds; at the megabytes a video's all-to-alls move it is noise.
COLLECTIVE_LATENCY_MS = 0.05


@dataclass(frozen=True, slots=True)
class CollectiveCost:
    """One collective as the time model sees it: issued when compute reaches op ``issue_op``,
    needed before op ``wait_op`` (its ``wait_tensor``), ``ms`` on the collectives stream.
    ``shares_h2d``: it holds the host-to-device direction of the PCIe link for that time (no
    NVLink), so that loads and it are served one after another."""

    issue_op: int
    wait_op: int
    ms: float
    shares_h2d: bool


@dataclass(frozen=True, slots=True)
class OpCosts:
    """Modelled compute time of every op and its prefix sum (``prefix_ms[i]`` = start of op i), and
    the collectives of the graph in issue order (none for a graph of one process)."""

    op_ms: tuple[float, ...]
    prefix_ms: tuple[float, ...]
    collectives: tuple[CollectiveCost, ...] = ()

    @classmethod
    def from_op_ms(cls, op_ms: Sequence[float], collectives: Sequence[CollectiveCost] = ()) -> OpCosts:
        """The costs of ops taking ``op_ms`` each, with their prefix sum."""
        prefix = [0.0]
        for t in op_ms:
            prefix.append(prefix[-1] + t)
        return cls(tuple(op_ms), tuple(prefix), tuple(collectives))


def op_costs(
    ops: Sequence[OpInfo],
    compute_tflops: float,
    device_mem_gbps: float,
    p2p_gbps: float = DEFAULT_P2P_GBPS,
    nvlink: bool = False,
) -> OpCosts:
    """Op time = max(flops / compute rate, mem_bytes / memory rate), plus the dequantisation run
    before it (``dequant_bytes`` / memory rate: a separate, memory-bound kernel), in milliseconds.

    A collective op (``OpInfo.collective``) and its wait cost 0 on compute; the collective becomes a
    :class:`CollectiveCost` of ``COLLECTIVE_LATENCY_MS + max(sent, received) / p2p_gbps``, waited
    for at the op whose ``waits_on`` names it (at the graph's end if none does).
    """
    flop_ms = 1e3 / (compute_tflops * 1e12)
    byte_ms = 1e3 / (device_mem_gbps * 1e9)
    link_ms = 1e3 / (p2p_gbps * 1e9)
    wait_of = {op.waits_on: i for i, op in enumerate(ops) if op.collective == "wait" and op.waits_on >= 0}
    op_ms: list[float] = []
    collectives: list[CollectiveCost] = []
    for i, op in enumerate(ops):
        if op.collective:
            # neither the collective (its stream's) nor its wait (a stream dependency) computes
            op_ms.append(0.0)
            if op.collective != "wait":
                ms = COLLECTIVE_LATENCY_MS + max(op.sent_bytes, op.received_bytes) * link_ms
                collectives.append(CollectiveCost(i, wait_of.get(i, len(ops)), ms, not nvlink))
            continue
        op_ms.append(max(op.flops * flop_ms, op.mem_bytes * byte_ms) + op.dequant_bytes * byte_ms)
    return OpCosts.from_op_ms(op_ms, collectives)


class Streams:
    """Where the copy and collectives streams and the host-to-device direction of the link are
    free (ms); :meth:`load` and :meth:`collective` book one transfer on them (module docstring).

    Not a frozen record: a helper the time simulations build per run and discard.
    """

    __slots__ = ("collective_free", "copy_free", "h2d_free")

    def __init__(self) -> None:
        self.copy_free = self.collective_free = self.h2d_free = 0.0

    def load(self, now: float, ms: float) -> tuple[float, float]:
        """Start and end of a load issued at ``now`` that takes ``ms`` on the link."""
        start = max(now, self.copy_free, self.h2d_free)
        self.copy_free = self.h2d_free = start + ms
        return start, start + ms

    def collective(self, now: float, c: CollectiveCost) -> float:
        """End of collective ``c`` issued at ``now``."""
        start = max(now, self.collective_free, self.h2d_free if c.shares_h2d else 0.0)
        self.collective_free = start + c.ms
        if c.shares_h2d:
            self.h2d_free = self.collective_free
        return self.collective_free


@dataclass(frozen=True, slots=True)
class TimeReport:
    """Predicted timing of one call. Per-load tuples follow the order of the ``units`` argument
    (entries for resident units are 0.0)."""

    step_ms: float
    compute_ms: float
    stall_ms: float
    moved_bytes: int
    load_start_ms: tuple[float, ...]
    load_end_ms: tuple[float, ...]
    stall_ms_per_unit: tuple[float, ...]
    # Sequence parallelism: the collectives' time on their stream, and compute's waits for them
    # at their wait_tensor ops. ``step_ms = compute_ms + stall_ms + collective_stall_ms``, where
    # ``stall_ms`` is the waits for copies alone.
    collective_ms: float = 0.0
    collective_stall_ms: float = 0.0


def simulate_time(costs: OpCosts, units: Sequence[UnitWindow], h2d_gbps: float) -> TimeReport:
    """Three-stream time model of one call (see the module docstring). O((units + collectives) log).

    Args:
        costs: per-op compute times and the collectives from :func:`op_costs`.
        units: every unit; resident ones cost nothing per call. Loads issued at the same op go to
            the copy stream in the order given here (callers pass units sorted by first use).
        h2d_gbps: host-to-device copy rate in GB/s (1e9 bytes per second).

    Returns:
        The :class:`TimeReport`.
    """
    byte_ms = 1e3 / (h2d_gbps * 1e9)
    m = len(units)
    colls = costs.collectives
    # Events at op i: issue loads first, then waits for loads (so that depth 0, load_at == wait_at,
    # works), then the collective op itself (compute reaches it after those waits), then waits for
    # collectives (a wait_tensor op never issues a collective).
    events = sorted(
        [(u.load_at, 0, k) for k, u in enumerate(units) if not u.resident]
        + [(u.wait_at, 1, k) for k, u in enumerate(units) if not u.resident]
        + [(c.issue_op, 2, k) for k, c in enumerate(colls)]
        + [(c.wait_op, 3, k) for k, c in enumerate(colls)]
    )
    start = [0.0] * m
    end = [0.0] * m
    stall_k = [0.0] * m
    coll_end = [0.0] * len(colls)
    stall = coll_stall = 0.0
    streams = Streams()
    prefix = costs.prefix_ms
    for op, kind, k in events:
        now = prefix[op] + stall + coll_stall
        if kind == 0:
            start[k], end[k] = streams.load(now, units[k].bytes * byte_ms)
            if units[k].blocking:  # the host, hence compute, waits at the load itself
                stall_k[k] = end[k] - now
                stall += stall_k[k]
        elif kind == 1:
            if end[k] > now:
                stall_k[k] = end[k] - now
                stall += stall_k[k]
        elif kind == 2:
            coll_end[k] = streams.collective(now, colls[k])
        elif coll_end[k] > now:
            coll_stall += coll_end[k] - now
    compute = prefix[-1]
    moved = sum(u.bytes for u in units if not u.resident)
    return TimeReport(
        compute + stall + coll_stall,
        compute,
        stall,
        moved,
        tuple(start),
        tuple(end),
        tuple(stall_k),
        sum((c.ms for c in colls), 0.0),
        coll_stall,
    )


class SegmentModel:
    """Fast peak evaluation for one partition: units with fixed first/last uses, any residency/depth.

    Segments are the maximal op ranges in which no unit can start or stop occupying memory; their
    boundaries are op 0, every unit's first use (every possible ``load_at``) and every
    ``last_use + 1``. Each unit then covers whole segments, and a segment's peak is its fixed
    unit bytes plus the activation maximum over its ops, computed once here.

    Not a frozen record: a helper the schedule pass builds per partition and discards.
    """

    __slots__ = ("act_max", "bounds", "first", "first_seg", "last", "last_seg", "n", "reserve")

    def __init__(self, act: Sequence[int], first: Sequence[int], last: Sequence[int], reserve: int) -> None:
        self.n = len(act)
        self.first = list(first)
        self.last = list(last)
        self.reserve = reserve
        cuts = {0} | set(first) | {e + 1 for e in last}
        self.bounds = sorted(c for c in cuts if 0 <= c < self.n) if self.n else [0]
        ends = [*self.bounds[1:], self.n]
        self.act_max = [max(act[s:e]) if e > s else 0 for s, e in zip(self.bounds, ends, strict=True)]
        # Segments of every first and last use, once: every depth's load points are first uses.
        self.first_seg = [self.seg(f) for f in self.first]
        self.last_seg = [self.seg(e) for e in self.last]

    def seg(self, op: int) -> int:
        """Index of the segment that contains op ``op``."""
        return bisect.bisect_right(self.bounds, op) - 1

    def swapped_levels(self, depth: int, sizes: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Memory per segment with every unit swapped, and each unit's segment span at ``depth``.

        Returns:
            ``(levels, spans)``: ``levels[j]`` = reserve + max activation + swapped bytes in
            segment j; ``spans[k]`` = first and last segment that unit k occupies.
        """
        # load_points(first, depth)[k] is first[k - depth] (op 0, segment 0, when k < depth).
        starts = [0] * min(depth, len(sizes)) + self.first_seg[: max(0, len(sizes) - depth)]
        diff = [0] * (len(self.bounds) + 1)
        spans = list(zip(starts, self.last_seg, strict=True))
        for (a, b), size in zip(spans, sizes, strict=True):
            diff[a] += size
            diff[b + 1] -= size
        levels = []
        running = 0
        for j, am in enumerate(self.act_max):
            running += diff[j]
            levels.append(self.reserve + am + running)
        return levels, spans
