"""What the fxswap ops do when a compiled graph runs: host store, transfers, device ledger.

One :class:`SwapRuntime` per compiled model and device. It owns

- a :class:`HostStore`: exactly one host copy of every swapped weight, kept in its storage dtype
  (fp8 with a per-tensor scale). On CUDA the copies live in page-locked *arenas*: one exact-size
  host buffer per batch of weights, registered with the driver and sliced, up to a share of RAM;
  beyond that (or if registering fails) they stay pageable, with a warning;
- the device copies of the resident weights (made once, handed to the graph as ordinary inputs);
- a :class:`TransferBackend` that copies a unit to the device asynchronously;
- a :class:`Ledger` of device bytes held by fxswap, kept exact by tensor finalizers.

CUDA transfer protocol (the stream rules are in ``docs/memory_model.md``)::

    load:    dst = empty(...)                    # allocated on the COMPUTE stream, which owns the
                                                 # block: the caching allocator files a block under
                                                 # the stream that allocated it, and hands it out
                                                 # again only on that stream once it is freed
             side.wait_stream(compute)           # the block may be reused memory still being read
             with side: dst.copy_(host, non_blocking=True); ev.record(side)
                                                 # pageable host memory is first copied into a small
                                                 # pinned staging ring, slot by slot
    wait:    compute.wait_event(ev)              # a device-side wait; the host never blocks
    release: the graph drops its last reference  # no record_stream, no D2H copy (the host copy stays)

A transfer a warm start carried into the next call is read there only if that call runs on the
stream that allocated it; otherwise it is discarded (its stream waits for the copy first) and the
unit is loaded cold. No step of a call synchronises the host with the device while every unit is
pinned; calls under CUDA graph capture are refused (:func:`check_not_capturing`).

On the CPU the "device" is the CPU itself and a copy is a clone into a fresh tensor, so the same code
path (ops, ownership, ledger) runs in every test.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import warnings
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fxswap import ops

if TYPE_CHECKING:
    from fxswap.stored import StoredWeight

__all__ = [
    "ARENA_ALIGN",
    "CopyBackend",
    "CudaStreamBackend",
    "Pinner",
    "aligned_bytes",
    "check_not_capturing",
    "cuda_host_register",
    "narrow_for_storage",
    "stored_dtype",
    "staging_bytes",
    "widen_stored",
    "HostStore",
    "LateCopyBackend",
    "Ledger",
    "PendingTransfer",
    "SwapRuntime",
    "TransferBackend",
    "default_backend",
    "default_device",
    "live_runtimes",
]

logger = logging.getLogger("fxswap.runtime")


# --------------------------------------------------------------------------------------------- ledger
class Ledger:
    """Bytes of device memory currently held by fxswap tensors, and the peak since the last reset.

    A tensor is added when fxswap allocates it and subtracted by a ``weakref.finalize`` when its
    storage dies, so the ledger sees exactly when the graph lets go of a unit (tensor objects keep
    their Python identity while any view of them lives, so views keep the bytes counted).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.peak = 0

    def track(self, t: Tensor) -> Tensor:
        n = t.untyped_storage().nbytes()
        with self._lock:
            self.bytes += n
            self.peak = max(self.peak, self.bytes)
        weakref.finalize(t, self._sub, n)
        return t

    def _sub(self, n: int) -> None:
        with self._lock:
            self.bytes -= n

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.bytes


