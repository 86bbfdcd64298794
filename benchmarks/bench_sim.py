"""The full `fxswap bench --sim` table: WAN 1.3B / 5B / 14B / A14B x 480p81, 720p81, 480p17 x bf16, fp8
x 12/16/20/24 GiB x every built-in card, every policy.

    python benchmarks/bench_sim.py                 # capture (cached in ~/.cache/fxswap/ir), plan, write
    python benchmarks/bench_sim.py --from-json     # re-render md/chart from results/bench_sim.json
    python benchmarks/bench_sim.py --slow-link     # stress: transfer-bound regime (see below)

Every built-in card is compute-bound on these WAN settings (PCIe 4/5 pinned copies hide behind the
block compute), so the main table hardly tests the schedule's overlap. ``--slow-link`` runs 1.3B, 5B
and 14B at 480p (17 and 81 frames) on a hypothetical H100 behind an 8 GB/s pinned link with 24 GiB
(written to results/slowlink_profile.json), where copies dominate; outputs bench_sim_slowlink.*.

Outputs in benchmarks/results/: bench_sim.json, bench_sim.csv, bench_sim.md, bench_chart.png and
readme_table.md (the README excerpt: 14B 480p81/480p17 and 1.3B 480p17, bf16, consumer cards + H100).
Captured graphs are cached as JSON keyed by config, size and capture source (see fxswap.bench.graphs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fxswap.bench.report import read_json, readme_table, write_markdown
from fxswap.bench.runner import add_bench_arguments, run_bench

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def timeline_example(cache_dir: str | None) -> None:
    """results/timeline_14b_480p81_16gb.png: the adaptive plan of WAN 14B bf16 at 480p81, 16 GiB, RTX 4090."""
    from fxswap.bench.costmodel import plan_rates
    from fxswap.bench.graphs import load_wan_ir
    from fxswap.bench.hardware import PROFILES
    from fxswap.bench.plots import plot_timeline
    from fxswap.passes.planner import build_plan
    from fxswap.swapplan import PlanOptions

    ir = load_wan_ir("wan2.1-t2v-14b", "480p81", Path(cache_dir) if cache_dir else None)
    rates = plan_rates(PROFILES["rtx4090"])
    opts = PlanOptions(
        mode="adaptive",
        max_vram_bytes=16 * 2**30,
        h2d_gbps=rates["h2d_gbps"],
        compute_tflops=rates["compute_tflops"],
        device_mem_gbps=rates["device_mem_gbps"],
    )
    plan = build_plan(ir, opts)
    plot_timeline(plan, ir, RESULTS / "timeline_14b_480p81_16gb.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_bench_arguments(parser)
    parser.add_argument("--from-json", action="store_true", help="re-render md and chart from the saved JSON")
    parser.add_argument("--slow-link", action="store_true", help="the transfer-bound stress table instead")
    parser.add_argument(
        "--compare-gpu-check",
        default=None,
        metavar="GPU_CHECK.json",
        help="predict the models of a benchmarks/gpu_check.py report on --cards (one card) "
        "and write results/sim_vs_gpu.json with the error per variant",
    )
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        rows = read_json(RESULTS / "bench_sim.json")
        (RESULTS / "readme_table.md").write_text(readme_table(rows) + "\n")
        timeline_example(args.cache_dir or str(Path.home() / ".cache" / "fxswap" / "ir"))
        write_markdown(rows, RESULTS / "bench_sim.md", header="# fxswap bench --sim (re-rendered)\n")
        try:
            from fxswap.bench.plots import plot_bench

            plot_bench(rows, RESULTS / "bench_chart.png")
        except ImportError as exc:
            print(f"chart skipped: {exc}", file=sys.stderr)
        return 0
    args.sim = True
    if args.compare_gpu_check:
        import json

        from fxswap.bench.gpu_compare import compare_with_gpu_check
        from fxswap.bench.hardware import get_profile

        report = json.loads(Path(args.compare_gpu_check).read_text())
        cmp = compare_with_gpu_check(report, get_profile(args.cards.split(",")[0]))
        (RESULTS / "sim_vs_gpu.json").write_text(json.dumps(cmp, indent=1) + "\n")
        for c in cmp:
            print(c)
        return 0
    if args.slow_link:
        from dataclasses import replace

        from fxswap.bench.hardware import PROFILES, save_profile

        prof = replace(
            PROFILES["h100-sxm"],
            name="h100-sxm-slowlink-8gbps",
            pinned_h2d_gbps=8.0,
            pageable_h2d_gbps=4.0,
            vram_bytes=24 * 2**30,
            sources={"all": "hypothetical: h100-sxm compute behind an 8 GB/s link, for stress"},
        )
        save_profile(prof, RESULTS / "slowlink_profile.json")
        args.cards = str(RESULTS / "slowlink_profile.json")
        args.models = "wan2.1-t2v-1.3b,wan2.2-ti2v-5b,wan2.1-t2v-14b"
        args.cases = "480p17,480p81"
        stem = "bench_sim_slowlink"
        args.json, args.csv, args.md = (str(RESULTS / f"{stem}.{ext}") for ext in ("json", "csv", "md"))
        args.chart = str(RESULTS / "bench_chart_slowlink.png")
    args.cache_dir = args.cache_dir or str(Path.home() / ".cache" / "fxswap" / "ir")
    args.json = args.json or str(RESULTS / "bench_sim.json")
    args.csv = args.csv or str(RESULTS / "bench_sim.csv")
    args.md = args.md or str(RESULTS / "bench_sim.md")
    args.chart = args.chart or str(RESULTS / "bench_chart.png")
    t0 = time.perf_counter()
    rc = run_bench(args)
    if rc == 0 and not args.slow_link:
        (RESULTS / "readme_table.md").write_text(readme_table(read_json(args.json)) + "\n")
        timeline_example(args.cache_dir)
    print(f"bench_sim: {time.perf_counter() - t0:.1f} s wall", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
