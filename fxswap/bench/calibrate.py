"""``fxswap calibrate``: measure this machine's GPU and save a hardware profile JSON for planning.

Measured on a CUDA device (CUDA events, median of repeats, after warm-up):

- pinned and pageable host-to-device copy rates, and device-to-host into pinned memory, on a
  buffer of ``--copy-mb`` (default 256 MiB, about a third of a WAN 14B bf16 block);
- per-block compute time of a WAN model: the forward of a 2-block model minus that of a 1-block
  model of the same config (random weights, bf16, the given resolution), so the non-block ops cancel.
  ``achieved_fraction`` = FLOPs of one block (:func:`fxswap.bench.costmodel.wan_block_flops`) / (time
  x the base profile's datasheet peak).

The figures that are not measured (datasheet peak, device-memory bandwidth) come from a base
profile: ``--base NAME``, or the built-in profile whose name matches ``torch.cuda.get_device_name``.

Without CUDA the command fails with status 2 and says so. ``--device cpu`` instead measures a host
memcpy (one pageable CPU tensor into another) and prints it, labelled as such: it says nothing about a
PCIe link, so it is never written as a profile.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from fxswap.bench.costmodel import wan_block_flops
from fxswap.bench.hardware import PROFILES, HardwareProfile, get_profile, save_profile
from fxswap.errors import FxswapError

__all__ = [
    "add_calibrate_arguments",
    "calibrated_profile",
    "measure_host_memcpy",
    "measure_matmul_tflops",
    "run_calibrate",
]

MiB = 2**20
_NAME_HINTS = (
    ("h200", "h200"),  # "NVIDIA H200" (torch.cuda.get_device_name on the H200 SXM)
    ("5090", "rtx5090"),
    ("4090", "rtx4090"),
    ("4080", "rtx4080"),
    ("3090", "rtx3090"),
    ("h100 pcie", "h100-pcie"),
    ("h100", "h100-sxm"),
    ("a100-sxm4-40gb", "a100-40gb"),
    ("a100-pcie-40gb", "a100-40gb"),
    ("a100", "a100-80gb"),
)


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fxswap calibrate`` (the lead wires this into the CLI)."""
    parser.add_argument(
        "--device", default="cuda", help="cuda (default; measures the GPU) or cpu (host memcpy)"
    )
    parser.add_argument("--base", default=None, help=f"profile for unmeasured figures: {', '.join(PROFILES)}")
    parser.add_argument("--model", default="wan2.1-t2v-1.3b", help="WAN config whose block is timed")
    parser.add_argument("--resolution", default="832x480", help="WIDTHxHEIGHT for the block timing")
    parser.add_argument("--frames", type=int, default=81, help="frames for the block timing")
    parser.add_argument("--copy-mb", type=float, default=256.0, help="copy buffer size, MiB")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median is kept)")
    parser.add_argument("--skip-block", action="store_true", help="measure copies only")
    parser.add_argument("-o", "--output", default=None, help="write the calibrated profile JSON here")


def _median_ms(fn: Any, repeats: int, sync: Any) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_host_memcpy(nbytes: int, repeats: int = 5) -> float:
    """GB/s of a pageable host-to-host tensor copy (``dst.copy_(src)``) of ``nbytes``."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), repeats, lambda: None)
    return nbytes / (ms * 1e-3) / 1e9


def _cuda_median_ms(fn: Any, repeats: int) -> float:
    """Median GPU time of ``fn`` in ms over ``repeats`` runs (CUDA events), after one warm-up run."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cuda_copy_rates(nbytes: int, repeats: int) -> dict[str, float]:
    import torch

    dev = torch.device("cuda")
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)

    def timed(fn: Any) -> float:
        return nbytes / (_cuda_median_ms(fn, repeats) * 1e-3) / 1e9

    return {
        "pinned_h2d_gbps": timed(lambda: gpu.copy_(pinned, non_blocking=True)),
        # A pageable copy is staged by the driver through its own pinned buffer; time it as users get it.
        "pageable_h2d_gbps": timed(lambda: gpu.copy_(pageable)),
        "d2h_gbps": timed(lambda: pinned.copy_(gpu, non_blocking=True)),
    }


