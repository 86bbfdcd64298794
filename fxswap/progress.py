"""Progress where people wait: tqdm bars, one log line per phase, and listeners for other front ends.

tqdm draws on stderr only when it is a terminal (``disable=None``), so logs, CI and tests stay
quiet; ``FXSWAP_PROGRESS=0`` turns the bars off everywhere, ``FXSWAP_PROGRESS=1`` forces them on.

Listeners (``listen``) receive every phase and every bar step as a :class:`ProgressEvent` whatever
``FXSWAP_PROGRESS`` says: they are not bars on this terminal but other front ends' (ComfyUI's node
progress bar), and those decide for themselves what to show.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["ProgressEvent", "listen", "phase", "plan_line", "progress", "stage"]

GiB = 2**30

logger = logging.getLogger("fxswap")

_T = TypeVar("_T")

#: The kinds of :class:`ProgressEvent`.
PHASE_START = "phase_start"
PHASE_END = "phase_end"
STEP = "step"


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    """One thing a listener hears.

    - ``phase_start``: ``name`` is the phase ("capture", "plan", "compile", "first call");
      ``done`` 0, ``total`` and ``seconds`` None.
    - ``phase_end``: the same ``name``; ``seconds`` the phase's wall time (also when it raised).
    - ``step``: ``name`` is the bar's ``desc``; ``done`` items of ``total`` (None when unknown)
      finished, ``seconds`` since the bar started. Each bar sends ``done=0`` before its first item.
    """

    kind: str
    name: str
    done: int
    total: int | None
    seconds: float | None


Listener = Callable[[ProgressEvent], None]


class _Registration:
    __slots__ = ("callback", "warned")

    def __init__(self, callback: Listener) -> None:
        self.callback = callback
        self.warned = False


# NOTE (why global, not thread-local): the thread that installs a listener (ComfyUI's prompt
# worker around a sampler call) is not always the thread that reports (a build may hand its
# blocks to workers). The tuple is replaced, never mutated, so notifying reads it without the lock.
_LISTENERS: tuple[_Registration, ...] = ()
_LOCK = threading.Lock()


@contextmanager
def listen(callback: Listener) -> Iterator[None]:
    """Send every :class:`ProgressEvent` of any thread to ``callback`` while the block runs.

    Listeners nest: all registered ones hear each event, oldest first. A callback that raises is
    logged once (a warning on the ``fxswap`` logger) and keeps being called; the work it watches
    goes on as if nothing happened.
    """
    global _LISTENERS
    reg = _Registration(callback)
    with _LOCK:
        _LISTENERS = (*_LISTENERS, reg)
    try:
        yield
    finally:
        with _LOCK:
            _LISTENERS = tuple(r for r in _LISTENERS if r is not reg)


def _notify(kind: str, name: str, done: int, total: int | None, seconds: float | None) -> None:
    regs = _LISTENERS
    if not regs:
        return
    event = ProgressEvent(kind, name, done, total, seconds)
    for reg in regs:
        try:
            reg.callback(event)
        except Exception:
            # A progress display must never cost a compile that took minutes.
            with _LOCK:
                first, reg.warned = not reg.warned, True
            if first:
                logger.warning(
                    "fxswap: progress listener %r raised on %s; ignored (warned once per listener)",
                    reg.callback,
                    event,
                    exc_info=True,
                )


@contextmanager
def phase(name: str) -> Iterator[None]:
    """One phase of a build: a log line when it starts, one with its wall time when it ends."""
    logger.info("fxswap: %s ...", name)
    _notify(PHASE_START, name, 0, None, None)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException as e:
        seconds = time.perf_counter() - t0
        logger.info("fxswap: %s failed after %.2f s (%s)", name, seconds, type(e).__name__)
        _notify(PHASE_END, name, 0, None, seconds)
        raise
    seconds = time.perf_counter() - t0
    logger.info("fxswap: %s done in %.2f s", name, seconds)
    _notify(PHASE_END, name, 0, None, seconds)


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
    """``iterable`` with a tqdm bar named ``desc`` (quiet when not a TTY or FXSWAP_PROGRESS=0).

    Listeners hear ``(desc, done, total)``: 0 before the first item, then each item once the loop
    body that took it has finished (when the next one is asked for).
    """
    from tqdm.auto import tqdm

    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    t0 = time.perf_counter()
    _notify(STEP, desc, 0, total, 0.0)
    with tqdm(total=total, desc=desc, unit=unit, disable=_disable(), leave=False, **kw) as bar:
        for done, item in enumerate(iterable, start=1):
            yield item
            bar.update()
            _notify(STEP, desc, done, total, time.perf_counter() - t0)


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
    """A one-step bar for a long step with no finer progress (it shows the elapsed time).

    Listeners hear it as a bar of one step: ``(desc, 0, 1)`` at the start, ``(desc, 1, 1)`` when
    the block finished without raising.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    _notify(STEP, desc, 0, 1, 0.0)
    with tqdm(total=1, desc=desc, disable=_disable(), leave=False, bar_format="{desc}: {elapsed}") as bar:
        yield
        bar.update()
    _notify(STEP, desc, 1, 1, time.perf_counter() - t0)
