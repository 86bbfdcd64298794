"""GPU check for fxswap: one run on a lent GPU answers peak, overlap, speed and exactness.

    bash benchmarks/device_run.sh                       # on the GPU machine (CONTRIBUTING.md, "GPU checks")
    python benchmarks/gpu_check.py --out-dir DIR        # the same, without the install / import checks
    python benchmarks/gpu_check.py --dry-run --out-dir DIR   # tiny WANs on the CPU: the same code path

What it measures, in this order (each result is written to ``DIR/gpu_check.json`` as soon as it
exists, so a run cut short keeps everything measured before the cut):

1. **Calibration**, first: pinned host-to-device bandwidth (and pageable H2D, D2H) and the achieved
   bf16 matmul rate (``fxswap.bench.calibrate.calibrated_profile``). Every plan below is made with
   these rates (``fxswap.bench.costmodel.plan_rates``), so ``predicted_step_ms`` is comparable with the
   measured step.
2. **Cases**: WAN 2.1 14B cut to 10 blocks first, then WAN 2.1 1.3B; each at 480p81 (832x480, 81 frames)
   and at the copy-bound 480p17. bf16, random weights. Budgets: the planner's minimum for the case
   (``min``) and two larger ones (``mid`` = min + 1/4 of the weights, ``large`` = min + 1/2).
3. Per case, the eager pass first (cheap), for every model, then the Inductor pass (compiles):

   - ``resident_eager`` / ``resident_compiled``: the whole model on the GPU, plain / ``torch.compile``;
     their outputs are the references;
   - ``fxswap_inductor_cold@min``: ``fxswap_inductor@min``'s budget with ``warm_start=False`` (every
     call starts cold), against which the warm start's gain over a loop is read;
   - ``fxswap_eager@{min,mid,large}`` and ``fxswap_inductor@{min,mid,large}``;
   - ``fxswap_eager_depth0@min``: the same plan as ``fxswap_eager@min`` with every load moved to its
     wait (prefetch depth 0): copies cannot overlap compute, the no-overlap bound;
   - ``diffusers_group_offload``: diffusers' ``WanTransformer3DModel`` holding the same weights,
     ``apply_group_offloading(block_level, 1 block per group, use_stream=True, record_stream=True)``,
     the peer; ``fxswap_eager@peer_peak`` then runs fxswap at the peer's measured peak as its budget.

Per variant: ``loop_step_s`` = wall time of 10 consecutive calls / 10 (a sampling loop: a warm start's
prefetch across calls counts), ``loop_step_vs_resident`` per case the ratio to the resident baseline;
``step_s`` = median of ``--steps`` (>= 3) timed calls after one warm-up call (which
plans / compiles); ``peak_allocated`` / ``peak_reserved`` = the CUDA allocator's peak minus the bytes
allocated / reserved just before the warm-up call (so the inputs and anything left from earlier do not
count, and fxswap's resident weights, made by the warm-up, do), for the warm-up and for the timed calls;
``alloc_retries`` (``num_alloc_retries`` delta); exactness on every call (``torch.equal`` against the
reference: eager against resident eager, Inductor against resident compiled; with the max abs
difference). fxswap variants add the plan (``plan_peak_bytes``, ``predicted_step_ms``, moved bytes...),
``within_budget`` (measured peak above baseline <= budget), the pinned host bytes fxswap counts against
the pinned allocator's own statistics, and for Inductor the order of load / wait / release in the
generated code against the rewritten FX graph (which is the plan).

``allocator_rules`` (CUDA only), before the cases: the rules the plans use against the allocator
itself: requests of hand-picked sizes each from a fresh segment (``memory_allocated`` delta against
``DeviceRules.alloc_bytes``), cuBLAS's and cuBLASLt's kept workspace on a new stream, and the
flash-attention workspace at a WAN-like shape (1 x 40 heads x 4096 x 128, bf16).

Per variant ``memory`` (the row that settles the default reserve, ``docs/memory_model.md``):
``plan_peak_bytes``; ``max_memory_allocated_above_entry`` / ``max_memory_reserved_above_entry`` (the
timed calls' peaks above the level before the warm-up); ``plan_terms``, what the plan added to the
graph's plain tensor bytes for this device (``fxswap.passes.device_rules``: the allocator's rounding of
the weights and of what is live at the plan's peak op, cuBLAS / cuBLASLt's kept workspace, the op
workspace measured at that op); ``fragmentation_at_peak_bytes`` = reserved - allocated at the peaks,
and the allocator's own ``inactive_split_peak_bytes``. Resident rows have no plan (None).

Per case ``overlap``: copy time = moved bytes / measured pinned rate; ``hidden_share_vs_resident`` =
1 - (fxswap step - resident step) / copy time; ``hidden_share_vs_depth0`` = (depth-0 step - fxswap step)
/ copy time. One step of ``fxswap_eager@min`` of the first copy-bound case runs under the profiler:
``DIR/gpu_check_trace.json.gz`` (Chrome trace) and ``profiled_step`` in the JSON: the H2D copies, whether
each came from pinned memory, on which stream, and how much of their time ran beside a kernel.

Once, on the first copy-bound case, after its overlap: ``issue22_cuda_path@min`` (the CUDA path's
stream and memory rules, ``docs/cuda_path.md``; see :meth:`GpuCheck.cuda_path`): host syncs inside
steady calls (profiler and sync-debug mode; both must be 0), a call on a user stream (exact, carried
units dropped, ``reserved - allocated`` not grown), refusal under ``torch.cuda.graph``, the pinned
arenas' host bytes against ``/proc/self/status`` and torch's pinned-allocator statistics (after the
build and after ``close()``), every weight pageable (staged through the ring: measured step against
its priced prediction and the pinned plan's), fp8 storage at two budgets (finite, bitwise equal).
Every fxswap variant also records ``reserved_minus_allocated_at_peak``.

``multi_gpu``, after the allocator rules and before the cases, only where the machine has 2 GPUs or
more (else it records ``{"skipped": "N GPUs ..."}``, not a pass): sequence parallelism
(``ulysses_degree=2``, ``docs/sequence_parallel.md``) on a small WAN in float32, 2 processes of this
script (``--multi-gpu-rank``) with NCCL, one GPU each. Per rank: the whole model resident on one GPU
(the reference, and the 1-GPU time), then fxswap's 2-rank program all resident and at 60% of that
plan's peak (swapping); for each, the median call time, ``torch.cuda.max_memory_allocated`` above
the level before the call against the rank's plan and budget, and the output against the
reference: ``bitwise``, else ``max_abs_diff`` (cuBLAS may pick another kernel for half the rows, so
bitwise is recorded, not required; above ``MULTI_GPU_TOLERANCE`` times the reference's largest
magnitude it is an error).

Time: ``--time-limit`` (default 450 s) is checked before every model and every variant; a variant
whose estimated cost does not fit is recorded as skipped. ``--hard-limit`` (default 470 s) raises
inside the running variant (recorded as its error) so the JSON is always complete and valid.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import gzip
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

GiB = 2**30
MiB = 2**20
SCHEMA_VERSION = 2
BUDGET_LABELS = ("min", "mid", "large")
# Rough costs (seconds) used to decide whether a variant still fits before the deadline.
EAGER_COST_S = 15.0
COMPILE_COST_S = 100.0
MULTI_GPU_COST_S = 60.0  # 2 processes: imports, NCCL set-up, 3 eager builds of a small WAN each
MULTI_GPU_RANKS = 2
# fp32 outputs of order 1; a different cuBLAS kernel for N/2 rows changes the last bits only
MULTI_GPU_TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------------ cases
@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    frames: int
    height: int
    width: int
    copy_bound: bool

    @property
    def key(self) -> str:
        return f"{self.model}@{self.height}p{self.frames}"


def model_configs(dry_run: bool) -> dict[str, Any]:
    """Model name -> WanConfig, in run order (the 14B first)."""
    from fxswap.models import wan

    if dry_run:
        return {
            "tiny-t2v-4blocks": wan.tiny_config("t2v", num_layers=4),
            "tiny-t2v-2blocks": wan.tiny_config("t2v", num_layers=2),
        }
    return {
        "wan2.1-t2v-14b-10blocks": dataclasses.replace(wan.CONFIGS["wan2.1-t2v-14b"], num_layers=10),
        "wan2.1-t2v-1.3b": wan.CONFIGS["wan2.1-t2v-1.3b"],
    }


def case_list(dry_run: bool, models: Sequence[str]) -> list[Case]:
    if dry_run:
        res = [(5, 32, 32, False), (1, 32, 32, True)]
    else:
        res = [(81, 480, 832, False), (17, 480, 832, True)]
    return [Case(m, f, h, w, cb) for m in models for f, h, w, cb in res]


# ------------------------------------------------------------------------------------ measurement
class Device:
    """Allocator figures on CUDA; None on the CPU (the dry run checks the code path, not figures)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def snapshot(self) -> dict[str, int | None]:
        if not self.cuda:
            return {"allocated": None, "reserved": None, "retries": None}
        stats = torch.cuda.memory_stats(self.device)
        return {
            "allocated": int(torch.cuda.memory_allocated(self.device)),
            "reserved": int(torch.cuda.memory_reserved(self.device)),
            "retries": int(stats.get("num_alloc_retries", 0)),
        }

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> tuple[int | None, int | None]:
        if not self.cuda:
            return None, None
        return int(torch.cuda.max_memory_allocated(self.device)), int(
            torch.cuda.max_memory_reserved(self.device)
        )

    def inactive_split_peak(self) -> int | None:
        """The allocator's own fragmentation figure: the most bytes of free blocks inside split
        segments (``inactive_split_bytes``) since the last peak reset."""
        if not self.cuda:
            return None
        return int(torch.cuda.memory_stats(self.device).get("inactive_split_bytes.all.peak", 0))

    def pinned_allocated(self) -> int | None:
        if not self.cuda or not hasattr(torch.cuda, "host_memory_stats"):
            return None
        # active = blocks handed out (rounded sizes), whether new or reused from the allocator's cache
        return int(torch.cuda.host_memory_stats().get("active_bytes.current", 0))


