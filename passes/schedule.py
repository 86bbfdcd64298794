"""Schedule pass: which units stay resident, the prefetch depth, and each unit's load/wait/release.

Input: a partition (:class:`fxswap.passes.partition.UnitSpec` tuple), the liveness record and a
budget. Output: a :class:`Schedule` (plain data). For a swapped unit ``k`` (units sorted by first
use, depth ``d``)::

    load_at[k]       = first_use[k - d]   (op 0 if k < d)     # async H2D copy issued before this op
    wait_at[k]       = first_use[k]                          # compute waits before this op
    release_after[k] = last_use[k]                           # device copy freed after this op

Resident set: greedy, units largest first (ties: execution order); a unit is kept resident when the
simulated peak stays within the budget. By the monotonicity NOTE in :mod:`fxswap.passes.simulate`
a unit that does not fit now never fits later in the same greedy pass, so one pass suffices.

NOTE: greedy by size is not an exact knapsack: a set of several smaller units could sometimes
keep more bytes resident than the one large unit chosen first. The rejected alternative, an exact
DP over segments, is exponential in the number of overlapping units; greedy is O(units x
segments) and the cost model in adaptive mode then picks among partitions and depths, which
matters more than the last few percent of resident bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fxswap.passes.liveness import Liveness, unit_range
from fxswap.passes.partition import UnitSpec
from fxswap.passes.simulate import SegmentModel, UnitWindow, load_points

__all__ = ["PreparedPartition", "Schedule", "fill_resident", "prepare_partition"]


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

    def min_budget(self) -> int:
        """The smallest budget any schedule of this partition fits: all swapped, depth 0."""
        levels, _ = self.model.swapped_levels(0, [u.bytes for u in self.units])
        return max(levels)


def prepare_partition(
    label: str, units: Sequence[UnitSpec], live: Liveness, reserve: int
) -> PreparedPartition:
    """Sort units by first use (ties: partition order) and build their segment model."""
    ranges = [unit_range(u.params, live) for u in units]
    order = sorted(range(len(units)), key=lambda k: (ranges[k][0], k))
    first = tuple(ranges[k][0] for k in order)
    last = tuple(ranges[k][1] for k in order)
    return PreparedPartition(
        label, tuple(units[k] for k in order), first, last, SegmentModel(live.act, first, last, reserve)
    )


def fill_resident(part: PreparedPartition, depth: int, budget: int) -> Schedule | None:
    """Greedily keep units resident at prefetch ``depth`` under ``budget``.

    Returns:
        The schedule, or None when even the all-swapped schedule at this depth exceeds the budget.
    """
    sizes = [u.bytes for u in part.units]
    levels, spans = part.model.swapped_levels(depth, sizes)
    if max(levels) > budget:
        return None
    resident = [False] * len(sizes)
    for k in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        a, b = spans[k]
        size = sizes[k]
        # Resident adds the unit's bytes to every segment outside its swapped span.
        outside = max(max(levels[:a], default=0), max(levels[b + 1 :], default=0))
        if outside + size <= budget:
            resident[k] = True
            if size:
                levels[:a] = [v + size for v in levels[:a]]
                levels[b + 1 :] = [v + size for v in levels[b + 1 :]]
    return Schedule(
        part.units,
        part.first_use,
        part.last_use,
        tuple(resident),
        depth,
        tuple(load_points(part.first_use, depth)),
        max(levels),
    )
