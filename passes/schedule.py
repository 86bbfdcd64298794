"""Schedule pass: which units stay resident, the prefetch depth, and each unit's load/wait/release.

Input: a partition (:class:`fxswap.passes.partition.UnitSpec` tuple), the liveness record and a
budget. Output: a :class:`Schedule` (plain data). For a swapped unit ``k`` (units sorted by first
use, depth ``d``)::

    load_at[k]       = first_use[k - d]   (op 0 if k < d)     # async H2D copy issued before this op
    wait_at[k]       = first_use[k]                          # compute waits before this op
    release_after[k] = last_use[k]                           # device copy freed after this op

Resident set: greedy, units largest first (ties: execution order for the "front" placement, an
evenly spread order for "spread", see :func:`fill_resident`); a unit is kept resident when the
simulated peak stays within the budget. By the monotonicity NOTE in :mod:`fxswap.passes.simulate`
a unit that does not fit now never fits later in the same greedy pass, so one pass suffices.

NOTE: greedy by size is not an exact knapsack: a set of several smaller units could sometimes
keep more bytes resident than the one large unit chosen first. The rejected alternative, an exact
DP over segments, is exponential in the number of overlapping units; greedy is O(units x
segments) and the cost model in adaptive mode then picks among partitions and depths, which
matters more than the last few percent of resident bytes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from fxswap.passes.liveness import Liveness, unit_range
from fxswap.passes.occurrence import Occurrence
from fxswap.passes.partition import UnitSpec
from fxswap.passes.simulate import SegmentModel, UnitWindow, load_points

__all__ = [
    "PLACEMENTS",
    "PreparedPartition",
    "Schedule",
    "block_windows",
    "fill_resident",
    "prepare_partition",
    "spread_rank",
]


@dataclass(frozen=True, slots=True)
class Schedule:
    """Residency, depth and load points for one partition (units sorted by first use)."""

    units: tuple[UnitSpec, ...]
    first_use: tuple[int, ...]
    last_use: tuple[int, ...]
    resident: tuple[bool, ...]
    depth: int
    load_at: tuple[int, ...]
    peak_bytes: int

    @property
    def resident_bytes(self) -> int:
        return sum(u.bytes for u, r in zip(self.units, self.resident, strict=True) if r)

    def windows(self) -> list[UnitWindow]:
        """The units as the simulators take them, in first-use order."""
        return [
            UnitWindow(u.bytes, r, la, f, ll)
            for u, r, la, f, ll in zip(
                self.units, self.resident, self.load_at, self.first_use, self.last_use, strict=True
            )
        ]


@dataclass(frozen=True, slots=True)
class PreparedPartition:
    """A partition sorted by first use with its segment model; reused for every depth and budget."""

    label: str
    units: tuple[UnitSpec, ...]
    first_use: tuple[int, ...]
    last_use: tuple[int, ...]
    model: SegmentModel
    # Units that may never be resident: they hold one of several loads of a weight
    # (fxswap.passes.occurrence); and the occurrences the partition's graph was split by.
    swap_only: tuple[bool, ...] = ()
    occurrences: tuple[Occurrence, ...] = ()
    # The ops that really read each unit, where ``first_use``/``last_use`` were widened to its
    # blocks' edges (see prepare_partition's ``blocks``); empty: the same as first_use/last_use.
    read_first: tuple[int, ...] = ()
    read_last: tuple[int, ...] = ()

    def reads(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """First and last op that reads each unit (what the plan's first_use/last_use record)."""
        if self.read_first:
            return self.read_first, self.read_last
        return self.first_use, self.last_use

    def min_budget(self) -> int:
        """The smallest budget any schedule of this partition fits: all swapped, depth 0."""
        levels, _ = self.model.swapped_levels(0, [u.bytes for u in self.units])
        return max(levels)


def prepare_partition(
    label: str,
    units: Sequence[UnitSpec],
    live: Liveness,
    reserve: int,
    *,
    pinned: Collection[str] = (),
    occurrences: Sequence[Occurrence] = (),
    blocks: Sequence[str] | None = None,
) -> PreparedPartition:
    """Sort units by first use (ties: partition order) and build their segment model.

    ``pinned``: weights that keep a unit swapped (the split graph's reloaded occurrences);
    ``occurrences``: what the graph of ``live`` was split by, for the planner to map units back.
    ``blocks``: the repeated block of every op (:func:`fxswap.passes.partition.block_labels`).
    Given, a unit that alone is read in the blocks it is read in is waited for before the first op
    of its first block and released after the last op of its last (loads anchored on it move to
    that first op too): the swap ops then sit between blocks, outside the compiled block programs,
    and blocks alike share one program whether swapped or resident (:mod:`fxswap.passes.regions`).
    The memory model sees the widened windows, so the plan pays for them.
    """
    ranges = [unit_range(u.params, live) for u in units]
    order = sorted(range(len(units)), key=lambda k: (ranges[k][0], k))
    first = tuple(ranges[k][0] for k in order)
    last = tuple(ranges[k][1] for k in order)
    sorted_units = tuple(units[k] for k in order)
    read_first: tuple[int, ...] = ()
    read_last: tuple[int, ...] = ()
    if blocks is not None and len(blocks) == len(live.act):
        used = [any(p in live.first_use for p in u.params) for u in sorted_units]
        wide = block_windows(blocks, first, last, used)
        if wide != list(zip(first, last, strict=True)):
            read_first, read_last = first, last
            first = tuple(a for a, _ in wide)
            last = tuple(b for _, b in wide)
    return PreparedPartition(
        label,
        sorted_units,
        first,
        last,
        SegmentModel(live.act, first, last, reserve),
        tuple(any(p in pinned for p in u.params) for u in sorted_units),
        tuple(occurrences),
        read_first,
        read_last,
    )


def block_windows(
    blocks: Sequence[str], first: Sequence[int], last: Sequence[int], used: Sequence[bool]
) -> list[tuple[int, int]]:
    """Each unit's window ``(first, last)`` with every end that falls in a block moved to that
    block's edge: ``first`` to the block's first op, ``last`` to its last op.

    ``blocks``: block label per op (``""`` between blocks); ``first``/``last``: the ops that read
    each unit first and last; ``used``: whether any op reads the unit at all (an unused unit keeps
    its window).

    Every wait and release then sits at a block's edge, where the compiled block programs do not
    reach, so blocks that differ only in which of their units are swapped share one program. Units
    that share a block (chunkwise) are all held over the whole block: the planner plans these
    windows, and plans the exact ones where they do not fit (:func:`fxswap.passes.planner.build_plan`).

    >>> block_windows(["", "b.0", "b.0", "b.0", "b.1", "b.1"], [0, 2, 3, 4], [0, 2, 5, 4], [True] * 4)
    [(0, 0), (1, 3), (1, 5), (4, 5)]
    """
    n = len(blocks)
    start = list(range(n))
    end = list(range(n))
    for i in range(1, n):
        if blocks[i] and blocks[i] == blocks[i - 1]:
            start[i] = start[i - 1]
    for i in range(n - 2, -1, -1):
        if blocks[i] and blocks[i] == blocks[i + 1]:
            end[i] = end[i + 1]
    return [(start[f], end[ll]) if u else (f, ll) for f, ll, u in zip(first, last, used, strict=True)]


# "back" only pays with a warm start (the planner tries it then): see fill_resident.
PLACEMENTS = ("front", "spread", "back")


def spread_rank(n: int) -> list[int]:
    """A rank per position 0..n-1 such that every prefix of the ranking is spread evenly.

    Positions are taken in van der Corput order (0, n/2, n/4, 3n/4, ...), so the first ``r`` ranked
    positions, and the ``n - r`` left over, are each close to evenly spaced for every ``r``.

    >>> spread_rank(8)
    [0, 4, 2, 6, 1, 5, 3, 7]
    """
    rank = [-1] * n
    bits = max(1, (n - 1).bit_length())
    taken = 0
    # 2**bits >= n, so the scaled fractions v * n / 2**bits step by at most 1 and hit every position.
    for i in range(2**bits if n else 0):
        pos = int(f"{i:0{bits}b}"[::-1], 2) * n >> bits
        if rank[pos] < 0:
            rank[pos] = taken
            taken += 1
    return rank


def fill_resident(
    part: PreparedPartition, depth: int, budget: int, placement: str = "front"
) -> Schedule | None:
    """Greedily keep units resident at prefetch ``depth`` under ``budget``.

    Units are tried largest first; ``placement`` breaks ties between equal sizes:

    - ``"front"``: execution order, so the first units stay resident and the swapped ones bunch at
      the end (their copies then overlap only each other's compute);
    - ``"spread"``: :func:`spread_rank` order, so the swapped units are spread among the resident
      ones and each copy can overlap the compute of the resident units before it. With a depth of
      a few units this hides far more copy time per byte in flight (the depth counts resident units
      too, which take no memory to prefetch past).

    - ``"back"``: reverse execution order, so the last units stay resident and the first ones are
      swapped. A single call then starts with a stall, but in a sampling loop planned as a cycle
      (:mod:`fxswap.passes.warmstart`) the first units load while the resident tail of the
      previous call computes: the rotation of "front" that hides the call boundary.

    Every way the result is maximal: no swapped unit could be made resident as well, except the
    units of ``part.swap_only``, which are never resident.

    Returns:
        The schedule, or None when even the all-swapped schedule at this depth exceeds the budget.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}; use one of {', '.join(PLACEMENTS)}")
    sizes = [u.bytes for u in part.units]
    levels, spans = part.model.swapped_levels(depth, sizes)
    if max(levels) > budget:
        return None
    resident = [False] * len(sizes)
    n = len(sizes)
    tie = {"front": list(range(n)), "spread": spread_rank(n), "back": list(range(n - 1, -1, -1))}[placement]
    # Memory of segment j is lower[j] + added: ``added`` sums the resident units, ``lower`` is the
    # all-swapped level less the resident units whose swapped span covers j (counted there already).
    # Making a unit resident then rewrites only its own short span, and the highest other segment
    # is ``top`` unless every segment at ``top`` lies inside the span: O(span) per unit instead of
    # O(segments), which is what keeps adaptive's search within its time target.
    lower = levels
    added = 0
    top = max(lower)
    ntop = lower.count(top)
    swap_only = part.swap_only or (False,) * n
    for k in sorted(range(len(sizes)), key=lambda k: (-sizes[k], tie[k])):
        if swap_only[k]:
            continue
        a, b = spans[k]
        size = sizes[k]
        inside = lower[a : b + 1].count(top)
        outside = top if inside < ntop else max(max(lower[:a], default=0), max(lower[b + 1 :], default=0))
        # Resident adds the unit's bytes to every segment outside its swapped span.
        if outside + added + size <= budget:
            resident[k] = True
            if size:
                added += size
                lower[a : b + 1] = [v - size for v in lower[a : b + 1]]
                ntop -= inside
                if ntop == 0:
                    top = max(lower)
                    ntop = lower.count(top)
    return Schedule(
        part.units,
        part.first_use,
        part.last_use,
        tuple(resident),
        depth,
        tuple(load_points(part.first_use, depth)),
        max(lower) + added,
    )
