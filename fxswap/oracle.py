"""An independent measure of the memory a call really allocates: the allocator's word, not fxswap's.

fxswap's plan is a prediction and its :class:`fxswap.runtime.Ledger` counts only the tensors fxswap
allocates. Neither can check the budget. This module asks the allocator instead, and counts every
byte the process allocates on the device while the call runs, whoever allocates it (the graph's
activations, op workspace, Inductor's buffers, fxswap's unit copies, the caller's own code)::

    with measure(device) as m:
        out = swapped(x)
    m.peak_bytes      # the most bytes allocated above the level at entry, at any moment of the call

- CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of c10's
  CPU allocator (on every thread) as an event with a signed byte count; the peak is the running
  sum's maximum in time order.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` at entry; ``reserved_bytes`` and ``alloc_retries`` come from
  ``torch.cuda.memory_stats``. ``snapshot()`` returns the allocator's memory snapshot for diagnosis.

Bytes live before the call (resident weights, the caller's inputs) are not in ``peak_bytes``: the
caller adds them, measured on its own tensors (see :func:`live_bytes`).

NOTE: nothing here imports any other fxswap module, and no fxswap module outside the benchmark
tooling imports this one (the planner probes op workspace with :mod:`fxswap.alloc_probe`, its own
implementation); the tests and benchmarks compare fxswap's figures with this module, so it must share
no code with what it checks. ``tests/test_independence.py`` walks the import graph to keep it so.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Measurement", "live_bytes", "measure", "profiler_active", "snapshot"]


def profiler_active() -> bool:
    """Whether a torch profiler is already running in this process (profilers do not nest: a second
    one's exit stops the first)."""
    return bool(torch._C._autograd._profiler_enabled())


@dataclass
class Measurement:
    """What :func:`measure` saw. Filled in when the ``with`` block exits."""

    device: torch.device
    peak_bytes: int = 0  # most bytes allocated above the entry level during the block
    end_bytes: int = 0  # bytes still allocated at exit, above the entry level
    reserved_bytes: int = 0  # CUDA: peak reserved above the entry level; CPU: equal to peak_bytes
    alloc_retries: int = 0  # CUDA: allocator retries (cudaMalloc failed, cache flushed, tried again)
    allocations: int = 0  # number of allocations seen (CPU) / allocation requests (CUDA)
    events: list[tuple[int, int]] = field(default_factory=list, repr=False)  # CPU: (time ns, signed bytes)

    def timeline(self) -> list[int]:
        """CPU: allocated bytes above the entry level after each event, in time order."""
        out, running = [], 0
        for _t, b in self.events:
            running += b
            out.append(running)
        return out


def _cpu_events(prof: Any) -> list[tuple[int, int]]:
    # NOTE: ``prof.events()`` folds an allocation made inside an op into that op's net
    # ``cpu_memory_usage``, which hides intra-op peaks (workspace freed before the op returns). The
    # raw event tree keeps one Allocation event per malloc/free, on every thread.
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            if f.device.type == "cpu" and f.alloc_size:
                events.append((int(node.start_time_ns), int(f.alloc_size)))
        stack.extend(node.children)
    events.sort(key=lambda tb: tb[0])
    return events


@contextmanager
def measure(device: torch.device | str = "cpu") -> Iterator[Measurement]:
    """Measure the device memory allocated inside the ``with`` block (see the module docstring).

    Args:
        device: the device whose allocator to read: ``"cpu"`` or a CUDA device.

    Raises:
        ValueError: another device type (the measurement would be meaningless).
    """
    dev = torch.device(device)
    m = Measurement(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        base_reserved = torch.cuda.memory_reserved(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        try:
            yield m
        finally:
            torch.cuda.synchronize(dev)
            after = torch.cuda.memory_stats(dev)
            m.peak_bytes = torch.cuda.max_memory_allocated(dev) - base
            m.end_bytes = torch.cuda.memory_allocated(dev) - base
            m.reserved_bytes = torch.cuda.max_memory_reserved(dev) - base_reserved
            m.alloc_retries = int(after.get("num_alloc_retries", 0)) - int(before.get("num_alloc_retries", 0))
            m.allocations = int(after.get("allocation.all.allocated", 0)) - int(
                before.get("allocation.all.allocated", 0)
            )
        return
    if dev.type != "cpu":
        raise ValueError(f"`device`={device!r}: the memory oracle reads the 'cpu' and 'cuda' allocators only")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        yield m
    m.events = _cpu_events(prof)
    running = peak = 0
    for _t, b in m.events:
        running += b
        peak = max(peak, running)
    m.peak_bytes = m.reserved_bytes = peak
    m.end_bytes = running
    m.allocations = sum(1 for _t, b in m.events if b > 0)


def snapshot(device: torch.device | str = "cuda") -> dict[str, Any]:
    """CUDA only: the allocator's memory snapshot (segments, blocks, traces) for diagnosing a peak."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"`device`={device!r}: memory snapshots exist for CUDA devices only")
    return torch.cuda.memory._snapshot(dev)


def live_bytes(values: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind the tensors in ``values`` (pytrees allowed).

    Used for what a call needs that is already allocated when it starts: the caller's inputs and
    the resident weights. Storages shared by several tensors (views, tied weights) count once.
    """
    seen: dict[int, int] = {}
    for leaf in torch.utils._pytree.tree_leaves(list(values)):
        if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
            st = leaf.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())
