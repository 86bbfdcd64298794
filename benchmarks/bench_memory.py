"""Measured peak against the plan, for every (model, backend, mode, budget): the budget issue's table.

"Measured" is the CPU allocator's own account (``torch.profiler`` allocation events through
:mod:`fxswap.oracle`) of one call made right after ``release()`` (so the resident weights are
allocated inside it), plus the caller's inputs. "Planned" is ``plan.peak_bytes``. Budgets: the
minimum fxswap reports for the mode and backend, two points between it and all-resident, and
all-resident; ``reserve_mb=0``. The models are the property test's (``tests/test_budget_measured.py``).

    python benchmarks/bench_memory.py                       # every model, both backends
    python benchmarks/bench_memory.py --backends eager --models mlp,tied

Writes ``benchmarks/results/bench_memory.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fxswap.errors import BudgetInfeasibleError  # noqa: E402
from tests.test_budget_measured import CASES, MODES, Case, compiled, measured_peak  # noqa: E402

GiB = 2**30


def minimum(c: Case, mode: str, backend: str) -> int:
    try:
        compiled(c, mode, 1, backend)(*c.args, **c.kwargs)
    except BudgetInfeasibleError as e:
        return e.min_vram_bytes
    raise AssertionError("a 1-byte budget was accepted")


def rows_for(name: str, c: Case, backend: str, mode: str) -> list[dict[str, object]]:
    lo = minimum(c, mode, backend)
    full = compiled(c, mode, 1 << 40, backend)
    with torch.no_grad():
        full(*c.args, **c.kwargs)
    assert full.plan is not None
    hi = max(lo, full.plan.peak_bytes)
    out = []
    for label, budget in (
        ("min", lo),
        ("1/3", lo + (hi - lo) // 3),
        ("2/3", lo + 2 * (hi - lo) // 3),
        ("all", hi),
    ):
        s = compiled(c, mode, budget, backend)
        got = measured_peak(s, c)
        assert s.plan is not None
        planned = s.plan.peak_bytes
        out.append(
            dict(
                model=name,
                backend=backend,
                mode=mode,
                budget=label,
                budget_bytes=budget,
                planned_bytes=planned,
                measured_bytes=got,
                ratio=got / planned,
                within_budget=planned <= budget,
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(CASES))
    ap.add_argument("--backends", default="eager,inductor")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="bench_memory", help="file name (without suffix) of the results")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows: list[dict[str, object]] = []
    for name in a.models.split(","):
        torch.manual_seed(0)
        c = CASES[name]()
        c.model.eval().requires_grad_(False)
        for backend in a.backends.split(","):
            for mode in MODES:
                rows += rows_for(name, c, backend, mode)
                got = ", ".join(f"{r['ratio']:.3f}" for r in rows[-4:])
                print(f"{name} {backend} {mode}: {got}", flush=True)
                write(a.out, a.name, rows, t0, finished=False)
    write(a.out, a.name, rows, t0, finished=True)
    return 0


def write(out: Path, name: str, rows: list[dict[str, object]], t0: float, *, finished: bool) -> None:
    """Results so far (rewritten after every group, so a cut run keeps what it measured)."""
    ratios = [float(r["ratio"]) for r in rows]  # type: ignore[arg-type]
    head = {
        "hardware": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        "rows": len(rows),
        "worst_measured_over_planned": max(ratios),
        "best_measured_over_planned": min(ratios),
        "all_plans_within_budget": all(bool(r["within_budget"]) for r in rows),
        "seconds": round(time.perf_counter() - t0, 1),
        "finished": finished,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"summary": head, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Measured peak / planned peak (CPU allocator events; reserve_mb=0)",
        "",
        f"`python benchmarks/bench_memory.py` on {head['hardware']}"
        f"{'' if finished else ' (cut short: the rows so far)'}: {head['rows']} rows in "
        f"{head['seconds']} s; worst measured/planned {head['worst_measured_over_planned']:.4f}, "
        f"best {head['best_measured_over_planned']:.4f}; every plan within its budget: "
        f"{head['all_plans_within_budget']}.",
        "",
        "| model | backend | mode | min | 1/3 | 2/3 | all-resident |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in range(0, len(rows), 4):
        grp = rows[k : k + 4]
        r0 = grp[0]
        cells = " | ".join(f"{float(r['ratio']):.3f}" for r in grp)  # type: ignore[arg-type]
        lines.append(f"| {r0['model']} | {r0['backend']} | {r0['mode']} | {cells} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    if finished:
        print("\n".join(lines[:3]))


if __name__ == "__main__":
    raise SystemExit(main())