def measure_matmul_tflops(device: Any, n: int = 8192, repeats: int = 5) -> float:
    """Achieved TFLOP/s of an ``n``x``n``x``n`` matrix product: bf16 on CUDA (CUDA events, median),
    float32 on the CPU (wall clock, median); random data, after one warm-up product."""
    import torch

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            ms = _cuda_median_ms(lambda: torch.mm(a, b), repeats)
    else:
        ms = _median_ms(lambda: torch.mm(a, b), repeats, lambda: None)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def calibrated_profile(
    device: Any,
    *,
    base: str | None = None,
    copy_mb: float = 256.0,
    repeats: int = 5,
    matmul_n: int | None = None,
) -> tuple[HardwareProfile, dict[str, Any]]:
    """Measure the copy rates and the matmul rate of ``device`` and return a calibrated profile for
    the planner (``fxswap.bench.costmodel.plan_rates``) with the raw measurements.

    The copies are measured first, so that a card without a built-in profile still reports them
    before the base lookup fails. ``achieved_fraction`` = measured matmul TFLOP/s / the base's
    datasheet peak: the planner's ``compute_tflops`` becomes the measured matmul rate.

    On the CPU (the dry run) the "copy" is a host memcpy and the product runs in float32; the profile
    is named ``cpu-memcpy-...`` and its sources say so: it prices nothing real.

    Raises:
        FxswapError: no built-in profile matches the GPU's name and ``base`` is not given (the
            measurements are in the error message).
    """
    import torch

    dev = torch.device(device)
    nbytes = round(copy_mb * MiB)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    if dev.type == "cuda":
        device_name = torch.cuda.get_device_name(dev)
        with torch.cuda.device(dev):
            rates = _cuda_copy_rates(nbytes, repeats)
        n = matmul_n or 8192
    else:
        device_name = "cpu"
        memcpy = measure_host_memcpy(nbytes, repeats)
        rates = {"pinned_h2d_gbps": memcpy, "pageable_h2d_gbps": memcpy, "d2h_gbps": memcpy}
        n = matmul_n or 512
    tflops = measure_matmul_tflops(dev, n, repeats)
    measured: dict[str, Any] = {"device_name": device_name, **rates, "matmul_tflops": tflops, "matmul_n": n}
    try:
        prof = _base_profile(base, device_name) if dev.type == "cuda" else get_profile(base or "generic-20gb")
    except FxswapError as exc:
        raise FxswapError(f"{exc}. Measured before the lookup: {measured}") from None
    what = "measured" if dev.type == "cuda" else "host memcpy / CPU float32 matmul (dry run, not a GPU)"
    sources = dict(prof.sources)
    for k in (*rates, "achieved_fraction"):
        sources[k] = f"{what} on {device_name}, {stamp}"
    vram = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else prof.vram_bytes
    prefix = "calibrated" if dev.type == "cuda" else "cpu-memcpy"
    prof = replace(
        prof,
        name=f"{prefix}-{prof.name}",
        calibrated=dev.type == "cuda",
        vram_bytes=int(vram),
        achieved_fraction=min(1.0, tflops / prof.bf16_tflops),
        sources=sources,
        nvlink=prof.nvlink,  # not measured here: the base profile's link
        **rates,
    )
    prof.check()
    return prof, measured


