"""Hardware profiles, the cost model, the physical bound and `fxswap calibrate` (CPU paths)."""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
from graphs import OpSpec, build_graph, chain_graph

import fxswap.bench.hardware as hardware
from fxswap.bench.calibrate import add_calibrate_arguments, run_calibrate
from fxswap.bench.costmodel import copy_ms, physical_bound, plan_rates, resident_compute_ms, wan_block_flops
from fxswap.bench.hardware import PROFILES, HardwareProfile, get_profile, load_profile, save_profile
from fxswap.errors import FxswapError
from fxswap.passes.liveness import activation_profile

MiB = 2**20
GiB = 2**30
REQUIRED_CARDS = {
    "rtx3090", "rtx4080", "rtx4090", "rtx5090", "a100-40gb", "a100-80gb", "h100-pcie", "h100-sxm",
    "generic-20gb",
}  # fmt: skip
FIGURES = ("vram_bytes", "bf16_tflops", "achieved_fraction", "mem_gbps", "pinned_h2d_gbps",
           "pageable_h2d_gbps", "d2h_gbps")  # fmt: skip


def test_required_profiles_exist_and_are_sane() -> None:
    assert set(PROFILES) >= REQUIRED_CARDS
    for prof in PROFILES.values():
        prof.check()
        assert prof.pageable_h2d_gbps <= prof.pinned_h2d_gbps, prof.name
    assert PROFILES["rtx4080"].vram_bytes == 16 * GiB
    assert PROFILES["generic-20gb"].vram_bytes == 20 * GiB
    # A PCIe 5 card must copy faster than a PCIe 4 card.
    assert PROFILES["rtx5090"].pinned_h2d_gbps > PROFILES["rtx4090"].pinned_h2d_gbps


def test_every_figure_cites_a_source_in_the_code() -> None:
    """Each figure line of each profile has a comment, or uses a constant whose definition has one."""
    src = Path(hardware.__file__).read_text()
    commented_constants = set(re.findall(r"^(_[A-Z0-9_]+) = .*#", src, flags=re.M))
    # Constants computed from commented constants on the lines just above them count as cited too.
    commented_constants |= set(re.findall(r"#.*\n(_[A-Z0-9_]+) = ", src))
    body = src[src.index("PROFILES: dict") :]
    blocks = re.split(r'\n    "([a-z0-9-]+)": _p\(', body)[1:]
    assert len(blocks) // 2 == len(PROFILES)
    for name, block in zip(blocks[::2], blocks[1::2], strict=True):
        for fig in FIGURES:
            line = next(ln for ln in block.splitlines() if ln.strip().startswith(f"{fig}="))
            prev = block.splitlines()[block.splitlines().index(line) - 1]
            value = line.split("=", 1)[1].split("#")[0].strip().rstrip(",")
            cited = "#" in line or prev.strip().startswith("#") or value.split(" ")[0] in commented_constants
            assert cited, f"{name}.{fig} has no source comment: {line.strip()!r}"


def test_profile_json_round_trip_and_errors(tmp_path: Path) -> None:
    prof = replace(PROFILES["rtx4090"], name="mine", pinned_h2d_gbps=21.5, calibrated=True)
    path = tmp_path / "p.json"
    save_profile(prof, path)
    back = load_profile(path)
    assert back == prof and back.sources == prof.sources
    assert get_profile(str(path)) == prof

    data = json.loads(path.read_text())
    data["pinned_h2d_gbps"] = -1
    path.write_text(json.dumps(data))
    with pytest.raises(FxswapError, match="pinned_h2d_gbps=-1"):
        load_profile(path)
    data["pinned_h2d_gbps"] = 20.0
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(FxswapError, match="schema_version=99"):
        load_profile(path)
    data["schema_version"] = 1
    data["warp_speed"] = 9
    path.write_text(json.dumps(data))
    with pytest.raises(FxswapError, match="warp_speed"):
        load_profile(path)
    with pytest.raises(FxswapError, match="does not exist"):
        load_profile(tmp_path / "missing.json")
    with pytest.raises(FxswapError, match="unknown"):
        get_profile("rtx9999")


def test_resident_compute_is_the_roofline_sum() -> None:
    hw = replace(PROFILES["rtx4090"], bf16_tflops=100.0, achieved_fraction=0.5, mem_gbps=1000.0)
    ir = build_graph(
        [("a.weight", MiB)],
        [
            OpSpec(("a.weight",), 10, flops=5e12),
            OpSpec((), 10, mem_bytes=2 * 10**9),
            OpSpec((), 10, flops=1e9, mem_bytes=10**6),
        ],
    )
    # 5e12 / 50e12 s = 100 ms; 2e9 B / 1e12 B/s = 2 ms; max(1e9/50e12, 1e6/1e12) s = 0.02 ms
    assert resident_compute_ms(ir, hw) == pytest.approx(100 + 2 + 0.02)
    assert copy_ms(25 * 10**9, 25.0) == pytest.approx(1000.0)
    with pytest.raises(ValueError, match="gbps"):
        copy_ms(1, 0.0)
    assert plan_rates(hw) == {
        "h2d_gbps": hw.pinned_h2d_gbps,
        "compute_tflops": 50.0,
        "device_mem_gbps": 1000.0,
    }