# ----------------------------------------------------------------------------------------- host store
def stored_dtype(dtype: torch.dtype, storage_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a weight of ``dtype`` is kept in on the host and copied in.

    Only real floating-point weights wider than ``storage_dtype`` are narrowed: integer, boolean and
    complex tensors (indices, masks, RoPE tables) keep their dtype, since narrowing them would change
    their values far beyond rounding, and widening would move more bytes, not fewer.
    """
    if (
        storage_dtype is None
        or storage_dtype == dtype
        or not dtype.is_floating_point
        or not storage_dtype.is_floating_point
        or storage_dtype.itemsize >= dtype.itemsize
    ):
        return dtype
    return storage_dtype


def staging_bytes(tensor: Tensor, storage_dtype: torch.dtype | None) -> int:
    """Device bytes of the staging copy ``tensor`` needs (0 when it is copied in its own dtype)."""
    sd = stored_dtype(tensor.dtype, storage_dtype)
    return 0 if sd == tensor.dtype else tensor.numel() * sd.itemsize


def narrow_for_storage(name: str, tensor: Tensor, sd: torch.dtype) -> tuple[Tensor, float]:
    """``tensor`` in the storage dtype ``sd`` and the scale that restores it (:func:`widen_stored`).

    fp8 (1-byte) formats keep a per-tensor scale, ``amax / finfo(sd).max`` as the fp8-scaled
    checkpoints do, so the largest magnitude maps to the format's largest finite value instead of
    NaN or saturation, and small weights keep the format's relative precision. Wider formats (fp16)
    keep scale 1 and must hold the tensor's range. A tensor that cannot be represented (NaN or
    infinite values, a range above fp16's) is refused, naming it.
    """
    src = tensor.detach()
    finfo = torch.finfo(sd)
    amax = float(src.abs().max()) if src.numel() else 0.0
    if not math.isfinite(amax):
        raise ValueError(
            f"weight `{name}` holds NaN or infinite values; storage_dtype={sd} cannot represent them. "
            "Fix: compile without `storage_dtype`, or repair the checkpoint."
        )
    if sd.itemsize > 1:
        if amax > finfo.max:
            raise ValueError(
                f"weight `{name}` reaches |x| = {amax:g}, above {sd}'s largest value {finfo.max:g}. "
                "Fix: compile with storage_dtype=torch.float8_e4m3fn (scaled per tensor) or without "
                "`storage_dtype`."
            )
        return src.to(sd), 1.0
    # NOTE: the scale is rounded to float32 first so that the host (residents) and the device
    # (swapped units) multiply by the very same float32 value.
    scale = float(torch.tensor(amax / finfo.max if amax > 0 else 1.0, dtype=torch.float32))
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(
            f"weight `{name}` has |x| <= {amax:g}: its fp8 scale underflows float32. Fix: compile "
            "without `storage_dtype`."
        )
    q = (src.to(torch.float32) / scale).to(sd) if scale != 1.0 else src.to(sd)
    return q, scale


def widen_stored(stored: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """The compute-dtype tensor of a stored one: one cast and, for scaled fp8, one in-place multiply
    in ``dtype`` (no float32 temporary: its bytes are the plan's staging bound). The same on the
    host and on the device, so resident and swapped weights round alike."""
    out = stored.to(dtype)
    if scale != 1.0:
        out.mul_(scale)
    return out


#: Host bytes between two weights in an arena: each slice starts on a cache line (dtype views and
#: DMA need alignment; at most 63 padding bytes per weight).
ARENA_ALIGN = 64

#: ``pinner(buffer) -> release``: page-locks a host ``uint8`` buffer in place and returns the
#: function that unlocks it; raises RuntimeError when the driver refuses.
Pinner = Callable[[Tensor], Callable[[], None]]


def aligned_bytes(nbytes: int) -> int:
    """``nbytes`` rounded up to :data:`ARENA_ALIGN`."""
    return -(-nbytes // ARENA_ALIGN) * ARENA_ALIGN


def cuda_host_register(buffer: Tensor) -> Callable[[], None]:
    """Page-lock ``buffer`` with ``cudaHostRegister`` (exactly its bytes, no power-of-two rounding,
    and nothing left in torch's pinned-block cache once it is unregistered)."""
    try:
        cudart = torch.cuda.cudart()
    except (AssertionError, RuntimeError) as e:  # a CPU-only build asserts, a broken driver raises
        raise RuntimeError(f"no CUDA runtime to pin host memory with ({e})") from e
    ptr, nbytes = buffer.data_ptr(), buffer.numel() * buffer.element_size()
    err = int(cudart.cudaHostRegister(ptr, nbytes, 1))  # 1: cudaHostRegisterPortable
    if err != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {err}")

    def release() -> None:
        cudart.cudaHostUnregister(ptr)

    return release


def _total_ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def _shared_view(t: Tensor) -> bool:
    from fxswap.hostshare import region_of

    return t.device.type == "cpu" and t.is_contiguous() and region_of(t) is not None


class HostStore:
    """Exactly one host copy per weight name, in its storage dtype (fp8 with a per-tensor scale).

    Pinned copies live in *arenas*: :meth:`reserve` takes a batch of weights (a plan's swapped units),
    allocates ONE host buffer of exactly their bytes (each slice aligned to :data:`ARENA_ALIGN`),
    page-locks it with ``pinner`` and hands out slices of it. ``pinned_bytes`` is the arenas' bytes,
    which is what is locked. :meth:`clear` unlocks and drops the arenas (the caller first makes sure
    no copy still reads them).

    A weight that already is a view of a machine-wide shared mapping (:mod:`fxswap.hostshare`, what
    ``ulysses_degree`` sets up) is kept as it is, not copied: with ``pin``, its whole mapping is
    page-locked in place once per process and counts as one arena.

    Args:
        pin: pin the copies (page-locked memory makes ``non_blocking`` H2D copies truly async).
        pin_share: at most this share of physical RAM is pinned; the rest stays pageable and a
            warning says so once (pinning everything can starve the OS and the dataloader).
        pinner: how an arena is page-locked (default :func:`cuda_host_register`). If it raises
            (Windows and containers cap page-locked memory), the batch is tried in halves; once a
            single weight fails, it and every later weight stay pageable: one warning,
            :attr:`pin_error` keeps the reason, nothing fails.
    """

    def __init__(self, *, pin: bool, pin_share: float = 0.5, pinner: Pinner | None = None) -> None:
        if not 0.0 <= pin_share <= 1.0:
            raise ValueError(f"`pin_share` must be within [0, 1], got {pin_share!r}")
        self.pin = pin
        self.pin_limit_bytes = int(_total_ram_bytes() * pin_share)
        self.pinned_bytes = 0  # bytes of the page-locked arenas
        self.pinned_payload_bytes = 0  # the weights' own bytes inside them
        self.pageable_bytes = 0
        self.pin_error: str | None = None
        self._pinner: Pinner = pinner if pinner is not None else cuda_host_register
        self._tensors: dict[str, Tensor] = {}
        self._scales: dict[str, float] = {}
        self._slots: dict[str, Tensor] = {}  # reserved arena slices (uint8) not yet filled
        self._in_arena: set[str] = set()
        self._arenas: list[tuple[Tensor, Callable[[], None]]] = []
        self._capped = False
        self._warned = False

    def _warn_once(self, why: str) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"fxswap: {why}; this and further weights stay pageable, so their copies are slower and "
            "not fully asynchronous (fxswap keeps running).",
            stacklevel=4,
        )

    def reserve(self, items: Sequence[tuple[str, Tensor]], storage_dtype: torch.dtype | None = None) -> None:
        """Pin one arena for the weights of ``items`` not stored yet (in order, up to the cap)."""
        if not self.pin or self.pin_error is not None or self._capped:
            return
        todo: list[tuple[str, int]] = []
        seen: set[str] = set()
        total = 0
        for name, t in items:
            if name in self._tensors or name in self._slots or name in seen:
                continue
            if stored_dtype(t.dtype, storage_dtype) == t.dtype and _shared_view(t):
                continue  # kept where it is (``_in_shared``): no arena
            n = t.numel() * stored_dtype(t.dtype, storage_dtype).itemsize
            if self.pinned_bytes + total + aligned_bytes(n) > self.pin_limit_bytes:
                self._capped = True  # this and every later weight stay pageable (one rule, one warning)
                self._warn_once(
                    f"pinned host memory capped at {self.pin_limit_bytes / 2**30:.1f} GiB (`pin_share`); "
                    "raise `pin_share` if the machine has RAM to spare"
                )
                break
            seen.add(name)
            todo.append((name, n))
            total += aligned_bytes(n)
        if todo:
            self._pin_arena(todo)

    def _pin_arena(self, todo: list[tuple[str, int]]) -> bool:
        """One arena for ``todo``; if the pinner refuses, halves of it (a capped machine still pins
        what fits), until a single weight fails: then pinning stops. Whether all were pinned."""
        total = sum(aligned_bytes(n) for _, n in todo)
        buffer = torch.empty(total, dtype=torch.uint8)
        try:
            release = self._pinner(buffer)
        except RuntimeError as e:  # torch and the pinner report allocation failures as RuntimeError
            del buffer
            if len(todo) > 1:
                h = len(todo) // 2
                return self._pin_arena(todo[:h]) and self._pin_arena(todo[h:])
            self.pin_error = f"{type(e).__name__}: {e}"
            logger.warning("fxswap: pinning a %d-byte host arena failed: %s", total, self.pin_error)
            self._warn_once(f"pinning host memory failed after {self.pinned_bytes} bytes ({self.pin_error})")
            return False
        self._arenas.append((buffer, release))
        self.pinned_bytes += total
        off = 0
        for name, n in todo:
            self._slots[name] = buffer[off : off + n]
            off += aligned_bytes(n)
        return True

    def put(self, name: str, tensor: Tensor, storage_dtype: torch.dtype | None = None) -> Tensor:
        """Store ``tensor`` (a host tensor) under ``name`` once and return the host copy."""
        if name in self._tensors:
            return self._tensors[name]
        if tensor.device.type != "cpu":
            raise ValueError(
                f"weight `{name}` is on {tensor.device}; fxswap keeps swapped weights on the host. "
                "Build or load the model on the CPU (or on meta and load weights later) before compiling."
            )
        host = tensor.detach()
        sd = stored_dtype(host.dtype, storage_dtype)
        scale = 1.0
        if sd != host.dtype:
            host, scale = narrow_for_storage(name, host, sd)
        if sd == tensor.dtype and self._in_shared(name, host):
            return self._tensors[name]
        if self.pin and name not in self._slots:
            self.reserve([(name, host)])  # not part of a batch: an arena of its own
        slot = self._slots.pop(name, None)
        nbytes = host.numel() * host.element_size()
        if slot is not None:
            pinned = slot.view(host.dtype).view(host.shape)
            pinned.copy_(host)
            host = pinned
            self._in_arena.add(name)
            self.pinned_payload_bytes += nbytes
        else:
            host = host.contiguous()
            self.pageable_bytes += nbytes
        self._tensors[name] = host
        if scale != 1.0:
            self._scales[name] = scale
        return host

    def _in_shared(self, name: str, host: Tensor) -> bool:
        """Keep ``host`` as it is when it is a view of a machine-wide shared mapping
        (:mod:`fxswap.hostshare`): no private copy. With ``pin``, the whole mapping is page-locked
        once in this process (each process registers its own mapping of the same physical pages);
        past the cap or if the pinner refuses, it stays pageable, still shared."""
        from fxswap.hostshare import region_of

        region = region_of(host)
        if region is None or not host.is_contiguous():
            return False
        nbytes = host.numel() * host.element_size()
        pinned = self.pin and self._pin_shared(region)
        if pinned:
            self._in_arena.add(name)
            self.pinned_payload_bytes += nbytes
        else:
            self.pageable_bytes += nbytes
        self._tensors[name] = host
        return True

    def _pin_shared(self, region: object) -> bool:
        from fxswap.hostshare import SharedWeights

        assert isinstance(region, SharedWeights)  # narrowing: region_of's result
        if any(b is region.buffer for b, _ in self._arenas):
            return True
        if self.pin_error is not None or self._capped:
            return False
        if self.pinned_bytes + region.nbytes > self.pin_limit_bytes:
            self._capped = True
            self._warn_once(
                f"pinned host memory capped at {self.pin_limit_bytes / 2**30:.1f} GiB (`pin_share`); the "
                f"shared weights ({region.nbytes / 2**30:.2f} GiB) stay pageable"
            )
            return False
        try:
            release = region.pin(self._pinner)
        except RuntimeError as e:
            self.pin_error = f"{type(e).__name__}: {e}"
            self._warn_once(f"pinning the shared host weights failed ({self.pin_error})")
            return False
        self._arenas.append((region.buffer, release))
        self.pinned_bytes += region.nbytes
        return True

    def scale(self, name: str) -> float:
        """The factor that restores weight ``name`` from its stored values (1.0 unless fp8)."""
        return self._scales.get(name, 1.0)

    def in_arena(self, name: str) -> bool:
        """Whether weight ``name``'s host copy is a slice of a pinned arena (owned by the store)."""
        return name in self._in_arena

    def clear(self) -> None:
        """Forget every host copy and unlock the arenas. Their memory returns when no one else holds
        a slice; no copy may still be reading them (:meth:`SwapRuntime.close` waits first)."""
        for _buffer, release in self._arenas:
            release()
        self._arenas.clear()
        self._tensors.clear()
        self._scales.clear()
        self._slots.clear()
        self._in_arena.clear()
        self._capped = False
        self.pinned_bytes = self.pinned_payload_bytes = self.pageable_bytes = 0

    def items(self) -> list[tuple[str, Tensor]]:
        return list(self._tensors.items())

    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)


# ---------------------------------------------------------------------------------- transfer backends
class PendingTransfer(ABC):
    """Device tensors whose contents are valid only after :meth:`wait`."""

    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors = tensors

    @abstractmethod
    def wait(self) -> None:
        """Make the current stream (or thread) wait until the copy has landed."""

    def wait_host(self) -> None:
        """Block the host until the copy has landed (only off the critical path: error cleanup)."""
        self.wait()

    def readable_here(self) -> bool:
        """Whether :meth:`wait` may be called from here (CUDA: the stream that allocated the
        destinations is the current one). A carried transfer that is not is discarded."""
        return True

    def discard(self) -> None:
        """Give up the transfer without reading it; its destinations may be freed after this."""
        self.wait_host()
        self.tensors = []


class TransferBackend(ABC):
    """Starts the copy of host tensors to ``device``; pluggable so tests can inject a late one."""

    @abstractmethod
    def start(self, host: Sequence[Tensor], device: torch.device) -> PendingTransfer: ...

    def copy_resident(self, src: Tensor, device: torch.device) -> Tensor:
        """A fresh device copy of ``src``, readable by the current stream (a resident weight)."""
        d = torch.empty_like(src, device=device, memory_format=torch.contiguous_format)
        d.copy_(src)
        return d

    def close(self) -> None:
        """Block until every copy this backend started has landed; give back its own host memory."""
        return None


class _Done(PendingTransfer):
    def wait(self) -> None:
        return None


class CopyBackend(TransferBackend):
    """Synchronous copy into a fresh tensor (the CPU path; also a CUDA fallback without streams)."""

    def start(self, host: Sequence[Tensor], device: torch.device) -> PendingTransfer:
        out = []
        for h in host:
            d = torch.empty_like(h, device=device)
            d.copy_(h)
            out.append(d)
        return _Done(out)


class _CudaPending(PendingTransfer):
    def __init__(
        self, tensors: list[Tensor], event: torch.cuda.Event, device: torch.device, stream: torch.cuda.Stream
    ) -> None:
        super().__init__(tensors)
        self.event = event
        self.device = device
        self.stream = stream  # the stream the destinations were allocated on (their owner)

    def readable_here(self) -> bool:
        return bool(torch.cuda.current_stream(self.device) == self.stream)

    def wait(self) -> None:
        current = torch.cuda.current_stream(self.device)
        if current != self.stream:
            # NOTE: no record_stream fallback: it would keep the block allocated past its free
            # (reserved memory grows where the plan and max_memory_allocated cannot see it).
            # Carried transfers are discarded before this (readable_here); a load and its wait of
            # one call run on one stream.
            raise RuntimeError(
                f"fxswap: a transfer allocated on stream {self.stream} is read on stream {current}; "
                "the stream changed in the middle of a call. Fix: run each call on one stream."
            )
        current.wait_event(self.event)

    def wait_host(self) -> None:
        self.event.synchronize()

    def discard(self) -> None:
        # Device-side: the owning stream waits for the copy, so the allocator can reuse the blocks
        # (only on that stream) after it has landed. The host does not block.
        self.stream.wait_event(self.event)
        self.tensors = []


class _StagingRing:
    """A small pinned buffer cut into ``slots`` slots: pageable host memory is copied into a slot
    by the host, then from the slot to the device on the transfer stream. A slot is reused once
    its previous copy has landed (the host waits for that copy's event: pageable units block the
    host, which the plan prices, see ``passes.simulate``)."""

    def __init__(self, buffer: Tensor, slots: int, release: Callable[[], None]) -> None:
        self.buffer = buffer
        self.slot_bytes = buffer.numel() // slots
        self.release = release
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._next = 0

    def take(self) -> tuple[int, Tensor]:
        k = self._next
        self._next = (k + 1) % len(self._events)
        ev = self._events[k]
        if ev is not None:
            ev.synchronize()
        return k, self.buffer[k * self.slot_bytes : (k + 1) * self.slot_bytes]

    def recorded(self, k: int, side: torch.cuda.Stream) -> None:
        ev = torch.cuda.Event()
        ev.record(side)
        self._events[k] = ev


def _as_bytes(t: Tensor) -> Tensor:
    return t.reshape(-1).view(torch.uint8)


class CudaStreamBackend(TransferBackend):
    """One transfer stream per device; see the module docstring for the protocol.

    Args:
        ring_slots, slot_bytes: the pinned staging ring for pageable host memory (allocated on the
            first pageable copy; ``ring_bytes`` counts it). Bounded: ``ring_slots * slot_bytes``.
        pinner: how the ring is page-locked (:data:`Pinner`; default :func:`cuda_host_register`).
        is_pinned: whether a host tensor is page-locked (default ``Tensor.is_pinned``).
    """

    def __init__(
        self,
        *,
        ring_slots: int = 2,
        slot_bytes: int = 16 * 2**20,
        pinner: Pinner | None = None,
        is_pinned: Callable[[Tensor], bool] | None = None,
    ) -> None:
        if ring_slots < 1 or slot_bytes < ARENA_ALIGN:
            raise ValueError(f"`ring_slots`={ring_slots} and `slot_bytes`={slot_bytes}: need >= 1 and >= 64")
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.ring_slots, self.slot_bytes = ring_slots, slot_bytes
        self._pinner: Pinner = pinner if pinner is not None else cuda_host_register
        self._is_pinned = is_pinned if is_pinned is not None else Tensor.is_pinned
        self._ring: _StagingRing | None = None
        self.ring_error: str | None = None
        #: pageable bytes staged through the ring, and the tensors they came in
        self.staged_bytes = self.staged_tensors = 0

    @property
    def ring_bytes(self) -> int:
        """Pinned host bytes of the staging ring (0 until a pageable tensor is copied)."""
        return 0 if self._ring is None else self._ring.buffer.numel()

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device)
        return s

    def _get_ring(self) -> _StagingRing | None:
        if self._ring is None and self.ring_error is None:
            buffer = torch.empty(self.ring_slots * self.slot_bytes, dtype=torch.uint8)
            try:
                release = self._pinner(buffer)
            except RuntimeError as e:
                self.ring_error = f"{type(e).__name__}: {e}"
                logger.warning("fxswap: no pinned staging ring (%s); pageable copies go direct", e)
                return None
            self._ring = _StagingRing(buffer, self.ring_slots, release)
        return self._ring

    def _copy(self, d: Tensor, h: Tensor, side: torch.cuda.Stream) -> None:
        if self._is_pinned(h):
            d.copy_(h, non_blocking=True)
            return
        ring = self._get_ring()
        if ring is None:
            d.copy_(h, non_blocking=True)  # CUDA stages it itself, blocking the host
            return
        src, dst = _as_bytes(h.contiguous()), _as_bytes(d)
        n, step = src.numel(), ring.slot_bytes
        for off in range(0, n, step):
            k, slot = ring.take()
            m = min(step, n - off)
            slot[:m].copy_(src[off : off + m])
            dst[off : off + m].copy_(slot[:m], non_blocking=True)
            ring.recorded(k, side)
        self.staged_bytes += n
        self.staged_tensors += 1

    def _start(self, host: Sequence[Tensor], device: torch.device) -> _CudaPending:
        compute = torch.cuda.current_stream(device)
        side = self._side(device)
        # on the compute stream, contiguous (the staging path copies bytes)
        out = [torch.empty(h.shape, dtype=h.dtype, device=device) for h in host]
        side.wait_stream(compute)
        try:
            with torch.cuda.stream(side):
                for d, h in zip(out, host, strict=True):
                    self._copy(d, h, side)
                ev = torch.cuda.Event()
                ev.record(side)
        except BaseException:
            # Copies already enqueued write into `out`; dropping it now would return those blocks to
            # the compute stream's pool while the side stream still writes into them.
            side.synchronize()
            raise
        return _CudaPending(out, ev, device, compute)

    def start(self, host: Sequence[Tensor], device: torch.device) -> PendingTransfer:
        return self._start(host, device)

    def copy_resident(self, src: Tensor, device: torch.device) -> Tensor:
        # On the transfer stream like a unit (a new signature's residents no longer block the host
        # behind the compute stream); the compute stream waits for it on the device.
        p = self._start([src], device)
        try:
            p.wait()
        except BaseException:
            p.wait_host()
            raise
        return p.tensors[0]

    def close(self) -> None:
        for s in self._streams.values():
            s.synchronize()
        if self._ring is not None:
            self._ring.release()
            self._ring = None


