"""``fxswap bench --sim``: fxswap's schedules against the peers' policies, predicted, no GPU needed.

For every model x case (resolution, frames) x dtype x card x budget, every policy (fxswap
adaptive / layerwise / chunkwise and the peers of :mod:`fxswap.passes.peers`) is scheduled on the
same captured graph and evaluated by the same memory simulator and the same two-stream time model
with the same hardware profile. A row is one policy on one such setting.

Definitions (one *call* = one forward of the traced graph = one CFG branch of one denoising step;
a CFG step is two calls, which doubles step time, compute and bytes moved alike):

- ``step_ms``: predicted time of one call (compute + stalls + whatever the policy serialises).
- ``resident_compute_ms``: the same call with every weight resident (no copies).
- ``bound_ms``: :func:`fxswap.costmodel.physical_bound` for the row's budget.
- ``peak_bytes``: the simulated peak; ``feasible`` is False when it exceeds the budget (peers at
  their most frugal setting) or when fxswap reports the budget infeasible (then step fields are null).
- ``moved_bytes``: host-to-device bytes per call; ``d2h_bytes`` device-to-host (WanVideoWrapper).
- fp8 rows: the bf16 graph with every 2-D ``*.weight`` (the Linear weights) at 1 byte per element,
  as ComfyUI/WVW fp8 checkpoints store them (``wan_architecture.md`` section 4); biases, norms,
  modulation and the patch-embedding conv stay 2 bytes; each Linear op holds a transient bf16 copy
  of its weight (the upcast). Compute is still priced at the bf16 rate (fp8 tensor-core matmuls are
  not modelled).
- A14B rows (``wan2.2-t2v-a14b``): one expert (the two share the architecture). The rows are per
  call of the active expert; switching experts (once per generation, at the boundary step) costs
  loading the other expert's resident set, reported separately as ``switch_ms`` = resident bytes
  / pinned H2D rate and not included in ``step_ms``.
- TI2V-5B uses a VAE stride of 16, so its "720p" case is the model's native 1280x704.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from fxswap.costmodel import graph_costs, physical_bound, plan_rates
from fxswap.errors import BudgetInfeasibleError, FxswapError
from fxswap.hardware import PROFILES, HardwareProfile, get_profile
from fxswap.ir import BufferInfo, GraphIR, InputInfo, OpInfo, WeightInfo

__all__ = [
    "CASES",
    "DEFAULT_MODELS",
    "FXSWAP_POLICIES",
    "BenchRow",
    "add_bench_arguments",
    "bench_graph",
    "compare_with_gpu_check",
    "fp8_ir",
    "format_table",
    "ir_from_json",
    "ir_to_json",
    "load_wan_ir",
    "read_json",
    "readme_table",
    "run_bench",
    "summarize",
    "write_csv",
    "write_json",
    "write_markdown",
]

GiB = 2**30
FXSWAP_POLICIES = ("fxswap-adaptive", "fxswap-layerwise", "fxswap-chunkwise")
DEFAULT_MODELS = ("wan2.1-t2v-1.3b", "wan2.2-ti2v-5b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b")
# case name -> (width, height, frames)
CASES: dict[str, tuple[int, int, int]] = {
    "480p81": (832, 480, 81),
    "720p81": (1280, 720, 81),
    "480p17": (832, 480, 17),
}
DEFAULT_BUDGETS_GB = (12.0, 16.0, 20.0, 24.0)
IR_CACHE_VERSION = 1


@dataclass(frozen=True, slots=True)
class BenchRow:
    """One policy on one (model, case, dtype, card, budget). See the module docstring."""

    model: str
    resolution: str
    frames: int
    dtype: str
    card: str
    budget_gb: float
    policy: str
    feasible: bool
    step_ms: float | None
    resident_compute_ms: float
    bound_ms: float | None
    peak_bytes: int | None
    moved_bytes: int | None
    weight_bytes: int
    d2h_bytes: int | None
    stall_ms: float | None
    resident_bytes: int | None
    switch_ms: float | None  # A14B only: loading the other expert's resident set once per generation
    setting: str  # partition/depth for fxswap, the knob value for a peer, or why it is infeasible

    @property
    def over_compute(self) -> float | None:
        return None if self.step_ms is None else self.step_ms / self.resident_compute_ms

    @property
    def over_bound(self) -> float | None:
        if self.step_ms is None or not self.bound_ms or not math.isfinite(self.bound_ms):
            return None
        return self.step_ms / self.bound_ms


# ------------------------------------------------------------------------------------------------
# Graphs: capture, cache, fp8
# ------------------------------------------------------------------------------------------------


def ir_to_json(ir: GraphIR) -> dict[str, Any]:
    """Plain JSON of a GraphIR (tuples become lists)."""
    return {
        "ops": [asdict(o) for o in ir.ops],
        "weights": [asdict(w) for w in ir.weights],
        "buffers": [asdict(b) for b in ir.buffers],
        "inputs": [asdict(i) for i in ir.inputs],
    }


def ir_from_json(data: dict[str, Any]) -> GraphIR:
    """Inverse of :func:`ir_to_json`."""
    return GraphIR(
        ops=tuple(OpInfo(**{**o, "weights": tuple(o["weights"])}) for o in data["ops"]),
        weights=tuple(WeightInfo(**{**w, "shape": tuple(w["shape"])}) for w in data["weights"]),
        buffers=tuple(BufferInfo(**b) for b in data["buffers"]),
        inputs=tuple(InputInfo(**{**i, "shape": tuple(i["shape"])}) for i in data["inputs"]),
    )


def fp8_ir(ir: GraphIR) -> GraphIR:
    """The graph with Linear weights stored at 1 byte per element (module docstring).

    The Linear weights are the 2-D ``*.weight`` tensors (in WAN every other weight is 1-D, 3-D or the
    5-D patch-embedding conv). The resizing, including the transient bf16 copy each Linear op holds
    while it upcasts its fp8 weight, is the same function ``fxswap plan --dtype fp8`` uses, so the
    bench and the CLI count fp8 memory the same way.
    """
    linears = {w.name for w in ir.weights if len(w.shape) == 2 and w.name.endswith(".weight")}
    from fxswap.passes.analyse import fp8_linear_storage  # shared with `fxswap plan --dtype fp8`

    return fp8_linear_storage(ir, linears)


def case_size(model: str, case: str) -> tuple[int, int, int]:
    """(width, height, frames) of ``case`` for ``model`` (TI2V-5B's 720p is its native 1280x704)."""
    if case not in CASES:
        raise FxswapError(f"case={case!r} is unknown; use one of {', '.join(CASES)}")
    w, h, f = CASES[case]
    if "ti2v-5b" in model and h == 720:
        h = 704
    return w, h, f


def load_wan_ir(model: str, case: str, cache_dir: Path | None = None) -> GraphIR:
    """Capture the bf16 WAN graph of ``model`` at ``case`` on meta tensors, cached on disk as JSON.

    The cache key is a hash of the model config, the input size, the IR cache version and the
    source of the capture modules, so a changed model or capture invalidates it.
    """
    import torch  # deferred: the rest of the bench is plain Python

    from fxswap.capture import trace
    from fxswap.models import wan

    if model.startswith("tiny-") and model.removeprefix("tiny-") in wan.MODEL_TYPES:
        config = wan.tiny_config(model.removeprefix("tiny-"))  # for tests: the full structure, tiny sizes
    elif model in wan.CONFIGS or model in wan.TURBOWAN_CONFIGS:
        config = wan.named_config(model)
    else:
        known = ", ".join([*wan.CONFIGS, *wan.TURBOWAN_CONFIGS])
        raise FxswapError(f"model={model!r} is unknown; use one of {known} (or tiny-t2v for a test model)")
    width, height, frames = case_size(model, case)
    key_src = json.dumps(
        [IR_CACHE_VERSION, repr(config), width, height, frames, _source_hash()], sort_keys=True
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = cache_dir / f"{model}-{case}-{key}.json" if cache_dir else None
    if path is not None and path.exists():
        return ir_from_json(json.loads(path.read_text()))
    net = wan.build(config, device="meta", dtype=torch.bfloat16)
    kwargs = wan.example_inputs(
        config, frames=frames, height=height, width=width, device="meta", dtype=torch.bfloat16
    )
    ir = trace(net, **kwargs).ir
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ir_to_json(ir), separators=(",", ":")))
        tmp.replace(path)
    return ir


