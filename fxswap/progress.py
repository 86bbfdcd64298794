"""Progress bars for the slow everyday steps (checkpoint loading, pinning, compiling).

tqdm draws on stderr only when it is a terminal (``disable=None``), so logs, CI and tests stay
quiet; ``FXSWAP_PROGRESS=0`` turns the bars off everywhere, ``FXSWAP_PROGRESS=1`` forces them on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["plan_line", "progress", "stage"]

GiB = 2**30

_T = TypeVar("_T")


def _disable() -> bool | None:
    flag = os.environ.get("FXSWAP_PROGRESS", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return True
    if flag in ("1", "true", "yes", "on"):
        return False
    return None  # tqdm: off when stderr is not a TTY


def progress(
    iterable: Iterable[_T], *, desc: str, unit: str = "it", total: int | None = None, **kw: Any
) -> Iterator[_T]:
    """``iterable`` with a tqdm bar named ``desc`` (quiet when not a TTY or FXSWAP_PROGRESS=0)."""
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, unit=unit, total=total, disable=_disable(), leave=False, **kw)


def plan_line(plan: Any) -> str:
    """One log line for a plan (``SwapPlan.summary()`` is the multi-line form)."""
    swapped = sum(not u.resident for u in plan.units)
    return (
        f"mode {plan.mode} ({plan.partition}), {len(plan.units)} units ({swapped} swapped, prefetch depth "
        f"{plan.prefetch_depth}), resident {plan.resident_bytes / GiB:.2f} GiB, moved "
        f"{plan.moved_bytes_per_call / GiB:.2f} GiB per call, predicted peak {plan.peak_bytes / GiB:.2f} of "
        f"{plan.max_vram_bytes / GiB:.2f} GiB, predicted step {plan.predicted_step_ms:.1f} ms "
        f"(waiting {plan.predicted_stall_ms:.1f} ms); minimum budget {plan.min_vram_bytes / GiB:.2f} GiB"
    )


@contextmanager
def stage(desc: str) -> Iterator[None]:
    """A one-step bar for a long step with no finer progress (it shows the elapsed time)."""
    from tqdm.auto import tqdm

    with tqdm(total=1, desc=desc, disable=_disable(), leave=False, bar_format="{desc}: {elapsed}") as bar:
        yield
        bar.update()