class _LatePending(PendingTransfer):
    def __init__(self, tensors: list[Tensor], thread: threading.Thread) -> None:
        super().__init__(tensors)
        self.thread = thread

    def wait(self) -> None:
        self.thread.join()


class LateCopyBackend(TransferBackend):
    """A race detector: destinations read NaN (or -1 for integers) until a background thread copies
    the data ``delay_s`` later. A graph that reads a unit before its wait produces garbage.
    """

    def __init__(self, delay_s: float = 0.002) -> None:
        self.delay_s = delay_s
        self.started = 0

    def start(self, host: Sequence[Tensor], device: torch.device) -> PendingTransfer:
        out = []
        for h in host:
            d = torch.empty_like(h, device=device)
            d.fill_(float("nan") if d.is_floating_point() else -1)
            out.append(d)
        srcs = list(host)

        def finish() -> None:
            time.sleep(self.delay_s)
            for d, h in zip(out, srcs, strict=True):
                d.copy_(h)

        th = threading.Thread(target=finish, daemon=True)
        th.start()
        self.started += 1
        return _LatePending(out, th)


def default_device() -> torch.device:
    """The current CUDA device, else the CPU: where ``fxswap.compile`` runs and ``fxswap.monitor``
    looks when no device is given (one rule, so the monitor watches what compiled models use)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend(device: torch.device) -> TransferBackend:
    """The transfer stream on CUDA, a plain copy elsewhere."""
    return CudaStreamBackend() if device.type == "cuda" else CopyBackend()


# ---------------------------------------------------------------------------------------------- units
class _Unit:
    """One swapped unit as the ops see it (implements ``fxswap.ops.UnitHandle``).

    NOTE: this is the per-op hot path (target <= 3 us per op on CPU including the dispatcher), so
    the bound methods and flags it needs are cached as attributes and counters are plain ints.
    """

    __slots__ = (
        "_device", "_ledger", "_rt", "_start", "_token", "_track", "carried", "casts", "host", "loads",
        "meta", "name", "params", "pending", "releases", "scales", "waits",
    )  # fmt: skip

    def __init__(
        self,
        runtime: SwapRuntime,
        name: str,
        params: tuple[str, ...],
        host: list[Tensor],
        meta: ops.UnitMeta,
        casts: tuple[int, ...],
        scales: tuple[float, ...] = (),
    ) -> None:
        self.name = name
        self.params = params
        self.host = host
        self.meta = meta
        self.casts = casts  # positions stored in a narrower dtype than the graph computes in
        self.scales = scales or (1.0,) * len(host)  # per position: restores a scaled fp8 weight
        self.pending: deque[PendingTransfer] = deque()
        # Transfers a previous call's tail started for this call's first load (warm start).
        self.carried = 0
        self.loads = self.waits = self.releases = 0
        self._start = runtime.backend.start
        self._device = runtime.device
        self._token = runtime.token
        self._track = runtime.track
        self._ledger = runtime.ledger
        self._rt = runtime

    def start_load(self) -> Tensor:
        if self.carried:
            # The previous call's tail already started this transfer (``start_carry``); it waits in
            # `pending` for this load's wait, if this call runs where it was allocated.
            if self.pending[0].readable_here():
                self.carried -= 1
                return self._token
            # Another stream: reading it here would need record_stream (memory kept past its
            # free, unseen by the plan). Drop the carries (device-side) and load cold.
            self.discard_pending()
        return self._transfer()

    def start_carry(self) -> Tensor:
        token = self._transfer()
        self.carried += 1
        return token

    def _transfer(self) -> Tensor:
        if self._rt.alloc_hook is not None:
            self._rt.alloc_hook("load", self.name, sum(h.untyped_storage().nbytes() for h in self.host))
        p = self._start(self.host, self._device)
        # Owned by `pending` before anything else can raise: discard_pending then waits for the copy
        # before the destination is freed (a dropped record would free it mid-copy).
        self.pending.append(p)
        if self._track:
            track = self._ledger.track
            for t in p.tensors:
                track(t)
        self.loads += 1
        return self._token

    def finish_wait(self) -> list[Tensor]:
        if not self.pending:
            raise RuntimeError(
                f"fxswap.wait for unit `{self.name}` without a preceding fxswap.load; every wait must "
                "follow its load in the graph (was the graph edited after the rewrite?)"
            )
        p = self.pending.popleft()
        try:
            p.wait()
        except BaseException:
            # Interrupted mid-wait (KeyboardInterrupt): the copy may still be landing in these
            # tensors; let it land before they can be freed and their memory handed out again.
            p.wait_host()
            p.tensors = []
            raise
        out = p.tensors
        p.tensors = []  # ownership passes to the graph: keep no reference
        if self.casts:
            # Stored narrower: cast on the device, after the wait, on the compute stream. Each
            # staging tensor dies as soon as its cast exists, so at most ONE staging tensor is
            # held beside the unit's compute-dtype tensors; SwapRuntime.staging_bytes bounds it
            # and the compiler plans that bound (see SwapRuntime).
            dtypes = self.meta.dtypes
            hook = self._rt.alloc_hook
            for i in self.casts:
                if hook is not None:
                    hook("cast", self.params[i], out[i].numel() * dtypes[i].itemsize)
                cast = widen_stored(out[i], self.scales[i], dtypes[i])
                if self._track:  # tracked while its staging tensor still lives, as on the device
                    self._ledger.track(cast)
                out[i] = cast
        self.waits += 1
        return out

    def on_release(self) -> Tensor:
        self.releases += 1
        return self._token

    def discard_pending(self) -> int:
        """Drop transfers whose wait never ran (the graph failed in between); return how many.

        Each is made safe to free first (:meth:`PendingTransfer.discard`; on CUDA the owning stream
        waits for the copy on the device): the copy engine may still be writing into the block, and
        freeing it would let the allocator hand it to the compute stream mid-copy.
        """
        n = len(self.pending)
        self.carried = 0
        while self.pending:
            self.pending.popleft().discard()
        return n


def check_not_capturing(what: str) -> None:
    """Refuse to run under CUDA graph capture (``torch.cuda.graph``): the transfers, their
    allocations and the host-side bookkeeping would be frozen into the graph and replayed without
    the host copies, and the error paths' host waits are illegal while capturing."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        from fxswap.errors import CudaGraphCaptureError

        raise CudaGraphCaptureError(
            f"{what} was called while the current CUDA stream is capturing a CUDA graph. fxswap moves "
            "weights between host and device at run time, which a captured graph cannot replay. Fix: "
            "call it outside `torch.cuda.graph(...)` / `make_graphed_callables` (fxswap's own Inductor "
            "build already runs with CUDA graphs off)."
        )


