"""The planner's own allocator probe: peaks of short pieces of work, read from the device allocator.

:mod:`fxswap.workspace` and :mod:`fxswap.replay` measure op workspace with it while planning. It is
deliberately NOT :mod:`fxswap.oracle`: the oracle is the independent measure that tests and
benchmarks hold fxswap's plans against, so the code that produces a plan must not share code with
it (``tests/test_independence.py`` walks the import graph to keep it so). The two read the same
allocator, in two implementations.

- CUDA: the allocator's own counters: ``memory_allocated`` at entry and ``max_memory_allocated``
  after ``reset_peak_memory_stats`` (block sizes as the caching allocator rounds them).
- CPU: one ``torch.profiler`` session with ``profile_memory=True``; each piece of work runs inside a
  ``record_function`` range, and the allocation events recorded under that range (in the raw event
  tree, which keeps every malloc and free) are summed in time order.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["Measurements", "PieceProbe", "held_bytes", "pieces", "profiler_running"]

_RANGE = "fxswap.alloc_probe:"


def profiler_running() -> bool:
    """A torch profiler is already on in this process (profilers do not nest)."""
    return bool(torch._C._autograd._profiler_enabled())


class Measurements:
    """Peaks measured with this probe, kept for the process: a measurement runs an op for real, at
    full size, and later builds (a new input signature, another ``fxswap.fit`` round) repeat most
    of the last one's ops. Thread-safe; bounded, the oldest entries dropped first."""

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._data: collections.OrderedDict[Hashable, int] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> int | None:
        with self._lock:
            return self._data.get(key)

    def put(self, key: Hashable, value: int) -> None:
        with self._lock:
            self._data[key] = value
            while len(self._data) > self._limit:
                self._data.popitem(last=False)


class PieceProbe:
    """Collects ``peak[label]``: the most bytes allocated above the level at a piece's start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: dict[str, int] = {}
        self._cpu_labels: list[str] = []

    @contextmanager
    def piece(self, label: str) -> Iterator[None]:
        """Run the ``with`` body as the piece ``label``."""
        if self.device.type != "cuda":
            self._cpu_labels.append(label)
            with torch.profiler.record_function(_RANGE + label):
                yield
            return
        torch.cuda.synchronize(self.device)
        start = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            torch.cuda.synchronize(self.device)
            self.peak[label] = max(0, torch.cuda.max_memory_allocated(self.device) - start)

    def _read_profile(self, prof: Any) -> None:
        from torch._C._profiler import _EventType

        # Walk the tree once, keeping for every allocation event the label of the range above it.
        todo: list[tuple[Any, str | None]] = [
            (n, None) for n in prof.profiler.kineto_results.experimental_event_tree()
        ]
        per_label: dict[str, list[tuple[int, int]]] = {}
        while todo:
            node, label = todo.pop()
            if node.tag == _EventType.TorchOp and str(getattr(node, "name", "")).startswith(_RANGE):
                label = str(node.name)[len(_RANGE) :]
            elif node.tag == _EventType.Allocation and label is not None:
                f = node.extra_fields
                if f.device.type == "cpu" and f.alloc_size:
                    per_label.setdefault(label, []).append((int(node.start_time_ns), int(f.alloc_size)))
            todo.extend((c, label) for c in node.children)
        for label in self._cpu_labels:
            level = top = 0
            for _t, delta in sorted(per_label.get(label, ())):
                level += delta
                top = max(top, level)
            self.peak[label] = top


@contextmanager
def pieces(device: torch.device | str) -> Iterator[PieceProbe]:
    """One measuring session for many pieces of work (one profiler start on the CPU)::

        with pieces(device) as probe:
            with probe.piece("a"):
                op()
        probe.peak["a"]

    On the CPU, allocations made on other threads than the piece's are not seen.

    Raises:
        ValueError: ``device`` is neither CPU nor CUDA.
    """
    dev = torch.device(device)
    probe = PieceProbe(dev)
    if dev.type == "cuda":
        yield probe
        return
    if dev.type != "cpu":
        raise ValueError(
            f"`device`={device!r}: the allocator probe reads the 'cpu' and 'cuda' allocators only"
        )
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield probe
    probe._read_profile(prof)


def held_bytes(values: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind the tensors in ``values`` (pytrees allowed; a storage
    shared by several tensors counts once; meta tensors count nothing)."""
    sizes: dict[int, int] = {}
    for leaf in torch.utils._pytree.tree_leaves(list(values)):
        if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
            storage = leaf.untyped_storage()
            key = storage.data_ptr()
            sizes[key] = max(sizes.get(key, 0), storage.nbytes())
    return sum(sizes.values())