def _host_memory() -> dict[str, int | None]:
    """Host memory of this process: ``/proc/self/status`` (kB -> bytes) and torch's pinned
    allocator (``host_memory_stats``), independent of fxswap's own counts."""
    out: dict[str, int | None] = {"VmRSS": None, "VmLck": None, "VmPin": None, "torch_pinned_active": None}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in out:
                out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    if torch.cuda.is_available() and hasattr(torch.cuda, "host_memory_stats"):
        out["torch_pinned_active"] = int(torch.cuda.host_memory_stats().get("active_bytes.current", 0))
    return out


def _host_delta(a: dict[str, int | None], b: dict[str, int | None]) -> dict[str, int | None]:
    return {k: _minus(b[k], a[k]) for k in a}


def _minus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a - b


def compare(out: torch.Tensor, ref: torch.Tensor | None) -> tuple[bool | None, float | None]:
    if ref is None:
        return None, None
    if out.shape != ref.shape:
        return False, None
    equal = bool(torch.equal(out, ref))
    return equal, 0.0 if equal else float((out.float() - ref.float()).abs().max())


def measure(
    fn: Callable[[], torch.Tensor], dev: Device, steps: int, ref: torch.Tensor | None
) -> tuple[dict[str, Any], torch.Tensor]:
    """One warm-up call, then ``steps`` timed calls; peaks above the bytes live before the warm-up."""
    dev.free()
    base = dev.snapshot()
    dev.reset_peak()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn()
    dev.sync()
    first_s = time.perf_counter() - t0
    first_alloc, first_res = dev.peaks()
    equal, diff = compare(out, ref)
    checks = [equal]
    diffs = [diff]
    dev.reset_peak()
    times = []
    with torch.no_grad():
        for _ in range(steps):
            t = time.perf_counter()
            out = fn()
            dev.sync()
            times.append(time.perf_counter() - t)
            equal, diff = compare(out, ref)
            checks.append(equal)
            diffs.append(diff)
    alloc, res = dev.peaks()
    inactive_split = dev.inactive_split_peak()
    end = dev.snapshot()
    known = [d for d in diffs if d is not None]
    result = {
        "first_call_s": round(first_s, 3),
        "step_s": round(statistics.median(times), 5),
        "step_s_all": [round(t, 5) for t in times],
        "baseline_allocated_bytes": base["allocated"],
        "baseline_reserved_bytes": base["reserved"],
        "peak_allocated_first_call": _minus(first_alloc, base["allocated"]),
        "peak_reserved_first_call": _minus(first_res, base["reserved"]),
        "peak_allocated": _minus(alloc, base["allocated"]),
        "peak_reserved": _minus(res, base["reserved"]),
        "alloc_retries": _minus(end["retries"], base["retries"]),
        # reserved but not allocated at the timed calls' peak: segments' unused tails and cached free
        # blocks, i.e. fragmentation (the allocator's reserved does not shrink inside a call unless
        # empty_cache runs); and the allocator's own figure of free bytes inside split segments
        "fragmentation_at_peak": _minus(_minus(res, base["reserved"]), _minus(alloc, base["allocated"])),
        "inactive_split_peak_bytes": inactive_split,
        "exact_every_step": None if ref is None else all(bool(c) for c in checks),
        "exact_per_call": checks,
        "max_abs_diff": max(known) if known else None,
    }
    return result, out.detach().clone()


LOOP_CALLS = 10


def loop_time(fn: Callable[[], torch.Tensor], dev: Device, ref: torch.Tensor | None) -> dict[str, Any]:
    """A sampling loop's view: ``LOOP_CALLS`` consecutive calls timed as one (after the warm-up and
    the timed steps of :func:`measure`), so a warm start's prefetch across calls counts."""
    with torch.no_grad():
        dev.sync()
        t = time.perf_counter()
        for _ in range(LOOP_CALLS):
            out = fn()
        dev.sync()
        total = time.perf_counter() - t
    return {
        "loop_calls": LOOP_CALLS,
        "loop_step_s": round(total / LOOP_CALLS, 5),
        "loop_last_exact": compare(out, ref)[0],
    }


# ------------------------------------------------------------------------------ generated-code order
_OP_RE = re.compile(r"torch\.ops\.fxswap\.(load|wait|release)\.default\(\s*(-?\d+)\b")


# Requests whose counts the allocator rules predict differently (docs/memory_model.md): under 512,
# just over a multiple of 512, the small pool's top, just into the large pool, the 10 MiB edge, a
# segment left with exactly 1 MiB (unsplit), one left with more (split), and WAN 14B's ffn weight.
RULE_SIZES = (1, 513, 2**20, 2**20 + 1, 10 * 2**20, 11 * 2**20, 11 * 2**20 - 512, 13824 * 5120 * 2)


