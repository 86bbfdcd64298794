"""Plots (optional extra ``fxswap[plot]``: matplotlib): a plan's memory timeline and the bench chart.

matplotlib is imported inside the functions so that ``import fxswap.bench.plots`` costs nothing and a
missing matplotlib fails with an ImportError that says how to install it, only when a plot is asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fxswap.ir import GraphIR

if TYPE_CHECKING:
    from fxswap.bench.rows import BenchRow
    from fxswap.swapplan import SwapPlan

__all__ = ["plot_bench", "plot_timeline", "timeline_parts"]

GiB = 2**30


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never open a window
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            f"plots need matplotlib, which is not installed ({exc}); "
            "install it with `pip install 'fxswap[plot]'`"
        ) from None
    return plt


def timeline_parts(plan: SwapPlan, ir: GraphIR) -> dict[str, list[int]]:
    """Per-op bytes of a plan split into what the plot stacks, from the one memory simulator.

    Returns:
        ``reserve``, ``resident``, ``in_flight`` (swapped units loaded but not yet waited for:
        ``load_at <= i < wait_at``), ``swapped_live`` (``wait_at <= i <= release_after``),
        ``act`` and ``total``. ``total`` is :func:`fxswap.passes.simulate.simulate_memory`'s.
    """
    from fxswap.passes.liveness import activation_profile
    from fxswap.passes.simulate import UnitWindow, simulate_memory, unit_windows

    if plan.num_ops != len(ir.ops):
        raise ValueError(
            f"plan has num_ops={plan.num_ops} but the graph has {len(ir.ops)} ops; plot the plan with the "
            "graph it was made for"
        )
    act = activation_profile(ir)
    n = len(act)
    windows = unit_windows(plan.units)
    flight = [
        UnitWindow(w.bytes, False, w.load_at, w.wait_at, w.wait_at - 1)
        for w in windows
        if not w.resident and w.wait_at > w.load_at
    ]
    full = simulate_memory(act, windows, plan.reserve_bytes)
    zeros = [0] * n
    in_flight = list(simulate_memory(zeros, flight, 0).swapped) if n else []
    live = [s - f for s, f in zip(full.swapped, in_flight, strict=True)]
    return {
        "reserve": [plan.reserve_bytes] * n,
        "resident": [full.resident_bytes] * n,
        "in_flight": in_flight,
        "swapped_live": live,
        "act": list(act),
        "total": [full.total(i) for i in range(n)],
    }


def plot_timeline(plan: SwapPlan, ir: GraphIR, path: str | Path) -> None:
    """Memory over the graph for ``plan`` as a png: budget line, resident, in flight, activations.

    Args:
        plan: a plan made for ``ir``.
        ir: the captured graph.
        path: the png to write.
    """
    plt = _pyplot()
    parts = timeline_parts(plan, ir)
    x = list(range(len(parts["act"])))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    stack = [
        ("reserve", "reserve (workspace)", "#bbbbbb"),
        ("resident", "resident weights", "#4c72b0"),
        ("swapped_live", "swapped units in use", "#55a868"),
        ("in_flight", "swapped units in flight", "#dd8452"),
        ("act", "activations", "#c44e52"),
    ]
    ax.stackplot(
        x,
        *[[v / GiB for v in parts[k]] for k, _, _ in stack],
        labels=[label for _, label, _ in stack],
        colors=[c for _, _, c in stack],
        step="post",
    )
    ax.axhline(plan.max_vram_bytes / GiB, color="black", linestyle="--", linewidth=1.2, label="budget")
    ax.axhline(plan.peak_bytes / GiB, color="black", linestyle=":", linewidth=0.8, label="simulated peak")
    ax.set_xlabel("op (execution order)")
    ax.set_ylabel("GiB on the device")
    ax.set_xlim(0, max(1, len(x) - 1))
    ax.set_title(
        f"fxswap {plan.mode} ({plan.partition}, depth {plan.prefetch_depth}): peak "
        f"{plan.peak_bytes / GiB:.2f} / {plan.max_vram_bytes / GiB:.2f} GiB, "
        f"{plan.moved_bytes_per_call / GiB:.2f} GiB moved per call"
    )
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


DEFAULT_PANELS: tuple[tuple[str, str, int, str], ...] = (
    ("rtx4090", "832x480", 81, "bf16"),
    ("h100-sxm", "832x480", 17, "bf16"),
)


def plot_bench(
    rows: Sequence[BenchRow],
    path: str | Path,
    panels: Sequence[tuple[str, str, int, str]] = DEFAULT_PANELS,
) -> None:
    """Grouped bars of the slowdown over resident compute (%), one panel per model and setting.

    Each panel row is one (card, resolution, frames, dtype) of ``panels``; a row of the figure per
    setting present in ``rows`` (if none is present, the first row's setting is used). One group
    per budget, one bar per policy; a policy over budget is drawn as a hatched stub labelled OOM.
    The physical bound is a black tick per budget.
    """
    plt = _pyplot()
    present = [p for p in panels if any((r.card, r.resolution, r.frames, r.dtype) == p for r in rows)]
    if not present and rows:
        present = [(rows[0].card, rows[0].resolution, rows[0].frames, rows[0].dtype)]
    models = list(dict.fromkeys(r.model for r in rows))
    policies = list(dict.fromkeys(r.policy for r in rows))
    nrow, ncol = max(1, len(present)), max(1, len(models))
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(7.0, 4.2 * ncol), 3.6 * nrow), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for pi, (card, resolution, frames, dtype) in enumerate(present):
        sel = [
            r for r in rows if (r.card, r.resolution, r.frames, r.dtype) == (card, resolution, frames, dtype)
        ]
        for mi, model in enumerate(models):
            ax = axes[pi][mi]
            mrows = [r for r in sel if r.model == model]
            budgets = sorted({r.budget_gb for r in mrows})
            width = 0.8 / max(1, len(policies))
            top = 1.0
            for j, pol in enumerate(policies):
                xs, ys, oom = [], [], []
                for i, b in enumerate(budgets):
                    r = next((r for r in mrows if r.budget_gb == b and r.policy == pol), None)
                    if r is None:
                        continue
                    x = i + (j - (len(policies) - 1) / 2) * width
                    if r.feasible and r.step_ms is not None:
                        xs.append(x)
                        ys.append((r.step_ms / r.resident_compute_ms - 1) * 100)
                    else:
                        oom.append(x)
                top = max([top, *ys])
                ax.bar(xs, ys, width, color=cmap(j % 10), label=pol if pi == 0 and mi == 0 else None)
                for x in oom:
                    ax.text(
                        x, 0, "OOM", rotation=90, ha="center", va="bottom", fontsize=6, color=cmap(j % 10)
                    )
            for i, b in enumerate(budgets):
                r = next((r for r in mrows if r.budget_gb == b), None)
                if r is not None and r.bound_ms is not None:
                    ax.plot(
                        [i - 0.42, i + 0.42],
                        [(r.bound_ms / r.resident_compute_ms - 1) * 100] * 2,
                        "k-",
                        linewidth=1.2,
                        label="physical bound" if pi == 0 and mi == 0 and i == 0 else None,
                    )
            ax.set_ylim(0, top * 1.1)
            ax.set_xticks(range(len(budgets)))
            ax.set_xticklabels([f"{b:g} GiB" for b in budgets], fontsize=8)
            ax.set_title(f"{model}: {card}, {resolution}x{frames}, {dtype}", fontsize=8)
            if mi == 0:
                ax.set_ylabel("% slower than resident compute")
    fig.legend(loc="lower center", ncol=min(9, len(policies) + 1), fontsize=7)
    fig.suptitle(
        "fxswap bench --sim: predicted step time over the all-resident compute time (lower is better)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
