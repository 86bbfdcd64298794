"""SwapRuntime, host store, transfer backends, ledger and the ops called directly (no graph)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fxswap import ops
from fxswap.runtime import CopyBackend, HostStore, LateCopyBackend, Ledger, SwapRuntime, default_backend


def _weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.randn(8, 4, generator=g)), ("a.bias", torch.randn(8, generator=g))]


def test_load_wait_release_roundtrip_and_ownership() -> None:
    rt = SwapRuntime("cpu")
    w = _weights()
    uid = rt.add_unit("a", w)
    anchor = torch.zeros(1)
    tok = ops.load(uid, anchor)
    assert tok.numel() == 0 and rt.ledger.bytes == (32 + 8) * 4
    got = ops.wait(uid, tok)
    assert [torch.equal(g, t) for g, (_, t) in zip(got, w, strict=True)] == [True, True]
    assert all(g.data_ptr() != t.data_ptr() for g, (_, t) in zip(got, w, strict=True))  # fresh copies
    ops.release(uid, got, anchor)
    ref = weakref.ref(got[0])
    del got
    gc.collect()
    assert ref() is None, "the registry must not keep a reference to tensors handed to the graph"
    assert rt.ledger.bytes == 0 and rt.ledger.peak == (32 + 8) * 4
    assert rt.stats == {"loads": 1, "waits": 1, "releases": 1}


def test_host_store_one_copy_per_name_and_pin_fallback() -> None:
    t = torch.randn(4, 4)
    store = HostStore(pin=False)
    h1 = store.put("w", t)
    assert store.put("w", torch.zeros(4, 4)) is h1 and len(store) == 1
    assert h1.data_ptr() == t.data_ptr()  # CPU, same dtype, contiguous: no extra host copy
    capped = HostStore(pin=True, pin_share=0.0)
    with pytest.warns(UserWarning, match="pin_share"):
        capped.put("w", t)
    assert capped.pinned_bytes == 0 and capped.pageable_bytes == 64
    with pytest.raises(ValueError, match="pin_share"):
        HostStore(pin=True, pin_share=1.5)
    with pytest.raises(ValueError, match="on meta"):
        HostStore(pin=False).put("w", torch.empty(2, device="meta"))


@pytest.mark.parametrize("storage", [torch.float16, torch.float8_e4m3fn])
def test_storage_dtype_copied_as_stored_cast_on_device(storage: torch.dtype) -> None:
    rt = SwapRuntime("cpu", storage_dtype=storage)
    w = _weights()
    uid = rt.add_unit("a", w)
    assert rt.store["a.weight"].dtype == storage
    got = ops.wait(uid, ops.load(uid, torch.zeros(1)))
    for g, (_, t) in zip(got, w, strict=True):
        assert g.dtype == torch.float32
        # fp8 is scaled per tensor as fp8-scaled checkpoints are: s = amax / 448 (e4m3fn's largest
        # finite value) in float32, stored t / s, restored stored * s; fp16 keeps scale 1.
        amax = float(t.abs().max())
        s = float(torch.tensor(amax / 448.0, dtype=torch.float32)) if storage.itemsize == 1 else 1.0
        assert torch.equal(g, (t / s).to(storage).to(torch.float32) * s)
    del got, g
    gc.collect()
    assert rt.ledger.bytes == 0  # the staging copy in the storage dtype is gone too


def test_late_backend_reads_nan_until_wait() -> None:
    rt = SwapRuntime("cpu", backend=LateCopyBackend(delay_s=0.05))
    uid = rt.add_unit("a", _weights())
    ops.load(uid, torch.zeros(1))
    unit = ops.lookup(uid)
    pending = unit.pending[0]  # type: ignore[attr-defined]
    assert torch.isnan(pending.tensors[0]).all()  # not landed yet
    got = ops.wait(uid, torch.empty(0))
    assert torch.equal(got[0], _weights()[0][1])


def test_wait_without_load_and_unknown_unit_explain_the_contract() -> None:
    rt = SwapRuntime("cpu")
    uid = rt.add_unit("a", _weights())
    with pytest.raises(RuntimeError, match="without a preceding fxswap.load"):
        ops.wait(uid, torch.empty(0))
    rt.close()
    with pytest.raises(KeyError, match="not registered"):
        ops.load(uid, torch.zeros(1))


def test_fake_impls_give_shapes_without_running() -> None:
    rt = SwapRuntime("cpu")
    uid = rt.add_unit("a", _weights())
    with FakeTensorMode() as mode:
        anchor = mode.from_tensor(torch.zeros(2))
        tok = ops.load(uid, anchor)
        ws = ops.wait(uid, tok)
        rel = ops.release(uid, ws, anchor)
    assert [tuple(w.shape) for w in ws] == [(8, 4), (8,)] and rel.numel() == 0
    assert rt.stats["loads"] == 0 and rt.ledger.bytes == 0  # fake calls move nothing


def test_ops_are_marked_side_effectful() -> None:
    from torch.fx.node import _side_effectful_functions

    assert {ops.load, ops.carry, ops.wait, ops.release} <= _side_effectful_functions
    assert frozenset({ops.load, ops.carry, ops.wait, ops.release}) == ops.FXSWAP_OPS


def test_residents_made_once_tracked_and_released() -> None:
    rt = SwapRuntime("cpu")
    t = torch.randn(16)
    d1 = rt.resident("w", t)
    assert rt.resident("w", t) is d1 and d1.data_ptr() != t.data_ptr()
    assert rt.ledger.bytes == 64 and rt.resident_bytes == 64
    del d1
    rt.retain_residents(set())
    gc.collect()
    assert rt.ledger.bytes == 0


def test_ledger_counts_views_with_their_base() -> None:
    led = Ledger()
    t = led.track(torch.empty(10))
    v = t[2:]
    del t
    gc.collect()
    assert led.bytes == 40  # a live view keeps the storage, the ledger agrees
    del v
    gc.collect()
    assert led.bytes == 0


def test_default_backend_on_cpu_is_a_copy() -> None:
    assert isinstance(default_backend(torch.device("cpu")), CopyBackend)


def test_monitor_logs_ledger_rows_per_call() -> None:
    import torch.nn as nn

    from fxswap.compiler import compile as fx_compile
    from fxswap.monitoring import monitor

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)).requires_grad_(False).eval()
    x = torch.randn(2, 32)
    from fxswap.runtime import live_runtimes

    lines: list[str] = []
    sm = fx_compile(m, mode="layerwise", max_vram_gb=6000 / 2**30, backend="eager", reserve_mb=0)
    gc.collect()
    # the monitor sums every live runtime (other tests' may still hold residents)
    others = sum(r.ledger.bytes for r in live_runtimes() if r is not sm.runtime)
    with monitor("cpu", log=lines.append) as mon:
        for _ in range(3):
            sm(x)
    assert len(mon.rows) == 3 and len(lines) == 4  # 3 steps + summary
    assert sm.plan is not None
    # held between steps: the residents; peak: at least one swapped unit on top
    assert all(r.allocated_bytes - others == sm.plan.resident_bytes for r in mon.rows)
    swapped = [u for u in sm.plan.units if not u.resident]
    assert swapped and mon.peak_bytes >= sm.plan.resident_bytes + min(u.bytes for u in swapped)
    assert "peak" in lines[-1] and "step 0" in lines[0]
    sm(x)
    assert len(mon.rows) == 3  # inactive after the block


def test_public_functions_survive_submodule_imports() -> None:
    import importlib

    import fxswap

    for module in ("fxswap.monitoring", "fxswap.compiler", "fxswap.capture", "fxswap.swapplan", "fxswap.api"):
        importlib.import_module(module)
    assert callable(fxswap.plan) and callable(fxswap.trace) and callable(fxswap.compile)
    assert fxswap.plan.__module__ == "fxswap.api" and fxswap.trace.__module__ == "fxswap.capture"
    with fxswap.monitor("cpu", log=None) as mon:
        mon.step("manual")
    assert len(mon.rows) == 1 and mon.rows[0].label == "manual"
