"""The defects the first GPU run would have hit (issue 14): the copy-path exception window, CUDA
graphs under fxswap's Inductor config, the experts' timestep read, and calibrate on an H200 / an
unknown card."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch

from fxswap import ops
from fxswap.bench.calibrate import _base_profile, add_calibrate_arguments, run_calibrate
from fxswap.bench.hardware import PROFILES
from fxswap.experts import _mirrored_value
from fxswap.runtime import PendingTransfer, SwapRuntime, TransferBackend

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# Pinned bytes: pinned host memory is now one exact-size arena per batch (issue 22);
# tests/test_cuda_path.py checks its bytes against the CPU allocator's own events.


# ----------------------------------------------------------------------------- copy-path exceptions
class _Pending(PendingTransfer):
    def __init__(self, tensors: list[torch.Tensor], log: list[str]) -> None:
        super().__init__(tensors)
        self.log = log

    def wait(self) -> None:
        self.log.append("wait")

    def wait_host(self) -> None:
        self.log.append("wait_host")


class _Backend(TransferBackend):
    def __init__(self) -> None:
        self.log: list[str] = []

    def start(self, host: Any, device: torch.device) -> PendingTransfer:
        return _Pending([h.clone() for h in host], self.log)


def test_a_failure_after_the_copy_started_still_waits_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _Backend()
    rt = SwapRuntime("cpu", backend=backend, track=True)
    uid = rt.add_unit("u", [("w", torch.ones(4))])

    def boom(t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("tracking failed")

    monkeypatch.setattr(rt.ledger, "track", boom)
    rt._units[0]._ledger = rt.ledger  # the unit caches the ledger
    with pytest.raises(RuntimeError, match="tracking failed"):
        ops.load(uid, torch.zeros(1))
    # the started transfer is owned by the unit: the error cleanup waits for it before freeing
    assert rt.discard_pending() == 1 and backend.log == ["wait_host"]


@needs_cuda
@pytest.mark.gpu
def test_cuda_backend_syncs_its_stream_when_enqueueing_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxswap.runtime import CudaStreamBackend

    b = CudaStreamBackend()
    dev = torch.device("cuda", 0)
    host = [torch.randn(2**24).pin_memory()]
    synced: list[bool] = []
    side = b._side(dev)
    real = side.synchronize
    monkeypatch.setattr(side, "synchronize", lambda: (synced.append(True), real())[1])

    def no_event(*a: Any, **k: Any) -> None:
        raise RuntimeError("event creation failed")

    monkeypatch.setattr(torch.cuda, "Event", no_event)
    with pytest.raises(RuntimeError, match="event creation failed"):
        b.start(host, dev)
    assert synced == [True] and side.query()


# ------------------------------------------------------------------------------------- CUDA graphs
def test_inductor_compile_runs_with_cuda_graphs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.compile_fx as cfx

    import fxswap

    seen: list[tuple[bool, bool]] = []

    real_compile_fx = cfx.compile_fx

    def spy_compile_fx(gm: torch.fx.GraphModule, inputs: Any) -> Any:
        cfg = torch._inductor.config
        seen.append((cfg.triton.cudagraphs, cfg.reorder_for_locality))
        return real_compile_fx(gm, inputs)

    monkeypatch.setattr(cfx, "compile_fx", spy_compile_fx)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).eval()
    x = torch.randn(2, 8)
    sm = fxswap.compile(model, mode="layerwise", max_vram_gb=2e-6, backend="inductor", device="cpu",
                        reserve_mb=0)  # fmt: skip
    with torch._inductor.config.patch({"triton.cudagraphs": True}):  # a user's global setting
        out = sm(x)
    # one compile per plan tried (fxswap.fit may try more than one); every one with both off
    assert seen and all(s == (False, False) for s in seen)
    assert torch.allclose(out, model(x))


# ---------------------------------------------------------------------------------- experts' timestep
def test_timestep_views_read_from_one_host_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    copies = []
    real_cpu = torch.UntypedStorage.cpu

    def counting_cpu(self: torch.UntypedStorage) -> torch.UntypedStorage:
        copies.append(self.nbytes())
        return real_cpu(self)

    monkeypatch.setattr(torch.UntypedStorage, "cpu", counting_cpu)
    mirror: list[Any] = []
    timesteps = torch.linspace(1000, 0, 11)
    got = [_mirrored_value(t.expand(2), mirror) for t in timesteps]  # what diffusers' loop passes
    assert got == [float(t) for t in timesteps] and len(copies) == 1
    timesteps.mul_(0.5)  # edited in place: the version counter moves, the copy is refreshed
    assert _mirrored_value(timesteps[3], mirror) == float(timesteps[3]) and len(copies) == 2
    other = torch.tensor([[7.0, 8.0], [9.0, 10.0]]).t()  # another tensor, strided view
    assert _mirrored_value(other[1], mirror) == 8.0 and len(copies) == 3
    with torch.inference_mode():
        frozen = torch.full((2,), 3.0)
    assert _mirrored_value(frozen, mirror) == 3.0 and len(copies) == 3  # no version: read directly


@needs_cuda
@pytest.mark.gpu
def test_experts_timestep_switch_does_not_sync_per_step() -> None:
    from fxswap.experts import _host_value

    timesteps = torch.linspace(1000, 0, 11, device="cuda")
    mirror: list[Any] = []
    first = _host_value(timesteps[0].expand(1), mirror)  # one sync per schedule
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = [_host_value(t.expand(1), mirror) for t in timesteps[1:]]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [first, *rest] == timesteps.cpu().tolist()


# ---------------------------------------------------------------------------------------- calibrate
def test_h200_has_a_profile_and_is_recognised() -> None:
    assert _base_profile(None, "NVIDIA H200") is PROFILES["h200"]
    assert _base_profile(None, "NVIDIA H100 80GB HBM3") is PROFILES["h100-sxm"]
    h200, h100 = PROFILES["h200"], PROFILES["h100-sxm"]
    assert h200.bf16_tflops == h100.bf16_tflops and h200.mem_gbps > h100.mem_gbps  # same GH100, HBM3e


def test_calibrate_measures_copies_before_the_profile_lookup(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fxswap.bench.calibrate as cal

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    rates = {"pinned_h2d_gbps": 51.5, "pageable_h2d_gbps": 20.0, "d2h_gbps": 50.0}
    monkeypatch.setattr(cal, "_cuda_copy_rates", lambda nbytes, repeats: rates)
    ap = argparse.ArgumentParser()
    add_calibrate_arguments(ap)
    assert run_calibrate(ap.parse_args([])) == 2
    out = capsys.readouterr()
    assert "pinned H2D 51.5 GB/s" in out.out  # measured and printed although no profile matches
    assert "no built-in profile matches the GPU 'Some Future GPU'" in out.err
