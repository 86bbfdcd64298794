"""Hardware profiles: what a GPU computes per second and how fast weights reach it.

A profile holds the handful of figures the cost model needs: dense bf16 tensor throughput (the
datasheet peak) with the fraction of it a real WAN forward achieves, device-memory bandwidth for
memory-bound ops, host-to-device copy rates from pinned and pageable host memory, the
device-to-host rate (only the WanVideoWrapper peer copies back), and the VRAM size.

Every built-in figure cites its source in a comment. Units: 1 GB/s = 1e9 bytes per second,
1 TFLOP/s = 1e12 FLOP per second, VRAM in bytes (cards are sold in GiB). Markers: **[src]** read in
the cited source, **[calc]** computed from a sourced number, **[guess]** an assumption with no
source saying so. Guessed figures are the weak spot of
every prediction; ``fxswap calibrate`` replaces the copy rates and the achieved fraction with
measurements and saves them as JSON (:func:`save_profile` / :func:`load_profile`).

Anchors used below (``docs/benchmarks.md``, "Card profiles", gives each with its context):

- PCIe 4.0 x16 pinned H2D 23.9-26.4 GB/s (nvbandwidth on 8x RTX 4090, NVIDIA/nvbandwidth#15),
  25.7 GB/s pinned and 10.0 GB/s pageable H2D on a DGX A100-SXM4-80GB (gengwg/gpu
  ``nvda_gpu_benchmark.md``), D2H 25.8 / 26.3-27.1 GB/s.
- PCIe 5.0 x16 pinned H2D 56.3 GB/s, D2H 57.3 GB/s (8x RTX 5090, tinygrad/open-gpu-kernel-modules#29).
- NVLink4 ~783 GB/s bidirectional between two H100 SXM (NVIDIA/nccl#1264): the all-to-all rate of
  the NVLink parts (``p2p_gbps``); PCIe cards' all-to-all rate is estimated (``p2p_rate``).
- WAN 14B forward at 480x832x81 = 1.678 PFLOP (40 blocks x 41.96 TFLOP,
  :func:`fxswap.bench.costmodel.wan_block_flops`) took 3766.3 ms compiled without offload on an
  H100 and 11584 ms compiled with group offloading on an RTX 4090 (diffusers PR #11605).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fxswap.errors import FxswapError

__all__ = [
    "PROFILES",
    "PROFILE_SCHEMA_VERSION",
    "HardwareProfile",
    "get_profile",
    "load_profile",
    "save_profile",
]

GiB = 2**30
PROFILE_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """Figures of one GPU and its host link (see the module docstring for units)."""

    name: str
    vram_bytes: int
    bf16_tflops: float  # dense bf16 tensor peak with FP32 accumulation (datasheet)
    achieved_fraction: float  # share of bf16_tflops a WAN forward reaches (attention + GEMMs)
    mem_gbps: float  # device memory bandwidth achieved by memory-bound ops
    pinned_h2d_gbps: float
    pageable_h2d_gbps: float
    d2h_gbps: float  # device-to-host into pinned memory
    sync_overhead_ms: float = 0.02  # GPU idle time after a host synchronisation before work resumes
    # Sequence parallelism's all-to-alls (passes.simulate): the rate per direction at which one
    # rank's all-to-all moves its bytes, and whether it has NVLink. None: a PCIe card without
    # peer-to-peer, through host memory at _P2P_PCIE_FRACTION of its pinned copy rate (p2p_rate).
    p2p_gbps: float | None = None
    nvlink: bool = False
    calibrated: bool = False  # True when the copy rates / fraction were measured by `fxswap calibrate`
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def p2p_rate(self) -> float:
        """The all-to-all rate per direction, GB/s: ``p2p_gbps``, or the PCIe estimate without it."""
        if self.p2p_gbps is not None:
            return self.p2p_gbps
        return round(min(self.pinned_h2d_gbps, self.d2h_gbps) * _P2P_PCIE_FRACTION, 1)

    @property
    def compute_tflops(self) -> float:
        """Effective dense throughput the cost model divides FLOPs by."""
        return self.bf16_tflops * self.achieved_fraction

    def check(self) -> None:
        """Raise :class:`FxswapError` naming the first figure that is not a finite positive number."""
        for name in ("bf16_tflops", "mem_gbps", "pinned_h2d_gbps", "pageable_h2d_gbps", "d2h_gbps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise FxswapError(
                    f"hardware profile {self.name!r}: {name}={value!r} must be a finite number > 0; "
                    "fix the profile JSON or re-run `fxswap calibrate`"
                )
        if not 0 < self.achieved_fraction <= 1:
            raise FxswapError(
                f"hardware profile {self.name!r}: achieved_fraction={self.achieved_fraction!r} must be "
                "in (0, 1]; it is measured FLOP/s divided by the datasheet peak"
            )
        if self.p2p_gbps is not None and not (
            isinstance(self.p2p_gbps, (int, float)) and math.isfinite(self.p2p_gbps) and self.p2p_gbps > 0
        ):
            raise FxswapError(
                f"hardware profile {self.name!r}: p2p_gbps={self.p2p_gbps!r} must be a finite number > 0, "
                "or null for a PCIe card's estimate"
            )
        if not isinstance(self.nvlink, bool):
            raise FxswapError(f"hardware profile {self.name!r}: nvlink={self.nvlink!r} must be true or false")
        if self.vram_bytes <= 0:
            raise FxswapError(f"hardware profile {self.name!r}: vram_bytes={self.vram_bytes!r} must be > 0")
        if self.sync_overhead_ms < 0:
            raise FxswapError(
                f"hardware profile {self.name!r}: sync_overhead_ms={self.sync_overhead_ms!r} must be >= 0"
            )


# Shared link figures, so that each card below says which anchor it takes.
_PCIE4_PINNED = (
    24.0  # [src] nvbandwidth CE memcpy 23.9-26.4 GB/s on RTX 4090 (NVIDIA/nvbandwidth#15); low end
)
_PCIE4_PAGEABLE = 10.0  # [src] bandwidthTest pageable H2D 10.0 GB/s, DGX A100 PCIe 4.0 host link (gengwg/gpu)
_PCIE4_D2H = 26.3  # [src] nvbandwidth D2H 26.3-27.1 GB/s on RTX 4090 (NVIDIA/nvbandwidth#15)
_PCIE5_PINNED = 56.3  # [src] nvbandwidth CE H2D 56.3 GB/s, RTX 5090 (tinygrad/open-gpu-kernel-modules#29)
_PCIE5_D2H = 57.3  # [src] same source, D2H
# [calc]+[guess] no pageable PCIe 5 figure was found; scale by the PCIe 4 pageable/pinned ratio 10.0/25.7.
_PCIE5_PAGEABLE = round(_PCIE5_PINNED * 10.0 / 25.7, 1)
# [guess] H100 CE H2D not found; the SM-memcpy figure is 35.2 GB/s (NVIDIA/nvbandwidth#24) and other
# Gen5 x16 hosts reach 50-55 GB/s CE, so take 50.
_H100_PINNED = 50.0
_H100_PAGEABLE = round(_H100_PINNED * 10.0 / 25.7, 1)  # [calc]+[guess] as for PCIe 5 above
_H100_D2H = 52.8  # [src] nvbandwidth SM memcpy D2H 52.8 GB/s, HGX H100 (NVIDIA/nvbandwidth#24)
# [guess] memory-bound ops (norms, adds) reach ~80% of datasheet DRAM bandwidth.
_MEM_EFF = 0.8
# All-to-all links (docs/sequence_parallel.md, "Pricing collectives"). GeForce cards have no
# NVLink (the RTX 3090's bridge aside) and no peer-to-peer over PCIe with NVIDIA's driver, so NCCL
# stages an all-to-all through pinned host memory: the sent bytes cross the sender's link
# device-to-host, the received bytes the receiver's link host-to-device, both directions at once.
# [calc]+[guess] per direction, the slower of the card's measured pinned H2D and D2H rates times
# 0.75 for the staging through host buffers (no all-to-all measurement without P2P was found).
_P2P_PCIE_FRACTION = 0.75
# [src] NVIDIA/nccl#1264: ~783 GB/s bidirectional measured between two H100 SXM over NVLink4 (900
# GB/s datasheet), so ~390 GB/s per direction; used for the GH100 SXM parts (H100 SXM, H200).
_NVLINK4_P2P = 390.0
# [calc] A100 SXM NVLink3: 600 GB/s bidirectional (A100 datasheet), 300 per direction, at the same
# achieved share as NVLink4 above (783 / 900): 261.
_NVLINK3_P2P = round(300.0 * 783.0 / 900.0, 0)


def _p(**kw: Any) -> HardwareProfile:
    prof = HardwareProfile(**kw)
    prof.check()
    return prof


PROFILES: dict[str, HardwareProfile] = {
    "rtx3090": _p(
        name="rtx3090",
        vram_bytes=24 * GiB,  # [src] NVIDIA GA102 whitepaper: 24 GB GDDR6X
        bf16_tflops=71.0,  # [src] GA102 whitepaper: RTX 3090 peak BF16 tensor (FP32 acc.) 71/142 dense/sparse
        achieved_fraction=0.75,  # [guess] Ampere consumer, between the H100 (0.45) and 4090 (0.85) anchors
        mem_gbps=936.0 * _MEM_EFF,  # [src] 936 GB/s GDDR6X (GA102 whitepaper)
        pinned_h2d_gbps=_PCIE4_PINNED,  # PCIe 4.0 x16
        pageable_h2d_gbps=_PCIE4_PAGEABLE,
        d2h_gbps=_PCIE4_D2H,
        sources={
            "bf16_tflops": "NVIDIA Ampere GA102 GPU architecture whitepaper",
            "link": "PCIe 4.0 anchors",
        },
    ),
    "rtx4080": _p(
        name="rtx4080",
        vram_bytes=16 * GiB,  # [src] RTX 4080 16 GB (Ada Lovelace whitepaper)
        bf16_tflops=97.5,  # [src] Ada whitepaper: RTX 4080 peak BF16 tensor (FP32 acc.) 97.5 dense
        achieved_fraction=0.85,  # [calc] same architecture as the RTX 4090 anchor below
        mem_gbps=716.8 * _MEM_EFF,  # [src] 716.8 GB/s GDDR6X (Ada whitepaper)
        pinned_h2d_gbps=_PCIE4_PINNED,
        pageable_h2d_gbps=_PCIE4_PAGEABLE,
        d2h_gbps=_PCIE4_D2H,
        sources={"bf16_tflops": "NVIDIA Ada Lovelace architecture whitepaper", "link": "PCIe 4.0 anchors"},
    ),
    "rtx4090": _p(
        name="rtx4090",
        vram_bytes=24 * GiB,  # [src] Ada whitepaper
        bf16_tflops=165.2,  # [src] Ada whitepaper: RTX 4090 peak BF16 tensor (FP32 acc.) 165.2/330.4
        # [calc] diffusers PR #11605: 1.678 PFLOP in 11584 ms (compile + group offload) = 145 TFLOP/s
        # = 0.88 of peak, a lower bound on the pure-compute rate; rounded down to 0.85 (boost clocks vary).
        achieved_fraction=0.85,
        mem_gbps=1008.0 * _MEM_EFF,  # [src] 1008 GB/s GDDR6X (Ada whitepaper)
        pinned_h2d_gbps=_PCIE4_PINNED,  # [src] measured on this very card (NVIDIA/nvbandwidth#15)
        pageable_h2d_gbps=_PCIE4_PAGEABLE,
        d2h_gbps=_PCIE4_D2H,
        sources={"bf16_tflops": "Ada whitepaper", "achieved_fraction": "diffusers PR #11605"},
    ),
    "rtx5090": _p(
        name="rtx5090",
        vram_bytes=32 * GiB,  # [src] RTX Blackwell whitepaper: 32 GB GDDR7
        # [calc] 838.4 TFLOPS FP16 sparse (FP16 acc.) published; dense = 419.2, and GeForce runs FP32
        # accumulation at half rate (as on GA102/AD102), so BF16 dense = 209.5 (RTX Blackwell whitepaper).
        bf16_tflops=209.5,
        achieved_fraction=0.7,  # [guess] newer kernels less tuned on sm_120 than on Ada/Hopper
        mem_gbps=1792.0 * _MEM_EFF,  # [src] 1792 GB/s GDDR7
        pinned_h2d_gbps=_PCIE5_PINNED,  # [src] measured on RTX 5090 (tinygrad/open-gpu-kernel-modules#29)
        pageable_h2d_gbps=_PCIE5_PAGEABLE,
        d2h_gbps=_PCIE5_D2H,
        sources={
            "bf16_tflops": "NVIDIA RTX Blackwell GPU architecture whitepaper",
            "link": "PCIe 5.0 anchors",
        },
    ),
    "a100-40gb": _p(
        name="a100-40gb",
        vram_bytes=40 * GiB,  # [src] NVIDIA A100 datasheet
        bf16_tflops=312.0,  # [src] A100 datasheet: BF16 tensor 312 dense / 624 sparse
        achieved_fraction=0.6,  # [guess] FlashAttention-2 class kernels on A100
        mem_gbps=1555.0 * _MEM_EFF,  # [src] A100 40GB HBM2 1,555 GB/s (datasheet)
        pinned_h2d_gbps=25.7,  # [src] DGX A100 bandwidthTest pinned H2D (gengwg/gpu nvda_gpu_benchmark.md)
        pageable_h2d_gbps=10.0,  # [src] same, pageable H2D
        d2h_gbps=25.8,  # [src] same, pinned D2H
        p2p_gbps=_NVLINK3_P2P,  # NVLink + NVSwitch (HGX/DGX boards), see _NVLINK*_P2P
        nvlink=True,
        sources={
            "bf16_tflops": "NVIDIA A100 datasheet",
            "link": "gengwg/gpu nvda_gpu_benchmark.md (DGX A100)",
        },
    ),
    "a100-80gb": _p(
        name="a100-80gb",
        vram_bytes=80 * GiB,  # [src] A100 datasheet
        bf16_tflops=312.0,  # [src] A100 datasheet
        achieved_fraction=0.6,  # [guess] as a100-40gb
        mem_gbps=2039.0 * _MEM_EFF,  # [src] A100 80GB SXM HBM2e 2,039 GB/s (datasheet)
        pinned_h2d_gbps=25.7,  # [src] DGX A100-SXM4-80GB bandwidthTest (gengwg/gpu)
        pageable_h2d_gbps=10.0,  # [src] same
        d2h_gbps=25.8,  # [src] same
        p2p_gbps=_NVLINK3_P2P,  # NVLink + NVSwitch (HGX/DGX boards), see _NVLINK*_P2P
        nvlink=True,
        sources={
            "bf16_tflops": "NVIDIA A100 datasheet",
            "link": "gengwg/gpu nvda_gpu_benchmark.md (DGX A100)",
        },
    ),
    "h100-pcie": _p(
        name="h100-pcie",
        vram_bytes=80 * GiB,  # [src] H100 PCIe product brief PB-11133-001
        bf16_tflops=756.0,  # [src] H100 datasheet: H100 PCIe BF16 tensor 1,513 sparse / 756 dense
        achieved_fraction=0.45,  # [calc] as h100-sxm (same Hopper kernels; lower clocks are in the peak)
        mem_gbps=2000.0 * _MEM_EFF,  # [src] product brief: "greater than 2,000 GBps"
        pinned_h2d_gbps=_H100_PINNED,
        pageable_h2d_gbps=_H100_PAGEABLE,
        d2h_gbps=_H100_D2H,
        sources={"bf16_tflops": "NVIDIA H100 datasheet", "link": "[guess] PCIe 5.0, see module docstring"},
    ),
    "h100-sxm": _p(
        name="h100-sxm",
        vram_bytes=80 * GiB,  # [src] H100 datasheet
        bf16_tflops=989.4,  # [src] H100 datasheet: H100 SXM BF16 tensor 1,979 sparse / 989.4 dense
        # [calc] diffusers PR #11605: 1.678 PFLOP in 3766.3 ms compiled, no offload = 446 TFLOP/s = 0.45.
        # [inference] the PR does not say SXM or PCIe; SXM assumed (the common cloud H100).
        achieved_fraction=0.45,
        mem_gbps=3350.0 * _MEM_EFF,  # [src] H100 SXM HBM3 3.35 TB/s (datasheet)
        pinned_h2d_gbps=_H100_PINNED,
        pageable_h2d_gbps=_H100_PAGEABLE,
        d2h_gbps=_H100_D2H,
        p2p_gbps=_NVLINK4_P2P,  # NVLink + NVSwitch (HGX/DGX boards), see _NVLINK*_P2P
        nvlink=True,
        sources={"bf16_tflops": "NVIDIA H100 datasheet", "achieved_fraction": "diffusers PR #11605"},
    ),
    "h200": _p(
        name="h200",
        # [src] NVIDIA H200 Tensor Core GPU datasheet (H200 SXM): 141 GB HBM3e at 4.8 TB/s; BF16 tensor
        # 1,979 TFLOPS with sparsity = 989 dense, the same GH100 compute as the H100 SXM.
        vram_bytes=141 * GiB,  # counted in GiB as the other cards here; torch reports ~140.4 GiB
        bf16_tflops=989.4,  # [src] H200 datasheet: 1,979 sparse / 989 dense (as H100 SXM)
        achieved_fraction=0.45,  # [calc] as h100-sxm: same GH100 SMs and kernels (diffusers PR #11605)
        mem_gbps=4800.0 * _MEM_EFF,  # [src] H200 datasheet: 4.8 TB/s HBM3e
        # [guess] the same PCIe 5.0 x16 host link as HGX H100: the H100 link figures.
        pinned_h2d_gbps=_H100_PINNED,
        pageable_h2d_gbps=_H100_PAGEABLE,
        d2h_gbps=_H100_D2H,
        p2p_gbps=_NVLINK4_P2P,  # NVLink + NVSwitch (HGX/DGX boards), see _NVLINK*_P2P
        nvlink=True,
        sources={
            "bf16_tflops": "NVIDIA H200 datasheet (H200 SXM)",
            "mem_gbps": "NVIDIA H200 datasheet: 4.8 TB/s HBM3e",
            "link": "[guess] PCIe 5.0 as HGX H100, see module docstring",
        },
    ),
    "generic-20gb": _p(
        name="generic-20gb",
        # [guess] not a product: a 20 GiB PCIe 4.0 card between the RTX 4080 and 4090, for budgets
        # users actually have (RTX 4000 Ada / RX 7900 XT class). Its figures are interpolations.
        vram_bytes=20 * GiB,
        bf16_tflops=120.0,  # [guess] between rtx4080 (97.5) and rtx4090 (165.2)
        achieved_fraction=0.8,  # [guess]
        mem_gbps=800.0 * _MEM_EFF,  # [guess]
        pinned_h2d_gbps=_PCIE4_PINNED,
        pageable_h2d_gbps=_PCIE4_PAGEABLE,
        d2h_gbps=_PCIE4_D2H,
        sources={"all": "[guess] synthetic mid-range PCIe 4.0 card"},
    ),
}


def get_profile(name_or_path: str) -> HardwareProfile:
    """A built-in profile by name, or a calibrated profile from a JSON path.

    Raises:
        FxswapError: the name is neither a built-in profile nor an existing JSON file.
    """
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return load_profile(path)
    raise FxswapError(
        f"hardware profile {name_or_path!r} is unknown; use one of {sorted(PROFILES)} or the path of a "
        "JSON written by `fxswap calibrate`"
    )


def save_profile(profile: HardwareProfile, path: str | Path) -> None:
    """Write ``profile`` as JSON with a schema version (no pickle)."""
    profile.check()
    data = {"schema_version": PROFILE_SCHEMA_VERSION, **asdict(profile)}
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_profile(path: str | Path) -> HardwareProfile:
    """Read a profile written by :func:`save_profile` and check every figure.

    Raises:
        FxswapError: missing file, wrong schema version, unknown or missing fields, bad values.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FxswapError(
            f"hardware profile file {str(p)!r} does not exist; run `fxswap calibrate -o {p}`"
        ) from None
    except json.JSONDecodeError as exc:
        raise FxswapError(f"hardware profile file {str(p)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema_version") != PROFILE_SCHEMA_VERSION:
        got = data.get("schema_version") if isinstance(data, dict) else type(data).__name__
        raise FxswapError(
            f"hardware profile file {str(p)!r} has schema_version={got!r}, expected "
            f"{PROFILE_SCHEMA_VERSION}; re-run `fxswap calibrate`"
        )
    data = dict(data)
    data.pop("schema_version")
    known = {f.name for f in fields(HardwareProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise FxswapError(
            f"hardware profile file {str(p)!r} has unknown fields {unknown}; expected {sorted(known)}"
        )
    try:
        prof = HardwareProfile(**data)
    except TypeError as exc:
        raise FxswapError(f"hardware profile file {str(p)!r}: {exc}") from None
    prof = replace(prof, sources=dict(prof.sources))
    prof.check()
    return prof