def check_allocator_rules(device: torch.device) -> dict[str, Any]:
    """The device rules the plans use (``passes.device_rules``) against the allocator itself: each
    request in :data:`RULE_SIZES` allocated from a fresh segment (``memory_allocated`` before and
    after), cuBLAS's and cuBLASLt's kept workspace on a new stream (a new (handle, stream) key
    allocates a new one), and the flash-attention workspace at a WAN-like shape (peak above the
    level before, less the output)."""
    if device.type != "cuda":
        return {"skipped": "no CUDA device: the CPU's rules are the identity"}
    import torch.nn.functional as F

    from fxswap.passes.device_rules import sdpa_backend, sdpa_workspace_bytes
    from fxswap.workspace import device_rules_for

    rules = device_rules_for(device)
    out: dict[str, Any] = {"capability": list(rules.capability or ()), "rounding": []}

    def allocated() -> int:
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))

    for n in RULE_SIZES:
        torch.cuda.empty_cache()  # the request gets a fresh segment, as the rules assume
        before = allocated()
        t = torch.empty(n, dtype=torch.uint8, device=device)
        got = allocated() - before
        del t
        out["rounding"].append({"request": n, "allocated": got, "rules": rules.alloc_bytes(n)})
    out["rounding_all_equal"] = all(r["allocated"] == r["rules"] for r in out["rounding"])

    a = torch.ones(64, 64, device=device, dtype=torch.bfloat16)
    stream = torch.cuda.Stream(device)
    torch.cuda.synchronize(device)
    with torch.cuda.stream(stream), torch.no_grad():
        before = allocated()
        c = torch.mm(a, a)  # the cuBLAS path: its workspace for this (handle, stream)
        mid = allocated()
        d = F.linear(a, a, a[0])  # addmm with a bias: the cuBLASLt path
        after = allocated()
    out["cublas_kept"] = {"measured": mid - before - rules.alloc_bytes(c.nbytes),
                          "rules": rules.alloc_bytes(rules.cublas_bytes)}  # fmt: skip
    out["cublaslt_kept"] = {"measured": after - mid - rules.alloc_bytes(d.nbytes),
                            "rules": rules.alloc_bytes(rules.cublaslt_bytes)}  # fmt: skip
    del c, d

    b, h, n, dim = 1, 40, 4096, 128
    q = torch.zeros(b, h, n, dim, device=device, dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats(device)
    base = allocated()
    with torch.no_grad():
        o = F.scaled_dot_product_attention(q, q, q)
    peak = int(torch.cuda.max_memory_allocated(device)) - base - rules.alloc_bytes(o.nbytes)
    backend = sdpa_backend(rules.capability, "bfloat16", dim, dim, has_mask=False)
    ws = sdpa_workspace_bytes(backend, batch=b, heads=h, lq=n, lk=n, head_dim=dim, head_dim_v=dim, itemsize=2)
    out["sdpa"] = {"shape": [b, h, n, dim], "predicted_backend": backend, "measured_workspace": peak,
                   "rules": rules.alloc_bytes(ws)}  # fmt: skip
    del q, o
    torch.cuda.empty_cache()
    return out


def plan_terms(sm: Any) -> dict[str, Any]:
    """What the plan added to the captured graph's plain tensor bytes for the device
    (``fxswap.passes.device_rules``): the allocator's rounding of the weights and of what is live at
    the plan's peak op, the library workspace kept (cuBLAS / cuBLASLt), and the op workspace
    measured at that op. The CPU's rules add nothing but the workspace."""
    from fxswap.passes.device_rules import rule_terms
    from fxswap.workspace import with_workspace

    entry = getattr(sm, "_current", None)
    if entry is None:
        return {"error": "no built entry"}
    raw = with_workspace(entry.cap.ir, entry.cap.workspace or {})
    ruled = entry.ir
    names = [o.name for o in ruled.ops]
    at = names.index(entry.plan.peak_op) if entry.plan.peak_op in names else 0
    t = rule_terms(raw, ruled, at)
    return {
        "peak_op": entry.plan.peak_op,
        "weights_rounding_bytes": t.weights_rounding,
        "activation_rounding_at_peak_bytes": t.activation_rounding,
        "kept_library_workspace_bytes": t.kept,
        "op_workspace_at_peak_bytes": int(ruled.ops[at].workspace_bytes) if ruled.ops else 0,
    }


def memory_row(res: dict[str, Any], plan_peak: int | None, terms: dict[str, Any] | None) -> dict[str, Any]:
    """The row the first GPU run settles the default reserve with: the plan's peak beside the
    allocator's max_memory_allocated / max_memory_reserved above the entry level, what the plan
    added for the device, and the fragmentation at the peak."""
    alloc, reserved = res.get("peak_allocated"), res.get("peak_reserved")
    return {
        "plan_peak_bytes": plan_peak,
        "max_memory_allocated_above_entry": alloc,
        "max_memory_reserved_above_entry": reserved,
        "plan_terms": terms,
        "fragmentation_at_peak_bytes": res.get("fragmentation_at_peak"),
        "inactive_split_peak_bytes": res.get("inactive_split_peak_bytes"),
        "allocated_minus_plan_peak": None if alloc is None or plan_peak is None else alloc - plan_peak,
        "reserved_minus_plan_peak": None if reserved is None or plan_peak is None else reserved - plan_peak,
    }


def fx_sequence(gm: torch.fx.GraphModule) -> list[tuple[str, int]]:
    """(kind, unit id) of every fxswap op in the rewritten FX graph, in graph order (the plan)."""
    from fxswap import ops

    kinds = {ops.load: "load", ops.wait: "wait", ops.release: "release"}
    return [(kinds[n.target], int(n.args[0])) for n in gm.graph.nodes if n.target in kinds]


def generated_sequence(sources: Sequence[str]) -> list[tuple[str, int]]:
    """(kind, unit id) of every fxswap op call in Inductor's generated Python, in source order."""
    seq: list[tuple[str, int]] = []
    for src in sources:
        seq.extend((m.group(1), int(m.group(2))) for m in _OP_RE.finditer(src))
    return seq


def program_sequence(program: Any) -> list[tuple[str, int]] | None:
    """(kind, unit id) of every fxswap op in the generated code of a regional program
    (``fxswap.regional``), in the order its regions run, each region's ids named by the rewritten
    graph's; None for a program compiled as one graph."""
    steps = getattr(program, "steps", None)
    if steps is None:
        return None
    seq: list[tuple[str, int]] = []
    for st in steps:
        src = _source_of(st.compiled)
        body = src[src.index("def call(") :] if "def call(" in src else src
        seq.extend(
            (m.group(1), int(st.units.get(int(m.group(2)), int(m.group(2))))) for m in _OP_RE.finditer(body)
        )
    return seq


def _source_of(compiled: Any) -> str:
    import torch.fx

    if isinstance(compiled, torch.fx.GraphModule):  # glue between regions: FX's own Python
        return str(compiled.code)
    src = getattr(compiled, "source_code", None)
    if isinstance(src, str) and src:
        return src
    call = getattr(compiled, "current_callable", None)
    fn = getattr(call, "__func__", call)
    path = getattr(getattr(fn, "__code__", None), "co_filename", None)
    return Path(path).read_text() if path and os.path.exists(path) else ""


def order_report(fx_seq: list[tuple[str, int]], gen_seq: list[tuple[str, int]]) -> dict[str, Any]:
    def per_unit_ok(seq: list[tuple[str, int]]) -> bool:
        pos: dict[tuple[str, int], int] = {}
        for i, ev in enumerate(seq):
            pos.setdefault(ev, i)
        units = {u for _, u in seq}
        return all(
            pos.get(("load", u), -1) < pos.get(("wait", u), -1) < pos.get(("release", u), -1) for u in units
        )

    def prefetched(seq: list[tuple[str, int]]) -> int:
        # loads issued while another unit is still held (between its wait and its release): overlap kept
        held: set[int] = set()
        n = 0
        for kind, u in seq:
            if kind == "wait":
                held.add(u)
            elif kind == "release":
                held.discard(u)
            elif held:
                n += 1
        return n

    first_diff = next((i for i, (a, b) in enumerate(zip(fx_seq, gen_seq, strict=False)) if a != b), None)
    if first_diff is None and len(fx_seq) != len(gen_seq):
        first_diff = min(len(fx_seq), len(gen_seq))
    return {
        "fx_ops": len(fx_seq),
        "generated_ops": len(gen_seq),
        "same_order": fx_seq == gen_seq,
        "first_difference_at": first_diff,
        "around_difference": None
        if first_diff is None
        else {"fx": fx_seq[first_diff : first_diff + 4], "generated": gen_seq[first_diff : first_diff + 4]},
        "load_wait_release_in_order": per_unit_ok(gen_seq),
        "loads_beside_held_units_fx": prefetched(fx_seq),
        "loads_beside_held_units_generated": prefetched(gen_seq),
    }


def _inductor_sources(before: int) -> list[str]:
    from torch._inductor.codecache import PyCodeCache

    out = []
    for mod in PyCodeCache.modules[before:]:
        path = getattr(mod, "__file__", None)
        if path and os.path.exists(path):
            out.append(Path(path).read_text())
    return out


# ------------------------------------------------------------------------------------ trace analysis
def analyse_trace(path: Path) -> dict[str, Any]:
    """H2D copies of a Chrome trace beside its kernels: how many, pinned or not, which streams, and the
    share of copy time that ran while a kernel ran (interval overlap)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = json.load(f).get("traceEvents", [])
    copies, kernels = [], []
    for ev in events:
        if ev.get("ph") != "X":
            continue
        cat = str(ev.get("cat", "")).lower()
        name = str(ev.get("name", ""))
        start, dur = float(ev.get("ts", 0.0)), float(ev.get("dur", 0.0))
        stream = (ev.get("args") or {}).get("stream")
        if cat == "gpu_memcpy" and "htod" in name.lower().replace(" ", ""):
            copies.append((start, start + dur, name, stream))
        elif cat == "kernel":
            kernels.append((start, start + dur, stream))
    kernels.sort()
    merged: list[list[float]] = []
    for s, e, _ in kernels:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])

    def overlap(s: float, e: float) -> float:
        tot = 0.0
        for ks, ke in merged:
            if ke <= s:
                continue
            if ks >= e:
                break
            tot += min(e, ke) - max(s, ks)
        return tot

    copy_us = sum(e - s for s, e, _, _ in copies)
    beside = sum(overlap(s, e) for s, e, _, _ in copies)
    kernel_streams = sorted({str(st) for _, _, st in kernels})
    copy_streams = sorted({str(st) for *_, st in copies})
    return {
        "h2d_copies": len(copies),
        "h2d_pinned": sum("pinned" in n.lower() for _, _, n, _ in copies),
        "h2d_pageable": sum("pageable" in n.lower() for _, _, n, _ in copies),
        "h2d_copy_ms": round(copy_us / 1e3, 3),
        "h2d_ms_beside_kernels": round(beside / 1e3, 3),
        "h2d_share_beside_kernels": None if not copy_us else round(beside / copy_us, 4),
        "kernels": len(kernels),
        "kernel_ms": round(sum(e - s for s, e, _ in kernels) / 1e3, 3),
        "copy_streams": copy_streams,
        "kernel_streams": kernel_streams,
        "copies_on_own_stream": bool(copies) and not (set(copy_streams) & set(kernel_streams)),
    }


# ------------------------------------------------------------------------------------- several GPUs
def multi_gpu_case(dry_run: bool) -> tuple[Any, dict[str, int]]:
    """The WAN config and video size of the sequence-parallel case (its token count divides by 2)."""
    from fxswap.models import wan

    if dry_run:  # 5 frames at 32 x 64: 2 x 2 x 4 = 16 tokens, 2 heads
        return wan.tiny_config("t2v"), {"frames": 5, "height": 32, "width": 64}
    # 9 frames at 256 x 256: 3 x 16 x 16 = 768 tokens; 4 heads of 64
    cfg = wan.tiny_config("t2v", dim=256, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=64, text_len=32)
    return cfg, {"frames": 9, "height": 256, "width": 256}


def multi_gpu_rank(rank: int, world: int, store: str, out: str, dry_run: bool, steps: int) -> dict[str, Any]:
    """One rank of the multi-GPU case, in a process of its own (``--multi-gpu-rank``): GPU ``rank``
    and NCCL, or with ``dry_run`` the CPU and gloo. Writes its result to ``out`` as JSON."""
    import datetime

    import torch.distributed as dist

    import fxswap
    from fxswap.models import wan

    if dry_run:
        torch.set_num_threads(1)
        device, backend = torch.device("cpu"), "gloo"
    else:
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    dist.init_process_group(
        backend, init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    dev = Device(device)
    res: dict[str, Any] = {"rank": rank, "device": str(device), "backend": backend}
    try:
        cfg, size = multi_gpu_case(dry_run)
        torch.manual_seed(0)  # the same weights on every rank
        model = wan.build(cfg, dtype=torch.float32).eval().requires_grad_(False)
        inputs = wan.example_inputs(cfg, device=device, dtype=torch.float32, **size)
        model.to(device)
        try:  # the reference: the whole model on this one device
            res["resident_1gpu"], ref = measure(lambda: model(**inputs), dev, steps, None)
        finally:
            model.to("cpu")
        scale = float(ref.abs().max())
        opts: dict[str, Any] = dict(backend="eager", device=device, reserve_mb=0,
                                    block_size_mb=0.004 if dry_run else 0.25)  # fmt: skip
        for label, fraction in (("fxswap_resident", None), ("fxswap_swapping", 0.6)):
            roomy = res.get("fxswap_resident", {}).get("plan_peak_bytes")
            budget = GiB if fraction is None else int(fraction * roomy)
            sm = fxswap.compile(model, max_vram_gb=budget / GiB, ulysses_degree=world, **opts)
            try:
                row, _ = measure(lambda sm=sm: sm(**inputs), dev, steps, ref)
                p = sm.plan
                assert p is not None
                peak = row["peak_allocated"]
                row.update(
                    budget_bytes=budget,
                    plan_peak_bytes=int(p.peak_bytes),
                    activation_peak_bytes=int(p.activation_peak_bytes),
                    plan_degree_rank=[int(p.ulysses_degree), int(p.ulysses_rank)],
                    swapped_units=sum(not u.resident for u in p.units),
                    within_plan=None if peak is None else peak <= p.peak_bytes <= budget,
                    within_tolerance=(row["max_abs_diff"] or 0.0) <= MULTI_GPU_TOLERANCE * scale,
                )
                res[label] = row
            finally:
                sm.runtime.close()
                dev.free()
        res["reference_max_abs"] = scale
    except Exception as e:  # noqa: BLE001 (reported to the parent, which records it)
        res["error"] = f"{type(e).__name__}: {e}"[:3000]
        res["traceback"] = traceback.format_exc()[-3000:]
    Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()
    return res


def run_ranks(world: int, dry_run: bool, steps: int, timeout_s: float) -> dict[str, Any]:
    """``world`` processes of :func:`multi_gpu_rank` (this script, ``--multi-gpu-rank``), killed
    after ``timeout_s``; their results side by side, with the figures across ranks."""
    cfg, size = multi_gpu_case(dry_run)
    with tempfile.TemporaryDirectory(prefix="fxswap_multi_gpu_") as tmp:
        outs = [Path(tmp, f"rank{r}.json") for r in range(world)]
        env = dict(os.environ, OMP_NUM_THREADS="1") if dry_run else dict(os.environ)
        common = [sys.executable, str(Path(__file__).resolve()), "--multi-gpu-world", str(world),
                  "--multi-gpu-store", str(Path(tmp, "store")), "--steps", str(steps),
                  *(["--dry-run"] if dry_run else [])]  # fmt: skip
        procs = [
            subprocess.Popen([*common, "--multi-gpu-rank", str(r), "--multi-gpu-out", str(outs[r])], env=env)
            for r in range(world)
        ]
        end = time.monotonic() + timeout_s
        try:
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.0, end - time.monotonic()))
        finally:  # also when the hard limit interrupts the wait: no rank outlives the check
            hung = [r for r, proc in enumerate(procs) if proc.poll() is None]
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        ranks = []
        for r, o in enumerate(outs):
            got = json.loads(o.read_text()) if o.exists() else {"rank": r, "error": "no result"}
            if r in hung:
                got["error"] = f"killed after {timeout_s:.0f} s"
            elif procs[r].returncode:
                got.setdefault("error", f"exit status {procs[r].returncode}")
            ranks.append(got)
    out: dict[str, Any] = {
        "ranks": world,
        "dtype": "float32",
        "model": {"dim": cfg.dim, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers},
        **size,
        "tolerance": f"bitwise recorded; max_abs_diff <= {MULTI_GPU_TOLERANCE:g} x max|reference|",
        "per_rank": ranks,
    }
    if any("error" in r for r in ranks):
        return out
    kinds = ("fxswap_resident", "fxswap_swapping")
    rows = [r[k] for r in ranks for k in kinds]
    plan_checks = [r["fxswap_swapping"]["within_plan"] for r in ranks]
    one_gpu = statistics.median(r["resident_1gpu"]["step_s"] for r in ranks)
    # a call ends when its slowest rank ends
    two_ranks = {k: max(r[k]["step_s"] for r in ranks) for k in kinds}
    out.update(
        bitwise=all(row["exact_every_step"] for row in rows),
        max_abs_diff=max(row["max_abs_diff"] for row in rows),
        within_tolerance=all(row["within_tolerance"] for row in rows),
        within_plan=None if None in plan_checks else all(plan_checks),
        step_s_resident_1gpu=one_gpu,
        step_s_2ranks_resident=two_ranks["fxswap_resident"],
        step_s_2ranks_swapping=two_ranks["fxswap_swapping"],
        step_2ranks_resident_vs_1gpu=round(two_ranks["fxswap_resident"] / one_gpu, 4),
    )
    return out


# ----------------------------------------------------------------------------------------- runner
class Deadline(Exception):
    pass


class GpuCheck:
    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.dev = Device(device)
        self.device = device
        self.dtype = torch.float32 if args.dry_run else torch.bfloat16
        self.start = time.perf_counter()
        self.deadline = self.start + args.time_limit
        self.out_dir = Path(args.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out_dir / "gpu_check.json"
        self.trace_path = self.out_dir / "gpu_check_trace.json.gz"
        self.traced = False
        self.cuda_path_done = False
        self.models: dict[str, Any] = {}
        self.configs = model_configs(args.dry_run)
        wanted = [m for m in args.models.split(",") if m] or list(self.configs)
        unknown = sorted(set(wanted) - set(self.configs))
        if unknown:
            raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(self.configs)}")
        self.model_names = [m for m in self.configs if m in wanted]
        wanted_cases = [c for c in args.cases.split(",") if c]
        self.cases = [
            c for c in case_list(args.dry_run, self.model_names)
            if not wanted_cases or any(w in c.key for w in wanted_cases)
        ]  # fmt: skip
        self.state: dict[str, dict[str, Any]] = {}
        self.profile: Any = None
        self.report: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "dry_run": args.dry_run,
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "dtype": str(self.dtype).removeprefix("torch."),
            "steps": args.steps,
            "mode": args.mode,
            "time_limit_s": args.time_limit,
            "calibration": None,
            "allocator_rules": None,
            "multi_gpu": None,
            "cases": {},
            "skipped": [],
            "errors": [],
            "finished": False,
        }

    # -- bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def sink(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=1) + "\n")
        tmp.replace(self.json_path)

    def fits(self, cost_s: float) -> bool:
        return time.perf_counter() + cost_s <= self.deadline

    # -- calibration
    def calibrate(self) -> None:
        from fxswap.bench.calibrate import calibrated_profile

        kw: dict[str, Any] = {"copy_mb": 256.0, "repeats": 5}
        if self.args.dry_run:
            kw = {"copy_mb": 16.0, "repeats": 3, "matmul_n": 256}
        from fxswap.errors import FxswapError

        try:
            prof, measured = calibrated_profile(self.device, base=self.args.base, **kw)
        except FxswapError as e:
            # an unknown card: its datasheet peak only scales achieved_fraction; the measured rates
            # that the planner uses are the same with any base
            self.report["errors"].append(f"calibration: {e}"[:1000])
            prof, measured = calibrated_profile(self.device, base="h100-sxm", **kw)
        self.profile = prof
        self.report["calibration"] = {
            "measured": measured,
            "profile": dataclasses.asdict(prof),
        }
        self.log(
            f"calibrated: pinned H2D {measured['pinned_h2d_gbps']:.1f} GB/s, matmul "
            f"{measured['matmul_tflops']:.1f} TFLOP/s ({prof.name})"
        )
        self.sink()

    def plan_kw(self) -> dict[str, Any]:
        from fxswap.bench.costmodel import plan_rates

        kw: dict[str, Any] = dict(plan_rates(self.profile))
        if self.args.dry_run:
            # the tiny models need tiny units and no workspace reserve to swap anything at all
            kw.update(reserve_mb=0, block_size_mb=0.004)
        return kw

    # -- several GPUs
    def multi_gpu(self) -> None:
        n = torch.cuda.device_count() if torch.cuda.is_available() and not self.args.dry_run else 0
        if n < MULTI_GPU_RANKS:
            gpus = f"{n} GPU{'' if n == 1 else 's'}{' (--dry-run uses the CPU)' if self.args.dry_run else ''}"
            self.report["multi_gpu"] = {
                "skipped": f"{gpus}: the sequence-parallel case needs {MULTI_GPU_RANKS}"
            }
        elif "multi_gpu" in self.args.skip_set:
            self.report["multi_gpu"] = {"skipped": "--skip"}
        elif not self.fits(MULTI_GPU_COST_S):
            self.report["multi_gpu"] = {"skipped": f"deadline: needs ~{MULTI_GPU_COST_S:.0f} s"}
            self.report["skipped"].append("multi_gpu")
        else:
            self.log(f"run  multi_gpu: {MULTI_GPU_RANKS} ranks on {n} GPUs, NCCL")
            t0 = time.perf_counter()
            try:
                res = run_ranks(MULTI_GPU_RANKS, False, self.args.steps, self.deadline - time.perf_counter())
            except Exception as e:  # noqa: BLE001 (the cases still run)
                res = {"error": f"{type(e).__name__}: {e}"[:3000]}
            res["wall_s"] = round(time.perf_counter() - t0, 2)
            self.report["multi_gpu"] = res
            failed = [f"rank {r.get('rank')}: {r['error']}" for r in res.get("per_rank", []) if "error" in r]
            if "error" in res:
                failed.append(res["error"])
            elif res.get("within_tolerance") is False:
                failed.append(f"outputs off the 1-GPU reference by {res.get('max_abs_diff')}")
            for f in failed:
                self.report["errors"].append(f"multi_gpu: {f}"[:500])
            self.log(f"     multi_gpu: bitwise {res.get('bitwise')}, max abs diff {res.get('max_abs_diff')}, "
                     f"within plan {res.get('within_plan')}, step {res.get('step_s_2ranks_swapping')} s "
                     f"(1 GPU resident {res.get('step_s_resident_1gpu')} s)")  # fmt: skip
        self.sink()

    # -- models
    def model(self, name: str) -> Any:
        if name in self.models:
            return self.models[name]
        from fxswap.models import wan

        t0 = time.perf_counter()
        torch.manual_seed(0)
        # Built (default init) on the device, where it is fast, then kept on the host: every variant
        # starts from host weights, fxswap's input.
        m = wan.build(self.configs[name], device=self.device, dtype=self.dtype)
        m = m.to("cpu").requires_grad_(False).eval()
        self.dev.free()
        self.models[name] = m
        self.log(f"built {name} in {time.perf_counter() - t0:.1f} s")
        return m

    def case_state(self, case: Case) -> dict[str, Any]:
        st = self.state.get(case.key)
        if st is not None:
            return st
        import fxswap.api as api
        from fxswap.capture import trace
        from fxswap.errors import BudgetInfeasibleError
        from fxswap.models import wan

        cfg = self.configs[case.model]
        kw = {"frames": case.frames, "height": case.height, "width": case.width}
        meta = wan.build(cfg, device="meta", dtype=self.dtype)
        inputs_meta = wan.example_inputs(cfg, device="meta", dtype=self.dtype, **kw)
        # the probe (a 4 TiB budget) only gives the minimum budget and the weight bytes
        opts = api.make_options(mode=self.args.mode, max_vram_gb=4096, **self.plan_kw())
        try:
            probe = api.plan_traced(trace(meta, **inputs_meta), opts)
        except BudgetInfeasibleError as e:  # pragma: no cover - 4 TiB always fits
            raise RuntimeError(f"probe plan failed: {e}") from e
        weights, minimum = int(probe.weight_bytes), int(probe.min_vram_bytes)
        budgets = {"min": minimum, "mid": minimum + weights // 4, "large": minimum + weights // 2}
        inputs = wan.example_inputs(cfg, device=self.device, dtype=self.dtype, **kw)
        st = {
            "inputs": inputs,
            "refs": {},
            "plans": {},
            "result": {
                "model": case.model,
                "frames": case.frames,
                "height": case.height,
                "width": case.width,
                "copy_bound": case.copy_bound,
                "weight_bytes": weights,
                # live before every call, so inside the baseline the peaks are measured above
                "input_bytes": sum(int(t.untyped_storage().nbytes()) for t in inputs.values()),
                "min_vram_bytes": minimum,
                "budgets": budgets,
                "budgets_gib": {k: round(v / GiB, 3) for k, v in budgets.items()},
                "variants": {},
            },
        }
        self.state[case.key] = st
        self.report["cases"][case.key] = st["result"]
        self.sink()
        return st

    # -- one variant
    def run_variant(
        self, case: Case, name: str, cost_s: float, body: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> None:
        st = self.case_state(case)
        variants = st["result"]["variants"]
        if name in self.args.skip_set:
            variants[name] = {"skipped": "--skip"}
            self.sink()
            return
        if not self.fits(cost_s):
            variants[name] = {
                "skipped": f"deadline: {self.deadline - time.perf_counter():.0f} s left, "
                f"needs ~{cost_s:.0f} s"
            }
            self.report["skipped"].append(f"{case.key}/{name}")
            self.log(f"skip {case.key} {name} (deadline)")
            self.sink()
            return
        self.log(f"run  {case.key} {name}")
        t0 = time.perf_counter()
        try:
            res = body(st)
        except Exception as e:  # noqa: BLE001 (one failing variant must not lose the others)
            res = {"error": f"{type(e).__name__}: {e}"[:3000], "traceback": traceback.format_exc()[-3000:]}
            self.report["errors"].append(f"{case.key}/{name}: {type(e).__name__}: {e}"[:500])
            self.log(f"ERROR {case.key} {name}: {type(e).__name__}: {e}"[:500])
        res["wall_s"] = round(time.perf_counter() - t0, 2)
        variants[name] = res
        if "step_s" in res:
            self.log(f"     {name}: step {res['step_s'] * 1e3:.1f} ms, exact {res.get('exact_every_step')}, "
                     f"peak {res.get('peak_allocated')}")  # fmt: skip
            mem = res.get("memory") or {}
            terms = mem.get("plan_terms") or {}
            self.log(f"     {name}: plan peak {mem.get('plan_peak_bytes')}, allocated "
                     f"{mem.get('max_memory_allocated_above_entry')}, reserved "
                     f"{mem.get('max_memory_reserved_above_entry')}, fragmentation "
                     f"{mem.get('fragmentation_at_peak_bytes')}, rounding "
                     f"{terms.get('weights_rounding_bytes')}+"
                     f"{terms.get('activation_rounding_at_peak_bytes')}, "
                     f"kept workspace {terms.get('kept_library_workspace_bytes')}")  # fmt: skip
        self.sink()
        self.dev.free()

    # -- resident
    def resident(self, case: Case, backend: str) -> None:
        name = "resident_eager" if backend == "eager" else "resident_compiled"
        cost = EAGER_COST_S if backend == "eager" else COMPILE_COST_S

        def body(st: dict[str, Any]) -> dict[str, Any]:
            model = self.model(case.model)
            inputs = st["inputs"]
            model.to(self.device)
            try:
                fn = model if backend == "eager" else torch.compile(model)
                res, out = measure(lambda: fn(**inputs), self.dev, self.args.steps, None)
                st["refs"][backend] = out
                res.update(loop_time(lambda: fn(**inputs), self.dev, out))
                # eager and compiled resident outputs against each other (not expected bitwise)
                other = st["refs"].get("inductor" if backend == "eager" else "eager")
                res["equal_to_other_resident"], res["max_abs_diff_vs_other_resident"] = compare(out, other)
                res["memory"] = memory_row(res, None, None)
            finally:
                model.to("cpu")
                if backend == "inductor":
                    torch._dynamo.reset()
            return res

        self.run_variant(case, name, cost, body)

    # -- fxswap
    def fxswap(self, case: Case, backend: str, label: str, *, depth0: bool = False,
               budget_bytes: int | None = None, warm_start: bool = True) -> None:  # fmt: skip
        name = f"fxswap_{backend}{'_depth0' if depth0 else ''}{'' if warm_start else '_cold'}@{label}"
        cost = EAGER_COST_S if backend == "eager" else COMPILE_COST_S

        def body(st: dict[str, Any]) -> dict[str, Any]:
            import fxswap.compiler as fc

            model = self.model(case.model)
            ref = st["refs"].get(backend)
            if ref is None:
                return {"skipped": f"no resident {backend} reference (it failed or was skipped)"}
            budget = budget_bytes if budget_bytes is not None else st["result"]["budgets"][label]
            kw = self.plan_kw()
            plan = None
            if depth0:
                base = st["plans"].get((backend, label)) or st["plans"].get(("eager", label))
                if base is None:
                    return {"skipped": f"no fxswap_{backend}@{label} plan to take the depth-0 copy of"}
                plan = depth0_plan(base)
            pinned0 = self.dev.pinned_allocated()
            first_compile = not any(k[0] == backend for k in st["plans"]) and not self.models_compiled(
                case.model
            )
            from torch._inductor.codecache import PyCodeCache

            n_modules = len(PyCodeCache.modules)
            sm = fc.compile(model, mode=self.args.mode, max_vram_gb=budget / GiB, backend=backend,
                            device=self.device, plan=plan, warm_start=warm_start and plan is None,
                            **kw)  # fmt: skip
            try:
                res, _ = measure(lambda: sm(**st["inputs"]), self.dev, self.args.steps, ref)
                res.update(loop_time(lambda: sm(**st["inputs"]), self.dev, ref))
                p = sm.plan
                assert p is not None
                st["plans"].setdefault((backend, label), p)
                moved = int(p.moved_bytes_per_call)
                copy_ms = moved / (self.profile.pinned_h2d_gbps * 1e9) * 1e3
                res.update(
                    budget_bytes=int(budget),
                    plan_peak_bytes=int(p.peak_bytes),
                    plan_resident_bytes=int(p.resident_bytes),
                    plan_partition=p.partition,
                    plan_prefetch_depth=0 if depth0 else int(p.prefetch_depth),
                    moved_bytes_per_call=moved,
                    copy_ms_at_measured_rate=round(copy_ms, 3),
                    predicted_step_ms=round(float(p.predicted_step_ms), 3),
                    predicted_compute_ms=round(float(p.predicted_compute_ms), 3),
                    predicted_first_step_ms=round(float(p.predicted_first_step_ms), 3),
                    carried_bytes=int(p.carried_bytes),
                    boundary_bytes=int(p.boundary_bytes),
                    predicted_over_measured=round(float(p.predicted_step_ms) / (res["step_s"] * 1e3), 4),
                    swapped_units=sum(not u.resident for u in p.units),
                    units=len(p.units),
                    within_budget=None if res["peak_allocated"] is None else res["peak_allocated"] <= budget,
                    peak_minus_plan_peak=None
                    if res["peak_allocated"] is None
                    else res["peak_allocated"] - int(p.peak_bytes),
                    reserved_within_budget=None
                    if res["peak_reserved"] is None
                    else res["peak_reserved"] <= budget,
                    ledger_peak_bytes=sm.runtime.ledger.peak if sm.runtime.track else None,
                    ops=sm.runtime.stats,
                    pinned_bytes_counted=int(sm.runtime.store.pinned_bytes),
                    pinned_payload_bytes=int(sm.runtime.store.pinned_payload_bytes),
                    pageable_bytes=int(sm.runtime.store.pageable_bytes),
                    # issue 22: memory the allocator keeps beside the peak (record_stream would grow it)
                    reserved_minus_allocated_at_peak=_minus(res["peak_reserved"], res["peak_allocated"]),
                )
                res["memory"] = memory_row(res, int(p.peak_bytes), plan_terms(sm))
                pinned1 = self.dev.pinned_allocated()
                if first_compile and pinned0 is not None and pinned1 is not None:
                    # the first runtime of this model pins everything it stores: the allocator's own
                    # count is the oracle for fxswap's (later runtimes reuse pinned tensors)
                    res["pinned_allocator_active_delta_bytes"] = pinned1 - pinned0
                if backend == "inductor" and sm.graph_module is not None:
                    program = sm._current.fn if sm._current is not None else None
                    regional = program_sequence(program)
                    if regional is not None:  # region by region, in the order the regions run
                        gen_seq, found = regional, bool(regional) or not fx_sequence(sm.graph_module)
                    else:
                        sources = _inductor_sources(n_modules)
                        gen_seq, found = generated_sequence(sources), bool(sources)
                    res["generated_code_order"] = order_report(fx_sequence(sm.graph_module), gen_seq)
                    # no new module: served from an in-process cache, nothing to compare
                    res["generated_code_order"]["generated_code_found"] = found
                if (
                    backend == "eager"
                    and label == "min"
                    and not depth0
                    and case.copy_bound
                    and not self.traced
                ):
                    res["profiled_step"] = self.profile_step(lambda: sm(**st["inputs"]))
            finally:
                sm.runtime.close()
                if backend == "inductor":
                    torch._dynamo.reset()
            return res

        self.run_variant(case, name, cost, body)

    def models_compiled(self, model: str) -> bool:
        return any(st["plans"] for key, st in self.state.items() if key.startswith(model + "@"))

    def profile_step(self, fn: Callable[[], Any]) -> dict[str, Any]:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.dev.cuda else [])
        self.dev.sync()
        with profile(activities=acts) as prof, torch.no_grad():
            fn()
            self.dev.sync()
        raw = self.out_dir / "gpu_check_trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(self.trace_path, "wb") as dst:
            dst.write(src.read())
        raw.unlink()
        self.traced = True
        out = analyse_trace(self.trace_path)
        out["trace_file"] = self.trace_path.name
        out["trace_bytes"] = self.trace_path.stat().st_size
        if out["trace_bytes"] > 15 * MiB:  # the device tool brings back files of up to 16 MiB
            self.trace_path.unlink()
            out["trace_file"] = None
        return out

    # -- issue 22: the CUDA path's stream and memory rules
    def cuda_path(self, case: Case) -> None:
        """The checks of issue 22 that need a device, on one copy-bound case at its ``min`` budget:

        - ``host_syncs``: CUDA runtime synchronisations (``cudaStreamSynchronize``,
          ``cudaDeviceSynchronize``, ``cudaEventSynchronize``, blocking ``cudaMemcpy``) counted by the
          profiler inside 3 steady warm calls, and the warnings of ``set_sync_debug_mode("warn")``;
          both must be 0;
        - ``other_stream``: a call on a user stream after warm calls on the default one: carried
          units are dropped and loaded cold (exact output, ``reserved - allocated`` not grown);
        - ``capture_refused``: a call inside ``torch.cuda.graph`` raises ``CudaGraphCaptureError``;
        - ``pinned_host``: the arenas' bytes against ``/proc/self/status`` (VmRSS, VmLck, VmPin)
          and torch's pinned-allocator statistics, after the build and after ``close()``;
        - ``pageable``: every host copy pageable (``pin_share=0``): staged through the ring; its
          measured step against the priced prediction and against the pinned plan;
        - ``fp8``: ``storage_dtype=float8_e4m3fn`` at two budgets: finite and bitwise equal.
        """
        self.cuda_path_done = True

        def body(st: dict[str, Any]) -> dict[str, Any]:
            import fxswap.compiler as fc

            model = self.model(case.model)
            inputs = st["inputs"]
            ref = st["refs"].get("eager")
            budgets = st["result"]["budgets"]
            kw = self.plan_kw()
            out: dict[str, Any] = {}

            def compiled(budget: int, **extra: Any) -> Any:
                return fc.compile(model, mode=self.args.mode, max_vram_gb=budget / GiB, backend="eager",
                                  device=self.device, **{**kw, **extra})  # fmt: skip

            host0 = _host_memory()
            sm = compiled(budgets["min"], warm_start=True)
            try:
                with torch.no_grad():
                    sm(**inputs)
                    sm(**inputs)
                self.dev.sync()
                out["pinned_host"] = {
                    "pinned_bytes": int(sm.runtime.store.pinned_bytes),
                    "pinned_payload_bytes": int(sm.runtime.store.pinned_payload_bytes),
                    "pageable_bytes": int(sm.runtime.store.pageable_bytes),
                    "after_build": _host_delta(host0, _host_memory()),
                    # the arenas (cudaHostRegister) must read as pinned, or every copy is staged
                    "arena_tensors_pinned": all(
                        h.is_pinned() for n, h in sm.runtime.store.items() if sm.runtime.store.in_arena(n)
                    )
                    if self.dev.cuda
                    else None,
                    "staged_bytes": getattr(sm.runtime.backend, "staged_bytes", None),
                }
                out["host_syncs"] = self.count_host_syncs(lambda: sm(**inputs), calls=3)
                out["other_stream"] = self.other_stream_call(sm, inputs, ref)
                out["capture_refused"] = self.capture_refused(sm, inputs)
            finally:
                sm.close()
            self.dev.free()
            out["pinned_host"]["after_close"] = _host_delta(host0, _host_memory())
            out["pageable"] = self.pageable_step(compiled, budgets["min"], inputs, ref, st)
            out["fp8"] = self.fp8_two_budgets(compiled, budgets, inputs)
            return out

        self.run_variant(case, "issue22_cuda_path@min", 4 * EAGER_COST_S, body)

    def count_host_syncs(self, fn: Callable[[], Any], calls: int) -> dict[str, Any]:
        from torch.profiler import ProfilerActivity, profile, record_function

        if not self.dev.cuda:
            with torch.no_grad():
                for _ in range(calls):
                    fn()
            return {"skipped": "no CUDA device: nothing to synchronise with"}
        names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
        self.dev.sync()
        acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with profile(activities=acts) as prof, torch.no_grad(), record_function("issue22.steady"):
            for _ in range(calls):
                fn()
        events = prof.events()
        window = [e for e in events if e.name == "issue22.steady"]
        lo, hi = (window[0].time_range.start, window[0].time_range.end) if window else (0, float("inf"))
        found: dict[str, int] = {}
        for e in events:
            if e.name.startswith(names) and "Async" not in e.name and lo <= e.time_range.start <= hi:
                found[e.name] = found.get(e.name, 0) + 1
        import warnings

        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught, torch.no_grad():
                warnings.simplefilter("always")
                for _ in range(calls):
                    fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        self.dev.sync()
        debug = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message).lower()]
        return {"calls": calls, "profiler_syncs": found, "profiler_sync_count": sum(found.values()),
                "sync_debug_warnings": len(debug), "sync_debug_first": debug[:3]}  # fmt: skip

    def other_stream_call(self, sm: Any, inputs: dict[str, Any], ref: torch.Tensor | None) -> dict[str, Any]:
        if not self.dev.cuda:
            return {"skipped": "no CUDA streams"}
        before = self.dev.snapshot()
        loads0 = sm.runtime.stats["loads"]
        carried = int(sm.runtime.carried_bytes)
        user = torch.cuda.Stream(self.device)
        user.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(user), torch.no_grad():
            got = sm(**inputs)
        torch.cuda.current_stream(self.device).wait_stream(user)
        with torch.no_grad():
            again = sm(**inputs)  # back on the default stream: the user stream's carries are dropped
        self.dev.sync()
        after = self.dev.snapshot()
        slack0 = _minus(before["reserved"], before["allocated"])
        slack1 = _minus(after["reserved"], after["allocated"])
        return {
            "carried_bytes_before": carried,
            "loads": sm.runtime.stats["loads"] - loads0,
            "exact": compare(got, ref)[0],
            "exact_back_on_default": compare(again, ref)[0],
            "reserved_minus_allocated_before": slack0,
            "reserved_minus_allocated_after": slack1,
        }

    def capture_refused(self, sm: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        from fxswap.errors import CudaGraphCaptureError

        if not self.dev.cuda:
            return {"skipped": "no CUDA graphs"}
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), torch.no_grad():
                sm(**inputs)
        except CudaGraphCaptureError as e:
            return {"refused": True, "message": str(e)[:200]}
        except Exception as e:  # noqa: BLE001 (what else happened is the finding)
            return {"refused": False, "error": f"{type(e).__name__}: {e}"[:500]}
        return {"refused": False, "error": None}

    def pageable_step(
        self, compiled: Callable[..., Any], budget: int, inputs: dict[str, Any], ref: torch.Tensor | None,
        st: dict[str, Any],
    ) -> dict[str, Any]:  # fmt: skip
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the pin cap warning: expected here
            sm = compiled(budget, warm_start=True, pin_share=0.0)
            try:
                with torch.no_grad():
                    first = sm(**inputs)
                self.dev.sync()
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    with torch.no_grad():
                        got = sm(**inputs)
                    self.dev.sync()
                    times.append(time.perf_counter() - t)
                p = sm.plan
                backend = sm.runtime.backend
                pinned = st["result"]["variants"].get("fxswap_eager@min", {})
                step = statistics.median(times)
                predicted = None if p is None else float(p.predicted_step_ms)
                ratio = None if predicted is None else round(predicted / (step * 1e3), 4)
                return {
                    "exact": bool(compare(first, ref)[0]) and bool(compare(got, ref)[0]),
                    "pageable_bytes": int(sm.runtime.store.pageable_bytes),
                    "pinned_bytes": int(sm.runtime.store.pinned_bytes),
                    "ring_bytes": getattr(backend, "ring_bytes", None),
                    "staged_bytes": getattr(backend, "staged_bytes", None),
                    "pageable_step_s": round(step, 5),
                    "predicted_step_ms_priced": None if predicted is None else round(predicted, 3),
                    "predicted_over_measured": ratio,
                    "pinned_step_s": pinned.get("step_s"),
                    "pinned_predicted_step_ms": pinned.get("predicted_step_ms"),
                }
            finally:
                sm.close()

    def fp8_two_budgets(
        self, compiled: Callable[..., Any], budgets: dict[str, int], inputs: dict[str, Any]
    ) -> dict[str, Any]:
        outs = []
        for label in ("mid", "large"):
            sm = compiled(budgets[label], storage_dtype=torch.float8_e4m3fn)
            try:
                with torch.no_grad():
                    outs.append(sm(**inputs).detach().clone())
            finally:
                sm.close()
        return {"finite": all(bool(torch.isfinite(o).all()) for o in outs),
                "equal_across_budgets": bool(torch.equal(outs[0], outs[1]))}  # fmt: skip

    # -- diffusers peer
    def diffusers(self, case: Case) -> None:
        def body(st: dict[str, Any]) -> dict[str, Any]:
            model = self.peer(case.model)
            inp = st["inputs"]
            res, _ = measure(
                lambda: model(hidden_states=inp["x"], timestep=inp["timestep"],
                              encoder_hidden_states=inp["context"], return_dict=False)[0],
                self.dev, self.args.steps, st["refs"].get("eager"),
            )  # fmt: skip
            budget = st["result"]["budgets"]["min"]
            res["within_min_budget"] = (
                None if res["peak_allocated"] is None else res["peak_allocated"] <= budget
            )
            res["use_stream"] = self.dev.cuda
            res["note"] = "max_abs_diff against fxswap's resident eager WanModel: another implementation" + (
                "" if self.dev.cuda else "; dry run: use_stream=False (streams need CUDA)"
            )
            return res

        self.run_variant(case, "diffusers_group_offload", EAGER_COST_S + 10, body)

    def peer(self, name: str) -> Any:
        key = f"peer:{name}"
        if key in self.models:
            return self.models[key]
        from diffusers import WanTransformer3DModel
        from diffusers.hooks import apply_group_offloading

        from fxswap.models.wan_checkpoint import convert_state_dict

        cfg = self.configs[name]
        with _parameters_on_meta():
            peer: Any = WanTransformer3DModel(
                patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim,
                freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=cfg.eps, image_dim=cfg.image_dim,
            )  # fmt: skip
        # the same host weights as fxswap's model (shared storage; the peer swaps its own parameter
        # objects' .data, never fxswap's tensors)
        sd = convert_state_dict(self.model(name).state_dict(), "original", "diffusers")
        peer.load_state_dict(sd, strict=True, assign=True)
        peer = peer.requires_grad_(False).eval()
        # On the CPU (dry run) streams do not exist: the same model and hooks without them.
        apply_group_offloading(peer, onload_device=self.device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=self.dev.cuda,
                               record_stream=self.dev.cuda)  # fmt: skip
        self.models[key] = peer
        return peer

    # -- the run
    def overlap(self, case: Case) -> None:
        st = self.state.get(case.key)
        if st is None:
            return
        v = st["result"]["variants"]
        sw, d0, res = (
            v.get("fxswap_eager@min", {}),
            v.get("fxswap_eager_depth0@min", {}),
            v.get("resident_eager", {}),
        )
        if "step_s" not in sw:
            return
        copy_ms = sw["copy_ms_at_measured_rate"]
        out: dict[str, Any] = {"copy_ms": copy_ms, "step_ms": sw["step_s"] * 1e3}
        if "step_s" in res and copy_ms:
            out["exposed_ms_vs_resident"] = round((sw["step_s"] - res["step_s"]) * 1e3, 3)
            out["hidden_share_vs_resident"] = round(1 - out["exposed_ms_vs_resident"] / copy_ms, 4)
        if "step_s" in d0 and copy_ms:
            out["depth0_step_ms"] = d0["step_s"] * 1e3
            out["hidden_share_vs_depth0"] = round((d0["step_s"] - sw["step_s"]) * 1e3 / copy_ms, 4)
        st["result"]["overlap"] = out
        self.sink()

    def ratios(self, case: Case) -> None:
        """Each variant's step over its resident baseline: fxswap eager and the peer over resident eager,
        fxswap Inductor over resident compiled (1.0 = as fast as the whole model on the GPU)."""
        st = self.state.get(case.key)
        if st is None:
            return
        v = st["result"]["variants"]
        base = {"eager": v.get("resident_eager", {}).get("step_s"),
                "inductor": v.get("resident_compiled", {}).get("step_s")}  # fmt: skip
        out = {}
        for name, res in v.items():
            kind = "inductor" if name.startswith("fxswap_inductor") else "eager"
            if res.get("step_s") and base[kind] and not name.startswith("resident"):
                out[name] = round(res["step_s"] / base[kind], 4)
        st["result"]["step_vs_resident"] = out
        # the same over LOOP_CALLS consecutive calls (warm starts included)
        loop_base = {"eager": v.get("resident_eager", {}).get("loop_step_s"),
                     "inductor": v.get("resident_compiled", {}).get("loop_step_s")}  # fmt: skip
        st["result"]["loop_step_vs_resident"] = {
            name: round(res["loop_step_s"] / loop_base[kind], 4)
            for name, res in v.items()
            for kind in ["inductor" if name.startswith("fxswap_inductor") else "eager"]
            if res.get("loop_step_s") and loop_base[kind] and not name.startswith("resident")
        }
        self.sink()

    def oom_recovery(self, case: Case) -> None:
        """Another program takes device memory between two calls: adaptive must re-plan and stay exact.

        On CUDA a second tensor takes all free memory but half of what the plan holds above its
        resident weights, so the next call's loads fail for real; on the CPU (dry run) the runtime's
        allocation hook raises the same error at the first load.
        """

        def body(st: dict[str, Any]) -> dict[str, Any]:
            import fxswap.compiler as fc

            ref = st["refs"].get("eager")
            if ref is None:
                return {"skipped": "no resident eager reference"}
            budget = st["result"]["budgets"]["large"]
            sm = fc.compile(self.model(case.model), mode="adaptive", max_vram_gb=budget / GiB,
                            backend="eager", device=self.device, **self.plan_kw())  # fmt: skip
            try:
                with torch.no_grad():
                    sm(**st["inputs"])
                assert sm.plan is not None
                hog: torch.Tensor | None = None
                if self.device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(self.device)
                    keep = int(sm.plan.peak_bytes - sm.plan.resident_bytes) // 2
                    hog = torch.empty(max(0, free - keep), dtype=torch.uint8, device=self.device)
                else:
                    fired: list[int] = []

                    def hook(kind: str, name: str, nbytes: int) -> None:
                        if kind == "load" and not fired:
                            fired.append(nbytes)
                            raise torch.OutOfMemoryError("injected: another program took the memory")

                    sm.runtime.alloc_hook = hook
                try:
                    with torch.no_grad():
                        out = sm(**st["inputs"])
                finally:
                    del hog
                    sm.runtime.alloc_hook = None
                exact, max_abs = compare(out, ref)
                rec = sm.recoveries[-1] if sm.recoveries else None
                return {
                    "budget_bytes": int(budget),
                    "recoveries": len(sm.recoveries),
                    "recovery": dataclasses.asdict(rec) if rec is not None else None,
                    "exact_after_recovery": exact,
                    "max_abs_diff": max_abs,
                }
            finally:
                sm.close()

        self.run_variant(case, "fxswap_eager_oom_recovery@large", EAGER_COST_S, body)

    def run(self) -> None:
        self.calibrate()
        try:
            self.report["allocator_rules"] = check_allocator_rules(self.device)
        except Exception as e:  # noqa: BLE001 (a failed check must not lose the cases)
            self.report["allocator_rules"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        self.log(f"allocator rules: {json.dumps(self.report['allocator_rules'])[:600]}")
        self.sink()
        self.multi_gpu()
        order = [(b, m) for b in ("eager", "inductor") for m in self.model_names]
        for backend, model in order:
            if backend == "inductor" and self.args.dry_run and not self.args.dry_run_inductor:
                for case in (c for c in self.cases if c.model == model):
                    res = self.case_state(case)["result"]["variants"]
                    res["resident_compiled"] = {"skipped": "--dry-run without --dry-run-inductor"}
                    for label in BUDGET_LABELS:
                        res[f"fxswap_inductor@{label}"] = {"skipped": "--dry-run without --dry-run-inductor"}
                self.sink()
                continue
            if not self.fits(EAGER_COST_S):  # the deadline is checked before each model
                self.report["skipped"].append(f"{model}/{backend}: deadline before the model")
                self.log(f"skip {model} {backend}: deadline")
                self.sink()
                continue
            for case in (c for c in self.cases if c.model == model):
                if backend == "eager":
                    self.resident(case, "eager")
                    self.fxswap(case, "eager", "min")
                    self.fxswap(case, "eager", "min", depth0=True)
                    self.overlap(case)
                    if case.copy_bound and not self.cuda_path_done:
                        self.cuda_path(case)
                    self.fxswap(case, "eager", "mid")
                    self.fxswap(case, "eager", "large")
                    self.diffusers(case)
                    self.oom_recovery(case)
                    peer = self.state[case.key]["result"]["variants"].get("diffusers_group_offload", {})
                    if peer.get("peak_allocated"):
                        self.fxswap(
                            case,
                            "eager",
                            "peer_peak",
                            budget_bytes=max(
                                int(peer["peak_allocated"]), self.state[case.key]["result"]["min_vram_bytes"]
                            ),
                        )
                    else:
                        self.state[case.key]["result"]["variants"]["fxswap_eager@peer_peak"] = {
                            "skipped": "the peer has no measured peak (CPU, or it failed)"
                        }
                else:
                    self.resident(case, "inductor")
                    self.fxswap(case, "inductor", "min")
                    # the same budget with every call cold: what the warm start gains in a loop
                    self.fxswap(case, "inductor", "min", warm_start=False)
                self.ratios(case)
            if backend == "inductor":  # the larger budgets compile again: last
                for case in (c for c in self.cases if c.model == model):
                    self.fxswap(case, "inductor", "mid")
                    self.fxswap(case, "inductor", "large")
                    self.ratios(case)
        self.report["finished"] = True
        self.sink()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build a module with its parameters on meta (no init, no memory) but its buffers real: the peer's
    RoPE tables are non-persistent buffers that no state dict brings back."""
    register = torch.nn.Module.register_parameter

    def on_meta(self: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def depth0_plan(plan: Any) -> Any:
    """``plan`` with every swapped unit's load moved onto its wait (prefetch depth 0): the copies then
    run with nothing to hide behind. Peak and fingerprint stay (the peak can only drop)."""
    units = tuple(
        u
        if u.resident
        else dataclasses.replace(u, load_at=u.wait_at, load_node=u.wait_node, carry_at=None, carry_node=None)
        for u in plan.units
    )
    # no warm start either: nothing is loaded before its own call's wait
    return dataclasses.replace(plan, units=units, prefetch_depth=0, carried_bytes=0, boundary_bytes=0)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny WANs on the CPU: checks the code path")
    ap.add_argument("--dry-run-inductor", action="store_true", help="with --dry-run: the Inductor pass too")
    ap.add_argument("--out-dir", default="benchmarks/results/gpu_check",
                    help="gpu_check.json and gpu_check_trace.json.gz go here")  # fmt: skip
    ap.add_argument("--steps", type=int, default=3, help="timed calls per variant after the warm-up (>= 3)")
    ap.add_argument("--mode", default="adaptive", choices=["layerwise", "chunkwise", "adaptive"])
    ap.add_argument(
        "--base", default=None, help="hardware profile for the unmeasured figures (default: by name)"
    )
    ap.add_argument("--time-limit", type=float, default=450.0, help="no variant starts that would end later")
    ap.add_argument("--hard-limit", type=float, default=470.0,
                    help="interrupt the running variant after this many seconds; 0 = never")  # fmt: skip
    ap.add_argument("--skip", default="", help="comma-separated variant names to skip")
    ap.add_argument("--models", default="", help="comma-separated model names (default: all, 14B first)")
    ap.add_argument("--cases", default="", help="comma-separated parts of case keys to keep, e.g. 480p17")
    # one rank of the multi-GPU case, started by the check itself (run_ranks)
    ap.add_argument("--multi-gpu-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--multi-gpu-world", type=int, default=MULTI_GPU_RANKS, help=argparse.SUPPRESS)
    ap.add_argument("--multi-gpu-store", default="", help=argparse.SUPPRESS)
    ap.add_argument("--multi-gpu-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.multi_gpu_rank is not None:
        res = multi_gpu_rank(args.multi_gpu_rank, args.multi_gpu_world, args.multi_gpu_store,
                             args.multi_gpu_out, args.dry_run, args.steps)  # fmt: skip
        return {"finished": True, "errors": [res["error"]] if "error" in res else []}
    args.skip_set = {s for s in args.skip.split(",") if s}
    if args.steps < 3 and not args.dry_run:
        ap.error(f"--steps={args.steps}: the median needs at least 3 timed calls")
    if args.dry_run:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --dry-run on the CPU")
        device = torch.device("cuda", torch.cuda.current_device())
    check = GpuCheck(args, device)
    alarm = args.hard_limit > 0 and hasattr(signal, "SIGALRM")
    if alarm:
        # A variant that overruns (a slow compile, a hang in Python) must not cost the report: the
        # alarm raises inside it, run_variant records the error, and later variants are skipped.
        def _overrun(signum: int, frame: Any) -> None:
            check.deadline = 0.0
            raise TimeoutError(f"--hard-limit {args.hard_limit:g}s reached")

        previous = signal.signal(signal.SIGALRM, _overrun)
        signal.setitimer(signal.ITIMER_REAL, args.hard_limit)
    try:
        check.run()
    except Exception as e:  # noqa: BLE001 (calibration or a case setup failed: keep the report)
        check.report["errors"].append(f"run: {type(e).__name__}: {e}"[:2000])
        check.log(f"ERROR run: {type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        check.sink()
    return check.report


if __name__ == "__main__":
    rep = main()
    sys.exit(0 if rep["finished"] and not rep["errors"] else 1)
