"""The CUDA path read against PyTorch's CUDA semantics (issue 22), tested without a GPU.

What is CPU-visible is tested directly (fp8 scales and refusals, input copy flags, the order of
drop and probe, monitor peaks, arena bytes against the CPU allocator's own events, plan pricing
by hand). Stream semantics are tested with :class:`FakeCuda`: ``torch.cuda``'s stream and event
objects replaced by recorders, so a test reads the sequence of stream and event operations a unit
goes through and can make every host sync fail. ``benchmarks/gpu_check.py`` repeats the checks that
need a device (reserved - allocated at the peak, host syncs counted by the profiler, overlap of
pageable units).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn as nn

from fxswap import ops
from fxswap.compiler import compile as fx_compile
from fxswap.runtime import CudaStreamBackend, HostStore, SwapRuntime
from tests.models import MLP

COMMON: dict[str, Any] = dict(reserve_mb=0, block_size_mb=0.004, backend="eager")
GiB = 2**30
FP8 = torch.float8_e4m3fn
# Rates where copies and compute are of the same order (as tests/test_warm_loop.py): at 40 kB the
# MLP's plan prefetches and carries a unit into the next call, at 70 kB it keeps two layers resident.
RATES: dict[str, Any] = dict(h2d_gbps=1.0, compute_tflops=1e-4)
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value (OCP FP8 spec: S.1111.110 = 1.75 * 2**8)


# --------------------------------------------------------------------------------------- fake CUDA
class FakeStream:
    def __init__(self, cuda: FakeCuda, name: str) -> None:
        self.cuda, self.name = cuda, name

    def wait_stream(self, other: FakeStream) -> None:
        self.cuda.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, ev: FakeEvent) -> None:
        self.cuda.log.append(("wait_event", self.name, ev.id))

    def synchronize(self) -> None:
        self.cuda.host_sync(("stream_sync", self.name))

    def __repr__(self) -> str:
        return self.name


class FakeEvent:
    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda, self.id = cuda, next(cuda.ids)

    def record(self, stream: FakeStream | None = None) -> None:
        s = stream if stream is not None else self.cuda.current
        self.cuda.log.append(("record", self.id, s.name))

    def synchronize(self) -> None:
        self.cuda.host_sync(("event_sync", self.id))


class FakeCuda:
    """Stands in for torch.cuda's streams and events; ``log`` is what happened, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.ids = itertools.count()
        self.compute = FakeStream(self, "compute")
        self.current = self.compute
        self.sides = itertools.count()
        self.syncs_fail = False

    def host_sync(self, what: tuple[Any, ...]) -> None:
        if self.syncs_fail:
            raise AssertionError(f"host sync on the per-call path: {what}")
        self.log.append(what)

    @contextlib.contextmanager
    def stream(self, s: FakeStream) -> Iterator[None]:
        prev, self.current = self.current, s
        try:
            yield
        finally:
            self.current = prev

    def install(self, mp: pytest.MonkeyPatch, *, log_copies: bool = False, log_allocs: bool = False) -> None:
        mp.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        mp.setattr(torch.cuda, "Stream", lambda device=None: FakeStream(self, f"side{next(self.sides)}"))
        mp.setattr(torch.cuda, "stream", self.stream)
        mp.setattr(torch.cuda, "Event", lambda *a, **k: FakeEvent(self))

        def record_stream(t: torch.Tensor, s: Any) -> None:
            self.log.append(("record_stream", s.name))

        mp.setattr(torch.Tensor, "record_stream", record_stream)
        if log_copies:
            real_copy = torch.Tensor.copy_

            def copy_(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
                self.log.append(("copy", self.current.name, non_blocking, src.data_ptr()))
                return real_copy(dst, src, non_blocking)

            mp.setattr(torch.Tensor, "copy_", copy_)
        if log_allocs:
            for name in ("empty", "empty_like"):
                real = getattr(torch, name)

                def alloc(*a: Any, _real: Any = real, **k: Any) -> torch.Tensor:
                    if k.get("device") is not None:  # a device allocation (host ones name no device)
                        self.log.append(("alloc", self.current.name))
                    return _real(*a, **k)

                mp.setattr(torch, name, alloc)

    def fail_on_host_sync(self, mp: pytest.MonkeyPatch) -> None:
        """From now on any host sync raises (streams, events, the device, a scalar read)."""
        self.syncs_fail = True

        def fail(*a: Any, **k: Any) -> Any:
            raise AssertionError("host sync on the per-call path")

        mp.setattr(torch.cuda, "synchronize", fail)
        # every way Python reads a tensor's value on the host (a device sync on CUDA)
        for name in ("item", "tolist", "__float__", "__int__", "__index__"):
            mp.setattr(torch.Tensor, name, fail)


def _pinner_log() -> tuple[list[int], Callable[[torch.Tensor], Callable[[], None]]]:
    locked: list[int] = []

    def pinner(buf: torch.Tensor) -> Callable[[], None]:
        locked.append(buf.numel())
        return lambda: locked.append(-buf.numel())

    return locked, pinner


def _kinds(log: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The log without copy source addresses (stable across runs)."""
    return [e[:3] if e[0] == "copy" else e for e in log]


# ---------------------------------------------------------------------- 1. fp8 storage with a scale
def _scaled_fp8(t: torch.Tensor) -> torch.Tensor:
    # The fp8-scaled checkpoint convention, written out here: s = amax / 448 (float32), q = t / s.
    s = float(torch.tensor(float(t.abs().max()) / FP8_MAX, dtype=torch.float32))
    return (t / s).to(FP8).to(t.dtype) * s


def test_fp8_storage_keeps_weights_that_span_the_range() -> None:
    w = torch.tensor([1000.0, -700.0, 3.0, -0.05, 2e-3, 1e-3] * 4).reshape(4, 6)
    rt = SwapRuntime("cpu", storage_dtype=FP8)
    uid = rt.add_unit("u", [("w", w)])
    got = ops.wait(uid, ops.load(uid, torch.zeros(1)))[0]
    assert torch.isfinite(got).all()
    # e4m3 keeps 3 mantissa bits: a relative error of at most 2**-4 for every value within the
    # format's normal range after scaling (|x| / s >= 2**-6, s = 1000 / 448).
    s = 1000.0 / FP8_MAX
    normal = w.abs() / s >= 2**-6
    rel = ((got - w).abs() / w.abs())[normal]
    assert normal.sum() == 16 and float(rel.max()) <= 2**-4  # 1000, 700, 3 and 0.05 of each row
    assert torch.equal(got, _scaled_fp8(w))
    # the resident copy of the same weight is rounded alike (the output must not depend on the plan)
    assert torch.equal(rt.resident("w", w), got)


class _WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("pos", torch.linspace(0, 2000.0, 8))  # a float buffer far above 448

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.pos


@pytest.mark.parametrize("budget_gb", [480 / GiB, 1.0], ids=["swapped", "resident"])
def test_fp8_storage_of_a_float_buffer_matches_the_scaled_reference(budget_gb: float) -> None:
    torch.manual_seed(0)
    m = _WithBuffer().eval().requires_grad_(False)
    x = torch.randn(2, 8)
    with torch.no_grad():
        lin = torch.nn.functional.linear(x, _scaled_fp8(m.lin.weight), _scaled_fp8(m.lin.bias))
        out = lin + _scaled_fp8(m.pos)
    sm = fx_compile(m, mode="layerwise", max_vram_gb=budget_gb, storage_dtype=FP8, **COMMON)
    got = sm(x)
    assert torch.isfinite(got).all() and torch.equal(got, out)


def test_fp8_storage_refuses_a_weight_it_cannot_represent() -> None:
    rt = SwapRuntime("cpu", storage_dtype=FP8)
    bad = torch.tensor([1.0, float("inf"), 2.0])
    with pytest.raises(ValueError, match=r"weight `blk.w` holds NaN or infinite"):
        rt.add_unit("u", [("blk.w", bad)])
    with pytest.raises(ValueError, match=r"weight `big` reaches \|x\| = 100000, above torch.float16"):
        SwapRuntime("cpu", storage_dtype=torch.float16).resident("big", torch.tensor([1e5, 1.0]))


# ------------------------------------------------------------------- 2. inputs of the dynamo backend
def test_dynamo_backend_copies_inputs_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxswap.integrations import dynamo

    model = nn.Linear(4, 4).eval().requires_grad_(False)
    x = torch.randn(2, 4)
    captured: dict[str, Any] = {}

    def grab(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        captured.update(gm=gm, inputs=list(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=grab, fullgraph=True, dynamic=False)(x)
    torch._dynamo.reset()
    run = dynamo.fxswap_backend(
        captured["gm"], captured["inputs"], options={"device": "cpu", "backend": "eager"}
    )
    # The call's input arrives on another device ("meta" stands in for a caller's pinned host tensor
    # when fxswap runs on CUDA); record how the backend copies it.
    seen: list[Any] = []
    real_to = torch.Tensor.to

    def to(self: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        if self.device.type == "meta":
            seen.append(k.get("non_blocking", False))
            return x
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", to)
    args = [torch.empty(2, 4, device="meta") if a is x else a for a in captured["inputs"]]
    with torch.no_grad():
        out = run(*args)
        ref = model(x)
    # blocking: a caller may overwrite its (pinned) input as soon as the call returns
    assert seen == [False]
    assert torch.equal(out[0] if isinstance(out, (list, tuple)) else out, ref)


# ------------------------------------------------------------------------ 3. carried units, streams
def test_a_unit_loads_on_the_stream_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    cuda.install(monkeypatch, log_copies=True, log_allocs=True)
    backend = CudaStreamBackend(is_pinned=lambda t: True, pinner=_pinner_log()[1])
    rt = SwapRuntime("cpu", backend=backend)
    w = torch.randn(4, 4)
    uid = rt.add_unit("u", [("w", w)])
    cuda.log.clear()
    got = ops.wait(uid, ops.load(uid, torch.zeros(1)))
    assert torch.equal(got[0], w)
    assert _kinds(cuda.log) == [
        ("alloc", "compute"),  # the destination belongs to the compute stream
        ("wait_stream", "side0", "compute"),  # the block may be memory compute still reads
        ("copy", "side0", True),
        ("record", 0, "side0"),
        ("wait_event", "compute", 0),  # device-side: the host does not wait
    ]


def test_a_carried_unit_read_on_another_stream_is_loaded_cold(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    cuda.install(monkeypatch, log_copies=True)
    rt = SwapRuntime("cpu", backend=CudaStreamBackend(is_pinned=lambda t: True, pinner=_pinner_log()[1]))
    w = torch.randn(4, 4)
    uid = rt.add_unit("u", [("w", w)])
    ops.carry(uid, torch.zeros(1))  # the previous call's tail, on the compute stream
    other = FakeStream(cuda, "user")
    cuda.log.clear()
    with cuda.stream(other):  # the next call runs on the caller's own stream
        got = ops.wait(uid, ops.load(uid, torch.zeros(1)))
    assert torch.equal(got[0], w)
    assert ("record_stream", "user") not in cuda.log  # no block kept alive past its free
    assert _kinds(cuda.log) == [
        ("wait_event", "compute", 0),  # the carry's own stream waits for its copy, then frees it
        ("wait_stream", "side0", "user"),  # cold load on the new stream
        ("copy", "side0", True),
        ("record", 1, "side0"),
        ("wait_event", "user", 1),
    ]
    assert rt.stats["loads"] == 2 and not rt._units[0].pending


def test_a_carried_unit_on_the_same_stream_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    rt = SwapRuntime("cpu", backend=CudaStreamBackend(is_pinned=lambda t: True, pinner=_pinner_log()[1]))
    uid = rt.add_unit("u", [("w", torch.randn(4))])
    ops.carry(uid, torch.zeros(1))
    cuda.log.clear()
    ops.wait(uid, ops.load(uid, torch.zeros(1)))
    assert cuda.log == [("wait_event", "compute", 0)] and rt.stats["loads"] == 1


# ------------------------------------------------------- 4. a new signature's build, monitor peaks
@pytest.mark.parametrize("budget", [40_000, 70_000], ids=["carries", "residents"])
def test_a_new_signature_drops_residents_and_carries_before_its_probe(
    monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    import fxswap.build as build

    torch.manual_seed(0)
    m = MLP().eval().requires_grad_(False)
    seen: list[tuple[int, int]] = []
    real = build.probe_workspace

    def spy(gm: Any, device: torch.device) -> dict[str, int]:
        seen.append((sm.runtime.resident_bytes, sm.runtime.carried_bytes))
        return real(gm, device)

    monkeypatch.setattr(build, "probe_workspace", spy)
    sm = fx_compile(m, mode="layerwise", max_vram_gb=budget / GiB, warm_start=True, **RATES, **COMMON)
    x4, x2 = torch.randn(4, 64), torch.randn(2, 64)
    sm(x4)
    sm(x4)
    assert sm.runtime.resident_bytes + sm.runtime.carried_bytes > 0  # held between calls
    with torch.no_grad():
        assert torch.equal(sm(x2), m(x2))  # a new signature: captured, probed, planned
    assert len(seen) == 2 and seen[1] == (0, 0)


def test_monitor_keeps_its_peak_across_fxswap_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxswap.monitoring import keep_peaks, monitor

    state = {"now": 100, "peak": 100}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: state.update(peak=state["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: state["now"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: state["now"])
    dev = torch.device("cuda", 0)
    with monitor(dev, log=None) as mon:
        state.update(peak=5000)  # a monitored call peaked at 5000 bytes
        mon.step()
        with keep_peaks(dev):  # what Builder.build wraps the workspace probe and Inductor replay in
            torch.cuda.reset_peak_memory_stats(dev)  # the probe's own measurement
            state.update(peak=300)
        mon.step()
    assert [r.peak_bytes for r in mon.rows] == [5000, 5000]


def test_builds_run_inside_keep_peaks(monkeypatch: pytest.MonkeyPatch) -> None:
    import fxswap.monitoring as monitoring

    entered: list[torch.device] = []
    real = monitoring.keep_peaks

    def spy(device: torch.device) -> Any:
        entered.append(device)
        return real(device)

    monkeypatch.setattr(monitoring, "keep_peaks", spy)
    sm = fx_compile(MLP().eval().requires_grad_(False), mode="layerwise", max_vram_gb=1, **COMMON)
    sm(torch.randn(4, 64))
    assert entered == [torch.device("cpu")]


# ---------------------------------------------------------------- 5. pageable units: ring and price
def test_pageable_weights_are_staged_through_a_bounded_pinned_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    cuda.install(monkeypatch, log_copies=True)
    locked, pinner = _pinner_log()
    backend = CudaStreamBackend(ring_slots=2, slot_bytes=64, is_pinned=lambda t: False, pinner=pinner)
    w = torch.randn(75)  # 300 bytes: 5 slot-sized chunks through a 2-slot ring
    p = backend.start([w], torch.device("cpu"))
    p.wait()
    assert torch.equal(p.tensors[0], w)
    assert backend.ring_bytes == 128 and locked == [128]  # bounded, and counted
    assert (backend.staged_bytes, backend.staged_tensors) == (300, 1)
    ring = range(backend._ring.buffer.data_ptr(), backend._ring.buffer.data_ptr() + 128)  # type: ignore[union-attr]
    dma = [e for e in cuda.log if e[0] == "copy" and e[2]]
    assert len(dma) == 5 and all(e[1] == "side0" and e[3] in ring for e in dma)  # from the ring only
    # a slot is reused only after its previous copy landed: the 3rd chunk waits for the 1st's event
    kinds = _kinds(cuda.log)
    first_record = kinds.index(("record", 0, "side0"))
    assert ("event_sync", 0) in kinds[first_record:]
    backend.close()
    assert locked == [128, -128]


def test_a_model_runs_exactly_through_the_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    torch.manual_seed(0)
    m = MLP().eval().requires_grad_(False)
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = m(x)
    backend = CudaStreamBackend(
        ring_slots=2, slot_bytes=4096, is_pinned=lambda t: False, pinner=_pinner_log()[1]
    )
    sm = fx_compile(m, mode="layerwise", max_vram_gb=40_000 / GiB, warm_start=False, transfer_backend=backend,
                    **RATES, **COMMON)  # fmt: skip
    assert torch.equal(sm(x), ref)
    assert sm.plan is not None
    # Bytes counted from the model's own tensors (the plan only says which units are swapped): the
    # first call stages every weight once (swapped units and the resident copies), each later call
    # the swapped units' weights again.
    params = dict(m.named_parameters())
    every = sum(t.numel() * t.element_size() for t in params.values())
    names = [n for u in sm.plan.units if not u.resident for n in u.params]
    swapped = sum(params[n].numel() * params[n].element_size() for n in names)
    assert swapped > 0
    staged = backend.staged_bytes
    assert staged == every
    for _ in range(2):
        assert torch.equal(sm(x), ref)
    assert backend.staged_bytes - staged == 2 * swapped
    assert backend.ring_bytes == 8192
    sm.close()


def test_plan_prices_pageable_units_as_not_overlapping() -> None:
    torch.manual_seed(0)
    m = MLP().eval().requires_grad_(False)
    x = torch.randn(4, 64)
    opts: dict[str, Any] = dict(mode="layerwise", max_vram_gb=40_000 / GiB, warm_start=False, **RATES,
                                **COMMON)  # fmt: skip
    pinned = fx_compile(m, **opts)  # the plan as made: every copy may overlap compute
    pinned(x)
    pageable = fx_compile(m, **opts)

    def refuse(buf: torch.Tensor) -> Callable[[], None]:
        raise RuntimeError("cudaHostRegister failed (injected)")

    pageable.runtime.store = HostStore(pin=True, pin_share=1.0, pinner=refuse)
    with pytest.warns(UserWarning, match="pinning host memory failed"), torch.no_grad():
        assert torch.equal(pageable(x), m(x))
    a, b = pinned.plan, pageable.plan
    assert a is not None and b is not None and a.units == b.units
    # Every swapped unit blocks: nothing overlaps, so the step is compute plus every copy, by hand.
    copy_ms = b.moved_bytes_per_call / (1.0 * 1e9) * 1e3
    assert b.predicted_step_ms == pytest.approx(b.predicted_compute_ms + copy_ms, rel=1e-9)
    assert a.predicted_step_ms < b.predicted_step_ms  # the pinned plan overlaps some copies


def test_a_blocking_load_stalls_at_its_issue() -> None:
    from fxswap.passes.simulate import OpCosts, UnitWindow, simulate_time

    costs = OpCosts.from_op_ms([1.0, 1.0])
    unit = UnitWindow(500_000, False, load_at=0, wait_at=1, release_after=1)  # 0.5 ms at 1 GB/s
    # by hand: overlapped, the copy runs during op 0 (step 2 ms); blocking, the host waits 0.5 ms first
    assert simulate_time(costs, [unit], 1.0).step_ms == pytest.approx(2.0)
    blocking = UnitWindow(500_000, False, 0, 1, 1, blocking=True)
    assert simulate_time(costs, [blocking], 1.0).step_ms == pytest.approx(2.5)


# -------------------------------------------------------------------- 6. pinned arenas, exact size
def test_pinned_host_copies_take_one_exact_size_arena() -> None:
    from fxswap.oracle import measure

    locked, pinner = _pinner_log()
    store = HostStore(pin=True, pin_share=1.0, pinner=pinner)
    items = [("a", torch.randn(750)), ("b", torch.randn(1250)), ("c", torch.randn(3))]  # 3000, 5000, 12 B
    with measure("cpu") as m:
        store.reserve(items)
    # by hand: each weight on its own 64-byte boundary: 3008 + 5056 + 64 (torch's pinned allocator
    # would have taken 4096 + 8192 + 16 = 12304 bytes)
    expected = 3008 + 5056 + 64
    allocs = [b for _t, b in m.events if b > 0]
    assert allocs == [expected] and locked == [expected]  # the CPU allocator's own record
    for name, t in items:
        h = store.put(name, t)
        assert torch.equal(h, t) and h.data_ptr() != t.data_ptr()
    assert (store.pinned_bytes, store.pinned_payload_bytes, store.pageable_bytes) == (expected, 8012, 0)
    store.clear()
    assert locked == [expected, -expected]  # unlocked when the store is cleared


def test_close_unlocks_the_arenas_and_hands_the_weights_back() -> None:
    torch.manual_seed(0)
    m = MLP().eval().requires_grad_(False)
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = m(x)
    sm = fx_compile(m, mode="layerwise", max_vram_gb=30_000 / GiB, **COMMON)
    locked, pinner = _pinner_log()
    sm.runtime.store = HostStore(pin=True, pin_share=1.0, pinner=pinner)
    assert torch.equal(sm(x), ref)
    assert len([n for n in locked if n > 0]) == 1  # one arena for the plan's swapped weights
    swapped = [p for u in sm.plan.units if not u.resident for p in u.params]  # type: ignore[union-attr]
    assert all(sm.runtime.store.in_arena(p) for p in swapped)
    ptrs = {p: sm.runtime.store[p].data_ptr() for p in swapped}
    assert all(m.get_parameter(p).data_ptr() == ptrs[p] for p in swapped)  # one host copy in the process
    sm.close()
    assert sum(locked) == 0  # every arena unlocked
    assert all(m.get_parameter(p).data_ptr() != ptrs[p] for p in swapped)  # given their own copies
    with torch.no_grad():
        assert torch.equal(m(x), ref)


# ------------------------------------------------------------ 7. host syncs, residents on the stream
def test_residents_are_copied_on_the_transfer_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    cuda.install(monkeypatch, log_copies=True, log_allocs=True)
    rt = SwapRuntime("cpu", backend=CudaStreamBackend(is_pinned=lambda t: True, pinner=_pinner_log()[1]))
    w = torch.randn(4, 4)
    cuda.fail_on_host_sync(monkeypatch)
    cuda.log.clear()
    d = rt.resident("w", w)
    assert torch.equal(d, w) and d.data_ptr() != w.data_ptr()
    assert _kinds(cuda.log) == [
        ("alloc", "compute"),
        ("wait_stream", "side0", "compute"),
        ("copy", "side0", True),
        ("record", 0, "side0"),
        ("wait_event", "compute", 0),
    ]


def test_steady_calls_make_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    torch.manual_seed(0)
    m = MLP().eval().requires_grad_(False)
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = m(x)
    backend = CudaStreamBackend(is_pinned=lambda t: True, pinner=_pinner_log()[1])
    sm = fx_compile(m, mode="layerwise", max_vram_gb=40_000 / GiB, warm_start=True, transfer_backend=backend,
                    **RATES, **COMMON)  # fmt: skip
    assert torch.equal(sm(x), ref) and torch.equal(sm(x), ref)  # built, residents made, carries started
    cuda.fail_on_host_sync(monkeypatch)
    cuda.log.clear()
    for _ in range(3):
        assert torch.equal(sm(x), ref)
    assert sm.plan is not None and sm.plan.carried_bytes > 0
    loads = sum(e[0] == "wait_stream" for e in cuda.log)
    waits = sum(e[0] == "wait_event" for e in cuda.log)
    assert loads == waits == 3 * sum(not u.resident for u in sm.plan.units)
    cuda.syncs_fail = False
    sm.close()  # waits for the transfer stream: a host sync, but once, off the per-call path
    assert ("stream_sync", "side0") in cuda.log


def test_experts_pick_by_the_host_timestep_without_reading_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import fxswap.experts as experts_mod
    from fxswap.experts import compile_experts

    class Denoiser(nn.Module):
        def __init__(self, k: float) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.k = k

        def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.k + timestep.reshape(-1, 1)

    torch.manual_seed(0)
    high, low = Denoiser(1.0).eval().requires_grad_(False), Denoiser(-1.0).eval().requires_grad_(False)
    ex = compile_experts(high, low, boundary=875.0, mode="layerwise", max_vram_gb=1, **COMMON)
    x = torch.randn(2, 8)
    t = torch.full((2,), 900.0)

    def no_read(*a: Any, **k: Any) -> float:
        raise AssertionError("the timestep tensor was read")

    monkeypatch.setattr(experts_mod, "_host_value", no_read)
    with torch.no_grad():
        assert torch.equal(ex(x, t, host_timestep=900.0), high(x, t))
        assert torch.equal(ex(x, t, host_timestep=10.0), low(x, t))


def test_experts_warn_when_the_timestep_cannot_be_mirrored() -> None:
    from fxswap.experts import _mirrored_value

    calls: list[int] = []
    with torch.inference_mode():
        t = torch.full((2,), 3.0)
    assert _mirrored_value(t, [], on_device_read=lambda: calls.append(1)) == 3.0 and calls == [1]


# ----------------------------------------------------------------------------- 8. CUDA graph capture
def test_a_call_under_cuda_graph_capture_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    m = MLP().eval().requires_grad_(False)
    x = torch.randn(4, 64)
    sm = fx_compile(m, mode="layerwise", max_vram_gb=30_000 / GiB, **COMMON)
    sm(x)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"capturing a CUDA graph.*Fix: call it outside") as ei:
        sm(x)
    assert type(ei.value).__name__ == "CudaGraphCaptureError"  # fxswap.CudaGraphCaptureError
    assert all(not u.pending for u in sm.runtime._units)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with torch.no_grad():
        assert torch.equal(sm(x), m(x))


def test_arena_alignment_by_hand() -> None:
    from fxswap.runtime import aligned_bytes

    assert [aligned_bytes(n) for n in (0, 1, 64, 65, 3000)] == [0, 64, 64, 128, 3008]
    assert math.isclose(FP8_MAX, torch.finfo(FP8).max)
