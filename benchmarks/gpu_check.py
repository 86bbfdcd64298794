"""GPU check for fxswap (prepared on CPU; run it where a CUDA device is lent).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json     # ~6-8 min on one H100
    python benchmarks/gpu_check.py --dry-run                                    # tiny WAN on the CPU, seconds

For each model (random weights, bf16, inputs at 480p, 81 frames):

- ``wan2.1-t2v-1.3b`` and ``wan2.1-t2v-14b`` cut to 10 layers;
- the budget is the planner's minimum for the input plus a quarter of the weights, and must be well
  below the weights (the JSON says by how much);
- variants, each timed over ``--steps`` steps after one warm-up call:
  ``fxswap_eager`` and ``fxswap_inductor`` (``fxswap.compile``, budget as above),
  ``resident_eager`` and ``resident_compiled`` (the whole model on the GPU; ``torch.compile``),
  ``diffusers_group_offload`` (``apply_group_offloading(block_level, 1 block per group,
  use_stream=True)``, the same model and inputs).

Reported per variant: mean step seconds, ``torch.cuda.max_memory_allocated`` over the timed steps
and over the first call, max abs difference of the output against ``resident_eager`` and, for
fxswap, whether the peak stayed within the budget. Results are written after every variant, so a
run cut short keeps what it measured. ``--time-limit`` skips (and records) variants that would
start after that many seconds; ``--hard-limit`` (450 s) interrupts the running one with an error
entry, so a one-shot run prints its JSON in under 8 minutes. ``step_vs_resident_eager`` gives each
variant's step time over the fully resident eager model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

GiB = 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _relative_steps(variants: dict[str, Any]) -> dict[str, float]:
    """Each variant's step time over resident eager's (1.0 = as fast as the whole model on the GPU)."""
    base = variants.get("resident_eager", {}).get("step_s")
    if not base:
        return {}
    return {k: round(v["step_s"] / base, 3) for k, v in variants.items() if v.get("step_s")}


def _within(peak: int | None, budget: int) -> bool | None:
    return None if peak is None else bool(peak <= budget)


def time_variant(
    fn: Callable[[], torch.Tensor], device: torch.device, steps: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """One warm-up call (captures / compiles), then ``steps`` timed calls."""
    _free(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn()
    _sync(device)
    first_s = time.perf_counter() - t0
    first_peak = _peak(device)
    _reset_peak(device)
    times = []
    with torch.no_grad():
        for _ in range(steps):
            t = time.perf_counter()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - t)
    res = {
        "first_call_s": round(first_s, 3),
        "step_s": round(sum(times) / len(times), 4),
        "step_s_all": [round(t, 4) for t in times],
        "max_memory_allocated_first_call": first_peak,
        "max_memory_allocated": _peak(device),
    }
    return res, out.detach().float().cpu()


def model_specs(dry_run: bool) -> list[dict[str, Any]]:
    from fxswap.models import wan

    if dry_run:
        return [
            {"name": "tiny-t2v", "config": wan.tiny_config("t2v"), "frames": 5, "height": 32, "width": 32}
        ]
    base14 = wan.CONFIGS["wan2.1-t2v-14b"]
    return [
        {"name": "wan2.1-t2v-1.3b", "config": wan.CONFIGS["wan2.1-t2v-1.3b"], "frames": 81, "height": 480,
         "width": 832},
        {"name": "wan2.1-t2v-14b-10layers", "config": dataclasses.replace(base14, num_layers=10),
         "frames": 81, "height": 480, "width": 832},
    ]  # fmt: skip


def choose_budget(
    model_meta: torch.nn.Module, inputs_meta: dict[str, Any], mode: str, plan_kw: dict[str, Any]
) -> dict[str, int]:
    """Planner minimum for this input + a quarter of the weights (kept below 3/4 of the weights)."""
    import fxswap.api as api

    probe = api.plan(model_meta, **inputs_meta, mode=mode, max_vram_gb=4096, **plan_kw)
    weights = probe.weight_bytes
    budget = max(probe.min_vram_bytes, min(probe.min_vram_bytes + weights // 4, (weights * 3) // 4))
    return {
        "budget_bytes": int(budget),
        "weight_bytes": int(weights),
        "min_vram_bytes": int(probe.min_vram_bytes),
    }


def run_model(spec: dict[str, Any], args: argparse.Namespace, device: torch.device, deadline: float,
              sink: Callable[[], None], result: dict[str, Any]) -> None:  # fmt: skip
    import fxswap.compiler as fc
    from fxswap.models import wan

    cfg = spec["config"]
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    kw = dict(frames=spec["frames"], height=spec["height"], width=spec["width"])
    t0 = time.perf_counter()
    meta_model = wan.build(cfg, device="meta", dtype=dtype).requires_grad_(False)
    # the dry run's tiny model needs tiny units and no workspace reserve to swap anything at all
    plan_kw: dict[str, Any] = {"reserve_mb": 0, "block_size_mb": 0.004} if args.dry_run else {}
    inputs_meta = wan.example_inputs(cfg, device="meta", dtype=dtype, **kw)
    budget = choose_budget(meta_model, inputs_meta, args.mode, plan_kw)
    del meta_model
    torch.manual_seed(0)
    model = wan.build(cfg, device="cpu", dtype=dtype).requires_grad_(False).eval()
    inputs = wan.example_inputs(cfg, device=device, dtype=dtype, **kw)
    result.update(
        budget,
        budget_gb=round(budget["budget_bytes"] / GiB, 3),
        weight_gb=round(budget["weight_bytes"] / GiB, 3),
        budget_below_weights_gb=round((budget["weight_bytes"] - budget["budget_bytes"]) / GiB, 3),
        build_s=round(time.perf_counter() - t0, 1),
        variants={},
    )
    sink()
    variants: dict[str, Any] = result["variants"]
    ref: torch.Tensor | None = None

    def record(
        name: str, fn: Callable[[], torch.Tensor], extra: Callable[[], dict[str, Any]] | None = None
    ) -> None:
        nonlocal ref
        if name in args.skip:
            variants[name] = {"skipped": "--skip"}
            sink()
            return
        if time.perf_counter() > deadline:
            variants[name] = {"skipped": f"--time-limit {args.time_limit}s reached"}
            sink()
            return
        try:
            res, out = time_variant(fn, device, args.steps)
            if ref is not None:
                res["max_abs_diff_vs_resident_eager"] = float((out - ref).abs().max())
            if name == "resident_eager":
                ref = out
            if extra is not None:
                res.update(extra())
        except Exception as e:  # noqa: BLE001 (a failing variant must not lose the others)
            res = {"error": f"{type(e).__name__}: {e}"[:2000]}
        variants[name] = res
        sink()
        _free(device)

    # resident first: it is the reference for the others' outputs
    if device.type == "cuda":
        model.to(device)
    record("resident_eager", lambda: model(**inputs))
    if args.dry_run and not args.dry_run_inductor:
        variants["resident_compiled"] = {"skipped": "--dry-run (add --dry-run-inductor)"}
    else:
        compiled = torch.compile(model)
        record("resident_compiled", lambda: compiled(**inputs))
        del compiled
    torch._dynamo.reset()
    if device.type == "cuda":
        model.to("cpu")
    _free(device)

    for backend in ("eager", "inductor"):
        if args.dry_run and backend == "inductor" and not args.dry_run_inductor:
            variants["fxswap_inductor"] = {"skipped": "--dry-run (add --dry-run-inductor)"}
            continue
        sm = fc.compile(
            model, mode=args.mode, max_vram_gb=budget["budget_bytes"] / GiB, backend=backend, device=device,
            **plan_kw,
        )  # fmt: skip

        def extra(sm: fc.SwapModule = sm) -> dict[str, Any]:
            plan = sm.plan
            assert plan is not None
            peak = _peak(device)
            return {
                "plan_peak_bytes": plan.peak_bytes,
                "plan_resident_bytes": plan.resident_bytes,
                "plan_moved_bytes_per_call": plan.moved_bytes_per_call,
                "plan_predicted_step_ms": plan.predicted_step_ms,
                "swapped_units": sum(not u.resident for u in plan.units),
                "units": len(plan.units),
                "within_budget": _within(peak, budget["budget_bytes"]),
                "ledger_peak_bytes": sm.runtime.ledger.peak if sm.runtime.track else None,
                "pinned_bytes": sm.runtime.store.pinned_bytes,
            }

        record(f"fxswap_{backend}", lambda sm=sm: sm(**inputs), extra)
        sm.runtime.close()
        del sm
        _free(device)

    if device.type != "cuda":
        variants["diffusers_group_offload"] = {"skipped": "needs CUDA (use_stream=True)"}
        sink()
        return
    try:
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(
            model, onload_device=device, offload_device="cpu", offload_type="block_level",
            num_blocks_per_group=1, use_stream=True,
        )  # fmt: skip
        record(
            "diffusers_group_offload",
            lambda: model(**inputs),
            lambda: {"within_budget": _within(_peak(device), budget["budget_bytes"])},
        )
    except Exception as e:  # noqa: BLE001
        variants["diffusers_group_offload"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        sink()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny WAN on the CPU: checks the script, no figures"
    )
    ap.add_argument(
        "--dry-run-inductor", action="store_true", help="with --dry-run: also the inductor variant"
    )
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--mode", default="adaptive", choices=["layerwise", "chunkwise", "adaptive"])
    ap.add_argument("--time-limit", type=float, default=400.0, help="skip variants that would start later")
    ap.add_argument(
        "--hard-limit",
        type=float,
        default=450.0,
        help="interrupt the running variant after this many seconds (recorded as an error; the JSON is "
        "still written); 0 = never",
    )
    ap.add_argument("--skip", default="", help="comma-separated variants to skip, e.g. resident_compiled")
    ap.add_argument("--models", default="", help="comma-separated model names to run (default: all)")
    args = ap.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    if args.dry_run:
        device = torch.device("cpu")
        args.steps = 1
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --dry-run on the CPU")
        device = torch.device("cuda", 0)
    start = time.perf_counter()
    deadline = start + args.time_limit
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "dry_run": args.dry_run,
        "steps": args.steps,
        "mode": args.mode,
        "models": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def sink() -> None:
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(report, indent=2) + "\n")

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report["device_total_memory_bytes"] = int(props.total_memory)
    if args.hard_limit > 0 and hasattr(signal, "SIGALRM"):
        # A variant that overruns (a slow compile, a hang) must not cost the whole report: the alarm
        # raises inside it, its record() catches and records the error, and the run goes on/ends.
        def _overrun(signum: int, frame: Any) -> None:
            raise TimeoutError(f"--hard-limit {args.hard_limit:g}s reached")

        previous = signal.signal(signal.SIGALRM, _overrun)
        signal.setitimer(signal.ITIMER_REAL, args.hard_limit)
    wanted = {m for m in args.models.split(",") if m}
    try:
        for spec in model_specs(args.dry_run):
            if wanted and spec["name"] not in wanted:
                continue
            result: dict[str, Any] = {k: spec[k] for k in ("frames", "height", "width")}
            report["models"][spec["name"]] = result
            try:
                run_model(spec, args, device, deadline, sink, result)
            except Exception as e:  # noqa: BLE001
                result["error"] = f"{type(e).__name__}: {e}"[:2000]
            result["step_vs_resident_eager"] = _relative_steps(result.get("variants", {}))
            sink()
            _free(device)
    finally:
        if args.hard_limit > 0 and hasattr(signal, "SIGALRM"):
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    sink()
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