def _source_hash() -> str:
    import fxswap.capture as trace_mod
    import fxswap.models.sla as sla_mod
    import fxswap.models.wan as wan_mod
    import fxswap.passes.analyse as analyse_mod

    h = hashlib.sha256()
    for mod in (wan_mod, sla_mod, analyse_mod, trace_mod):
        if mod.__file__:
            h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------


def _fxswap_rows(
    ir: GraphIR,
    mode: str,
    budget: int,
    hw: HardwareProfile,
    reserve: int,
    base: dict[str, Any],
    costs: Any,
    act: tuple[int, ...],
    block_size_bytes: int,
    cache: dict[Any, Any],
) -> BenchRow:
    from fxswap.passes.planner import build_plan
    from fxswap.passes.simulate import simulate_memory, simulate_time, unit_windows
    from fxswap.swapplan import PlanOptions

    rates = plan_rates(hw)
    # Every mode picks its prefetch depth and resident placement with the card's rates, so plans are
    # cached per card.
    key = (mode, budget, hw.name)
    if key not in cache:
        opts = PlanOptions(
            mode=mode,
            max_vram_bytes=budget,
            reserve_bytes=reserve,
            block_size_bytes=block_size_bytes,
            h2d_gbps=rates["h2d_gbps"],
            compute_tflops=rates["compute_tflops"],
            device_mem_gbps=rates["device_mem_gbps"],
        )
        try:
            cache[key] = build_plan(ir, opts)
        except BudgetInfeasibleError as exc:
            cache[key] = exc
    plan = cache[key]
    if isinstance(plan, BudgetInfeasibleError):
        return BenchRow(
            **base,
            policy=f"fxswap-{mode}",
            feasible=False,
            step_ms=None,
            peak_bytes=None,
            moved_bytes=None,
            d2h_bytes=None,
            stall_ms=None,
            resident_bytes=None,
            switch_ms=None,
            setting=f"infeasible: min {plan.min_vram_bytes / GiB:.2f} GiB",
        )
    windows = unit_windows(sorted(plan.units, key=lambda u: u.first_use))
    mem = simulate_memory(act, windows, reserve)
    t = simulate_time(costs, windows, hw.pinned_h2d_gbps)
    return BenchRow(
        **base,
        policy=f"fxswap-{mode}",
        feasible=mem.peak_bytes <= budget,
        step_ms=t.step_ms,
        peak_bytes=mem.peak_bytes,
        moved_bytes=t.moved_bytes,
        d2h_bytes=0,
        stall_ms=t.stall_ms,
        resident_bytes=mem.resident_bytes,
        switch_ms=None,
        setting=f"{plan.partition}, depth {plan.prefetch_depth}",
    )


