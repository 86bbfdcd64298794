"""First call of a compiled WAN transformer: whole-graph, regional and fxswap compilation, eager as baseline.

Each variant runs in its own child process with an empty Inductor cache (a fresh
``TORCHINDUCTOR_CACHE_DIR``, with ``FXSWAP_CACHE_DIR`` inside it), so every first call pays the
full compile, as a user's first run does:

- ``eager``: no compilation (the baseline steady call);
- ``whole``: ``torch.compile(model, fullgraph=True)`` (Inductor);
- ``regional``: ``block.compile(fullgraph=True)`` for each block in ``model.blocks``: what WAN users
  run in ComfyUI and WanVideoWrapper, and PyTorch's recipe for repeated blocks;
- ``fxswap``: ``fxswap.compile(model, mode="adaptive", max_vram_gb=<share> x the weights,
  reserve_mb=0, backend="inductor")``: the repeated blocks compiled, the rest run as FX's Python, as
  regional compilation leaves it; in the same child, its steady call is then timed against
  fxswap compiling one graph with the same options (calls interleaved: the run-time cost of
  block-by-block programs);
- ``fxswap-compiled-edges``: ``fxswap`` with ``FXSWAP_EAGER_EDGES=0``: its prologue and epilogue
  compiled too (outputs those of ``torch.compile`` on the whole model);
- ``fxswap-onegraph``: the same, as fxswap compiled before it went block by block
  (``FXSWAP_REGIONS=0 FXSWAP_BLOCK_CAPTURE=0``: the whole model traced, one Inductor graph).

In each child, under ``torch.no_grad()``: the eager model's outputs at both resolutions are computed
first (they are the references for ``max abs diff``; the compiled variants take their first call
after them, so the process is equally warm for all of them), then the model is compiled and called
once (the first call: from the compile call to the first output), ``--steady-calls`` more times
(median), then once at a second resolution (a new input signature in the same process) and again
(median of as many). ``fxswap`` and ``regional`` then run once more in a second child sharing the
first child's cache folders: its first call is what a user pays in a later process.

Models (``--model``, several allowed; default both):

- ``diffusers40``: diffusers' ``WanTransformer3DModel`` with 40 blocks (WAN 14B's count) and small
  widths (Inductor's time follows the number of ops, not their widths), float32 weights drawn
  ``randn * 0.2``; latents ``[1, 16, 3, 8, 8]``, second resolution ``[1, 16, 3, 8, 12]``;
- ``wan2.1-t2v-1.3b``: fxswap's own WAN module (``fxswap.models.wan``), 30 blocks at WAN 1.3B's
  widths, random bf16 weights; 1 frame at 64 x 64 pixels, second resolution 64 x 96.

Every figure is measured in this run; ratios are against ``regional`` of the same run. A variant
that fails records the tail of its child's stderr instead of figures; the others still run.

Usage (tens of minutes on 2 CPU cores, WAN 1.3B the longer part: its eager bf16 calls, the
references, take seconds each on a CPU; results are committed as
``benchmarks/results/bench_compile.json``). Timings mean little on a machine other jobs load::

    python benchmarks/bench_compile.py --json benchmarks/results/bench_compile.json

Smoke test (a few minutes)::

    python benchmarks/bench_compile.py --model diffusers40 --layers 2 \\
        --variants eager,regional,fxswap --share 1.25

With 2 blocks the embeddings and one block's worth of weights are most of the model: half the
weights is below the smallest budget fxswap can keep (0.75 to 0.94 of them for the 2-block
diffusers model while fxswap was being changed), so the fxswap row would be a
``BudgetInfeasibleError``. A larger share keeps the smoke test clear of that minimum (``plans``
in the JSON says how many units each plan swaps). ``--dry-run`` is ``--layers 2 --steady-calls 2
--share 1.25`` (each unless given) with every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODELS = ("diffusers40", "wan2.1-t2v-1.3b")
VARIANTS = ("eager", "whole", "regional", "fxswap", "fxswap-compiled-edges", "fxswap-onegraph")
# fxswap as it was before it compiled block by block: the whole model traced by Dynamo and the
# rewritten graph compiled as one Inductor graph (the switches fxswap keeps for comparisons).
ONEGRAPH_ENV = {"FXSWAP_REGIONS": "0", "FXSWAP_BLOCK_CAPTURE": "0"}
# fxswap with its prologue and epilogue compiled too (its default runs them as FX's Python).
COMPILED_EDGES_ENV = {"FXSWAP_EAGER_EDGES": "0"}
# Variants whose later-process first call is measured: the two whose per-block reuse the issue compares.
SECOND_PROCESS = ("regional", "fxswap", "fxswap-compiled-edges")
RESULT_MARK = "BENCH_COMPILE_RESULT "
STDERR_TAIL = 4000

# --------------------------------------------------------------------------------------------------
# Child: one variant of one model in this process
# --------------------------------------------------------------------------------------------------


def _build(name: str, layers: int | None) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The model (eval mode), the keyword inputs at both resolutions, and a description for the JSON."""
    import torch

    model: Any
    first: dict[str, Any]
    second: dict[str, Any]
    if name == "diffusers40":
        from diffusers import WanTransformer3DModel

        torch.manual_seed(0)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=32,
            ffn_dim=64,
            num_layers=40 if layers is None else layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
        # The default init zeroes some projections (the output would not depend on every weight);
        # random values everywhere make every weight, and so every difference, matter.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
        gen = torch.Generator().manual_seed(1)
        text = torch.randn(1, 8, 32, generator=gen)
        common = {"timestep": torch.tensor([500]), "encoder_hidden_states": text, "return_dict": False}
        first = {"hidden_states": torch.randn(1, 16, 3, 8, 8, generator=gen), **common}
        second = {"hidden_states": torch.randn(1, 16, 3, 8, 12, generator=gen), **common}
        blocks = len(model.blocks)
        desc = {
            "module": "diffusers.WanTransformer3DModel",
            "blocks": blocks,
            "dtype": "float32",
            "latents": [list(first["hidden_states"].shape), list(second["hidden_states"].shape)],
        }
        return model.eval(), first, second, desc

    from fxswap.models import wan

    cfg = wan.CONFIGS[name]
    torch.manual_seed(0)
    overrides: dict[str, Any] = {} if layers is None else {"num_layers": layers}
    model = wan.build(cfg, dtype=torch.bfloat16, **overrides)
    first = wan.example_inputs(cfg, frames=1, height=64, width=64, dtype=torch.bfloat16)
    second = wan.example_inputs(cfg, frames=1, height=64, width=96, dtype=torch.bfloat16, seed=1)
    desc = {
        "module": "fxswap.models.wan.WanModel",
        "config": name,
        "blocks": len(model.blocks),
        "dtype": "bfloat16",
        "pixels": [[1, 64, 64], [1, 64, 96]],
        "latents": [list(first["x"].shape), list(second["x"].shape)],
    }
    return model.eval(), first, second, desc


