"""Speed of capture and planning for WAN 14B at 480p, 81 frames, on meta tensors (no GPU, no weights).

Measures, on this machine:
- ``cli_wall_s``: the whole ``fxswap plan`` command (a child process: interpreter start, imports,
  meta build, capture, planning, summary, JSON) with an empty graph cache, target <= 60 s;
- ``cli_wall_cached_s``: the same command again, the graph read from the cache it wrote (median of
  ``--repeat`` runs), target <= 2 s. This is the torch-free path (``fxswap.cli_cache``): the
  command's own key, no ``import torch``;
- ``cli_wall_cached_torch_s``: the same, with ``fxswap plan``'s own entries removed before each run so
  that it goes the torch path (import torch, build the meta model, read the graph cache): the
  baseline of the figure above, measured in the same spell;
- ``cli_import_s`` / ``cli_imports_torch``: what ``python -X importtime`` counts for the imports of
  one cached run (the sum of its top-level imports) and whether any of them is torch;
  ``torch_import_s``: ``import torch`` alone in a fresh interpreter (median of ``--repeat``): what
  the torch path pays on top;
- ``cli_peak_rss_mb``: that child's peak resident set (``ru_maxrss`` from ``wait4``), target <= 2048;
- ``capture_s``: ``fxswap.trace`` of the meta model in this process;
- ``plan_s``: ``build_plan`` on the captured IR (median of ``--repeat`` runs), target <= 1 s.

Prints one JSON line. Usage: ``python benchmarks/bench_plan.py [--repeat 3] [--mode adaptive]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = "wan2.1-t2v-14b"


def _cli_args(mode: str, budget_gb: float, out: str) -> list[str]:
    return [
        "plan", "--model", MODEL, "--resolution", "832x480", "--frames", "81",
        "--max-vram-gb", str(budget_gb), "--block-size-mb", "300", "--mode", mode, "-o", out,
    ]  # fmt: skip


def _run_cli(mode: str, budget_gb: float, cache: str) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit status) of one ``fxswap plan`` child process."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fxswap.cli", *_cli_args(mode, budget_gb, f"{tmp}/plan.json")]
        start = time.perf_counter()
        env = dict(os.environ, FXSWAP_CACHE_DIR=cache)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise SystemExit(f"`{' '.join(cmd)}` failed with status {proc.returncode}: {err}")
    return wall, usage.ru_maxrss / 1024, proc.returncode  # Linux reports ru_maxrss in KiB


def _import_profile(mode: str, budget_gb: float, cache: str) -> tuple[float, bool]:
    """(seconds of top-level imports, whether torch is among them) of one cached ``fxswap plan``,
    from ``python -X importtime`` (which adds its own overhead: read it as an upper bound)."""
    with tempfile.TemporaryDirectory() as tmp:
        code = "import sys; from fxswap.cli import main; sys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-X", "importtime", "-c", code, *_cli_args(mode, budget_gb, f"{tmp}/p.json")]
        env = dict(os.environ, FXSWAP_CACHE_DIR=cache)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    total, torch = 0, False
    # "import time: self [us] | cumulative | imported package"; a top-level import has no indent
    for m in re.finditer(r"^import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)$", proc.stderr, re.MULTILINE):
        torch |= m.group(3).split(".")[0] == "torch"
        if not m.group(2):
            total += int(m.group(1))
    return total / 1e6, torch


def _torch_import() -> float:
    code = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="planning runs (median reported)")
    parser.add_argument("--mode", default="adaptive", choices=("layerwise", "chunkwise", "adaptive"))
    parser.add_argument("--max-vram-gb", type=float, default=16.0)
    args = parser.parse_args()

    # The child runs first, so that it does not compete with this process's own capture for the CPUs.
    repeat = max(1, args.repeat)
    with tempfile.TemporaryDirectory() as cache:
        cli_wall, cli_rss, _ = _run_cli(args.mode, args.max_vram_gb, cache)
        cached, cached_torch = [], []
        # interleaved, so that both see the same spells of a shared machine
        for _ in range(repeat):
            cached.append(_run_cli(args.mode, args.max_vram_gb, cache)[0])
            shutil.rmtree(os.path.join(cache, "plan"))  # fxswap plan's own entries: the torch path
            cached_torch.append(_run_cli(args.mode, args.max_vram_gb, cache)[0])
        import_s, imports_torch = _import_profile(args.mode, args.max_vram_gb, cache)
    cli_cached = statistics.median(cached)
    cli_cached_torch = statistics.median(cached_torch)
    torch_import = [_torch_import() for _ in range(repeat)]

    import torch

    from fxswap.api import make_options
    from fxswap.capture import trace
    from fxswap.models import wan
    from fxswap.passes.planner import build_plan

    model = wan.build(MODEL, device="meta", dtype=torch.bfloat16)
    inputs = wan.example_inputs(MODEL, frames=81, height=480, width=832, device="meta", dtype=torch.bfloat16)
    start = time.perf_counter()
    traced = trace(model, **inputs)
    capture = time.perf_counter() - start

    options = make_options(mode=args.mode, max_vram_gb=args.max_vram_gb, block_size_mb=300)
    times = []
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        plan = build_plan(traced.ir, options)
        times.append(time.perf_counter() - start)
    plan_s = statistics.median(times)

    print(
        json.dumps(
            {
                "bench": "plan",
                "model": MODEL,
                "input": "832x480, 81 frames, batch 1, bf16, meta",
                "mode": args.mode,
                "max_vram_gb": args.max_vram_gb,
                "ops": len(traced.ir.ops),
                "weights": len(traced.ir.weights),
                "capture_s": round(capture, 2),
                "plan_s": round(plan_s, 3),
                "plan_s_all": [round(t, 3) for t in times],
                "cli_wall_s": round(cli_wall, 2),
                "cli_peak_rss_mb": round(cli_rss, 1),
                "cli_wall_cached_s": round(cli_cached, 2),
                "cli_wall_cached_all": [round(t, 2) for t in cached],
                "cli_wall_cached_ok": cli_cached <= 2.0,
                "cli_wall_cached_torch_s": round(cli_cached_torch, 2),
                "cli_wall_cached_torch_all": [round(t, 2) for t in cached_torch],
                "cli_cached_speedup": round(cli_cached_torch / cli_cached, 2),
                "cli_import_s": round(import_s, 3),
                "cli_imports_torch": imports_torch,
                "torch_import_s": round(statistics.median(torch_import), 2),
                "torch_import_all": [round(t, 2) for t in torch_import],
                "plan_ok": plan_s <= 1.0,
                "cli_wall_ok": cli_wall <= 60.0,
                "rss_ok": cli_rss <= 2048.0,
                "peak_gib": round(plan.peak_bytes / 2**30, 2),
                "units": len(plan.units),
                "cpu_count": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
