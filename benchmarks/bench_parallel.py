"""Sequence parallelism on this machine: a tiny WAN on 1 and 2 processes (CPU, gloo), measured.

Per setting: processes started with ``torch.multiprocessing`` (spawn), each with ``--threads``
intra-op threads, compile the same model with ``fxswap.compile(..., backend="eager",
ulysses_degree=N)`` (N = 1: plain ``fxswap.compile``), run one call to build, then time
``--calls`` calls (wall time of the slowest rank, between barriers) and measure one more call's
allocator peak with :mod:`fxswap.oracle` (plus the inputs). The speed-up is against the 1-process
run with the same threads per process, in the same invocation. With 2 processes the machine runs
twice the threads: the 1-process run with ``2 * threads`` threads is printed too, the fair baseline.

These are CPU and gloo figures: they show the pass works and each rank's memory falls, not what
NVLink or PCIe GPUs would gain.

Usage: ``python benchmarks/bench_parallel.py [--threads 1] [--calls 5] [--frames 17] [--size 128]``

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
    ap.add_argument("--rss", action="store_true", help="measure host RSS/PSS of 1/2/4 ranks instead")
    ap.add_argument("--rss-dim", type=int, default=1024)
    ap.add_argument("--rss-layers", type=int, default=18)
    ap.add_argument("--rss-budget-gb", type=float, default=0.1)
    ap.add_argument("--rss-ranks", type=int, nargs="+", default=[1, 2, 4])
    ns = ap.parse_args(argv)
    if ns.rss:
        return rss(ns)
    args = {"calls": ns.calls, "frames": ns.frames, "size": ns.size, "layers": ns.layers}
    rows = [
        ("1 process", ns.threads, run(1, ns.threads, args)),
        ("1 process", 2 * ns.threads, run(1, 2 * ns.threads, args)),
        ("2 processes", ns.threads, run(2, ns.threads, args)),
    ]
    base = max(r["seconds"] for r in rows[0][2])
    kib = 2**10
    print(f"tiny WAN (dim 128, 4 heads, {ns.layers} blocks), {ns.frames} frames at {ns.size}x{ns.size}")
    print("CPU, gloo; peaks in KiB per rank: measured (oracle) / plan / the plan's activations")
    print("| setting | threads/process | s/call | speed-up vs 1 process | measured | plan | activations |")
    print("|---|---|---|---|---|---|---|")
    for name, threads, res in rows:
        secs = max(r["seconds"] for r in res)
        peaks = ", ".join(f"{r['peak'] / kib:.0f}" for r in res)
        plans = ", ".join(f"{r['plan_peak'] / kib:.0f}" for r in res)
        acts = ", ".join(f"{r['act_peak'] / kib:.0f}" for r in res)
        print(f"| {name} | {threads} | {secs:.3f} | {base / secs:.2f}x | {peaks} | {plans} | {acts} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