def _tensor(out: Any) -> Any:
    """The output tensor of either model: diffusers returns a tuple with ``return_dict=False``."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _max_abs_diff(out: Any, ref: Any) -> float:
    return float((_tensor(out).float() - _tensor(ref).float()).abs().max())


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    variant, steady_n = spec["variant"], spec["steady_calls"]
    model, inputs1, inputs2, desc = _build(spec["model"], spec["layers"])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    result: dict[str, Any] = {"model": desc, "weights_bytes": weights}
    with torch.no_grad():
        refs = None
        if variant != "eager":
            # Before compiling: regional compilation changes the blocks in place.
            refs = (model(**inputs1), model(**inputs2))

        start = time.perf_counter()
        if variant == "eager":
            fn: Callable[..., Any] = model
        elif variant == "whole":
            fn = torch.compile(model, fullgraph=True)
        elif variant == "regional":
            for block in model.blocks:
                block.compile(fullgraph=True)
            fn = model
        elif variant in ("fxswap", "fxswap-compiled-edges", "fxswap-onegraph"):
            import fxswap

            fn = fxswap.compile(
                model,
                mode="adaptive",
                max_vram_gb=spec["share"] * weights / 2**30,
                reserve_mb=0,
                backend="inductor",
            )
        else:
            raise ValueError(f"unknown variant {variant!r}")
        setup = time.perf_counter() - start

        first, out1 = _timed(lambda: fn(**inputs1))
        steady = [_timed(lambda: fn(**inputs1))[0] for _ in range(steady_n)]
        res2_first, out2 = _timed(lambda: fn(**inputs2))
        res2_steady = [_timed(lambda: fn(**inputs2))[0] for _ in range(steady_n)]

    result.update(
        setup_s=round(setup, 4),
        first_call_s=round(first, 4),
        first_output_s=round(setup + first, 4),
        steady_call_s=round(statistics.median(steady), 5) if steady else None,
        steady_calls_s=[round(t, 5) for t in steady],
        res2_first_call_s=round(res2_first, 4),
        res2_steady_call_s=round(statistics.median(res2_steady), 5) if res2_steady else None,
        res2_steady_calls_s=[round(t, 5) for t in res2_steady],
    )
    if refs is not None:
        result["max_abs_diff"] = _max_abs_diff(out1, refs[0])
        result["max_abs_diff_res2"] = _max_abs_diff(out2, refs[1])
    if variant == "fxswap" and spec.get("steady_baseline", True):
        result.update(_steady_against_onegraph(fn, model, inputs1, steady_n, spec["share"] * weights / 2**30))
    if variant in ("fxswap", "fxswap-compiled-edges", "fxswap-onegraph"):
        # One plan per input signature, in call order: the budget is only kept by swapping if some
        # units are not resident.
        result["plans"] = [
            {"units": len(p.units), "swapped_units": sum(not u.resident for u in p.units)}
            for p in getattr(fn, "plans", [])
        ]
        result["budget_bytes"] = int(spec["share"] * weights)
    try:
        from torch._dynamo.utils import counters

        # Hits and misses of Inductor's FX graph cache show what a second process found compiled.
        result["inductor_counters"] = {k: v for k, v in counters["inductor"].items() if "fxgraph" in k}
    except Exception:  # a private API: the figures above do not depend on it
        pass
    try:
        import resource

        # ru_maxrss is KiB on Linux
        result["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except ImportError:
        pass
    return result


def _steady_against_onegraph(
    fn: Any, model: Any, inputs: dict[str, Any], n: int, budget_gb: float
) -> dict[str, Any]:
    """The steady call of fxswap's regional program against fxswap as it compiled before (the whole
    model traced, one Inductor graph, its own plan for the same options), in this process, calls
    interleaved. Not the same plan: the plan fitted to the regional program can peak above the
    budget as one graph, and fxswap refuses it there."""
    import torch

    import fxswap

    os.environ.update(ONEGRAPH_ENV)
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            base = fxswap.compile(
                model, mode="adaptive", max_vram_gb=budget_gb, reserve_mb=0, backend="inductor"
            )
            ref = base(**inputs)
            compile_s = time.perf_counter() - t0
            out = fn(**inputs)  # back to the first signature (its carried units are dropped)
            regional, onegraph = [], []
            for _ in range(max(n, 5)):
                regional.append(_timed(lambda: fn(**inputs))[0])
                onegraph.append(_timed(lambda: base(**inputs))[0])
            # Consecutive calls, as a sampler makes them: runs of `run` calls of one program, the
            # two programs' runs alternated (drift cancels out as it does interleaved).
            run = 10
            regional_runs: list[float] = []
            onegraph_runs: list[float] = []
            for _ in range(max(4, max(n, 5) * 2 // run)):
                regional_runs += [_timed(lambda: fn(**inputs))[0] for _ in range(run)]
                onegraph_runs += [_timed(lambda: base(**inputs))[0] for _ in range(run)]
    finally:
        for k in ONEGRAPH_ENV:
            os.environ.pop(k, None)
    a, b = statistics.median(regional), statistics.median(onegraph)
    c, d = statistics.median(regional_runs), statistics.median(onegraph_runs)
    return {
        "steady_ratio_vs_onegraph_consecutive": round(c / d, 4),
        "steady_consecutive_s": [round(c, 5), round(d, 5)],
        "steady_consecutive_run": run,
        "steady_consecutive_regional_calls_s": [round(t, 5) for t in regional_runs],
        "steady_consecutive_onegraph_calls_s": [round(t, 5) for t in onegraph_runs],
        "onegraph_first_call_s": round(compile_s, 4),
        "onegraph_swapped_units": sum(not u.resident for u in base.plan.units),
        "regional_swapped_units": sum(not u.resident for u in fn.plans[0].units),
        "onegraph_steady_call_s": round(b, 5),
        "steady_regional_calls_s": [round(t, 5) for t in regional],
        "steady_onegraph_calls_s": [round(t, 5) for t in onegraph],
        "steady_ratio_vs_onegraph": round(a / b, 4),
        "max_abs_diff_vs_onegraph": _max_abs_diff(out, ref),
    }


# --------------------------------------------------------------------------------------------------
# Parent: one child per variant, then the table
# --------------------------------------------------------------------------------------------------


def _spawn(spec: dict[str, Any], cache: str, timeout_s: float) -> dict[str, Any]:
    env = dict(
        os.environ,
        TORCHINDUCTOR_CACHE_DIR=cache,
        FXSWAP_CACHE_DIR=os.path.join(cache, "fxswap"),
        PYTHONUNBUFFERED="1",
    )
    if spec["variant"] == "fxswap-onegraph":
        env.update(ONEGRAPH_ENV)
    if spec["variant"] == "fxswap-compiled-edges":
        env.update(COMPILED_EDGES_ENV)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return {"error": f"timed out after {timeout_s:.0f} s", "stderr_tail": err[-STDERR_TAIL:]}
    wall = round(time.perf_counter() - start, 2)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        return {
            "error": f"child exited with {proc.returncode}",
            "stderr_tail": proc.stderr[-STDERR_TAIL:],
            "wall_s": wall,
        }
    out: dict[str, Any] = json.loads(lines[-1][len(RESULT_MARK) :])
    out["wall_s"] = wall
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 3) if num is not None and den else None


def run_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    variants: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        spec = {
            "model": model,
            "variant": variant,
            "layers": args.layers,
            "share": args.share,
            "steady_calls": args.steady_calls,
        }
        with tempfile.TemporaryDirectory(prefix=f"bench_compile_{variant}_") as cache:
            res = _spawn(spec, cache, args.timeout)
            if variant in SECOND_PROCESS and "error" not in res:
                res["second_process"] = _spawn(spec, cache, args.timeout)
        variants[variant] = res
        _log(model, variant, res)

    regional = variants.get("regional", {})
    for res in variants.values():
        if "error" in res:
            continue
        res["ratio_first_vs_regional"] = _ratio(res.get("first_output_s"), regional.get("first_output_s"))
        res["ratio_res2_first_vs_regional"] = _ratio(
            res.get("res2_first_call_s"), regional.get("res2_first_call_s")
        )
        second, regional_second = res.get("second_process", {}), regional.get("second_process", {})
        if "first_output_s" in second:
            res["ratio_second_process_vs_regional"] = _ratio(
                second["first_output_s"], regional_second.get("first_output_s")
            )
    desc = next((r["model"] for r in variants.values() if "model" in r), {"config": model})
    return {"model": desc, "variants": variants}


def _log(model: str, variant: str, res: dict[str, Any]) -> None:
    if "error" in res:
        msg = f"ERROR {res['error']}"
    else:
        msg = f"first {res['first_output_s']:.2f} s, steady {res['steady_call_s']} s"
        second = res.get("second_process")
        if second is not None:
            msg += f", second process first {second.get('first_output_s', second.get('error'))}"
    print(f"[bench_compile] {model} {variant}: {msg}", file=sys.stderr, flush=True)


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_ratio(value: float | None) -> str:
    # eager's ratio is ~0.003: two decimals would print it as 0.00
    return "-" if value is None else f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def markdown(results: dict[str, Any]) -> str:
    header = (
        "| variant | first call s | steady call s | 2nd res. first s | 2nd res. steady s "
        "| 2nd process first s | first / regional first | 2nd res. first / regional's | max abs diff |"
    )
    parts = []
    for name, entry in results["models"].items():
        model = entry["model"]
        parts.append(
            f"**{name}** ({model.get('module', '?')}, {model.get('blocks', '?')} blocks, "
            f"{model.get('dtype', '?')}, latents {model.get('latents', '?')})\n"
        )
        parts.append(header)
        parts.append("|" + "---|" * header.count(" | ") + "---|")
        for variant, res in entry["variants"].items():
            if "error" in res:
                tail = res.get("stderr_tail", "").strip().splitlines()
                why = (tail[-1] if tail else "").replace("|", "\\|")
                parts.append(f"| {variant} | error: {res['error']}: {why[:160]} |" + " |" * 7)
                continue
            second = res.get("second_process")
            if second is None:
                second_cell = "-"
            elif "error" in second:
                second_cell = f"error: {second['error']}"
            else:
                second_cell = _fmt(second["first_output_s"], 2)
            diff = res.get("max_abs_diff")
            cells = [
                variant,
                _fmt(res["first_output_s"], 2),
                _fmt(res["steady_call_s"], 4),
                _fmt(res["res2_first_call_s"], 2),
                _fmt(res["res2_steady_call_s"], 4),
                second_cell,
                _fmt_ratio(res.get("ratio_first_vs_regional")),
                _fmt_ratio(res.get("ratio_res2_first_vs_regional")),
                "-" if diff is None else f"{diff:.3g}",
            ]
            parts.append("| " + " | ".join(cells) + " |")
        fx = entry["variants"].get("fxswap", {})
        if "steady_ratio_vs_onegraph" in fx:
            parts.append(
                f"\nfxswap's steady call against fxswap compiling one graph (its own plan, same options), "
                f"in the same process, "
                f"calls interleaved: {fx['steady_ratio_vs_onegraph']:.3f} x "
                f"({statistics.median(fx['steady_regional_calls_s']):.4f} s "
                f"against {fx['onegraph_steady_call_s']:.4f} s); in runs of "
                f"{fx['steady_consecutive_run']} consecutive calls: "
                f"{fx['steady_ratio_vs_onegraph_consecutive']:.3f} x "
                f"({fx['steady_consecutive_s'][0]:.4f} s against {fx['steady_consecutive_s'][1]:.4f} s); "
                f"outputs differ by at most {fx['max_abs_diff_vs_onegraph']:.3g}."
            )
        parts.append("")
    return "\n".join(parts)


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        from torch._inductor import config as inductor_config

        # Inductor compiles kernels in this many worker processes: the first call depends on it.
        info["inductor_compile_threads"] = inductor_config.compile_threads
    except ImportError:
        pass
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    # The fxswap source the figures belong to: a dirty tree is named as such.
    root = Path(__file__).resolve().parent.parent
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        dirty = subprocess.run(
            # --no-optional-locks: reading the state must not rewrite the index of a tree others work in.
            ["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        info["fxswap_commit"] = git.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    # Other jobs on the machine stretch every time measured here (ratios less, not nothing).
    info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _csv(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        # Run in the canonical order whatever the order given, so the table reads the same.
        return [c for c in choices if c in names]

    return parse


ALIGN_CASES = (
    ("wan2.1-t2v-14b", "480p81", "rtx4090", 12),
    ("wan2.1-t2v-14b", "480p81", "rtx4090", 16),
    ("wan2.1-t2v-14b", "720p81", "rtx4090", 16),
    ("wan2.1-t2v-14b", "720p81", "rtx4090", 24),
    ("wan2.1-t2v-14b", "480p81", "h100-pcie", 24),
    ("wan2.1-t2v-1.3b", "480p81", "rtx4090", 6),
)


def align_predict(cache_dir: str | None) -> dict[str, Any]:
    """What compiling each block once costs at run time, predicted: the adaptive plan of WAN at
    each case with its units' waits and releases at their blocks' edges (what ``fxswap.compile``
    plans under Inductor, so that blocks alike share one program) against the exact positions
    (one program per distinct pattern of swap ops), by the planner's cost model. Predictions, not
    measurements."""
    from fxswap.bench.costmodel import plan_rates
    from fxswap.bench.graphs import load_wan_ir
    from fxswap.bench.hardware import PROFILES
    from fxswap.passes.planner import build_plan
    from fxswap.swapplan import PlanOptions

    rows = []
    for model, case, card, gib in ALIGN_CASES:
        ir = load_wan_ir(model, case, Path(cache_dir) if cache_dir else None)
        opts = PlanOptions(mode="adaptive", max_vram_bytes=gib * 2**30, **plan_rates(PROFILES[card]))
        row: dict[str, Any] = {"model": model, "case": case, "card": card, "budget_gib": gib}
        for name, align in (("exact", False), ("aligned", True)):
            plan = build_plan(ir, opts, align_blocks=align)
            row[name] = {
                "partition": plan.partition,
                "step_ms": round(plan.predicted_step_ms, 1),
                "moved_gib": round(plan.moved_bytes_per_call / 2**30, 2),
                "resident_gib": round(plan.resident_bytes / 2**30, 2),
            }
        row["step_ratio"] = round(row["aligned"]["step_ms"] / row["exact"]["step_ms"], 4)
        rows.append(row)
        print(f"[bench_compile] align {model} {case} {card} {gib} GiB: {row}", flush=True)
    lines = [
        "| model | case | card | budget GiB | exact: partition, step ms, moved GiB | aligned: partition, "
        "step ms, moved GiB | aligned / exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, a = r["exact"], r["aligned"]
        lines.append(
            f"| {r['model']} | {r['case']} | {r['card']} | {r['budget_gib']} | {e['partition']}, "
            f"{e['step_ms']}, {e['moved_gib']} | {a['partition']}, {a['step_ms']}, {a['moved_gib']} | "
            f"{r['step_ratio']:.3f} |"
        )
    return {"rows": rows, "table": "\n".join(lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=MODELS, help="repeat for several; default both")
    parser.add_argument(
        "--variants", type=_csv(VARIANTS), default=list(VARIANTS), help="comma-separated subset"
    )
    parser.add_argument(
        "--share", type=float, default=None, help="fxswap budget as a share of the weights (default 0.5)"
    )
    parser.add_argument(
        "--steady-calls", type=int, default=None, help="calls after the first, median kept (default 5)"
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="override the number of blocks (smoke tests)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="--layers 2 --steady-calls 2 --share 1.25: a quick check"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per child process")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--align-predict",
        action="store_true",
        help="predict the run-time cost of block-edge swap positions on WAN 14B / 1.3B (no compile)",
    )
    parser.add_argument("--cache-dir", default=None, help="graph cache for --align-predict")
    args = parser.parse_args()

    if args.align_predict:
        out = align_predict(args.cache_dir)
        out["command"] = " ".join([os.path.relpath(__file__), *sys.argv[1:]])
        print(out["table"])
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2) + "\n")
            print(f"wrote {args.json}")
        return

    if args.child is not None:
        print(RESULT_MARK + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    if args.dry_run:
        args.layers = 2 if args.layers is None else args.layers
        args.steady_calls = 2 if args.steady_calls is None else args.steady_calls
    if args.share is None:
        # Half the weights is the budget; a 2-block model cannot go that low (docstring).
        args.share = 1.25 if args.dry_run else 0.5
    if args.steady_calls is None:
        args.steady_calls = 5
    if args.steady_calls < 1:
        parser.error("--steady-calls must be at least 1")

    models = args.model or list(MODELS)
    results: dict[str, Any] = {
        "benchmark": "bench_compile",
        "command": " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
        "machine": machine(),
        "settings": {
            "variants": args.variants,
            "share": args.share,
            "steady_calls": args.steady_calls,
            "layers": args.layers,
        },
        "models": {m: run_model(m, args) for m in models},
    }
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    table = markdown(results)
    results["table"] = table
    print(table)
    info = results["machine"]
    print(
        f"Machine: {info['platform']}, {info['cpu_count']} CPUs, "
        f"Python {info['python']}, torch {info['torch']}"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