def bench_graph(
    ir: GraphIR,
    *,
    model: str,
    resolution: str,
    frames: int,
    dtype: str,
    cards: Sequence[HardwareProfile],
    budgets_gb: Sequence[float],
    policies: Sequence[str],
    reserve_bytes: int = 256 * 2**20,
    block_size_bytes: int = 300 * 2**20,
    experts: int = 1,
) -> list[BenchRow]:
    """Every policy on ``ir`` for every card and every budget that fits the card's VRAM.

    Args:
        ir: the graph (already rescaled for fp8 when ``dtype`` says so).
        model, resolution, frames, dtype: labels copied into the rows.
        cards: hardware profiles; a budget above a card's VRAM is skipped for that card.
        budgets_gb: budgets in GiB.
        policies: names from :data:`FXSWAP_POLICIES` and :data:`fxswap.passes.peers.PEER_POLICIES`.
        reserve_bytes: the workspace reserve every policy is charged (the planner's default).
        block_size_bytes: the chunkwise block size.
        experts: 2 for A14B: rows get ``switch_ms`` (module docstring).
    """
    from fxswap.passes.peers import PEER_POLICIES, GraphContext, build_peer, evaluate

    unknown = [p for p in policies if p not in FXSWAP_POLICIES and p not in PEER_POLICIES]
    if unknown:
        raise FxswapError(f"policies {unknown} are unknown; use {', '.join(FXSWAP_POLICIES + PEER_POLICIES)}")
    ctx = GraphContext(ir, reserve_bytes) if any(p in PEER_POLICIES for p in policies) else None
    from fxswap.passes.liveness import activation_profile

    act = ctx.act if ctx else activation_profile(ir)
    rows: list[BenchRow] = []
    plan_cache: dict[Any, Any] = {}
    peer_cache: dict[Any, Any] = {}
    for hw in cards:
        costs = graph_costs(ir, hw)
        compute = costs.prefix_ms[-1]
        for gb in budgets_gb:
            budget = round(gb * GiB)
            if budget > hw.vram_bytes:
                continue
            bound = physical_bound(ir, hw, budget, reserve_bytes, act)
            base = dict(
                model=model,
                resolution=resolution,
                frames=frames,
                dtype=dtype,
                card=hw.name,
                budget_gb=gb,
                resident_compute_ms=compute,
                bound_ms=bound.bound_ms if bound.feasible else None,
                weight_bytes=ir.weight_bytes,
            )
            for policy in policies:
                if policy in FXSWAP_POLICIES:
                    row = _fxswap_rows(
                        ir,
                        policy.removeprefix("fxswap-"),
                        budget,
                        hw,
                        reserve_bytes,
                        base,
                        costs,
                        act,
                        block_size_bytes,
                        plan_cache,
                    )
                else:
                    assert ctx is not None
                    if (policy, budget) not in peer_cache:
                        peer_cache[policy, budget] = build_peer(policy, ctx, budget)
                    sched = peer_cache[policy, budget]
                    t = evaluate(sched, costs, hw.pinned_h2d_gbps, hw.d2h_gbps, hw.sync_overhead_ms)
                    resident = sum(u.bytes for u in sched.units if u.resident)
                    row = BenchRow(
                        **base,
                        policy=policy,
                        feasible=sched.feasible,
                        step_ms=t.step_ms,
                        peak_bytes=sched.peak_bytes,
                        moved_bytes=t.moved_bytes,
                        d2h_bytes=t.d2h_bytes,
                        stall_ms=t.stall_ms,
                        resident_bytes=resident,
                        switch_ms=None,
                        setting=sched.setting,
                    )
                if experts > 1 and row.resident_bytes is not None:
                    row = replace(row, switch_ms=row.resident_bytes * 1e3 / (hw.pinned_h2d_gbps * 1e9))
                rows.append(row)
    return rows


