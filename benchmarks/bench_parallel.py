"""Sequence parallelism on this machine: a tiny WAN on 1, 2 and 4 processes (CPU, gloo), measured.

Per setting: processes started with ``torch.multiprocessing`` (spawn), each with ``--threads``
intra-op threads, compile the same model with ``fxswap.compile(..., backend="eager",
ulysses_degree=N)`` (N = 1: plain ``fxswap.compile``), run one call to build, then time
``--calls`` calls (wall time of the slowest rank, between barriers) and measure one more call's
allocator peak with :mod:`fxswap.oracle` (plus the inputs). The speed-up is against the 1-process
run with the same threads per process, in the same invocation. With N processes the machine runs
N times the threads: the 1-process run with ``N * threads`` threads is printed too, the fair
baseline (this machine has 2 cores: 4 processes share them). Rows are written to
``benchmarks/results/bench_parallel.json``.

These are CPU and gloo figures: they show the pass works and each rank's memory falls, not what
NVLink or PCIe GPUs would gain.

Usage: ``python benchmarks/bench_parallel.py [--threads 1] [--calls 5] [--frames 17] [--size 128]
[--ranks 2 4]``

``--predict`` instead plans WAN 14B on meta tensors (as ``fxswap plan --ulysses-degree N`` does) at
480p81 and 720p81 for 1, 2 and 4 ranks with card profiles (:func:`predict`): the smallest budget and
the activation peak per rank, and the predicted step per rank at the same budget per card against one
process's. Those are predictions of the cost model (collectives priced on the profile's link), not
measurements; written to ``benchmarks/results/bench_parallel_predict.{json,md}``.

``--rss``: host memory instead (one host copy of the weights per machine): each rank's RSS and PSS
and their sum for 1, 2 and 4 ranks, written to ``benchmarks/results/bench_parallel_rss.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world: int, threads: int, args: dict[str, Any], out: str) -> None:
    import torch.distributed as dist

    import fxswap
    from fxswap.models import wan
    from fxswap.oracle import live_bytes, measure

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = wan.tiny_config("t2v", num_layers=args["layers"], dim=128, ffn_dim=512, num_heads=4)
    model = wan.build(cfg).eval().requires_grad_(False)
    inputs = wan.example_inputs(cfg, frames=args["frames"], height=args["size"], width=args["size"])
    s = fxswap.compile(
        model,
        max_vram_gb=1.0,
        reserve_mb=0,
        backend="eager",
        device="cpu",
        ulysses_degree=world if world > 1 else None,
    )
    with torch.no_grad():
        s(**inputs)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args["calls"]):
            s(**inputs)
        dist.barrier()
        seconds = (time.perf_counter() - start) / args["calls"]
        s.release()
        with measure("cpu") as m:
            y = s(**inputs)
        del y
    plan = s.plan
    assert plan is not None
    Path(f"{out}.{rank}.json").write_text(
        json.dumps(
            {
                "seconds": seconds,
                "peak": m.peak_bytes + live_bytes([inputs]),
                "plan_peak": plan.peak_bytes,
                "act_peak": plan.activation_peak_bytes,
            }
        )
    )
    dist.destroy_process_group()


def run(world: int, threads: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r")
        mp.start_processes(_worker, args=(world, threads, args, out), nprocs=world, start_method="spawn")
        return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]


# --predict: (name, width, height, frames), cards with the budgets per card (GiB) they are priced at
PREDICT_CASES = (("480p81", 832, 480, 81), ("720p81", 1280, 720, 81))
PREDICT_CARDS = {"rtx4090": (8.0, 16.0, 24.0), "h100-pcie": (24.0, 80.0), "h100-sxm": (24.0, 80.0)}
PREDICT_DEGREES = (1, 2, 4)
# The RTX 4090's all-to-all rate is an estimate (fxswap.bench.hardware): the same card with half and a
# third of it, to show how much the 2-rank figure leans on it.
PREDICT_SLOWER_LINKS = (("rtx4090", 16.0, 9.0), ("rtx4090", 16.0, 6.0))


def predict(model_name: str = "wan2.1-t2v-14b", out_dir: Path | None = None) -> list[dict[str, Any]]:
    """Plan ``model_name`` per rank for every case, card, budget and degree (see the module
    docstring); print a markdown table and write it with the rows as JSON to ``out_dir``."""
    import dataclasses
    import platform
    import sys

    from fxswap.bench.costmodel import link_rates, plan_rates
    from fxswap.bench.hardware import PROFILES
    from fxswap.errors import BudgetInfeasibleError
    from fxswap.models import wan, wan_config
    from fxswap.options import make_options
    from fxswap.parallel import sharded_ir
    from fxswap.passes.device_rules import CARD_CAPABILITY, apply_rules, cuda_rules
    from fxswap.passes.liveness import analyse_liveness
    from fxswap.passes.planner import build_plan

    gib, mib = 2**30, 2**20
    config = wan_config.CONFIGS[model_name]
    rows: list[dict[str, Any]] = []
    for case, width, height, frames in PREDICT_CASES:
        model = wan.build(config, device="meta", dtype=torch.bfloat16)
        inputs = wan.example_inputs(
            model.config, frames=frames, height=height, width=width, device="meta", dtype=torch.bfloat16
        )
        graphs = {}
        for degree in PREDICT_DEGREES[1:]:
            start = time.perf_counter()
            single, shard, _ = sharded_ir(model, inputs, degree)
            graphs[1], graphs[degree] = single, shard
            print(f"{case}: captured degree {degree} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        priced = [(PROFILES[card], budgets) for card, budgets in PREDICT_CARDS.items()]
        priced += [
            (dataclasses.replace(PROFILES[card], p2p_gbps=gbps), (budget,))
            for card, budget, gbps in PREDICT_SLOWER_LINKS
        ]
        for hw, budgets in priced:
            card = hw.name
            rules = cuda_rules(CARD_CAPABILITY[card])
            ruled = {d: apply_rules(ir, rules) for d, ir in graphs.items()}
            acts = {d: max(analyse_liveness(ir).act, default=0) for d, ir in ruled.items()}
            for budget in budgets:
                opts = make_options(mode="adaptive", max_vram_gb=budget, **plan_rates(hw), **link_rates(hw))
                base = None
                for degree in PREDICT_DEGREES:
                    row: dict[str, Any] = {
                        "case": case,
                        "card": card,
                        "nvlink": hw.nvlink,
                        "p2p_gbps": hw.p2p_rate,
                        "budget_gib": budget,
                        "degree": degree,
                        "act_peak_mib": round(acts[degree] / mib, 1),
                    }
                    try:
                        plan = build_plan(ruled[degree], opts)
                    except BudgetInfeasibleError as e:
                        row.update(min_budget_gib=round(e.min_vram_bytes / gib, 3), step_ms=None)
                        rows.append(row)
                        continue
                    row.update(
                        min_budget_gib=round(plan.min_vram_bytes / gib, 3),
                        step_ms=round(plan.predicted_step_ms, 1),
                        compute_ms=round(plan.predicted_compute_ms, 1),
                        copy_stall_ms=round(plan.predicted_stall_ms, 1),
                        collective_ms=round(plan.predicted_collective_ms, 1),
                        collective_stall_ms=round(plan.predicted_collective_stall_ms, 1),
                        moved_gib=round(plan.moved_bytes_per_call / gib, 2),
                    )
                    if degree == 1:
                        base = plan.predicted_step_ms
                    row["ratio_vs_1"] = round(plan.predicted_step_ms / base, 3) if base else None
                    rows.append(row)
    cmd = "python benchmarks/bench_parallel.py --predict"
    lines = [
        f"Predicted by fxswap's cost model, not measured: {model_name} bf16, adaptive plans per rank on meta "
        "tensors (CUDA allocator rules of each card), one forward, warm start. Each rank swaps from its own "
        "host copy at the card's pinned H2D rate; all-to-alls priced on the card's link (p2p GB/s per "
        "direction; PCIe cards: through host memory, sharing the host-to-device direction with the copies). "
        "Ratio: predicted step per rank / one card's at the same budget per card.",
        f"Command: `{cmd}` (planning only; {platform.machine()}, torch {torch.__version__}).",
        "",
        "| case | card | link | budget/card GiB | ranks | smallest budget/rank GiB "
        "| activation peak/rank MiB | step ms | compute ms | copy waits ms | all-to-alls ms "
        "| waits for them ms | vs 1 card |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        link = f"{'NVLink' if r['nvlink'] else 'PCIe'} {r['p2p_gbps']:g}"
        if r["step_ms"] is None:
            tail = "below the smallest budget | | | | | |"
        else:
            tail = (
                f"{r['step_ms']:.0f} | {r['compute_ms']:.0f} | {r['copy_stall_ms']:.0f} | "
                f"{r['collective_ms']:.0f} | {r['collective_stall_ms']:.0f} | "
                + (f"{r['ratio_vs_1']:.3f}" if r["ratio_vs_1"] is not None else "-")
                + " |"
            )
        lines.append(
            f"| {r['case']} | {r['card']} | {link} | {r['budget_gib']:g} | {r['degree']} | "
            f"{r['min_budget_gib']:.2f} | {r['act_peak_mib']:.0f} | {tail}"
        )
    target = [
        r
        for r in rows
        if r["case"] == "720p81" and r["card"] == "rtx4090" and r["degree"] == 2 and r["step_ms"] is not None
    ]
    if target:
        lines += [
            "",
            "Target of the issue, 720p81 on 2 x rtx4090 <= 0.6 x one card's step at the same budget "
            "per card: "
            + "; ".join(
                f"{r['ratio_vs_1']:.3f} at {r['budget_gib']:g} GiB, link {r['p2p_gbps']:g} GB/s"
                for r in target
            )
            + " (predictions).",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"command": cmd, "model": model_name, "kind": "prediction (cost model), not measured"}
        (out_dir / "bench_parallel_predict.json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=1)
        )
        (out_dir / "bench_parallel_predict.md").write_text(text)
    return rows


def rss(ns: argparse.Namespace) -> int:
    """``--rss``: host memory of 1, 2 and 4 ranks compiling one WAN (``ulysses_degree=N``: one
    shared host copy per machine), read by rank 0 from every rank's ``/proc/<pid>/smaps_rollup``
    while the ranks run their calls (``tests/test_host_share.py`` measures the same way)."""
    import platform
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests' helpers
    from tests.test_host_share import spawn

    job = {
        "mode": "compile",
        "dim": ns.rss_dim,
        "layers": ns.rss_layers,
        "calls": 2,
        "budget_gb": ns.rss_budget_gb,
        "reference": True,
    }
    rows: list[dict[str, Any]] = []
    for world in ns.rss_ranks:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            res = spawn(world, job, Path(tmp))
        r0 = res[0]
        rows.append(
            {
                "ranks": world,
                "seconds": round(time.perf_counter() - t0, 1),
                "weights": r0["weights"],
                "base_pss": r0["base"]["pss"],
                "pss": r0["pss"],
                "rss": r0["rss"],
                "sum_pss": r0["sum_pss"],
                "sum_pss_shmem": r0["sum_pss_shmem"],
                "shared": [r["shared"] for r in res],
                # every rank's output against the uncompiled model's in the 1-rank run (bitwise)
                "bitwise_equal": {r["output"] for r in res}
                == {rows[0]["reference"] if rows else r0["reference"]},
                "reference": r0["reference"],
            }
        )
    mib = 2**20
    w = rows[0]["weights"]
    print(
        f"tiny WAN (dim {ns.rss_dim}, {ns.rss_layers} blocks, fp32): weights {w / mib:.0f} MiB; "
        f"max_vram_gb={ns.rss_budget_gb} per rank (on the CPU the device is host RAM); CPU, gloo, eager"
    )
    print("PSS and RSS in MiB, sampled by rank 0 from /proc/<pid>/smaps_rollup during 2 calls")
    print(
        "| ranks | no-weights PSS per rank | PSS per rank | RSS per rank | sum of PSS | vs 1 rank | "
        "1.1 x weights + N x constant |"
    )
    print("|---|---|---|---|---|---|---|")
    one = rows[0]["sum_pss"]
    for r in rows:
        constant = max(r["base_pss"]) + ns.rss_budget_gb * 2**30 + 128 * mib
        bound = 1.1 * w + r["ranks"] * constant
        fmt = lambda xs: ", ".join(f"{x / mib:.0f}" for x in xs)  # noqa: E731
        print(
            f"| {r['ranks']} | {fmt(r['base_pss'])} | {fmt(r['pss'])} | {fmt(r['rss'])} | "
            f"{r['sum_pss'] / mib:.0f} | {r['sum_pss'] / one:.3f}x | {bound / mib:.0f} |"
        )
    out = Path(__file__).resolve().parent / "results" / "bench_parallel_rss.json"
    command = (
        f"python benchmarks/bench_parallel.py --rss --rss-dim {ns.rss_dim} --rss-layers {ns.rss_layers} "
        f"--rss-budget-gb {ns.rss_budget_gb} --rss-ranks {' '.join(map(str, ns.rss_ranks))}"
    )
    run = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "constant": "per rank: its PSS with the model on meta (measured) + max_vram_gb + 128 MiB",
        "rows": rows,
    }
    # one entry per model size: runs of other sizes are kept
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    runs = [r for r in runs if r["command"].split("--rss-ranks")[0] != command.split("--rss-ranks")[0]]
    out.write_text(json.dumps({"runs": [*runs, run]}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=128, help="video height and width (pixels)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="process counts beside 1")
    ap.add_argument(
        "--predict", action="store_true", help="predicted WAN 14B steps per rank instead (predict())"
    )
    ap.add_argument("--rss", action="store_true", help="measure host RSS/PSS of 1/2/4 ranks instead")
    ap.add_argument("--rss-dim", type=int, default=1024)
    ap.add_argument("--rss-layers", type=int, default=18)
    ap.add_argument("--rss-budget-gb", type=float, default=0.1)
    ap.add_argument("--rss-ranks", type=int, nargs="+", default=[1, 2, 4])
    ns = ap.parse_args(argv)
    if ns.predict:
        predict(out_dir=Path(__file__).resolve().parent / "results")
        return 0
    if ns.rss:
        return rss(ns)
    args = {"calls": ns.calls, "frames": ns.frames, "size": ns.size, "layers": ns.layers}
    rows = [("1 process", 1, ns.threads, run(1, ns.threads, args))]
    for world in ns.ranks:
        # the machine's threads in one process: the fair baseline for `world` processes
        rows.append(("1 process", 1, world * ns.threads, run(1, world * ns.threads, args)))
        rows.append((f"{world} processes", world, ns.threads, run(world, ns.threads, args)))
    base = max(r["seconds"] for r in rows[0][3])
    kib = 2**10
    print(f"tiny WAN (dim 128, 4 heads, {ns.layers} blocks), {ns.frames} frames at {ns.size}x{ns.size}")
    print("CPU, gloo; peaks in KiB per rank: measured (oracle) / plan / the plan's activations")
    print("| setting | threads/process | s/call | speed-up vs 1 process | measured | plan | activations |")
    print("|---|---|---|---|---|---|---|")
    for name, _, threads, res in rows:
        secs = max(r["seconds"] for r in res)
        peaks = ", ".join(f"{r['peak'] / kib:.0f}" for r in res)
        plans = ", ".join(f"{r['plan_peak'] / kib:.0f}" for r in res)
        acts = ", ".join(f"{r['act_peak'] / kib:.0f}" for r in res)
        print(f"| {name} | {threads} | {secs:.3f} | {base / secs:.2f}x | {peaks} | {plans} | {acts} |")
    import platform

    out = Path(__file__).resolve().parent / "results" / "bench_parallel.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_parallel",
                "command": "python benchmarks/bench_parallel.py " + " ".join(argv or []),
                "machine": {
                    "platform": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    "torch": torch.__version__,
                    "load_average": os.getloadavg(),
                },
                "settings": args | {"threads": ns.threads},
                "rows": [
                    {"setting": name, "processes": world, "threads_per_process": threads, "ranks": res}
                    for name, world, threads, res in rows
                ],
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