def test_physical_bound_by_hand() -> None:
    hw = replace(PROFILES["rtx4090"], bf16_tflops=100.0, achieved_fraction=1.0, pinned_h2d_gbps=10.0)
    ir = chain_graph(4, weight_bytes=100 * MiB, act_bytes=10 * MiB, embed_bytes=50 * MiB, head_bytes=50 * MiB,
                     flops=1e11)  # fmt: skip
    act = activation_profile(ir)
    reserve = 64 * MiB
    budget = 600 * MiB
    b = physical_bound(ir, hw, budget, reserve)
    room = budget - reserve - max(act)
    assert b.max_resident_bytes == room
    assert b.min_swapped_bytes == ir.weight_bytes - room
    assert b.copy_ms == pytest.approx((ir.weight_bytes - room) / 10e9 * 1e3)
    assert b.compute_ms == pytest.approx(resident_compute_ms(ir, hw))
    assert b.bound_ms == max(b.compute_ms, b.copy_ms) and b.feasible
    # Budget larger than everything: nothing needs to move.
    big = physical_bound(ir, hw, 100 * GiB, reserve)
    assert big.min_swapped_bytes == 0 and big.bound_ms == big.compute_ms
    # Activations alone over budget: infeasible.
    tiny = physical_bound(ir, hw, reserve + max(act) - 1, reserve)
    assert not tiny.feasible and math.isinf(tiny.bound_ms)


def test_wan_block_flops_matches_the_reference_table() -> None:
    # Derived by hand from the architecture, not from this code (docs/benchmarks.md, "WAN block FLOPs"):
    # 14B 480p 41.96 TFLOP, 720p 163.08; 1.3B 480p 9.43; Wan2.1 I2V 14B 480p 42.16.
    assert wan_block_flops(5120, 13824, 32760) / 1e12 == pytest.approx(41.96, abs=0.01)
    assert wan_block_flops(5120, 13824, 75600) / 1e12 == pytest.approx(163.08, abs=0.01)
    assert wan_block_flops(1536, 8960, 32760) / 1e12 == pytest.approx(9.43, abs=0.01)
    assert wan_block_flops(5120, 13824, 32760, image_tokens=257) / 1e12 == pytest.approx(42.16, abs=0.01)


def test_traced_tiny_wan_flops_match_the_formula() -> None:
    """Capture's per-op FLOPs summed over a tiny WAN equal the closed-form block FLOPs (+ small rest)."""
    torch = pytest.importorskip("torch")
    from fxswap.capture import trace
    from fxswap.models import wan

    cfg = wan.tiny_config("t2v", num_layers=3)
    net = wan.build(cfg, device="meta", dtype=torch.bfloat16)
    kw = wan.example_inputs(cfg, frames=5, height=64, width=64, device="meta", dtype=torch.bfloat16)
    ir = trace(net, **kw).ir
    _, f, h, w = wan.latent_shape(cfg, 5, 64, 64)
    tokens = f * (h // 2) * (w // 2)
    per_block = wan_block_flops(cfg.dim, cfg.ffn_dim, tokens, cfg.text_len)
    total = sum(op.flops for op in ir.ops)
    assert total >= cfg.num_layers * per_block
    assert total < cfg.num_layers * per_block * 1.25  # non-block work (embeddings, head) is small


def _cal_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_calibrate_arguments(p)
    return p.parse_args(list(argv))


def test_calibrate_without_cuda_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; the no-device message cannot be checked here")
    assert run_calibrate(_cal_args()) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_calibrate_cpu_mode_is_labelled_and_writes_no_profile(capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path) -> None:  # fmt: skip
    assert run_calibrate(_cal_args("--device", "cpu", "--copy-mb", "8", "--repeats", "2")) == 0
    out = capsys.readouterr().out
    assert "host memcpy" in out and "not a host-to-device rate" in out
    gbps = float(re.search(r"([0-9.]+) GB/s", out).group(1))  # type: ignore[union-attr]
    assert gbps > 0
    assert run_calibrate(_cal_args("--device", "cpu", "-o", str(tmp_path / "x.json"))) == 2
    assert not (tmp_path / "x.json").exists()
    assert run_calibrate(_cal_args("--device", "tpu")) == 2


@pytest.mark.gpu
def test_calibrate_on_gpu_writes_a_loadable_profile(tmp_path: Path) -> None:
    out = tmp_path / "cal.json"
    args = _cal_args("--copy-mb", "64", "--repeats", "3", "--model", "wan2.1-t2v-1.3b", "--resolution",
                     "832x480", "--frames", "17", "-o", str(out))  # fmt: skip
    assert run_calibrate(args) == 0
    prof: HardwareProfile = load_profile(out)
    assert prof.calibrated and prof.pinned_h2d_gbps > 1 and 0 < prof.achieved_fraction <= 1
