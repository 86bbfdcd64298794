"""``fxswap bench --sim``: the command. Reads the arguments, runs every setting, prints and writes the rows.

What a row is and how it is predicted: :mod:`fxswap.bench.rows`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from fxswap.bench.graphs import CASES, case_size, fp8_ir, load_wan_ir
from fxswap.bench.hardware import PROFILES, get_profile
from fxswap.bench.peers import PEER_POLICIES
from fxswap.bench.report import format_table, summarize, summary_text, write_csv, write_json, write_markdown
from fxswap.bench.rows import FXSWAP_POLICIES, BenchRow, bench_graph
from fxswap.errors import FxswapError

__all__ = ["DEFAULT_MODELS", "add_bench_arguments", "run_bench"]

DEFAULT_MODELS = ("wan2.1-t2v-1.3b", "wan2.2-ti2v-5b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b")
DEFAULT_BUDGETS_GB = (12.0, 16.0, 20.0, 24.0)


def _csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fxswap bench``; :mod:`fxswap.cli` adds them to its ``bench`` subcommand."""
    parser.add_argument(
        "--sim",
        action="store_true",
        help="predict with the simulator (required: measured benches are the runtime's)",
    )
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated WAN config names")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated from {', '.join(CASES)}")
    parser.add_argument("--dtypes", default="bf16,fp8", help="bf16 and/or fp8")
    parser.add_argument(
        "--budgets-gb",
        default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS_GB),
        help="comma-separated budgets in GiB",
    )
    parser.add_argument(
        "--cards",
        default=",".join(PROFILES),
        help="comma-separated profile names or calibrated profile JSON paths",
    )
    parser.add_argument(
        "--policies",
        default=",".join(FXSWAP_POLICIES + PEER_POLICIES),
        help="comma-separated policies to simulate (default: all of "
        f"{', '.join(FXSWAP_POLICIES + PEER_POLICIES)})",
    )
    parser.add_argument("--reserve-mb", type=float, default=256.0, help="workspace reserve, MiB")
    parser.add_argument("--block-size-mb", type=float, default=300.0, help="chunkwise block size, MiB")
    parser.add_argument("--cache-dir", default=None, help="cache captured graphs as JSON here")
    parser.add_argument("--json", default=None, help="write the rows as JSON")
    parser.add_argument("--csv", default=None, help="write the rows as CSV")
    parser.add_argument("--md", default=None, help="write the table and summary as markdown")
    parser.add_argument("--chart", default=None, help="write a bar chart png (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")


def run_bench(args: argparse.Namespace) -> int:
    """Run ``fxswap bench --sim``; returns the exit status (2 on bad arguments)."""
    if not args.sim:
        print("fxswap bench: only --sim is implemented (predicted, no GPU); pass --sim", file=sys.stderr)
        return 2
    try:
        cards = [get_profile(c) for c in _csv_list(args.cards)]
        dtypes = _csv_list(args.dtypes)
        bad = [d for d in dtypes if d not in ("bf16", "fp8")]
        if bad:
            raise FxswapError(f"--dtypes has {bad}; use bf16 and/or fp8")
        budgets = [float(b) for b in _csv_list(args.budgets_gb)]
        if any(not (b > 0 and math.isfinite(b)) for b in budgets):
            raise FxswapError(
                f"--budgets-gb={args.budgets_gb!r}: every budget must be a positive number of GiB"
            )
        cases = _csv_list(args.cases)
        for c in cases:
            if c not in CASES:
                raise FxswapError(f"--cases has {c!r}; use one of {', '.join(CASES)}")
        policies = _csv_list(args.policies)
        models = _csv_list(args.models)
    except (FxswapError, ValueError) as exc:
        print(f"fxswap bench: {exc}", file=sys.stderr)
        return 2
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    rows: list[BenchRow] = []
    t0 = time.perf_counter()
    try:
        for model in models:
            experts = 2 if "a14b" in model else 1
            for case in cases:
                t_cap = time.perf_counter()
                ir16 = load_wan_ir(model, case, cache_dir)
                t_cap = time.perf_counter() - t_cap
                width, height, frames = case_size(model, case)
                for dtype in dtypes:
                    t_b = time.perf_counter()
                    ir = ir16 if dtype == "bf16" else fp8_ir(ir16)
                    rows += bench_graph(
                        ir,
                        model=model,
                        resolution=f"{width}x{height}",
                        frames=frames,
                        dtype=dtype,
                        cards=cards,
                        budgets_gb=budgets,
                        policies=policies,
                        reserve_bytes=round(args.reserve_mb * 2**20),
                        block_size_bytes=round(args.block_size_mb * 2**20),
                        experts=experts,
                    )
                    print(
                        f"[bench] {model} {case} {dtype}: capture {t_cap:.1f} s, "
                        f"bench {time.perf_counter() - t_b:.1f} s",
                        file=sys.stderr,
                    )
    except FxswapError as exc:
        print(f"fxswap bench: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    if not args.quiet:
        print(format_table(rows))
    print(summary_text(summarize(rows)))
    print(f"{len(rows)} rows in {elapsed:.1f} s")
    if args.json:
        write_json(rows, args.json)
    if args.csv:
        write_csv(rows, args.csv)
    if args.md:
        write_markdown(rows, args.md, header=f"# fxswap bench --sim\n\n{len(rows)} rows, {elapsed:.0f} s.\n")
    if args.chart:
        try:
            from fxswap.bench.plots import plot_bench
        except ImportError as exc:  # matplotlib is the optional "plot" extra
            print(
                f"fxswap bench: --chart needs matplotlib (pip install fxswap[plot]): {exc}", file=sys.stderr
            )
            return 2
        plot_bench(rows, args.chart)
    return 0
