"""Classifier-free guidance: two transformer calls per step (diffusers' schedule) against one call of
batch 2 (``fxswap.integrations.diffusers.enable(..., cfg="batched")``), priced by fxswap's planner
and simulator on meta tensors (predictions, not measurements).

Per setting (model, video size, card, budget): the batch-1 call is planned and counted twice (every
swapped byte moves twice per step); the batch-2 call once (each byte once, activations doubled).
Each batch size is captured once for all cards and budgets.

Usage: ``python benchmarks/bench_cfg.py [--model wan2.1-t2v-14b] [--cards rtx4090,h100-sxm]
[--budgets-gb 12,16,20] [--cases 832x480x81,832x480x17] [--slow-link]``; prints a markdown table.
``--slow-link`` adds an H100 behind a hypothetical 8 GB/s link (as ``bench_sim.py --slow-link``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

import fxswap
from fxswap.api import make_options, plan_traced
from fxswap.bench.costmodel import plan_rates
from fxswap.bench.hardware import get_profile
from fxswap.models import wan

GiB = 2**30


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wan2.1-t2v-14b")
    ap.add_argument("--cards", default="rtx4090,h100-sxm")
    ap.add_argument("--budgets-gb", default="12,16,20")
    ap.add_argument("--cases", default="832x480x81,832x480x17")
    ap.add_argument("--slow-link", action="store_true", help="add an H100 behind an 8 GB/s link")
    args = ap.parse_args(argv)
    profiles = [get_profile(c) for c in args.cards.split(",")]
    if args.slow_link:
        h100 = get_profile("h100-sxm")
        profiles.append(
            dataclasses.replace(h100, name="h100-8gbps", pinned_h2d_gbps=8.0, pageable_h2d_gbps=4.0)
        )
    budgets = [float(b) for b in args.budgets_gb.split(",")]
    print(
        "| model | case | card | GiB | separate ms/step | batched ms/step | batched/separate | "
        "separate GiB moved/step | batched GiB moved/step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        w, h, f = (int(v) for v in case.split("x"))
        traced = {}
        for batch in (1, 2):
            model = wan.build(args.model, device="meta", dtype=torch.bfloat16)
            inputs = wan.example_inputs(
                model.config, batch=batch, frames=f, height=h, width=w, device="meta", dtype=torch.bfloat16
            )
            traced[batch] = fxswap.trace(model, **inputs)
        for hw in profiles:
            rates = plan_rates(hw)
            for gb in budgets:
                plans = {}
                for batch in (1, 2):
                    opts = make_options(mode="adaptive", max_vram_gb=gb, **rates)
                    try:
                        plans[batch] = plan_traced(traced[batch], opts)
                    except fxswap.BudgetInfeasibleError as e:
                        plans[batch] = e
                one, two = plans[1], plans[2]
                if isinstance(one, Exception):
                    continue
                head = f"| {args.model} | {case} | {hw.name} | {gb:g}"
                sep_ms, sep_gb = 2 * one.predicted_step_ms, 2 * one.moved_bytes_per_call / GiB
                if isinstance(two, Exception):
                    bat = f"infeasible (min {two.min_vram_bytes / GiB:.1f} GiB)"
                    print(f"{head} | {sep_ms:.0f} | {bat} | | {sep_gb:.1f} | |")
                    continue
                ratio = two.predicted_step_ms / sep_ms
                print(
                    f"{head} | {sep_ms:.0f} | {two.predicted_step_ms:.0f} | "
                    f"{ratio:.3f} | {sep_gb:.1f} | {two.moved_bytes_per_call / GiB:.1f} |"
                )
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
