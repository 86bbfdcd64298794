"""Predicted against measured: the bench's models priced at the sizes a GPU check measured.

The report is the JSON ``benchmarks/gpu_check.py`` writes on the GPU machine.

``python benchmarks/bench_sim.py --compare-gpu-check GPU_CHECK.json --cards CARD`` writes this comparison
for a report the GPU machine wrote.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fxswap.bench.costmodel import graph_costs, plan_rates
from fxswap.bench.hardware import HardwareProfile
from fxswap.bench.peers import GraphContext, diffusers_group, evaluate
from fxswap.errors import BudgetInfeasibleError, FxswapError
from fxswap.passes.planner import build_plan
from fxswap.passes.simulate import simulate_time, unit_windows
from fxswap.swapplan import PlanOptions

__all__ = ["compare_with_gpu_check"]


def compare_with_gpu_check(report: dict[str, Any], hw: HardwareProfile) -> list[dict[str, Any]]:
    """Predicted against measured step times for a ``benchmarks/gpu_check.py`` JSON report.

    For each model of the report the same WAN config (``-10layers`` = the first 10 blocks) is captured
    on meta at the report's size and predicted on ``hw`` at the report's budget: ``resident_eager``
    (every weight resident), ``fxswap_eager`` (an adaptive plan with ``hw``'s rates) and
    ``diffusers_group_offload`` (the peer model). The op model prices eager, unfused ops, so the
    compiled variants get no prediction. Returns one dict per variant with ``measured_ms``,
    ``predicted_ms`` and ``error_pct`` (predicted / measured - 1, in %); missing measurements stay None.
    """
    import torch  # deferred: capture needs it, the rest of the bench is plain Python

    from fxswap.capture import trace
    from fxswap.models import wan

    out: list[dict[str, Any]] = []
    for name, res in report.get("models", {}).items():
        if "budget_bytes" not in res:
            continue
        base = name.removesuffix("-10layers")
        if base.startswith("tiny-"):
            cfg = wan.tiny_config(base.removeprefix("tiny-"))
        elif base in wan.CONFIGS:
            cfg = wan.CONFIGS[base]
        else:
            raise FxswapError(f"gpu_check model {name!r} is not a known WAN config; cannot predict it")
        if name.endswith("-10layers"):
            cfg = dataclasses.replace(cfg, num_layers=10)
        dtype = torch.float32 if report.get("dry_run") else torch.bfloat16
        net = wan.build(cfg, device="meta", dtype=dtype)
        kw = wan.example_inputs(cfg, frames=res["frames"], height=res["height"], width=res["width"],
                                device="meta", dtype=dtype)  # fmt: skip
        ir = trace(net, **kw).ir
        costs = graph_costs(ir, hw)
        budget = int(res["budget_bytes"])
        reserve = 0 if report.get("dry_run") else 256 * 2**20
        rates = plan_rates(hw)
        predicted: dict[str, float | None] = {"resident_eager": costs.prefix_ms[-1]}
        try:
            plan = build_plan(ir, PlanOptions(mode=report.get("mode", "adaptive"), max_vram_bytes=budget,
                                              reserve_bytes=reserve, h2d_gbps=rates["h2d_gbps"],
                                              compute_tflops=rates["compute_tflops"],
                                              device_mem_gbps=rates["device_mem_gbps"]))  # fmt: skip
            windows = unit_windows(sorted(plan.units, key=lambda u: u.first_use))
            predicted["fxswap_eager"] = simulate_time(costs, windows, hw.pinned_h2d_gbps).step_ms
        except BudgetInfeasibleError:
            predicted["fxswap_eager"] = None
        try:
            sched = diffusers_group(GraphContext(ir, reserve), 2**62)
            predicted["diffusers_group_offload"] = evaluate(
                sched, costs, hw.pinned_h2d_gbps, hw.d2h_gbps, hw.sync_overhead_ms
            ).step_ms
        except FxswapError:
            predicted["diffusers_group_offload"] = None
        for variant, pred in predicted.items():
            v = res.get("variants", {}).get(variant, {})
            measured = v["step_s"] * 1e3 if isinstance(v, dict) and "step_s" in v else None
            err = None if measured is None or pred is None else (pred / measured - 1) * 100
            out.append({"model": name, "variant": variant, "card": hw.name, "measured_ms": measured,
                        "predicted_ms": pred, "error_pct": err})  # fmt: skip
    return out
