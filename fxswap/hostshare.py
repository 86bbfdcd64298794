"""One host copy of a model's weights per machine, shared by every process that runs it.

With ``ulysses_degree=N`` every rank builds the same model, and each used to keep its own host copy
of all its weights: 4 ranks of WAN 14B held 4 x 28.6 GB. :func:`share_weights` puts the model's
weights into ONE file in shared memory (``/dev/shm``) per machine and points every process's
parameters, buffers and stored (GGUF / fp8) records at views of its mapping, so the machine holds
the bytes once whatever the number of ranks. ``fxswap.compile(..., ulysses_degree=N)`` calls it for
the model it compiles; it can be called on its own for any processes that run the same model.

Protocol, per machine (``/dev/shm`` is per machine, so the ranks of one machine meet there without
knowing their local ranks):

1. The file is named after a digest of the weights' names, shapes and dtypes and a sample of their
   bytes (:func:`weights_key`), so different models, or different weights of one model, never meet
   in one file.
2. Each process takes the directory's lock (``flock`` on ``fxswap-host.lock``, held for a moment,
   never while waiting on anything else), opens the file, and if it is empty (or left incomplete by
   a process that died while writing) writes every weight at a 64-byte aligned offset, then a
   marker after the last byte; the others find it complete. Each maps it and takes a shared
   ``flock`` on the file, held while it uses it, before letting the directory's lock go.
3. Each process checks that every mapped byte equals its own copy (a digest only picks the file;
   the bytes decide: any difference and this process keeps its private copy, with a warning), then
   replaces its tensors by views of the mapping; the private copy is freed.

Mapping: copy-on-write (``MAP_PRIVATE``) by default, so a process that writes into a weight changes
only its own page; ``MAP_SHARED`` when the copies are to be pinned (``pin=True``, CUDA): page-locking
a copy-on-write mapping would give each process its own copy of every page, while on a shared
mapping every process registers the same physical pages (``cudaHostRegister`` per process, the
pages locked once). See :class:`fxswap.runtime.HostStore`.

Clean-up (a file in ``/dev/shm`` is RAM until it is removed):

- with a process group (``ulysses_degree``): the file is unlinked as soon as every rank has mapped
  it (:func:`unlink_when_mapped`); the memory then lives exactly as long as some process maps it,
  and a crash after that point leaves nothing behind;
- without: the last process to let go (:meth:`SharedWeights.close`, the model's death, or the
  interpreter's exit) unlinks it, which it knows because no other process holds the lock;
- a file left by processes that all crashed is removed by the next :func:`share_weights` on the
  machine: no process holds its shared lock (the kernel drops a dead process's locks). Files are
  only created, removed and locked under the directory's lock, so a file nobody holds is unused.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import logging
import mmap
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "MARKER",
    "PREFIX",
    "LOCK_NAME",
    "SharedWeights",
    "region_of",
    "share_weights",
    "shared_of",
    "unlink_when_mapped",
    "weights_key",
]

logger = logging.getLogger("fxswap.hostshare")

#: File name prefix in the shared-memory directory.
PREFIX = "fxswap-host-"
#: Written after the last weight once the file is complete (64 bytes).
MARKER = b"fxswap host weights v1".ljust(64, b"\0")
#: The directory's lock: serialises creating, writing, removing and first locking the files.
LOCK_NAME = "fxswap-host.lock"
#: Each weight starts on a cache line (dtype views need their alignment).
ALIGN = 64
#: Bytes of each weight sampled (start, middle, end) into the file's name.
_SAMPLE = 4096

_LOCK = threading.Lock()
_REGIONS: list[weakref.ref[SharedWeights]] = []
_BY_MODEL: weakref.WeakKeyDictionary[torch.nn.Module, SharedWeights] = weakref.WeakKeyDictionary()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _bytes_of(t: Tensor) -> Tensor:
    """``t``'s bytes as a flat uint8 tensor (a copy only when ``t`` is not contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def weights_key(items: list[tuple[str, Tensor]]) -> str:
    """A digest of the weights' names, shapes, dtypes and a sample of their bytes: which file holds
    them. Cheap on purpose (it reads about 12 KiB per weight); the bytes themselves are compared
    after mapping, so two weights that agree on the sample but not elsewhere are never shared."""
    h = hashlib.sha256()
    for name, t in items:
        h.update(f"{name}|{list(t.shape)}|{t.dtype}|".encode())
        u8 = _bytes_of(t)
        n = u8.numel()
        mid = max(0, n // 2 - _SAMPLE // 2)
        for part in (u8[:_SAMPLE], u8[mid : mid + _SAMPLE], u8[max(0, n - _SAMPLE) :]):
            h.update(part.numpy().tobytes())
    return h.hexdigest()[:32]


class SharedWeights:
    """A model's weights in one shared-memory file, mapped by this process (see the module's
    docstring). ``buffer`` is the whole mapping (uint8); ``names`` the weights it holds;
    ``wrote`` whether this process wrote the file. :meth:`close` lets go of the file (the views
    stay valid while they live: the mapping goes with the last of them)."""

    def __init__(
        self, path: Path, fd: int, buffer: Tensor, names: tuple[str, ...], shared: bool, wrote: bool
    ):
        self.path = path
        self.buffer = buffer
        self.names = names
        self.nbytes = buffer.numel()
        self.mapping = "MAP_SHARED" if shared else "MAP_PRIVATE"
        self.wrote = wrote
        self._base = buffer.data_ptr()
        self._pins = 0
        self._unpin: Callable[[], None] | None = None
        self._pin_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _let_go, fd, str(path))

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def covers(self, t: Tensor) -> bool:
        """Whether ``t``'s memory lies inside this mapping."""
        if t.device.type != "cpu" or self.closed:
            return False
        p = t.untyped_storage().data_ptr()
        return self._base <= p < self._base + self.nbytes

    def pin(self, pinner: Callable[[Tensor], Callable[[], None]]) -> Callable[[], None]:
        """Page-lock the whole mapping once in this process, however many host stores ask (a second
        ``cudaHostRegister`` of the same range fails); the returned function gives this hold back,
        and the last one unlocks it. Raises what ``pinner`` raises."""
        with self._pin_lock:
            if self._pins == 0:
                self._unpin = pinner(self.buffer)
            self._pins += 1
        done = False

        def release() -> None:
            nonlocal done
            with self._pin_lock:
                if done:
                    return
                done = True
                self._pins -= 1
                if self._pins == 0 and self._unpin is not None:
                    self._unpin()
                    self._unpin = None

        return release

    def close(self) -> None:
        """Let go of the file: release this process's lock and, if no other process holds one,
        unlink it. Idempotent. The tensors keep their values (the mapping outlives the name)."""
        self._finalizer()

    def __repr__(self) -> str:
        n = len(self.names)
        return f"SharedWeights({str(self.path)!r}, {n} weights, {self.nbytes} bytes, {self.mapping})"


