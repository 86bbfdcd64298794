"""What the fxswap ops do when a compiled graph runs: host store, transfers, device ledger.

One :class:`SwapRuntime` per compiled model and device. It owns

- a :class:`HostStore`: exactly one host copy of every swapped weight (pinned on CUDA up to a share of
  RAM, pageable beyond that with a warning), kept in its storage dtype;
- the device copies of the resident weights (made once, handed to the graph as ordinary inputs);
- a :class:`TransferBackend` that copies a unit to the device asynchronously;
- a :class:`Ledger` of device bytes held by fxswap, kept exact by tensor finalizers.

CUDA transfer protocol (torch's activation-offloading design, ``torch/_functorch/_activation_offloading``)::

    load:    dst = empty(...)                    # allocated on the COMPUTE stream: the allocator
                                                 # attributes it to the stream that frees it
             side.wait_stream(compute)           # the block may be reused memory still being read
             with side: dst.copy_(host, non_blocking=True); ev.record(side)
    wait:    compute.wait_event(ev)              # a device-side wait; the host never blocks
    release: the graph drops its last reference  # no record_stream, no D2H copy (the host copy stays)

On the CPU the "device" is the CPU itself and a copy is a clone into a fresh tensor, so the same code
path (ops, ownership, ledger) runs in every test.
"""

from __future__ import annotations

import logging
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
    "CopyBackend",
    "stored_dtype",
    "staging_bytes",
    "CudaStreamBackend",
    "HostStore",
    "LateCopyBackend",
    "Ledger",
    "PendingTransfer",
    "SwapRuntime",
    "TransferBackend",
    "default_backend",
    "default_device",
    "live_runtimes",
    "pinned_allocation_bytes",
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


def pinned_allocation_bytes(nbytes: int) -> int:
    """Host bytes that pinning a tensor of ``nbytes`` really takes.

    torch's CachingHostAllocator (``ATen/core/CachingHostAllocator.h``, ``allocate``) rounds every
    request up to the next power of two before ``cudaHostAlloc`` (``c10::llvm::PowerOf2Ceil``; torch
    2.13 adds a ``pinned_max_round_threshold`` setting whose default, SIZE_MAX, keeps the rounding
    for all sizes). A 141.6 MB WAN 14B FFN weight pins 256 MiB: the ``pin_share`` cap must count that.
    """
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


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


class HostStore:
    """Exactly one host copy per weight name, in its storage dtype.

    Args:
        pin: pin the copies (page-locked memory makes ``non_blocking`` H2D copies truly async).
        pin_share: at most this share of physical RAM is pinned; the rest stays pageable and a
            warning says so once (pinning everything can starve the OS and the dataloader).
        pinner: how a tensor is pinned (default ``Tensor.pin_memory``). If it raises (Windows and
            containers cap page-locked memory; ``cudaHostAlloc`` fails), that weight and every later
            one stay pageable: one warning, :attr:`pin_error` keeps the reason, nothing fails.
    """

    def __init__(
        self, *, pin: bool, pin_share: float = 0.5, pinner: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        if not 0.0 <= pin_share <= 1.0:
            raise ValueError(f"`pin_share` must be within [0, 1], got {pin_share!r}")
        self.pin = pin
        self.pin_limit_bytes = int(_total_ram_bytes() * pin_share)
        self.pinned_bytes = 0  # as the pinned allocator takes them (pinned_allocation_bytes)
        self.pinned_payload_bytes = 0  # the tensors' own bytes inside those blocks
        self.pageable_bytes = 0
        self.pin_error: str | None = None
        self._pinner = pinner if pinner is not None else Tensor.pin_memory
        self._tensors: dict[str, Tensor] = {}
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
        if sd != host.dtype:
            host = host.to(sd)
        host = host.contiguous()
        nbytes = host.untyped_storage().nbytes()
        pinned = False
        alloc = pinned_allocation_bytes(nbytes)
        if self.pin and self.pin_error is None:
            if self.pinned_bytes + alloc <= self.pin_limit_bytes:
                try:
                    host = self._pinner(host)
                    pinned = True
                except RuntimeError as e:  # torch reports allocation failures as RuntimeError
                    self.pin_error = f"{type(e).__name__}: {e}"
                    logger.warning("fxswap: pinning `%s` (%d bytes) failed: %s", name, nbytes, self.pin_error)
                    self._warn_once(
                        f"pinning host memory failed after {self.pinned_bytes} bytes ({self.pin_error})"
                    )
            else:
                self._warn_once(
                    f"pinned host memory capped at {self.pin_limit_bytes / 2**30:.1f} GiB (`pin_share`); "
                    "raise `pin_share` if the machine has RAM to spare"
                )
        if pinned:
            self.pinned_bytes += alloc
            self.pinned_payload_bytes += nbytes
        else:
            self.pageable_bytes += nbytes
        self._tensors[name] = host
        return host

    def clear(self) -> None:
        """Forget every host copy (their memory returns when no one else holds them)."""
        self._tensors.clear()
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


class TransferBackend(ABC):
    """Starts the copy of host tensors to ``device``; pluggable so tests can inject a late one."""

    @abstractmethod
    def start(self, host: Sequence[Tensor], device: torch.device) -> PendingTransfer: ...


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
    def __init__(self, tensors: list[Tensor], event: torch.cuda.Event, device: torch.device) -> None:
        super().__init__(tensors)
        self.event = event
        self.device = device
        # the stream the destinations were allocated on (the caching allocator's owner of the blocks)
        self.stream = torch.cuda.current_stream(device)

    def wait(self) -> None:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.event)
        if current != self.stream:
            # A transfer carried from the previous call is read here on another stream than the one
            # it was allocated on: without this the allocator could hand the block out again on
            # the old stream while this one still reads it.
            for t in self.tensors:
                t.record_stream(current)

    def wait_host(self) -> None:
        self.event.synchronize()


