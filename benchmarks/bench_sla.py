"""SLA on the GPU: attention time dense vs SLA at WAN 1.3B 480p shapes, and the Triton kernel against
the PyTorch reference (prepared on CPU; run it where a CUDA device and Triton are available).

    python benchmarks/bench_sla.py --out benchmarks/results/bench_sla.json   # ~1-2 min on one H100
    python benchmarks/bench_sla.py --dry-run                                 # tiny shapes on the CPU

Shapes: WAN2.1 T2V-1.3B at 832x480, 81 frames: B=1, 12 heads, L=32760 tokens, head_dim 128, bf16;
TurboDiffusion's blocks (128 queries x 64 keys). Timed with CUDA events, median of ``--repeats``
after two warm-up calls, all in this process:

- ``dense_sdpa``: ``F.scaled_dot_product_attention`` (PyTorch picks flash / cuDNN);
- ``sla[topk]``: the whole SLA attention (block selection, feature maps, the fused op through the
  Triton kernel, ``proj_l``), for each ``--topk``;
- ``kernel[topk]`` and ``reference[topk]``: the sparse + linear op alone through the Triton kernel
  and through the PyTorch reference, on the same inputs and block table;
- agreement: max abs difference kernel vs reference per topk (bf16 and float32 inputs), and SLA at
  topk 1.0 (zero ``proj_l``) vs dense SDPA on float32 inputs at ``--check-tokens`` tokens.

Ratios are given against ``dense_sdpa`` measured in the same run. The dry run executes every path on
tiny CPU tensors (the kernel only where Triton's interpreter is enabled: ``TRITON_INTERPRET=1``) and
times nothing that should be quoted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fxswap.models import sla

WAN13_480P = {"batch": 1, "heads": 12, "tokens": 32760, "head_dim": 128}
TINY = {"batch": 1, "heads": 2, "tokens": 200, "head_dim": 16}


def _median_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    for _ in range(2):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _inputs(
    shape: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=device).manual_seed(seed)
    size = (shape["batch"], shape["heads"], shape["tokens"], shape["head_dim"])
    return tuple(torch.randn(size, device=device, dtype=dtype, generator=g) for _ in range(3))


def _kernel_usable(device: torch.device) -> bool:
    import os

    from fxswap.kernels import triton_available

    return triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_sla: no CUDA device; use --dry-run on the CPU")
    shape = TINY if args.dry_run else WAN13_480P
    bq, bk = (32, 16) if args.dry_run else (sla.BLOCK_Q, sla.BLOCK_K)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    kernel_ok = _kernel_usable(device)
    report: dict[str, Any] = {
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
        ),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dry_run": args.dry_run,
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "blocks": [bq, bk],
        "kernel": "triton" if kernel_ok else "unavailable",
    }
    if kernel_ok:
        import triton

        report["triton"] = triton.__version__
    q, k, v = _inputs(shape, device, dtype)
    times: dict[str, float] = {}
    with torch.no_grad():
        times["dense_sdpa"] = _median_ms(
            lambda: F.scaled_dot_product_attention(q, k, v), device, args.repeats
        )
        proj = torch.nn.Linear(shape["head_dim"], shape["head_dim"], device=device, dtype=dtype)
        errors: dict[str, dict[str, float]] = {}
        for topk in args.topk:
            times[f"sla[{topk}]"] = _median_ms(
                lambda t=topk: sla.sla_attention(q, k, v, t, bq, bk, proj.weight, proj.bias),
                device,
                args.repeats,
            )
            lut = sla.select_blocks(q, k, topk, bq, bk)
            s, z = sla.kv_block_sums(sla.feature_map(k), v, bk)
            op_args = (q, k, v, sla.feature_map(q), s, z, lut, bq, bk)
            times[f"reference[{topk}]"] = _median_ms(
                lambda a=op_args: sla.sparse_linear_reference(*a), device, max(1, args.repeats // 4)
            )
            if not kernel_ok:
                continue
            from fxswap.kernels import sla_triton

            times[f"kernel[{topk}]"] = _median_ms(
                lambda a=op_args: sla_triton.sparse_linear(*a), device, args.repeats
            )
            errors[str(topk)] = {}
            for name, dt in (("bf16", torch.bfloat16), ("float32", torch.float32)):
                if args.dry_run and dt == torch.bfloat16:
                    continue  # the interpreter computes with numpy, which has no bfloat16
                qq, kk, vv = (t.to(dt) for t in (q, k, v))
                ss, zz = sla.kv_block_sums(sla.feature_map(kk), vv, bk)
                a = (qq, kk, vv, sla.feature_map(qq), ss, zz, lut, bq, bk)
                got, want = sla_triton.sparse_linear(*a), sla.sparse_linear_reference(*a)
                errors[str(topk)][name] = max(
                    (x.float() - y.float()).abs().max().item() for x, y in zip(got, want, strict=True)
                )
        # SLA with every block kept and a zero proj_l is dense attention (float32, a smaller L).
        small = dict(shape, tokens=min(shape["tokens"], args.check_tokens))
        q32, k32, v32 = _inputs(small, device, torch.float32, seed=1)
        dense = F.scaled_dot_product_attention(q32, k32, v32)
        dense_err = sla.sla_attention(q32, k32, v32, 1.0, bq, bk) - dense
        report["sla_topk1_vs_dense_max_abs"] = {
            "tokens": small["tokens"],
            "float32": dense_err.abs().max().item(),
        }
    report["ms"] = times
    report["vs_dense_sdpa"] = {k: t / times["dense_sdpa"] for k, t in times.items() if k != "dense_sdpa"}
    report["kernel_vs_reference_max_abs"] = errors
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (no timing worth quoting)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--topk", type=float, nargs="+", default=[0.1, 0.15, 0.2])
    p.add_argument("--check-tokens", type=int, default=4096, help="tokens for the topk=1 vs dense check")
    args = p.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