def compare_with_gpu_check(report: dict[str, Any], hw: HardwareProfile) -> list[dict[str, Any]]:
    """Predicted against measured step times for a ``benchmarks/gpu_check.py`` JSON report.

    For each model of the report the same WAN config (``-10layers`` = the first 10 blocks) is captured
    on meta at the report's size and predicted on ``hw`` at the report's budget: ``resident_eager``
    (every weight resident), ``fxswap_eager`` (an adaptive plan with ``hw``'s rates) and
    ``diffusers_group_offload`` (the peer model). The op model prices eager, unfused ops, so the
    compiled variants get no prediction. Returns one dict per variant with ``measured_ms``,
    ``predicted_ms`` and ``error_pct`` (predicted / measured - 1, in %); missing measurements stay None.
    """
    import dataclasses

    import torch

    from fxswap.capture import trace
    from fxswap.models import wan
    from fxswap.passes.peers import GraphContext, diffusers_group, evaluate
    from fxswap.passes.planner import build_plan
    from fxswap.passes.simulate import simulate_time, unit_windows
    from fxswap.swapplan import PlanOptions

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


# ------------------------------------------------------------------------------------------------
# Writers and summary
# ------------------------------------------------------------------------------------------------

_EXTRA = ("over_compute", "over_bound")


