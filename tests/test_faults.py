"""Faults during a step, injected from fxswap's own allocation and copy path (never by patching torch).

- Out of memory (``torch.OutOfMemoryError`` raised by the runtime's ``alloc_hook`` right before
  fxswap allocates): at a resident weight's copy, the first unit load, a load in the middle of the
  graph, and a storage-dtype cast; on the first call and on a later one. ``adaptive`` re-plans for
  the free memory (the runtime's ``free_bytes_probe``) minus the stated margin, recompiles once and
  re-runs the call: the output equals the unswapped model's bitwise. ``layerwise`` / ``chunkwise``
  raise ``DeviceOutOfMemoryError`` naming the budget that fits now, holding nothing.
- Pinning fails or reaches its cap: pageable for the rest, one warning, exact output, and the
  summary and the monitor report pinned and pageable bytes.
- Interrupted step (``KeyboardInterrupt`` or an exception at several points, also while a copy is
  still landing on another thread): no pending transfer, every byte returned (the allocator oracle
  sees the CPU allocator back at its entry level while the exception is still referenced), no host
  copy added, and the next call is exact.
- Concurrency: two threads calling one compiled model, two compiled models called from two
  threads, and a call from inside a call.
- ``close()`` and garbage collection return all memory (oracle) and unregister the units.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn as nn

from fxswap import ops
from fxswap.compiler import ClosedError, DeviceOutOfMemoryError, ReentrantCallError, SwapModule
from fxswap.compiler import compile as fx_compile
from fxswap.errors import BudgetInfeasibleError
from fxswap.monitoring import monitor
from fxswap.oracle import measure
from fxswap.runtime import CopyBackend, HostStore, LateCopyBackend, PendingTransfer, TransferBackend
from tests.models import MLP, regionally_compiled

COMMON: dict[str, Any] = dict(reserve_mb=0, block_size_mb=0.004, backend="eager")
GiB = 2**30


@dataclass
class Setup:
    model: MLP
    x: torch.Tensor
    ref: torch.Tensor  # the unswapped model's output
    ref_bf16: torch.Tensor  # ... with every weight rounded through bfloat16 (storage_dtype)
    lo: dict[str, int]  # smallest budget per mode
    hi: int  # everything resident


def _min_budget(model: nn.Module, x: torch.Tensor, mode: str, **kw: Any) -> int:
    with pytest.raises(BudgetInfeasibleError) as ei:
        fx_compile(model, mode=mode, max_vram_gb=1e-9, **COMMON, **kw)(x)
    return ei.value.min_vram_bytes


@pytest.fixture(scope="module")
def setup() -> Setup:
    torch.manual_seed(0)
    m = MLP().eval().requires_grad_(False)
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = m(x)
        rounded = MLP().eval().requires_grad_(False)
        rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in m.state_dict().items()})
        ref_bf16 = rounded(x)
    lo = {mode: _min_budget(m, x, mode) for mode in ("layerwise", "chunkwise", "adaptive")}
    full = fx_compile(m, mode="adaptive", max_vram_gb=1, **COMMON)
    full(x)
    assert full.plan is not None and full.plan.swapped_bytes == 0
    return Setup(m, x, ref, ref_bf16, lo, full.plan.peak_bytes)


class FaultAt:
    """An ``alloc_hook`` raising ``exc`` at the ``n``-th allocation of ``kind`` (1-based), once."""

    def __init__(self, kind: str, n: int, exc: Callable[[], BaseException]) -> None:
        self.kind, self.n, self.exc = kind, n, exc
        self.seen = 0
        self.fired: tuple[str, int] | None = None

    def __call__(self, kind: str, name: str, nbytes: int) -> None:
        if kind != self.kind or self.fired is not None:
            return
        self.seen += 1
        if self.seen == self.n:
            self.fired = (name, nbytes)
            raise self.exc()


def oom() -> BaseException:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB (injected by the test)")


def swapping(s: Setup, mode: str, budget: int, **kw: Any) -> SwapModule:
    sm = fx_compile(s.model, mode=mode, max_vram_gb=budget / GiB, **COMMON, **kw)
    return sm


def held_by_fxswap(sm: SwapModule) -> int:
    gc.collect()
    return sm.runtime.ledger.bytes


# (kind, n): a resident weight's copy, the first load, a load in the middle of the graph, a cast
POINTS = [("resident", 1), ("load", 1), ("load", 3), ("cast", 2)]


# ------------------------------------------------------------------------------------- OOM: adaptive
@pytest.mark.parametrize("first_call", [True, False], ids=["first-call", "later-call"])
@pytest.mark.parametrize(("kind", "n"), POINTS)
def test_adaptive_replans_for_free_memory_and_reruns_exactly(
    setup: Setup, kind: str, n: int, first_call: bool, caplog: pytest.LogCaptureFixture
) -> None:
    s = setup
    storage = torch.bfloat16 if kind == "cast" else None
    ref = s.ref_bf16 if storage is not None else s.ref
    lo = _min_budget(s.model, s.x, "adaptive", storage_dtype=storage) if storage else s.lo["adaptive"]
    old = lo + 2 * (s.hi - lo) // 3
    sm = swapping(s, "adaptive", old, storage_dtype=storage)
    if not first_call:
        assert torch.equal(sm(s.x), ref)
        if kind == "resident":
            sm.release()  # the residents are made again inside the faulty call
    # Another process took memory: what is free now fits only the smallest plan. The margin is
    # stated (no share, a fixed 1000 bytes) so the expected budget is computed here, independently.
    sm.oom_margin_share, sm.oom_margin_min_bytes = 0.0, 1000
    inputs = s.x.numel() * s.x.element_size()
    target = lo
    sm.runtime.free_bytes_probe = lambda: target + 1000 - inputs
    fault = FaultAt(kind, n, oom)
    sm.runtime.alloc_hook = fault
    with caplog.at_level(logging.WARNING, logger="fxswap.compiler"):
        out = sm(s.x)
    assert fault.fired is not None, "the fault point was never reached"
    assert torch.equal(out, ref)
    assert sm.plan is not None and sm.plan.max_vram_bytes == target and sm.plan.peak_bytes <= target
    assert len(sm.recoveries) == 1
    rec = sm.recoveries[0]
    assert rec.replanned and rec.old_budget_bytes == old and rec.new_budget_bytes == target
    assert rec.margin_bytes == 1000 and rec.where == ("first call" if first_call else "call 2")
    assert any("ran out of device memory" in r.message and "re-planned" in r.message for r in caplog.records)
    assert sm.options.max_vram_bytes == target  # later signatures plan for what is free, too
    # the recovered model keeps working and compiles no more
    compiles = sm.stats["compiles"]
    for _ in range(2):
        assert torch.equal(sm(s.x), ref)
    assert sm.stats["compiles"] == compiles and len(sm.plans) == 1
    assert all(not u.pending for u in sm.runtime._units)


def test_adaptive_reruns_the_same_plan_when_it_still_fits(setup: Setup) -> None:
    s = setup
    old = (s.lo["adaptive"] + s.hi) // 2
    sm = swapping(s, "adaptive", old)
    sm(s.x)
    compiles = sm.stats["compiles"]
    sm.runtime.free_bytes_probe = lambda: 10 * s.hi  # plenty free: the shortage was transient
    sm.runtime.alloc_hook = FaultAt("load", 2, oom)
    assert torch.equal(sm(s.x), s.ref)
    assert sm.stats["compiles"] == compiles
    assert not sm.recoveries[0].replanned and sm.recoveries[0].new_budget_bytes == old


def test_adaptive_below_the_minimum_names_what_to_free(setup: Setup) -> None:
    s = setup
    sm = swapping(s, "adaptive", s.hi)
    sm(s.x)
    sm.oom_margin_share, sm.oom_margin_min_bytes = 0.0, 0
    inputs = s.x.numel() * s.x.element_size()
    sm.runtime.free_bytes_probe = lambda: s.lo["adaptive"] - 1 - inputs
    sm.runtime.alloc_hook = FaultAt("resident", 1, oom)
    sm.release()
    with pytest.raises(DeviceOutOfMemoryError, match="below the smallest that works") as ei:
        sm(s.x)
    assert ei.value.needed_bytes == s.lo["adaptive"] and ei.value.fits_bytes == s.lo["adaptive"] - 1
    assert isinstance(ei.value, torch.OutOfMemoryError)  # callers catching torch's error still do
    assert held_by_fxswap(sm) == 0
    # nothing was lost: once memory is free again, the old plan runs
    sm.runtime.alloc_hook = None
    assert torch.equal(sm(s.x), s.ref) and sm.plan is not None and sm.plan.max_vram_bytes == s.hi


def test_adaptive_gives_up_after_one_retry(setup: Setup) -> None:
    s = setup
    sm = swapping(s, "adaptive", s.hi)
    sm(s.x)
    sm.runtime.free_bytes_probe = lambda: s.hi

    def hook(kind: str, name: str, nbytes: int) -> None:  # every load fails
        if kind in ("load", "resident"):
            raise oom()

    sm.runtime.alloc_hook = hook
    sm.release()
    with pytest.raises(DeviceOutOfMemoryError, match="ran out of memory again"):
        sm(s.x)
    assert held_by_fxswap(sm) == 0
    sm.runtime.alloc_hook = None
    assert torch.equal(sm(s.x), s.ref)


# ---------------------------------------------------------------------------- OOM: fixed modes
@pytest.mark.parametrize("mode", ["layerwise", "chunkwise"])
@pytest.mark.parametrize(("kind", "n"), POINTS)
def test_fixed_modes_name_the_budget_that_fits_now(setup: Setup, mode: str, kind: str, n: int) -> None:
    s = setup
    storage = torch.bfloat16 if kind == "cast" else None
    ref = s.ref_bf16 if storage is not None else s.ref
    lo = _min_budget(s.model, s.x, mode, storage_dtype=storage) if storage else s.lo[mode]
    sm = swapping(s, mode, s.hi if kind == "resident" else lo, storage_dtype=storage)
    assert torch.equal(sm(s.x), ref)
    plan = sm.plan
    free = 123_456
    sm.runtime.free_bytes_probe = lambda: free
    sm.oom_margin_share, sm.oom_margin_min_bytes = 0.05, 0
    sm.runtime.alloc_hook = FaultAt(kind, n, oom)
    if kind == "resident":
        sm.release()
    with pytest.raises(DeviceOutOfMemoryError) as ei:
        sm(s.x)
    fits = free - int(free * 0.05) + s.x.numel() * s.x.element_size()
    msg = str(ei.value)
    assert ei.value.fits_bytes == fits and f"({fits} bytes)" in msg
    assert f"max_vram_gb={fits / GiB:.4f}" in msg and "mode='adaptive'" in msg and mode in msg
    assert isinstance(ei.value.__cause__, torch.OutOfMemoryError)
    # nothing held, nothing re-planned, next call exact with the same plan
    assert held_by_fxswap(sm) == 0 and all(not u.pending for u in sm.runtime._units)
    assert sm.plan is plan and not sm.recoveries
    assert torch.equal(sm(s.x), ref)


# ------------------------------------------------------------------------------------------ pinning
class CappedPinner:
    """Stands in for ``cudaHostRegister`` on a machine that caps page-locked memory: 'locks' a host
    buffer (the CPU has no pinned memory: it only counts) up to ``cap`` bytes, then fails as the
    driver does; the returned release gives the bytes back."""

    def __init__(self, cap: int) -> None:
        self.cap, self.pinned, self.calls = cap, 0, 0

    def __call__(self, t: torch.Tensor) -> Callable[[], None]:
        self.calls += 1
        n = t.untyped_storage().nbytes()
        if self.pinned + n > self.cap:
            raise RuntimeError("CUDA error: out of memory (cudaHostRegister failed; injected)")
        self.pinned += n

        def release() -> None:
            self.pinned -= n

        return release


def test_pin_failure_falls_back_to_pageable_warns_once_and_runs(setup: Setup) -> None:
    s = setup
    sm = swapping(s, "layerwise", s.lo["layerwise"])
    pinner = CappedPinner(cap=3 * (64 * 64 + 64) * 4)  # three Linear layers' worth
    sm.runtime.store = HostStore(pin=True, pin_share=1.0, pinner=pinner)
    with pytest.warns(UserWarning, match="pinning host memory failed") as rec:
        out = sm(s.x)
    assert len([w for w in rec if "fxswap" in str(w.message)]) == 1
    assert torch.equal(out, s.ref)
    st = sm.runtime.store
    swapped = sum(
        sum(s.model.get_parameter(p).numel() * 4 for p in u.params) for u in sm.plan.units if not u.resident
    )  # type: ignore[union-attr]
    assert st.pinned_bytes == pinner.pinned > 0
    # the arena's bytes are the payload plus at most 63 alignment bytes per pinned weight
    assert 0 <= st.pinned_bytes - st.pinned_payload_bytes < 64 * len(st)
    assert st.pinned_payload_bytes + st.pageable_bytes == swapped and st.pageable_bytes > 0
    calls = pinner.calls  # the batch, then halves of it, until one weight fails: no attempt after that
    assert "cudaHostRegister" in (st.pin_error or "")
    text = sm.summary()
    assert f"pinned {st.pinned_bytes / 2**20:.2f} MiB" in text
    assert f"pageable {st.pageable_bytes / 2**20:.2f} MiB" in text and "pinning failed" in text
    with monitor("cpu", log=None) as mon:
        assert torch.equal(sm(s.x), s.ref)
    row = mon.rows[-1]
    assert row.pinned_bytes >= st.pinned_bytes and row.pageable_bytes >= st.pageable_bytes
    assert "pageable host" in str(row)
    assert pinner.calls == calls
    sm.close()
    assert pinner.pinned == 0  # close() unlocked every arena (the pinner's own count)


def test_pin_cap_keeps_the_rest_pageable_with_one_warning() -> None:
    store = HostStore(pin=True, pin_share=0.0, pinner=CappedPinner(cap=1 << 40))
    with pytest.warns(UserWarning, match="capped") as rec:
        for i in range(4):
            store.put(f"w{i}", torch.ones(8))
    assert len(rec) == 1 and store.pinned_bytes == 0 and store.pageable_bytes == 4 * 32


def test_real_pin_failure_on_a_machine_without_an_accelerator() -> None:
    if torch.cuda.is_available():
        pytest.skip("pinning works here; the injected failure above covers the fallback")
    store = HostStore(pin=True, pin_share=1.0)  # cudaHostRegister: fails without a device
    with pytest.warns(UserWarning, match="pinning host memory failed"):
        h = store.put("w", torch.arange(6.0))
    assert torch.equal(h, torch.arange(6.0)) and store.pageable_bytes == 24 and store.pin_error


# ------------------------------------------------------------------------------- interrupted step
class _InterruptiblePending(PendingTransfer):
    def __init__(self, owner: InterruptingBackend, inner: PendingTransfer) -> None:
        super().__init__(inner.tensors)
        inner.tensors = []  # one owner of the destinations, as the contract asks
        self.owner, self.inner = owner, inner

    def wait(self) -> None:
        o = self.owner
        o.waits += 1
        if o.armed and o.waits == o.n:
            o.armed = False
            raise o.exc()
        self.inner.wait()

    def wait_host(self) -> None:
        self.inner.wait_host()


class InterruptingBackend(TransferBackend):
    """Copies land late on another thread (LateCopyBackend); the ``n``-th wait raises ``exc``
    while its copy is still in flight."""

    def __init__(self, n: int, exc: Callable[[], BaseException]) -> None:
        self.late = LateCopyBackend(delay_s=0.01)
        self.n, self.exc, self.waits = n, exc, 0
        self.armed = True

    def start(self, host: Any, device: torch.device) -> PendingTransfer:
        return _InterruptiblePending(self, self.late.start(host, device))


INTERRUPTS: list[tuple[str, Callable[[], BaseException]]] = [
    ("keyboard", KeyboardInterrupt),
    ("error", lambda: RuntimeError("injected failure inside the graph")),
]


@pytest.mark.parametrize(("exc_name", "exc"), INTERRUPTS, ids=[n for n, _ in INTERRUPTS])
@pytest.mark.parametrize(("kind", "n"), [*POINTS, ("wait", 1), ("wait", 4)])
def test_interrupted_step_leaves_nothing_and_next_call_is_exact(
    setup: Setup, kind: str, n: int, exc_name: str, exc: Callable[[], BaseException]
) -> None:
    s = setup
    storage = torch.bfloat16 if kind == "cast" else None
    ref = s.ref_bf16 if storage is not None else s.ref
    backend: TransferBackend = InterruptingBackend(n, exc) if kind == "wait" else CopyBackend()
    if kind == "wait":
        backend.armed = False  # type: ignore[attr-defined]
    lo = _min_budget(s.model, s.x, "layerwise", storage_dtype=storage) if storage else s.lo["layerwise"]
    budget = s.hi if kind == "resident" else lo
    sm = swapping(s, "layerwise", budget, storage_dtype=storage, transfer_backend=backend)
    assert torch.equal(sm(s.x), ref)  # warm: compiled, residents made
    gc.collect()
    resident = sm.runtime.ledger.bytes
    store = (len(sm.runtime.store), sm.runtime.store.pinned_bytes, sm.runtime.store.pageable_bytes)
    units = len(ops._UNITS)
    if kind == "wait":
        backend.waits, backend.armed = 0, True  # type: ignore[attr-defined]
    else:
        sm.runtime.alloc_hook = FaultAt(kind, n, exc)
    if kind == "resident":
        sm.release()
        resident = 0
    expected = KeyboardInterrupt if exc_name == "keyboard" else RuntimeError
    with measure("cpu") as m:
        try:
            sm(s.x)
        except expected as e:
            caught = e  # kept alive on purpose: a held exception must not hold device memory
        else:
            pytest.fail("the injected interrupt did not fire")
        gc.collect()
    assert caught is not None
    assert all(not u.pending for u in sm.runtime._units)
    assert sm.runtime.ledger.bytes <= resident
    # The allocator itself (not fxswap's ledger) is back at its entry level, less anything released.
    assert m.end_bytes <= 0, m.end_bytes
    assert (len(sm.runtime.store), sm.runtime.store.pinned_bytes, sm.runtime.store.pageable_bytes) == store
    assert len(ops._UNITS) == units
    sm.runtime.alloc_hook = None
    for _ in range(2):
        assert torch.equal(sm(s.x), ref)
    gc.collect()
    assert sm.runtime.ledger.bytes == sm.runtime.resident_bytes


# ------------------------------------------------------------------------------------- concurrency
def test_two_threads_one_model_are_serialised_and_exact(setup: Setup) -> None:
    s = setup
    sm = swapping(s, "layerwise", s.lo["layerwise"], transfer_backend=LateCopyBackend(delay_s=0.001))
    xs = [torch.randn(4, 64, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        refs = [s.model(x) for x in xs]
    sm(xs[0])
    gc.collect()
    sm.runtime.ledger.reset_peak()
    sm(xs[0])
    single_peak = sm.runtime.ledger.peak
    sm.runtime.ledger.reset_peak()
    errors: list[BaseException] = []
    bad: list[int] = []

    def worker(offset: int) -> None:
        try:
            for k in range(12):
                i = (offset + k) % len(xs)
                if not torch.equal(sm(xs[i]), refs[i]):
                    bad.append(i)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(o,)) for o in (0, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not bad
    assert sm.runtime.ledger.peak <= single_peak  # one call at a time: the budget holds
    assert sm.stats["calls"] == 2 + 24 and sm.stats["compiles"] == 1


def test_two_compiled_models_in_two_threads_are_exact(setup: Setup) -> None:
    s = setup
    torch.manual_seed(1)
    other = MLP(n=4, d=64).eval().requires_grad_(False)
    with torch.no_grad():
        ref_other = other(s.x)
    a = swapping(s, "layerwise", s.lo["layerwise"], transfer_backend=LateCopyBackend(delay_s=0.001))
    b = fx_compile(other, mode="chunkwise", max_vram_gb=1e-3, **COMMON)
    assert torch.equal(a(s.x), s.ref) and torch.equal(b(s.x), ref_other)
    assert not set(a.runtime.unit_ids.values()) & set(b.runtime.unit_ids.values())
    results: dict[str, list[bool]] = {"a": [], "b": []}

    def run(name: str, sm: SwapModule, ref: torch.Tensor) -> None:
        for _ in range(10):
            results[name].append(torch.equal(sm(s.x), ref))

    ts = [
        threading.Thread(target=run, args=("a", a, s.ref)),
        threading.Thread(target=run, args=("b", b, ref_other)),
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results == {"a": [True] * 10, "b": [True] * 10}


def test_a_call_from_inside_a_call_is_refused(setup: Setup) -> None:
    s = setup
    sm = swapping(s, "layerwise", s.lo["layerwise"])
    sm(s.x)

    def hook(kind: str, name: str, nbytes: int) -> None:
        sm(s.x)

    sm.runtime.alloc_hook = hook
    with pytest.raises(ReentrantCallError, match="from inside its own call"):
        sm(s.x)
    sm.runtime.alloc_hook = None
    assert torch.equal(sm(s.x), s.ref)


# ------------------------------------------------------------------------------- close() and GC
def _cycle(s: Setup, close: bool, budget: int) -> tuple[int, set[int]]:
    sm = fx_compile(
        s.model, mode="layerwise", max_vram_gb=budget / GiB, **COMMON, storage_dtype=torch.bfloat16
    )
    out = sm(s.x)
    del out
    ids = set(sm.runtime.unit_ids.values())
    assert ids and all(i in ops._UNITS for i in ids)
    rt = sm.runtime
    if close:
        sm.close()
        with pytest.raises(ClosedError, match="compile the model again"):
            sm(s.x)
    del sm
    gc.collect()
    assert rt.closed and rt.units_registered == 0 and len(rt.store) == 0
    return rt.ledger.bytes, ids


@pytest.mark.parametrize("close", [True, False], ids=["close", "gc"])
def test_close_and_gc_return_every_byte_and_unregister(setup: Setup, close: bool) -> None:
    s = setup
    lo = _min_budget(s.model, s.x, "layerwise", storage_dtype=torch.bfloat16)
    _cycle(s, close, lo)  # first cycle: the capture cache and torch's own caches are filled
    with measure("cpu") as m:
        ledger, ids = _cycle(s, close, lo)
    assert ledger == 0
    assert m.peak_bytes > 0 and m.end_bytes <= 0, (m.peak_bytes, m.end_bytes)
    assert not any(i in ops._UNITS for i in ids)
    with torch.no_grad():
        assert torch.equal(s.model(s.x), s.ref)  # the model itself is untouched


@pytest.mark.slow
def test_inductor_adaptive_recovers_equal_to_regional_torch_compile(setup: Setup) -> None:
    s = setup
    sm = fx_compile(s.model, mode="adaptive", max_vram_gb=s.hi / GiB, backend="inductor", reserve_mb=0)
    ref = regionally_compiled(s.model)(s.x)  # fxswap compiles the blocks, the rest runs eagerly
    assert torch.equal(sm(s.x), ref)
    target = (s.lo["adaptive"] + s.hi) // 2
    sm.oom_margin_share, sm.oom_margin_min_bytes = 0.0, 0
    sm.runtime.free_bytes_probe = lambda: target - s.x.numel() * s.x.element_size()
    sm.release()
    sm.runtime.alloc_hook = FaultAt("resident", 3, oom)
    out = sm(s.x)
    assert torch.equal(out, ref)
    assert sm.recoveries[0].replanned and sm.plan is not None
    assert sm.plan.max_vram_bytes == target and sm.plan.peak_bytes <= target and sm.plan.swapped_bytes > 0
    assert torch.equal(sm(s.x), ref)
