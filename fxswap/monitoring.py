"""``fxswap.monitor()``: device and host memory per step, as a context manager and a logger.

    with fxswap.monitor() as mon:           # logs one line per compiled-model call
        for t in timesteps:
            latents = model(latents, t, ctx)
    print(mon.peak_bytes, mon.rows[-1])

On CUDA a row holds ``torch.cuda`` allocated / reserved / peak (max allocated since the monitor
started) and the pinned and pageable host bytes of every live fxswap runtime. On the CPU (tests) the "device"
numbers are fxswap's ledger: the bytes of device copies held by fxswap, from tensor finalizers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from fxswap import runtime as _rt

__all__ = ["Monitor", "MonitorRow", "any_active", "keep_peaks", "monitor", "notify_step"]

logger = logging.getLogger("fxswap.monitor")

GiB = 2**30


@dataclass(frozen=True, slots=True)
class MonitorRow:
    step: int
    label: str
    allocated_bytes: int
    reserved_bytes: int
    peak_bytes: int
    pinned_bytes: int
    seconds: float  # wall time since the previous row (or the monitor's start)
    pageable_bytes: int = 0  # host copies that stayed pageable (pin cap reached or pinning failed)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"step {self.step}{' ' + self.label if self.label else ''}: allocated "
            f"{self.allocated_bytes / GiB:.2f} GiB, reserved {self.reserved_bytes / GiB:.2f} GiB, peak "
            f"{self.peak_bytes / GiB:.2f} GiB, pinned host {self.pinned_bytes / GiB:.2f} GiB, pageable host "
            f"{self.pageable_bytes / GiB:.2f} GiB, "
            f"{self.seconds * 1e3:.1f} ms"
        )


class Monitor:
    """Collects :class:`MonitorRow` s; :meth:`step` adds one (compiled models call it after each call)."""

    def __init__(self, device: torch.device, log: Callable[[str], None] | None) -> None:
        self.device = device
        self.log = log
        self.rows: list[MonitorRow] = []
        self._last = time.perf_counter()
        self._cpu_peak = 0
        self._kept_peak = 0  # CUDA: peaks saved across resets that fxswap's own probes make (keep_peaks)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            for r in _rt.live_runtimes():
                r.ledger.reset_peak()

    def _sample(self) -> tuple[int, int, int, int, int]:
        rts = _rt.live_runtimes()
        pinned = sum(r.store.pinned_bytes for r in rts)
        pageable = sum(r.store.pageable_bytes for r in rts)
        if self.device.type == "cuda":
            return (
                torch.cuda.memory_allocated(self.device),
                torch.cuda.memory_reserved(self.device),
                max(self._kept_peak, torch.cuda.max_memory_allocated(self.device)),
                pinned,
                pageable,
            )
        held = sum(r.ledger.bytes for r in rts if r.device.type == self.device.type)
        self._cpu_peak = max(self._cpu_peak, held, *(r.ledger.peak for r in rts if r.device == self.device))
        return held, held, self._cpu_peak, pinned, pageable

    def step(self, label: str = "") -> MonitorRow:
        """Record (and log) one row now."""
        alloc, reserved, peak, pinned, pageable = self._sample()
        now = time.perf_counter()
        row = MonitorRow(len(self.rows), label, alloc, reserved, peak, pinned, now - self._last, pageable)
        self._last = now
        self.rows.append(row)
        if self.log is not None:
            self.log(str(row))
        return row

    @property
    def peak_bytes(self) -> int:
        return max((r.peak_bytes for r in self.rows), default=0)


_ACTIVE: list[Monitor] = []


@contextmanager
def keep_peaks(device: torch.device) -> Iterator[None]:
    """Around fxswap's own device measurements (the workspace probe, Inductor's replay), which reset
    CUDA's peak statistics to measure themselves: every active monitor of ``device`` keeps the peak
    it had before (and the one left after), so a build inside a monitored loop does not erase the
    loop's peak. No-op off CUDA or without a monitor."""
    watching = [m for m in _ACTIVE if m.device == device] if device.type == "cuda" else []
    if not watching:
        yield
        return

    def fold() -> None:
        peak = torch.cuda.max_memory_allocated(device)
        for m in watching:
            m._kept_peak = max(m._kept_peak, peak)

    fold()
    try:
        yield
    finally:
        fold()


def any_active() -> bool:
    """Whether a :func:`monitor` block is running (compiled models skip :func:`notify_step` if not)."""
    return bool(_ACTIVE)


def notify_step(label: str) -> None:
    """Called by compiled models after each call: one row in every active monitor."""
    for m in _ACTIVE:
        m.step(label)


@contextmanager
def monitor(
    device: torch.device | str | None = None, *, log: Callable[[str], None] | None = logger.info
) -> Iterator[Monitor]:
    """Record memory per step (each call of an ``fxswap.compile`` model) while the block runs.

    Args:
        device: the device to watch; default the current CUDA device, else the CPU (fxswap ledger).
        log: where each row goes (default ``logging.getLogger("fxswap.monitor").info``); None: quiet.
    """
    dev = _rt.default_device() if device is None else torch.device(device)
    mon = Monitor(dev, log)
    _ACTIVE.append(mon)
    try:
        yield mon
    finally:
        _ACTIVE.remove(mon)
        if log is not None and mon.rows:
            log(f"fxswap.monitor: {len(mon.rows)} steps, peak {mon.peak_bytes / GiB:.2f} GiB on {dev}")