def _row_dict(row: BenchRow) -> dict[str, Any]:
    d = asdict(row)
    d["over_compute"] = row.over_compute
    d["over_bound"] = row.over_bound
    if d["bound_ms"] is not None and not math.isfinite(d["bound_ms"]):
        d["bound_ms"] = None
    return d


def write_json(rows: Iterable[BenchRow], path: str | Path) -> None:
    """A JSON list of rows (the :class:`BenchRow` fields plus ``over_compute`` and ``over_bound``)."""
    # One row per line: diffable, and a third of the size of an indented dump.
    lines = [json.dumps(_row_dict(r), allow_nan=False) for r in rows]
    Path(path).write_text("[\n" + ",\n".join(lines) + "\n]\n")


def read_json(path: str | Path) -> list[BenchRow]:
    """Rows written by :func:`write_json`."""
    names = {f.name for f in fields(BenchRow)}
    return [
        BenchRow(**{k: v for k, v in d.items() if k in names}) for d in json.loads(Path(path).read_text())
    ]


def write_csv(rows: Iterable[BenchRow], path: str | Path) -> None:
    """The same rows as CSV (empty cells for nulls)."""
    names = [f.name for f in fields(BenchRow)] + list(_EXTRA)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in _row_dict(r).items()})


def _group(rows: Iterable[BenchRow]) -> dict[tuple[Any, ...], dict[str, BenchRow]]:
    out: dict[tuple[Any, ...], dict[str, BenchRow]] = {}
    for r in rows:
        out.setdefault((r.model, r.resolution, r.frames, r.dtype, r.card, r.budget_gb), {})[r.policy] = r
    return out


def _cell(r: BenchRow | None) -> str:
    if r is None:
        return "-"
    if not r.feasible:
        return "OOM" if r.peak_bytes is None else f"OOM {r.peak_bytes / GiB:.1f}G"
    return f"{r.over_compute:.2f}x"


def format_table(
    rows: Sequence[BenchRow], policies: Sequence[str] | None = None, markdown: bool = False
) -> str:
    """One line per setting; per policy: step / resident compute (``OOM <peak>`` when over budget)."""
    groups = _group(rows)
    pols = list(policies) if policies else list(dict.fromkeys(r.policy for r in rows))
    head = ["model", "case", "dtype", "card", "GiB", "compute ms", "bound"] + pols
    lines = []
    for key, by in groups.items():
        model, res, frames, dtype, card, gb = key
        any_row = next(iter(by.values()))
        bound = (
            f"{any_row.bound_ms / any_row.resident_compute_ms:.2f}x"
            if any_row.bound_ms is not None
            else "OOM"
        )
        lines.append(
            [model, f"{res}x{frames}", dtype, card, f"{gb:g}", f"{any_row.resident_compute_ms:.0f}", bound]
            + [_cell(by.get(p)) for p in pols]
        )
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*line) for line in lines])


@dataclass(frozen=True, slots=True)
class Summary:
    """Targets of issue 5, measured on a set of rows."""

    settings: int
    adaptive_feasible: int
    adaptive_within_3pct: int
    adaptive_worst_over_bound: float
    adaptive_over_budget: int  # must be 0 by construction
    adaptive_below_bound: int  # must be 0 by construction
    faster_than: dict[str, int]  # peer -> settings where adaptive is strictly faster (> 1%)
    slower_than: dict[str, int]  # peer -> settings where a feasible peer is faster than adaptive
    adaptive_infeasible_peer_feasible: dict[str, int]
    slower_examples: tuple[str, ...]  # the worst 12, most slower first
    not_within_3pct_examples: tuple[str, ...]  # the worst 12
    # peer -> reason -> settings where adaptive is strictly faster for that reason (several may apply):
    # "no copy back" (the peer copies each block back to the host), "resident set" (the peer moves
    # more bytes per call), "overlap" (the peer exposes more stall per byte moved).
    reasons: dict[str, dict[str, int]]