def _block_ms(model: str, width: int, height: int, frames: int, repeats: int) -> tuple[float, float]:
    """(ms per block, FLOPs per block) of ``model`` on the GPU: 2-block minus 1-block forward."""
    import torch

    from fxswap.models import wan

    cfg = wan.named_config(model)
    kwargs = wan.example_inputs(
        model, frames=frames, height=height, width=width, device="cuda", dtype=torch.bfloat16
    )
    times = []
    for layers in (1, 2):
        net = wan.build(model, device="cuda", dtype=torch.bfloat16, num_layers=layers).eval()
        with torch.no_grad():
            times.append(_cuda_median_ms(functools.partial(net, **kwargs), repeats))
        del net
        torch.cuda.empty_cache()
    _, lat_f, lat_h, lat_w = wan.latent_shape(cfg, frames, height, width)
    pt, ph, pw = cfg.patch_size
    tokens = (lat_f // pt) * (lat_h // ph) * (lat_w // pw)
    image_tokens = wan.CLIP_TOKENS if cfg.image_dim else 0
    flops = wan_block_flops(
        cfg.dim, cfg.ffn_dim, tokens, cfg.text_len, image_tokens,
        sla_topk=cfg.sla_topk if cfg.attention_type == "sla" else None, head_dim=cfg.head_dim,
        sla_block_q=cfg.sla_block_q, sla_block_k=cfg.sla_block_k,
    )  # fmt: skip
    return times[1] - times[0], flops


def _base_profile(name: str | None, device_name: str) -> HardwareProfile:
    if name:
        return get_profile(name)
    low = device_name.lower()
    for hint, prof in _NAME_HINTS:
        if hint in low:
            return PROFILES[prof]
    raise FxswapError(
        f"no built-in profile matches the GPU {device_name!r}; pass --base with one of {', '.join(PROFILES)} "
        "(its datasheet peak is used to turn the measured block time into achieved_fraction)"
    )


def run_calibrate(args: argparse.Namespace) -> int:
    """Run ``fxswap calibrate``; returns the exit status (2 when no CUDA device or bad arguments)."""
    import torch

    nbytes = round(args.copy_mb * MiB)
    if nbytes <= 0 or args.repeats <= 0:
        print(
            f"fxswap calibrate: --copy-mb={args.copy_mb} and --repeats={args.repeats} must be > 0",
            file=sys.stderr,
        )
        return 2
    if args.device == "cpu":
        if args.output:
            print(
                "fxswap calibrate: --device cpu measures a host memcpy, not a GPU link, and writes no "
                "profile; drop -o, or run on a CUDA machine",
                file=sys.stderr,
            )
            return 2
        gbps = measure_host_memcpy(nbytes, args.repeats)
        print(f"host memcpy (pageable CPU tensor -> CPU tensor, {args.copy_mb:g} MiB): {gbps:.1f} GB/s")
        print("NOTE: this is host memory bandwidth, not a host-to-device rate; no profile was written.")
        return 0
    if args.device != "cuda":
        print(f"fxswap calibrate: --device={args.device!r}; use cuda or cpu", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            "fxswap calibrate: needs a CUDA device (torch.cuda.is_available() is False); run it on the GPU "
            "machine, or pass --device cpu to measure host memcpy only",
            file=sys.stderr,
        )
        return 2
    device_name = torch.cuda.get_device_name()
    try:
        width, height = (int(v) for v in args.resolution.lower().split("x"))
    except ValueError:
        print(f"fxswap calibrate: --resolution={args.resolution!r}; use WIDTHxHEIGHT, e.g. 832x480",
              file=sys.stderr)  # fmt: skip
        return 2
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    # The copies first: a card without a built-in profile still gets its link measured and printed.
    rates = _cuda_copy_rates(nbytes, args.repeats)
    print(
        f"{device_name}: pinned H2D {rates['pinned_h2d_gbps']:.1f} GB/s, pageable H2D "
        f"{rates['pageable_h2d_gbps']:.1f} GB/s, D2H {rates['d2h_gbps']:.1f} GB/s"
    )
    try:
        base = _base_profile(args.base, device_name)
    except FxswapError as exc:
        print(f"fxswap calibrate: {exc}", file=sys.stderr)
        return 2
    sources = dict(base.sources)
    for k in rates:
        sources[k] = f"measured by fxswap calibrate on {device_name}, {stamp}"
    prof = replace(
        base,
        name=f"calibrated-{base.name}",
        calibrated=True,
        vram_bytes=torch.cuda.get_device_properties(0).total_memory,
        pinned_h2d_gbps=rates["pinned_h2d_gbps"],
        pageable_h2d_gbps=rates["pageable_h2d_gbps"],
        d2h_gbps=rates["d2h_gbps"],
    )
    if not args.skip_block:
        block_ms, flops = _block_ms(args.model, width, height, args.frames, args.repeats)
        if block_ms <= 0:
            print(
                f"fxswap calibrate: block time came out {block_ms:.3f} ms (noise); use a larger --resolution "
                "or --frames",
                file=sys.stderr,
            )
            return 2
        achieved = min(1.0, flops / (block_ms * 1e-3) / (base.bf16_tflops * 1e12))
        predicted = flops / (base.compute_tflops * 1e12) * 1e3
        print(
            f"{args.model} block at {width}x{height}x{args.frames}: {block_ms:.2f} ms measured, "
            f"{predicted:.2f} ms predicted by the base profile; achieved fraction {achieved:.3f} "
            f"(base {base.achieved_fraction:.3f})"
        )
        prof = replace(prof, achieved_fraction=achieved)
        sources["achieved_fraction"] = f"measured block time of {args.model} on {device_name}, {stamp}"
    prof = replace(prof, sources=sources)
    if args.output:
        save_profile(prof, args.output)
        print(f"wrote {args.output}")
    return 0
