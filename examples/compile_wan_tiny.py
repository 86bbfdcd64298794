"""Run a tiny WAN transformer under a VRAM budget far below its weights, in every swap mode.

    python examples/compile_wan_tiny.py

On a machine without a GPU the CPU plays the device, through the same code path fxswap uses on CUDA
(a transfer backend, load / wait / release ops in the graph), so this runs anywhere in seconds. It
prints each plan's summary and checks that the swapped model's output is bitwise equal to the
unswapped model's (eager backend; pass --backend inductor to compile the rewritten graph instead).
"""

from __future__ import annotations

import argparse

import torch

import fxswap
from fxswap.models import wan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("eager", "inductor"), default="eager")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = wan.tiny_config("t2v", num_layers=6)
    model = wan.build(config).eval()
    inputs = wan.example_inputs(config, frames=5, height=64, width=64)
    with torch.no_grad():
        reference = model(**inputs)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"tiny WAN: {config.num_layers} blocks, {weight_bytes / 2**20:.2f} MiB of fp32 weights")

    for mode in ("layerwise", "chunkwise", "adaptive"):
        # The smallest budget this mode can meet for this input, from the planner itself.
        smallest = fxswap.plan(
            model, mode=mode, max_vram_gb=1, block_size_mb=0.05, reserve_mb=0, **inputs
        ).min_vram_bytes
        budget_gb = 1.25 * smallest / 2**30
        swapped = fxswap.compile(
            model,
            mode=mode,
            max_vram_gb=budget_gb,
            block_size_mb=0.05,
            reserve_mb=0,
            backend=args.backend,
            device="cpu",
        )
        with fxswap.monitor("cpu", log=None) as mon, torch.no_grad():
            out = swapped(**inputs)
        plan = swapped.plan
        assert plan is not None
        print(f"\n== {mode}: budget {budget_gb * 2**30 / 2**20:.2f} MiB (1.25 x the mode's minimum)")
        print(plan.summary())
        print(f"device bytes held by fxswap at the end of the call: {mon.rows[-1].allocated_bytes:,}")
        same = torch.equal(out, reference)
        print(f"output bitwise equal to the unswapped model: {same}")
        if args.backend == "eager" and not same:
            raise SystemExit("swapped output differs from the unswapped model")


if __name__ == "__main__":
    main()
