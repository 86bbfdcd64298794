"""Predicted gain of the warm start (a cyclic schedule across calls) per WAN setting and card.

For each model, frame count, card profile and budget: the adaptive plan with ``warm_start=False``
(every call starts cold) and with ``warm_start=True`` (each call's tail loads the next call's first
units), priced by the card's rates. Reported: the steady-state step of both, the gain, the first
call (always cold), and the bytes carried between calls. Every figure is a PREDICTION of fxswap's
cost model (``fxswap.passes.simulate`` / ``fxswap.passes.warmstart``), not a measurement; the GPU
check measures 10 consecutive calls on a real card.

Graphs are captured on meta tensors (no weights, no GPU) through the graph cache.

Usage: ``python benchmarks/bench_warmstart.py [--out benchmarks/results]`` (about 2 minutes cold,
seconds once the graphs are cached).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

MODELS = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b")
FRAMES = (1, 17, 81)
CARDS = ("rtx3090", "rtx4090", "rtx5090", "h100-pcie")
# per model: budgets below its weights (1.3B: 2.6 GiB of bf16 weights; 14B: 26.6 GiB)
BUDGETS_GB = {"wan2.1-t2v-1.3b": (1.5, 2, 2.5), "wan2.1-t2v-14b": (12, 16, 24)}
GiB = 2**30


def rows() -> list[dict[str, Any]]:
    from fxswap.bench.costmodel import plan_rates
    from fxswap.bench.graphs import wan_ir
    from fxswap.bench.hardware import get_profile
    from fxswap.errors import BudgetInfeasibleError
    from fxswap.options import PlanOptions
    from fxswap.passes.planner import build_plan

    out = []
    for model in MODELS:
        for frames in FRAMES:
            ir = wan_ir(model, 832, 480, frames)
            for card in CARDS:
                hw = get_profile(card)
                for budget in BUDGETS_GB[model]:
                    if budget * GiB > hw.vram_bytes:
                        continue
                    base = PlanOptions.from_user(mode="adaptive", max_vram_gb=budget, **plan_rates(hw))
                    try:
                        start = time.perf_counter()
                        cold = build_plan(ir, dataclasses.replace(base, warm_start=False))
                        warm = build_plan(ir, base)
                        seconds = time.perf_counter() - start
                    except BudgetInfeasibleError:
                        continue
                    out.append(
                        {
                            "model": model,
                            "frames": frames,
                            "card": card,
                            "budget_gb": budget,
                            "cold_step_ms": round(cold.predicted_step_ms, 2),
                            "warm_step_ms": round(warm.predicted_step_ms, 2),
                            "gain_pct": round(100 * (1 - warm.predicted_step_ms / cold.predicted_step_ms), 2),
                            "first_call_ms": round(warm.predicted_first_step_ms, 2),
                            "carried_mib": round(warm.carried_bytes / 2**20, 1),
                            "cold_peak_gib": round(cold.peak_bytes / GiB, 3),
                            "warm_peak_gib": round(warm.peak_bytes / GiB, 3),
                            "plan_pair_s": round(seconds, 2),
                        }
                    )
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    head = (
        "| model | frames | card | budget GiB | cold step ms | warm step ms | gain | first call ms "
        "| carried MiB | peak GiB (cold / warm) |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['model']} | {r['frames']} | {r['card']} | {r['budget_gb']} | {r['cold_step_ms']} | "
        f"{r['warm_step_ms']} | {r['gain_pct']}% | {r['first_call_ms']} | {r['carried_mib']} | "
        f"{r['cold_peak_gib']} / {r['warm_peak_gib']} |\n"
        for r in table
    )
    return head + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for bench_warmstart.{json,md}")
    args = parser.parse_args()
    table = rows()
    text = (
        "Predicted by fxswap's cost model (not measured): steady-state step of the adaptive plan without "
        "and with the warm start, 480p (832x480), bf16, card rates from the built-in profiles.\n"
        "Command: `python benchmarks/bench_warmstart.py --out benchmarks/results`.\n\n" + markdown(table)
    )
    print(text)
    if args.out:
        from fxswap.bench.report import write_prediction

        write_prediction(args.out, "bench_warmstart", text, table)


if __name__ == "__main__":
    main()