class CudaStreamBackend(TransferBackend):
    """One transfer stream per device; see the module docstring for the protocol."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device)
        return s

    def start(self, host: Sequence[Tensor], device: torch.device) -> PendingTransfer:
        compute = torch.cuda.current_stream(device)
        side = self._side(device)
        out = [torch.empty_like(h, device=device) for h in host]  # on the compute stream
        side.wait_stream(compute)
        try:
            with torch.cuda.stream(side):
                for d, h in zip(out, host, strict=True):
                    d.copy_(h, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(side)
        except BaseException:
            # Copies already enqueued write into `out`; dropping it now would return those blocks to
            # the compute stream's pool while the side stream still writes into them.
            side.synchronize()
            raise
        return _CudaPending(out, ev, device)


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
        "meta", "name", "params", "pending", "releases", "waits",
    )  # fmt: skip

    def __init__(
        self,
        runtime: SwapRuntime,
        name: str,
        params: tuple[str, ...],
        host: list[Tensor],
        meta: ops.UnitMeta,
        casts: tuple[int, ...],
    ) -> None:
        self.name = name
        self.params = params
        self.host = host
        self.meta = meta
        self.casts = casts  # positions stored in a narrower dtype than the graph computes in
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
            # `pending` for this load's wait.
            self.carried -= 1
            return self._token
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
                cast = out[i].to(dtypes[i])
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

        Each is waited for first: on CUDA the copy engine may still be writing into the block, and
        freeing it would let the allocator hand it to the compute stream mid-copy.
        """
        n = len(self.pending)
        self.carried = 0
        while self.pending:
            p = self.pending.popleft()
            p.wait_host()
            p.tensors = []
        return n


_LIVE: weakref.WeakSet[SwapRuntime] = weakref.WeakSet()


def live_runtimes() -> list[SwapRuntime]:
    """Every SwapRuntime still alive (what ``fxswap.monitor`` sums over)."""
    return list(_LIVE)


class SwapRuntime:
    """Host store, resident device copies, transfer backend and ledger of one compiled model.

    Storage dtype (``storage_dtype``, e.g. ``torch.float8_e4m3fn``): every floating-point weight
    wider than it (see :func:`stored_dtype`) is rounded through it, so the output does not depend on
    which weights the budget swaps:

    - a swapped weight is kept on the host in the storage dtype, copied as stored (fewer bytes over
      the link) into a device *staging* tensor, and cast to the compute dtype by ``wait``;
    - a resident weight is rounded on the host and copied once in the compute dtype.

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
        pinner: how a host tensor is pinned (:class:`HostStore`); tests inject a failing one.

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
        pinner: Callable[[Tensor], Tensor] | None = None,
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
        unit = _Unit(self, name, tuple(f for f, _ in params), host, meta, casts=casts)
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
    def resident(self, fqn: str, tensor: Tensor) -> Tensor:
        """The device copy of a resident weight, made on first request (one copy per name)."""
        d = self._residents.get(fqn)
        if d is None:
            if fqn in self.stored:  # copied as stored; the graph decodes it at each call
                tensor = self.stored[fqn].data
            if self.alloc_hook is not None:
                self.alloc_hook("resident", fqn, tensor.numel() * tensor.element_size())
            src = tensor.detach()
            sd = stored_dtype(src.dtype, self.storage_dtype)
            if sd != src.dtype:  # rounded like the swapped weights (on the host: no device staging)
                src = src.to(sd).to(src.dtype)
            # NOTE: always a fresh tensor, also on the CPU, so the ledger accounts for it and the
            # graph never aliases the user's parameter.
            d = torch.empty_like(src, device=self.device, memory_format=torch.contiguous_format)
            d.copy_(src)
            self._residents[fqn] = self.ledger.track(d) if self.track else d
        return d

    def retain_residents(self, keep: frozenset[str] | set[str]) -> None:
        """Release the resident device copies whose names are not in ``keep``."""
        for k in [k for k in self._residents if k not in keep]:
            del self._residents[k]

    def drop_residents(self) -> None:
        """Release every resident device copy (switching experts; the host copies stay valid)."""
        self._residents.clear()

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
        self.store.clear()
        self.closed = True