def _reasons(a: BenchRow, r: BenchRow) -> list[str]:
    """Why adaptive (``a``) beats peer row ``r`` on the same setting (see :class:`Summary`)."""
    out = []
    if r.d2h_bytes:
        out.append("no copy back")
    a_moved, r_moved = a.moved_bytes or 0, r.moved_bytes or 0
    if r_moved > a_moved * 1.01:
        out.append("resident set")
    # Overlap: the peer exposes more stall per byte it moves (copies serialised with compute, a host
    # sync, a shallower prefetch), compared on the same card so the copy rate cancels.
    r_exposed = (r.stall_ms or 0) / r_moved if r_moved else 0.0
    a_exposed = (a.stall_ms or 0) / a_moved if a_moved else 0.0
    if r_moved and r_exposed > a_exposed * 1.05 + 1e-15:
        out.append("overlap")
    return out or ["other"]


def summarize(rows: Sequence[BenchRow], tolerance: float = 0.03) -> Summary:
    """Check the issue's targets on ``rows`` (nothing is tuned to pass; the numbers are reported)."""
    from fxswap.passes.peers import PEER_POLICIES

    groups = _group(rows)
    feas = within = over_budget = below = 0
    worst = 1.0
    faster = dict.fromkeys(PEER_POLICIES, 0)
    slower = dict.fromkeys(PEER_POLICIES, 0)
    only_peer = dict.fromkeys(PEER_POLICIES, 0)
    reasons: dict[str, dict[str, int]] = {p: {} for p in PEER_POLICIES}
    slow_ex: list[tuple[float, str]] = []
    miss_ex: list[tuple[float, str]] = []
    for key, by in groups.items():
        a = by.get("fxswap-adaptive")
        if a is None:
            continue
        label = "/".join(str(k) for k in key)
        if a.feasible and a.step_ms is not None:
            feas += 1
            if a.peak_bytes is not None and a.peak_bytes > round(a.budget_gb * GiB):
                over_budget += 1
            if a.bound_ms is not None:
                ratio = a.step_ms / a.bound_ms
                worst = max(worst, ratio)
                if a.step_ms < a.bound_ms * (1 - 1e-9):
                    below += 1
                if ratio <= 1 + tolerance:
                    within += 1
                else:
                    miss_ex.append((ratio, f"{label}: {ratio:.3f}x bound ({a.setting})"))
        for p in PEER_POLICIES:
            r = by.get(p)
            if r is None or not r.feasible or r.step_ms is None:
                continue
            if not a.feasible or a.step_ms is None:
                only_peer[p] += 1
            elif a.step_ms < r.step_ms * 0.99:
                faster[p] += 1
                for why in _reasons(a, r):
                    reasons[p][why] = reasons[p].get(why, 0) + 1
            elif r.step_ms < a.step_ms * (1 - 1e-9):
                slower[p] += 1
                text = f"{label}: {p} {r.step_ms:.1f} ms ({r.setting}) < adaptive {a.step_ms:.1f} ms"
                slow_ex.append((a.step_ms / r.step_ms, f"{text} ({a.setting})"))
    return Summary(
        len(groups),
        feas,
        within,
        worst,
        over_budget,
        below,
        faster,
        slower,
        only_peer,
        tuple(x for _, x in sorted(slow_ex, reverse=True)[:12]),
        tuple(x for _, x in sorted(miss_ex, reverse=True)[:12]),
        reasons,
    )