_DIR_LOCK = threading.RLock()
_DIR_HELD: dict[str, int] = {}  # directory -> its lock file descriptor, while this process holds it


@contextlib.contextmanager
def _dir_locked(directory: str | Path) -> Iterator[None]:
    # NOTE: re-entrant within the process. A finalizer (_let_go) can run in the middle of
    # share_weights when the garbage collector frees another model; a second flock from this
    # process on another descriptor would wait for itself forever.
    key = os.path.abspath(directory)
    with _DIR_LOCK:
        if key in _DIR_HELD:
            yield
            return
        fd = os.open(Path(key) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _DIR_HELD[key] = fd
            yield
        finally:
            _DIR_HELD.pop(key, None)
            os.close(fd)  # releases the lock


def _let_go(fd: int, path: str) -> None:
    with _dir_locked(os.path.dirname(path)):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # another process still uses it: the last one removes it
        else:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(path)
        with contextlib.suppress(OSError):
            os.close(fd)


def region_of(t: Tensor) -> SharedWeights | None:
    """The live shared mapping ``t`` is a view of, if any (what :class:`fxswap.runtime.HostStore`
    pins in place instead of copying)."""
    if t.device.type != "cpu":
        return None
    with _LOCK:
        regions = [r() for r in _REGIONS]
    for r in regions:
        if r is not None and r.covers(t):
            return r
    return None


def shared_of(model: torch.nn.Module) -> SharedWeights | None:
    """The shared weights :func:`share_weights` made for ``model`` in this process, if any."""
    return _BY_MODEL.get(model)


def _sweep(directory: Path, keep: Path) -> None:
    """Remove leftovers (called under the directory's lock): files of ours no process holds."""
    for p in directory.glob(PREFIX + "*"):
        if p == keep:
            continue
        try:
            fd = os.open(p, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(p)
            logger.info("fxswap: removed %s, left by processes that are gone", p)
        except OSError:
            pass  # in use, or already gone
        finally:
            os.close(fd)


def _complete(fd: int, total: int) -> bool:
    if os.fstat(fd).st_size != total:
        return False
    return os.pread(fd, len(MARKER), total - len(MARKER)) == MARKER


def _write(fd: int, path: Path, items: list[tuple[str, Tensor]], offsets: list[int], total: int) -> None:
    os.ftruncate(fd, 0)  # a partial file of a writer that died: start over
    try:
        # Reserve every page now: writing into a sparse file on a full tmpfs (Docker's /dev/shm is
        # 64 MB by default) kills the process with SIGBUS; this fails cleanly instead.
        os.posix_fallocate(fd, 0, total)
    except OSError as e:
        os.unlink(path)  # incomplete, so no process holds it (we hold the directory's lock)
        raise OSError(
            e.errno,
            f"cannot put {total / 2**30:.2f} GiB of host weights into {path.parent} ({e.strerror}; "
            f"{_free_bytes(path.parent) / 2**30:.2f} GiB free there). Fix: give it room (docker run "
            "--shm-size=...), or set FXSWAP_SHM_DIR to a larger memory file system",
        ) from e
    mm = mmap.mmap(fd, total, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        dst = torch.frombuffer(mm, dtype=torch.uint8)
        for (_, t), off in zip(items, offsets, strict=True):
            src = _bytes_of(t)
            dst[off : off + src.numel()].copy_(src)
        del dst
    finally:
        mm.close()
    # the marker last: a file without it is rewritten by the next process
    os.pwrite(fd, MARKER, total - len(MARKER))


def _free_bytes(directory: Path) -> int:
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _trim_heap() -> None:
    """Give the freed private copies back to the OS: glibc keeps freed heap blocks (weights below
    its mmap threshold) for reuse, and they would stay in this process's RSS."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _weights(model: torch.nn.Module) -> tuple[list[tuple[str, Tensor]], dict[str, object]]:
    """The model's CPU tensors to share (parameters, buffers, stored records' data), by a name
    unique per tensor, and the stored records by weight name."""
    from fxswap.stored import stored_weights

    stored = stored_weights(model)
    items: list[tuple[str, Tensor]] = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in stored or t.device.type != "cpu" or t.numel() == 0 or t.is_sparse or t.is_quantized:
            continue
        items.append((name, t))
    for name, w in stored.items():
        if w.data.device.type == "cpu" and w.data.numel():
            items.append((f"stored:{name}", w.data))
    return items, dict(stored)


def share_weights(
    model: torch.nn.Module, *, pin: bool = False, directory: str | Path | None = None
) -> SharedWeights | None:
    """Put ``model``'s host weights into one shared-memory file per machine and make the model's
    tensors views of it (see the module's docstring). Returns the mapping, or None when there is
    nothing to share or this process's bytes differ from the file's (then the model is left as it
    was, with a warning). A model shared already returns its mapping.

    Args:
        model: its CPU parameters, buffers and stored (GGUF / fp8) records are shared; tensors on
            other devices or on meta are left alone.
        pin: map ``MAP_SHARED`` so the host store can page-lock the pages in place (CUDA); the
            default maps copy-on-write.
        directory: where the file lives (default ``$FXSWAP_SHM_DIR`` or ``/dev/shm``); must be a
            memory file system for the sharing to save memory.
    """
    existing = _BY_MODEL.get(model)
    if existing is not None and not existing.closed:
        return existing
    items, stored = _weights(model)
    if not items:
        return None
    where = Path(directory if directory is not None else os.environ.get("FXSWAP_SHM_DIR", "/dev/shm"))
    if not where.is_dir():
        raise ValueError(
            f"`directory`={str(where)!r} is not a directory: fxswap shares host weights through a file "
            "there. Fix: pass an existing directory on a memory file system (/dev/shm), or set FXSWAP_SHM_DIR"
        )
    offsets: list[int] = []
    off = 0
    for _, t in items:
        offsets.append(off)
        off += _aligned(t.numel() * t.element_size())
    total = off + len(MARKER)
    path = where / f"{PREFIX}{weights_key(items)}-{total}"
    with _LOCK:
        mine = [r for r in (w() for w in _REGIONS) if r is not None and not r.closed and r.path == path]
    if mine:
        # this process maps it already (another model with the same weights): its flock would
        # conflict with ours, so the same mapping serves both
        return _adopt_checked(model, items, offsets, stored, mine[0])
    wrote = False
    with _dir_locked(where):
        _sweep(where, keep=path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not _complete(fd, total):
                _write(fd, path, items, offsets, total)
                wrote = True
            flags = mmap.MAP_SHARED if pin else mmap.MAP_PRIVATE
            mm = mmap.mmap(fd, total, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            # "in use" until this process lets go; only a leaver or a sweep, under the directory's
            # lock, ever asks for it exclusively, and never waits
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)  # never unlink here: other processes may be using the complete file
            raise
    buffer = torch.frombuffer(mm, dtype=torch.uint8)
    views: list[Tensor] = []
    same = True
    for (_, t), o in zip(items, offsets, strict=True):
        n = t.numel() * t.element_size()
        v = buffer[o : o + n]
        same = same and torch.equal(v, _bytes_of(t))
        views.append(v.view(t.dtype).view(t.shape))
    if not same:
        del views, buffer
        os.close(fd)  # the file is someone else's: leave it to them
        warnings.warn(
            f"fxswap: {path} holds other bytes than this process's weights of {type(model).__name__} "
            "under the same digest; this process keeps its own host copy (no memory is shared).",
            stacklevel=2,
        )
        return None
    region = SharedWeights(path, fd, buffer, tuple(n for n, _ in items), shared=pin, wrote=wrote)
    _adopt(model, items, views, stored)
    with _LOCK:
        _REGIONS[:] = [r for r in _REGIONS if r() is not None]
        _REGIONS.append(weakref.ref(region))
    _BY_MODEL[model] = region
    del items, views
    _trim_heap()
    logger.info("fxswap: %s (%s)", region, "written here" if wrote else "mapped")
    return region


def _adopt_checked(
    model: torch.nn.Module,
    items: list[tuple[str, Tensor]],
    offsets: list[int],
    stored: dict[str, object],
    region: SharedWeights,
) -> SharedWeights | None:
    views = [
        region.buffer[o : o + t.numel() * t.element_size()] for (_, t), o in zip(items, offsets, strict=True)
    ]
    if not all(torch.equal(v, _bytes_of(t)) for v, (_, t) in zip(views, items, strict=True)):
        warnings.warn(
            f"fxswap: {region.path} holds other bytes than {type(model).__name__}'s weights under the same "
            "digest; this model keeps its own host copy (no memory is shared).",
            stacklevel=3,
        )
        return None
    _adopt(
        model, items, [v.view(t.dtype).view(t.shape) for v, (_, t) in zip(views, items, strict=True)], stored
    )
    _BY_MODEL[model] = region
    _trim_heap()
    return region


def _adopt(
    model: torch.nn.Module, items: list[tuple[str, Tensor]], views: list[Tensor], stored: dict[str, object]
) -> None:
    """Point the model's tensors at the views; each private copy is freed with its last reference."""
    from fxswap.stored import StoredWeight, attach

    records: dict[str, StoredWeight] = {}
    for (name, t), v in zip(items, views, strict=True):
        if name.startswith("stored:"):
            key = name[len("stored:") :]
            w = stored[key]
            assert isinstance(w, StoredWeight)  # narrowing: built from stored_weights
            records[key] = dataclasses.replace(w, data=v)
        else:
            with torch.no_grad():
                t.data = v  # same tensor object: tied weights and the caller's references follow
    if records:
        attach(model, records)


def unlink_when_mapped(region: SharedWeights | None) -> None:
    """After every rank of the default process group has mapped its machine's file: remove the
    name, so the memory lives exactly as long as some process maps it. Every rank must call it
    (it is a barrier); with no region on this rank it still takes part."""
    import torch.distributed as dist

    dist.barrier()
    if region is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(region.path)
