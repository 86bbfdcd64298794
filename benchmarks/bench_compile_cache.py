"""First call of a compiled WAN in a fresh process, twice: cold compile caches, then warm ones.

Each run is a child process that builds the model (random weights, bf16 unless --fp32), compiles
it with ``fxswap.compile(..., backend="inductor")`` and times its first call (capture, plan,
rewrite, Inductor, run) and a second call. Both children share one fresh Inductor cache folder
(``TORCHINDUCTOR_CACHE_DIR``), so the second child finds what the first compiled: the figure says
whether fxswap's rewritten graph is the same code in both processes (Inductor's FX graph cache
keys on it). The graph cache of fxswap is disabled for the children (``fxswap.compile`` captures
anyway).

Prints one JSON object. Usage:
``python benchmarks/bench_compile_cache.py --model tiny-t2v`` (about a minute on 2 CPU cores) or
``--model wan2.1-t2v-1.3b`` (several minutes: 30 blocks of C++ kernels on the first run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import torch
import fxswap
from fxswap.models import wan

name, frames, size, budget_share = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
torch.manual_seed(0)
cfg = wan.tiny_config("t2v") if name == "tiny-t2v" else wan.CONFIGS[name]
dtype = torch.float32 if name == "tiny-t2v" else torch.bfloat16
model = wan.build(cfg, dtype=dtype).eval()
inputs = wan.example_inputs(cfg, frames=frames, height=size, width=size, dtype=dtype)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
sm = fxswap.compile(model, mode="adaptive", max_vram_gb=budget_share * weights / 2**30, backend="inductor",
                    reserve_mb=0)
with torch.no_grad():
    t = time.perf_counter(); sm(**inputs); first = time.perf_counter() - t
    t = time.perf_counter(); sm(**inputs); second = time.perf_counter() - t
print(json.dumps({"first_call_s": round(first, 2), "second_call_s": round(second, 3),
                  "swapped_units": sum(not u.resident for u in sm.plan.units)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-t2v", help="tiny-t2v or a WAN config name")
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="height = width in pixels")
    parser.add_argument("--budget-share", type=float, default=0.5, help="budget as a share of the weights")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, FXSWAP_CACHE_DIR=os.path.join(cache, "graphs"))
        runs = []
        for _ in range(2):
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    args.model,
                    str(args.frames),
                    str(args.size),
                    str(args.budget_share),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    print(
        json.dumps(
            {
                "model": args.model,
                "frames": args.frames,
                "size": args.size,
                "first_process": runs[0],
                "second_process": runs[1],
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            }
        )
    )


if __name__ == "__main__":
    main()