def summary_text(s: Summary) -> str:
    lines = [
        f"settings: {s.settings}; fxswap-adaptive feasible on {s.adaptive_feasible}",
        f"within 3% of the physical bound: {s.adaptive_within_3pct}/{s.adaptive_feasible} "
        f"(worst {s.adaptive_worst_over_bound:.3f}x bound)",
        f"adaptive above budget: {s.adaptive_over_budget}; below the bound: {s.adaptive_below_bound} "
        "(both must be 0)",
    ]
    for p in s.faster_than:
        lines.append(
            f"vs {p}: adaptive strictly faster (>1%) on {s.faster_than[p]}, slower on {s.slower_than[p]}, "
            f"peer feasible where adaptive is not on {s.adaptive_infeasible_peer_feasible[p]}; why faster: "
            + (", ".join(f"{k} {v}" for k, v in sorted(s.reasons[p].items())) or "-")
        )
    if s.not_within_3pct_examples:
        lines.append("not within 3% (worst rows):")
        lines += [f"  {x}" for x in s.not_within_3pct_examples]
    if s.slower_examples:
        lines.append("a peer faster than adaptive (worst rows):")
        lines += [f"  {x}" for x in s.slower_examples]
    return "\n".join(lines)


README_CASES: tuple[tuple[str, str, int], ...] = (
    ("wan2.1-t2v-14b", "832x480", 81),
    ("wan2.1-t2v-14b", "832x480", 17),
    ("wan2.1-t2v-1.3b", "832x480", 17),
)


def readme_table(
    rows: Sequence[BenchRow],
    cases: Sequence[tuple[str, str, int]] = README_CASES,
    cards: Sequence[str] = ("rtx3090", "rtx4080", "rtx4090", "rtx5090", "h100-sxm"),
    dtype: str = "bf16",
) -> str:
    """The README excerpt: a few (model, resolution, frames) on a few cards, one dtype, markdown."""
    sel = [
        r
        for r in rows
        if (r.model, r.resolution, r.frames) in set(cases) and r.card in cards and r.dtype == dtype
    ]
    return format_table(sel, markdown=True)


HOW_TO_READ = """\
Each cell is the predicted time of one call (one forward = one CFG branch of a denoising step)
divided by the same call with every weight resident (`1.00x` = no slowdown); `OOM <peak>` means the
policy's most frugal setting exceeds the budget. `bound` is the physical bound (max of compute and
the bytes that must move / pinned H2D rate) over the same compute. Same graph, same memory
simulator, same two-stream time model and same hardware profile for every policy; peers get the best
setting of their knob that fits. Policies: `fxswap-*` (planner modes), `wvw-blockswap-p0/p1`
(ComfyUI-WanVideoWrapper block swap, prefetch_blocks 0/1: copies on the compute stream, D2H after
use), `diffusers-group` (group offloading, block_level, use_stream=True), `mmgp` (one block ahead,
device sync per block, evenly spread preloaded floors), `comfyui-lowvram` (largest modules resident,
the rest cast per layer). fp8 = Linear weights at 1 byte, compute at the bf16 rate. A14B rows are
per call of one expert; the expert switch is `switch_ms` in the JSON, not in the cell.
See `fxswap/bench.py` and `passes/peers.py` for the modelling and the sources.
"""


def write_markdown(rows: Sequence[BenchRow], path: str | Path, header: str = "") -> None:
    """The full table as markdown, with the summary on top."""
    text = (
        header
        + "\n"
        + HOW_TO_READ
        + "\n```\n"
        + summary_text(summarize(rows))
        + "\n```\n\n"
        + format_table(rows, markdown=True)
    )
    Path(path).write_text(text + "\n")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def _csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fxswap bench`` (the lead wires this into the CLI)."""
    from fxswap.passes.peers import PEER_POLICIES

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
            from fxswap.plots import plot_bench
        except ImportError as exc:  # matplotlib is the optional "plot" extra
            print(
                f"fxswap bench: --chart needs matplotlib (pip install fxswap[plot]): {exc}", file=sys.stderr
            )
            return 2
        plot_bench(rows, args.chart)
    return 0