_LIVE: weakref.WeakSet[SwapRuntime] = weakref.WeakSet()


def live_runtimes() -> list[SwapRuntime]:
    """Every SwapRuntime still alive (what ``fxswap.monitor`` sums over)."""
    return list(_LIVE)


class SwapRuntime:
    """Host store, resident device copies, transfer backend and ledger of one compiled model.

    Storage dtype (``storage_dtype``, e.g. ``torch.float8_e4m3fn``): every floating-point weight
    wider than it (see :func:`stored_dtype`) is rounded through it (fp8 with one scale per tensor:
    :func:`narrow_for_storage`, :func:`widen_stored`), so the output does not depend on which
    weights the budget swaps:

    - a swapped weight is kept on the host in the storage dtype, copied as stored (fewer bytes over
      the link) into a device *staging* tensor, and cast (and scaled) to the compute dtype by ``wait``;
    - a resident weight is rounded on the host by the same two functions and copied once in the
      compute dtype.

    Device bytes of a swapped unit, as the plan counts them (its compute-dtype bytes from its load
    to its release): between load and wait it holds its staging copies, which are no larger; while
    ``wait`` casts, it holds its compute-dtype tensors plus at most ONE staging tensor (each dies as
    its cast is made, and casts run one at a time). :attr:`staging_bytes` is the largest staging
    tensor of any weight; the compiler adds it to the plan's ``reserve_bytes``, so the plan's peak
    covers it and the budget stays a promise.

    Args:
        device: where the graph runs.
        backend: transfer backend; :func:`default_backend` if None.
        pin_share: cap on pinned host memory, as a share of physical RAM (CUDA only).
        storage_dtype: see above; None keeps each weight's own dtype.
        track: count device copies in :attr:`ledger` with tensor finalizers (~2 us per tensor per
            load). Default: on for non-CUDA devices; on CUDA the allocator's statistics are the ledger.
        pin: pin the host copies; default on CUDA only (see :class:`HostStore` for the fallback).
        pinner: how the host arenas are page-locked (:data:`Pinner`, :class:`HostStore`); tests inject
            a failing or counting one.

    Fault hooks (for tests and diagnosis; None in normal use): :attr:`alloc_hook` is called as
    ``hook(kind, name, nbytes)`` right before fxswap allocates device memory, with ``kind`` one of
    ``"resident"`` (a resident weight's copy), ``"load"`` (a unit's transfer destinations) and
    ``"cast"`` (a storage-dtype cast after the wait); whatever it raises propagates exactly as the
    allocator's own error would. :attr:`free_bytes_probe` replaces the device query of
    :meth:`free_bytes`.
    """

    def __init__(
        self,
        device: torch.device | str,
        *,
        backend: TransferBackend | None = None,
        pin_share: float = 0.5,
        storage_dtype: torch.dtype | None = None,
        track: bool | None = None,
        pin: bool | None = None,
        pinner: Pinner | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.track = self.device.type != "cuda" if track is None else track
        self.token = ops.token_for(self.device)
        self.backend = backend if backend is not None else default_backend(self.device)
        self.store = HostStore(
            pin=self.device.type == "cuda" if pin is None else pin, pin_share=pin_share, pinner=pinner
        )
        self.alloc_hook: Callable[[str, str, int], None] | None = None
        self.free_bytes_probe: Callable[[], int] | None = None
        self.closed = False
        self.storage_dtype = storage_dtype
        self.ledger = Ledger()
        self._residents: dict[str, Tensor] = {}
        self._decoded: set[str] = set()  # residents held decoded (kept as stored on the host)
        # Weights kept as their file stores them (fxswap.stored.StoredWeight, by name): their stored
        # data is what the host store keeps and what is copied, swapped or resident; the graph
        # decodes it (fxswap::dequant). Set by the build from the model's records.
        self.stored: dict[str, StoredWeight] = {}
        self._uids: dict[str, int] = {}
        self._units: list[_Unit] = []
        _LIVE.add(self)

    @property
    def stats(self) -> dict[str, int]:
        """``{"loads", "waits", "releases"}`` summed over this runtime's units."""
        return {
            "loads": sum(u.loads for u in self._units),
            "waits": sum(u.waits for u in self._units),
            "releases": sum(u.releases for u in self._units),
        }

    def staging_bytes(self, tensors: Sequence[Tensor]) -> int:
        """The largest staging copy any of ``tensors`` needs on the device (0 without narrowing):
        what the plan must reserve beside the units' compute-dtype bytes (see the class docstring)."""
        return max((staging_bytes(t, self.storage_dtype) for t in tensors), default=0)

    # -- swapped units
    def reserve_host(self, params: Sequence[tuple[str, Tensor]]) -> None:
        """Pin one exact-size host arena for the weights of ``params`` before :meth:`add_unit` stores
        them (a plan's swapped weights at once; see :class:`HostStore`)."""
        self.store.reserve(params, self.storage_dtype)

    def add_unit(self, name: str, params: Sequence[tuple[str, Tensor]]) -> int:
        """Register a swapped unit made of ``params`` (fqn, host tensor); return its op id."""
        if name in self._uids:
            return self._uids[name]
        params = [(f, self.stored[f].data if f in self.stored else t) for f, t in params]
        host = [
            self.store.put(fqn, t, None if fqn in self.stored else self.storage_dtype) for fqn, t in params
        ]
        meta = ops.UnitMeta(tuple(tuple(t.shape) for _, t in params), tuple(t.dtype for _, t in params))
        casts = tuple(i for i, (h, d) in enumerate(zip(host, meta.dtypes, strict=True)) if h.dtype != d)
        scales = tuple(self.store.scale(fqn) for fqn, _ in params)
        unit = _Unit(self, name, tuple(f for f, _ in params), host, meta, casts=casts, scales=scales)
        uid = ops.register_unit(unit)
        self._uids[name] = uid
        self._units.append(unit)
        return uid

    def discard_pending(self) -> int:
        """After a failed graph run: wait for and drop every transfer that no ``wait`` consumed, so
        the next run neither pairs its waits with stale loads nor keeps their device memory.
        Also what drops the transfers a warm start carried for a next call that will not come (or
        runs another graph). Returns how many were dropped."""
        return sum(u.discard_pending() for u in self._units)

    @property
    def carried_bytes(self) -> int:
        """Device bytes held between calls by transfers carried for the next call (warm start)."""
        return sum(
            t.untyped_storage().nbytes()
            for u in self._units
            if u.carried
            for p in u.pending
            for t in p.tensors
        )

    @property
    def unit_ids(self) -> dict[str, int]:
        return dict(self._uids)

    # -- resident weights
    def decoded_patch(self, fqn: str) -> int | None:
        """The ``fxswap::patch`` handle the graph applies to stored weight ``fqn`` after its decode
        (``ops.register_patch``); None: the decoded weight is used as it is. Subclasses patch."""
        return None

    def resident(self, fqn: str, tensor: Tensor, decoded: bool = False) -> Tensor:
        """The device copy of a resident weight, made on first request (one copy per name).

        ``decoded``: a weight kept as stored that the plan keeps decoded for the whole call
        (``SwapPlan.decoded_residents``): its stored data is copied to the device, decoded there
        once by the op the graph would use (``fxswap::dequant``: the reference on the CPU, the
        Triton kernel on CUDA) and the stored device copy dropped; the host keeps only the stored
        data. Otherwise a stored weight is copied as stored and the graph decodes it at each call.
        """
        self._check_decoded(fqn, decoded)
        d = self._residents.get(fqn)
        if d is not None and (fqn in self._decoded) != decoded:
            # another signature's plan holds it in the other form: never both on the device
            del self._residents[fqn]
            self._decoded.discard(fqn)
            d = None
        if d is None:
            if fqn in self.stored:
                tensor = self.stored[fqn].data
            if self.alloc_hook is not None:
                self.alloc_hook("resident", fqn, tensor.numel() * tensor.element_size())
            src = tensor.detach()
            sd = stored_dtype(src.dtype, self.storage_dtype)
            if sd != src.dtype:  # rounded like the swapped weights (on the host: no device staging)
                src = widen_stored(*narrow_for_storage(fqn, src, sd), src.dtype)
            # NOTE: always a fresh tensor, also on the CPU, so the ledger accounts for it and the
            # graph never aliases the user's parameter. On CUDA it is copied on the transfer stream.
            d = self.backend.copy_resident(src, self.device)
            if decoded:
                w = self.stored[fqn]
                if self.alloc_hook is not None:
                    self.alloc_hook("resident", fqn, w.dequantized_nbytes)
                d = ops.dequant(d, w.qtype, list(w.shape), w.dtype, w.scale)
                self._decoded.add(fqn)
            self._residents[fqn] = self.ledger.track(d) if self.track else d
        return d

    def resident_like(self, fqn: str, tensor: Tensor, decoded: bool = False) -> Tensor:
        """A meta tensor laid out as ``resident(fqn, tensor, decoded)``'s copy is (both backends make
        it contiguous; its dtype and shape are the stored data's, or the decoded weight's), made
        without copying anything: what a compile needs of a resident while its copy is being made
        (``fxswap.build.Builder``, which checks the two agree once the copy exists)."""
        self._check_decoded(fqn, decoded)
        if decoded:
            w = self.stored[fqn]
            return torch.empty(tuple(w.shape), dtype=w.dtype, device="meta")
        src = self.stored[fqn].data if fqn in self.stored else tensor
        return torch.empty(tuple(src.shape), dtype=src.dtype, device="meta")

    def _check_decoded(self, fqn: str, decoded: bool) -> None:
        if decoded and fqn not in self.stored:
            raise ValueError(
                f"resident weight `{fqn}` is to be decoded once but is not kept as stored "
                "(fxswap.stored); only a GGUF or fp8 weight is decoded"
            )

    def retain_residents(self, keep: frozenset[str] | set[str]) -> None:
        """Release the resident device copies whose names are not in ``keep``."""
        for k in [k for k in self._residents if k not in keep]:
            del self._residents[k]
            self._decoded.discard(k)

    def drop_residents(self) -> None:
        """Release every resident device copy (switching experts; the host copies stay valid)."""
        self._residents.clear()
        self._decoded.clear()

    @property
    def resident_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self._residents.values())

    def free_bytes(self) -> int:
        """Device memory free now, as the driver (CUDA) or the OS (CPU: MemAvailable) reports it."""
        if self.free_bytes_probe is not None:
            return int(self.free_bytes_probe())
        if self.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.device)[0])
        return _available_ram_bytes()

    @property
    def units_registered(self) -> int:
        """How many of this runtime's units the op registry holds."""
        return len(self._uids)

    def close(self) -> None:
        """Drop residents, pending copies and host copies, and unregister every unit (graphs using
        them then fail loudly). Idempotent."""
        self.drop_residents()
        self.discard_pending()
        for uid in self._uids.values():
            ops.unregister_unit(uid)
        self._uids.clear()
        self._units.clear()
        # The transfer stream may still be reading the arenas: let it finish before they are
        # unlocked and freed (the only host sync of a runtime's life, off every call's path).
        self.backend.close()
        self.store.clear()
        self.closed = True
