"""What the planner is asked for: :class:`PlanOptions`, and every default stated once.

Units: all byte counts are ints in bytes. User-facing GB/MB are binary: ``max_vram_gb=16`` means
16 GiB (16 * 2**30 bytes) and ``block_size_mb=300`` means 300 MiB, since that is how card sizes are
marketed and reported by tools (a "16 GB" card reports 15.9-16 GiB). Transfer and compute rates are
decimal (GB/s = 1e9 bytes per second, TFLOP/s = 1e12 FLOP/s) as hardware specs state them.

``fxswap.plan``, ``fxswap.compile``, the CLI, the ``torch.compile`` backend and the ComfyUI nodes
take their defaults from the constants below, through :func:`make_options`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "DEFAULT_BLOCK_SIZE_MB",
    "DEFAULT_COMPUTE_TFLOPS",
    "DEFAULT_DEVICE_MEM_GBPS",
    "DEFAULT_H2D_GBPS",
    "DEFAULT_MAX_PREFETCH_DEPTH",
    "DEFAULT_MAX_VRAM_GB",
    "DEFAULT_MODE",
    "DEFAULT_P2P_GBPS",
    "DEFAULT_RESERVE_MB",
    "GiB",
    "MODES",
    "MiB",
    "OPTIONAL_OPTIONS",
    "PlanOptions",
    "make_options",
]

MODES = ("layerwise", "chunkwise", "adaptive")
GiB = 2**30
MiB = 2**20

DEFAULT_MODE = "adaptive"
DEFAULT_MAX_VRAM_GB = 16
DEFAULT_BLOCK_SIZE_MB = 300
# Counted at every op for what cannot be modelled: the CUDA allocator's fragmentation (its rounding
# and the libraries' kept workspace are planned, passes.device_rules). Kept at 256 MiB until the GPU
# check measures fragmentation on WAN; the reasoning is in docs/memory_model.md.
DEFAULT_RESERVE_MB = 256
# With swapped units spread among resident ones, hiding a slow copy takes a depth of several
# units; the planner's search stops early, so a high cap costs little.
DEFAULT_MAX_PREFETCH_DEPTH = 16
# Pinned host-to-device copy rate, GB/s. PCIe 4.0 x16 measures 24-26 GB/s pinned (nvbandwidth,
# bandwidthTest); 22 leaves room for the concurrent traffic of a real step. PCIe 5.0 x16 measures
# ~56 GB/s: pass h2d_gbps=50 there.
DEFAULT_H2D_GBPS = 22.0
# Achieved dense bf16 matmul rate, TFLOP/s: an RTX 4090-class card peaks at ~165 dense; H100 is
# far higher (pass compute_tflops=600 there). Only relative times matter for adaptive's choice.
DEFAULT_COMPUTE_TFLOPS = 150.0
# Achieved device-memory bandwidth for memory-bound ops (norms, adds, softmax), GB/s. 1,500 GB/s is
# roughly 75% of an H100 PCIe / A100 80GB peak; consumer cards are lower (RTX 4090: ~1,000 peak).
DEFAULT_DEVICE_MEM_GBPS = 1500.0
# Rate at which one rank's all-to-all moves its bytes, per direction, GB/s (sequence parallelism,
# docs/sequence_parallel.md "Pricing collectives"). The default is a consumer card without NVLink or
# peer-to-peer: the all-to-all goes through host memory over each card's PCIe 4.0 x16 link, at
# 0.75 of the pinned copy rate above (a guess for NCCL's host-staged transport, not measured).
DEFAULT_P2P_GBPS = 16.5


def _bad(field: str, value: object, fix: str) -> ValueError:
    return ValueError(f"`{field}` is {value!r}; {fix}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_rate(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanOptions:
    """What the planner is asked for. Bytes are exact ints; see :meth:`from_user` for GiB/MiB.

    Attributes:
        mode: "layerwise", "chunkwise" or "adaptive" (see :mod:`fxswap.passes.partition`).
        max_vram_bytes: the device budget; the plan's peak never exceeds it. The peak is that of
            the program that runs: the caller's inputs for the whole call, each op's workspace
            (measured on the device by ``fxswap.compile``), and under Inductor the buffers of the
            generated code itself (``fxswap.replay``).
        block_size_bytes: the largest chunk in chunkwise mode; one of the sizes adaptive tries.
        reserve_bytes: counted at every op inside the budget for what cannot be modelled: the
            CUDA caching allocator's fragmentation. Activations, op scratch, the allocator's
            rounding and cuBLAS's kept workspace are planned, not reserved
            (``passes.device_rules``). 256 MiB by default; 0 is exact on the CPU.
        max_prefetch_depth: the most units ahead a load may be issued (0 = just before use); the
            planner searches depths 0..this by its cost model (:mod:`fxswap.passes.planner`).
        h2d_gbps, compute_tflops, device_mem_gbps: the cost model's rates (see module constants).
        p2p_gbps: the rate of a rank's all-to-alls per direction (sequence parallelism only: a
            graph without collectives is priced the same whatever it is).
        nvlink: the all-to-alls run over a link of their own (NVLink). False (default): they cross
            the card's PCIe link, and the bytes a rank receives share its host-to-device direction
            with the weight copies (:mod:`fxswap.passes.simulate`).
        warm_start: plan the sampling loop as a cycle: each call's tail starts loading the units the
            next call of the same signature needs first (:mod:`fxswap.passes.warmstart`), within the
            same budget, when the cost model predicts faster calls. Between two calls those units
            stay allocated; ``SwapModule.discard_prefetch()`` frees them.
    """

    mode: str = DEFAULT_MODE
    max_vram_bytes: int
    block_size_bytes: int = DEFAULT_BLOCK_SIZE_MB * MiB
    reserve_bytes: int = DEFAULT_RESERVE_MB * MiB
    max_prefetch_depth: int = DEFAULT_MAX_PREFETCH_DEPTH
    h2d_gbps: float = DEFAULT_H2D_GBPS
    compute_tflops: float = DEFAULT_COMPUTE_TFLOPS
    device_mem_gbps: float = DEFAULT_DEVICE_MEM_GBPS
    warm_start: bool = True
    p2p_gbps: float = DEFAULT_P2P_GBPS
    nvlink: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise _bad("mode", self.mode, f"use one of {', '.join(repr(m) for m in MODES)}")
        if not _is_int(self.max_vram_bytes) or self.max_vram_bytes <= 0:
            raise _bad(
                "max_vram_bytes",
                self.max_vram_bytes,
                "pass a positive int number of bytes, or use PlanOptions.from_user(max_vram_gb=16, ...)",
            )
        if not _is_int(self.block_size_bytes) or self.block_size_bytes <= 0:
            raise _bad(
                "block_size_bytes",
                self.block_size_bytes,
                "pass a positive int number of bytes (e.g. 300 * 2**20 for 300 MiB)",
            )
        if not _is_int(self.reserve_bytes) or self.reserve_bytes < 0:
            raise _bad("reserve_bytes", self.reserve_bytes, "pass an int >= 0 (default 256 MiB)")
        if not _is_int(self.max_prefetch_depth) or not 0 <= self.max_prefetch_depth <= 64:
            raise _bad("max_prefetch_depth", self.max_prefetch_depth, "pass an int between 0 and 64")
        if not isinstance(self.warm_start, bool):
            raise _bad("warm_start", self.warm_start, "pass True or False")
        if not isinstance(self.nvlink, bool):
            raise _bad("nvlink", self.nvlink, "pass True (NVLink) or False (PCIe)")
        for name in ("h2d_gbps", "compute_tflops", "device_mem_gbps", "p2p_gbps"):
            value = getattr(self, name)
            if not _is_rate(value):
                raise _bad(name, value, "pass a finite number > 0")
            # Stored as float so that a plan compares equal after a JSON round trip.
            object.__setattr__(self, name, float(value))

    @classmethod
    def from_user(
        cls,
        *,
        mode: str = DEFAULT_MODE,
        max_vram_gb: float,
        block_size_mb: float = DEFAULT_BLOCK_SIZE_MB,
        reserve_mb: float = DEFAULT_RESERVE_MB,
        max_prefetch_depth: int = DEFAULT_MAX_PREFETCH_DEPTH,
        h2d_gbps: float = DEFAULT_H2D_GBPS,
        compute_tflops: float = DEFAULT_COMPUTE_TFLOPS,
        device_mem_gbps: float = DEFAULT_DEVICE_MEM_GBPS,
        warm_start: bool = True,
        p2p_gbps: float = DEFAULT_P2P_GBPS,
        nvlink: bool = False,
    ) -> PlanOptions:
        """Options from user units: ``max_vram_gb`` in GiB (2**30), sizes in MiB (2**20).

        Raises:
            ValueError: naming the user-facing argument (``max_vram_gb``, ...), its value and the fix.
        """
        for name, value in (("max_vram_gb", max_vram_gb), ("block_size_mb", block_size_mb)):
            if not _is_rate(value):
                raise _bad(
                    name, value, "pass a finite number > 0 (GiB for max_vram_gb, MiB for block_size_mb)"
                )
        if not (isinstance(reserve_mb, (int, float)) and not isinstance(reserve_mb, bool)) or not (
            math.isfinite(reserve_mb) and reserve_mb >= 0
        ):
            raise _bad("reserve_mb", reserve_mb, "pass a finite number of MiB >= 0 (default 256)")
        block = round(block_size_mb * MiB)
        if block <= 0:
            raise _bad("block_size_mb", block_size_mb, "pass at least 1 byte's worth (e.g. 300)")
        return cls(
            mode=mode,
            max_vram_bytes=max(1, round(max_vram_gb * GiB)),
            block_size_bytes=block,
            reserve_bytes=round(reserve_mb * MiB),
            max_prefetch_depth=max_prefetch_depth,
            h2d_gbps=h2d_gbps,
            compute_tflops=compute_tflops,
            device_mem_gbps=device_mem_gbps,
            warm_start=warm_start,
            p2p_gbps=p2p_gbps,
            nvlink=nvlink,
        )

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# The PlanOptions.from_user arguments that take their documented default when left out (or None).
OPTIONAL_OPTIONS = (
    "reserve_mb",
    "h2d_gbps",
    "compute_tflops",
    "max_prefetch_depth",
    "device_mem_gbps",
    "warm_start",
    "p2p_gbps",
    "nvlink",
)


def make_options(
    *,
    mode: str,
    max_vram_gb: float,
    block_size_mb: float = DEFAULT_BLOCK_SIZE_MB,
    **optional: float | bool | None,
) -> PlanOptions:
    """Validated :class:`PlanOptions` from user units; an optional option that is ``None`` (or left
    out) keeps PlanOptions' documented default. ``optional`` takes the names in
    :data:`OPTIONAL_OPTIONS` (``reserve_mb``, ``h2d_gbps``, ...).

    Raises:
        TypeError: an option name that is not one of :data:`OPTIONAL_OPTIONS`.
        ValueError: naming the argument, its value and the fix (:meth:`PlanOptions.from_user`).
    """
    unknown = sorted(set(optional) - set(OPTIONAL_OPTIONS))
    if unknown:
        raise TypeError(
            f"unknown planner option {unknown[0]!r}; the options are mode, max_vram_gb, block_size_mb, "
            f"{', '.join(OPTIONAL_OPTIONS)}"
        )
    given: dict[str, Any] = {k: v for k, v in optional.items() if v is not None}
    return PlanOptions.from_user(mode=mode, max_vram_gb=max_vram_gb, block_size_mb=block_size_mb, **given)
