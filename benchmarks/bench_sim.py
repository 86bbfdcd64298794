"""The full `fxswap bench --sim` table: WAN 1.3B / 5B / 14B / A14B x 480p81, 720p81, 480p17 x bf16, fp8
x 12/16/20/24 GiB x every built-in card, every policy.

    python benchmarks/bench_sim.py                 # capture (cached in ~/.cache/fxswap/ir), plan, write
    python benchmarks/bench_sim.py --from-json     # re-render md/chart from results/bench_sim.json

Outputs in benchmarks/results/: bench_sim.json, bench_sim.csv, bench_sim.md, bench_chart.png.
Captured graphs are cached as JSON keyed by config, size and capture source (see fxswap.bench).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fxswap.bench import add_bench_arguments, read_json, run_bench, write_markdown

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_bench_arguments(parser)
    parser.add_argument("--from-json", action="store_true", help="re-render md and chart from the saved JSON")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        rows = read_json(RESULTS / "bench_sim.json")
        write_markdown(rows, RESULTS / "bench_sim.md", header="# fxswap bench --sim (re-rendered)\n")
        try:
            from fxswap.plots import plot_bench

            plot_bench(rows, RESULTS / "bench_chart.png")
        except ImportError as exc:
            print(f"chart skipped: {exc}", file=sys.stderr)
        return 0
    args.sim = True
    args.cache_dir = args.cache_dir or str(Path.home() / ".cache" / "fxswap" / "ir")
    args.json = args.json or str(RESULTS / "bench_sim.json")
    args.csv = args.csv or str(RESULTS / "bench_sim.csv")
    args.md = args.md or str(RESULTS / "bench_sim.md")
    args.chart = args.chart or str(RESULTS / "bench_chart.png")
    t0 = time.perf_counter()
    rc = run_bench(args)
    print(f"bench_sim: {time.perf_counter() - t0:.1f} s wall", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
