"""Weights kept as stored (GGUF, fp8-scaled): what they save, predicted; what decoding costs and what
the host holds, measured.

Three parts, each its own flag (all by default):

``--predict``  PREDICTIONS of fxswap's planner and simulator (not measured). WAN 2.1 T2V-14B at 480p
    (832x480) with 81 and 17 frames, on the ``rtx4090`` and ``h100-sxm`` card profiles, for bf16, fp8-scaled
    (nn.Linear weights at 1 byte, decoded as ``W.float() * scale``) and GGUF Q8_0, Q6_K, Q5_K, Q4_K
    (the tensors ComfyUI-GGUF's converter quantises at the type's size): host bytes, the smallest
    budget, and at budgets of 12 and 16 GiB the bytes moved per call and the predicted step. Graphs
    are captured on meta tensors (through the graph cache) and re-sized by
    ``fxswap.passes.analyse.stored_storage``, which also prices each decode at device memory speed.
    The planner keeps resident stored weights decoded once where that fits the budget
    (``fxswap.passes.decode``); results written before that choice existed price every resident's
    decode at every call (docs/stored_weights.md, "Residents decoded once").
``--throughput``  MEASURED on this machine: the PyTorch reference decoder (``fxswap.quant``) per
    type, GB/s of bf16 output for a 4096x4096 weight, as a ratio against ``torch.clone`` of the same
    bf16 output in the same process (a pure memory copy: the baseline).
``--rss``  MEASURED: peak RSS of a process that loads a ~1 GB Q8_0 WAN GGUF file with
    ``fxswap.models.wan.load``, compiles it (eager, CPU, about half the weights swapped) and runs
    five calls, against the claim ``peak <= baseline + 1.1 x file tensor bytes + plan device bytes +
    256 MiB`` (on the CPU the "device" is host memory too). Sampled every millisecond and checked
    against the kernel's ``VmHWM``; see ``bench_rss.py`` for the method.

    python benchmarks/bench_quant.py                      # all three (about 5 minutes on 2 cores)
    python benchmarks/bench_quant.py --throughput --rss   # the measured parts only

Writes ``benchmarks/results/bench_quant.json`` and ``bench_quant.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
MiB = 2**20
STORAGES = ("bf16", "fp8-scaled", "Q8_0", "Q6_K", "Q5_K", "Q4_K")
CASES = {"480p81": (832, 480, 81), "480p17": (832, 480, 17)}
CARDS = ("rtx4090", "h100-sxm")
BUDGETS_GIB = (12, 16)
CONSTANT = 256 * MiB


# ------------------------------------------------------------------------------------ predictions
def _sizes(model: Any, storage: str) -> dict[str, tuple[int, int, int]]:
    import torch

    from fxswap.models.wan_stored import gguf_planned_sizes

    if storage == "bf16":
        return {}
    if storage == "fp8-scaled":
        # ComfyUI's fp8_scaled files: nn.Linear weights in float8_e4m3fn; decoding holds the float32
        # copy and the float32 product (8 bytes per value) beside the bf16 result.
        return {
            f"{n}.weight": (m.weight.numel(), m.weight.numel() * 2, 8 * m.weight.numel())
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
    return gguf_planned_sizes(model, storage)


def predict() -> list[dict[str, Any]]:
    import torch

    from fxswap.bench.costmodel import plan_rates
    from fxswap.bench.graphs import wan_ir
    from fxswap.bench.hardware import get_profile
    from fxswap.errors import BudgetInfeasibleError
    from fxswap.models import wan
    from fxswap.options import PlanOptions
    from fxswap.passes.analyse import stored_storage
    from fxswap.passes.planner import build_plan

    meta = wan.build("wan2.1-t2v-14b", device="meta", dtype=torch.bfloat16)
    rows = []
    for case, (w, h, f) in CASES.items():
        base = wan_ir("wan2.1-t2v-14b", w, h, f)
        for storage in STORAGES:
            ir = stored_storage(base, _sizes(meta, storage))
            for card in CARDS:
                hw = get_profile(card)
                rates = plan_rates(hw)

                def opts(budget: int, rates: dict[str, float] = rates) -> PlanOptions:
                    return PlanOptions(mode="adaptive", max_vram_bytes=budget, **rates)

                try:
                    build_plan(ir, opts(GiB // 16))
                    lo = GiB // 16
                except BudgetInfeasibleError as e:
                    lo = e.min_vram_bytes
                row: dict[str, Any] = {
                    "case": case, "card": card, "storage": storage,
                    "host_gib": round(ir.weight_bytes / GiB, 2), "min_budget_gib": round(lo / GiB, 2),
                }  # fmt: skip
                for b in BUDGETS_GIB:
                    if b * GiB < lo:
                        row[f"moved_gib@{b}"] = row[f"step_ms@{b}"] = None
                        continue
                    p = build_plan(ir, opts(b * GiB))
                    row[f"moved_gib@{b}"] = round(p.moved_bytes_per_call / GiB, 2)
                    row[f"step_ms@{b}"] = round(p.predicted_step_ms, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


# ----------------------------------------------------------------------------------- throughput
def throughput(repeat: int = 3) -> dict[str, Any]:
    import numpy as np
    import torch

    from fxswap import quant
    from fxswap.gguf import TYPES

    shape = (4096, 4096)
    numel = shape[0] * shape[1]
    out_bytes = numel * 2
    rng = np.random.default_rng(0)

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    ref = torch.empty(shape, dtype=torch.bfloat16).normal_()
    clone_s = best(lambda: ref.clone())
    res: dict[str, Any] = {
        "shape": list(shape),
        "threads": torch.get_num_threads(),
        "baseline_clone_gbps": round(out_bytes / clone_s / 1e9, 3),
        "types": {},
    }
    for name, t in TYPES.items():
        raw = rng.integers(0, 256, size=t.nbytes(numel), dtype=np.uint8)
        if t.block_elems > 1:  # finite scales (the float16 fields of each block)
            blocks = raw.reshape(-1, t.block_bytes)
            for at in _F16_FIELDS[name]:
                blocks[:, at : at + 2] = np.array([0.001], dtype=np.float16).view(np.uint8)
        elif name == "F32":
            raw = rng.standard_normal(numel).astype(np.float32).view(np.uint8)
        elif name == "F16":
            raw = rng.standard_normal(numel).astype(np.float16).view(np.uint8)
        data = torch.from_numpy(raw)
        s = best(lambda data=data, name=name: quant.dequantize(data, name, shape, torch.bfloat16))
        res["types"][name] = {
            "gbps_out": round(out_bytes / s / 1e9, 3),
            "ratio_to_clone": round(clone_s / s, 4),
            "stored_bytes": int(data.numel()),
        }
        print(name, res["types"][name], flush=True)
    fp8 = torch.empty(shape).normal_().to(torch.float8_e4m3fn)
    s = best(lambda: quant.dequantize_fp8(fp8, 0.01, torch.bfloat16))
    res["types"]["fp8-scaled"] = {
        "gbps_out": round(out_bytes / s / 1e9, 3),
        "ratio_to_clone": round(clone_s / s, 4),
        "stored_bytes": numel,
    }
    return res


_F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}  # fmt: skip


# ------------------------------------------------------------------------------------------- RSS
def _rss_config() -> Any:
    from fxswap.models import wan

    return wan.tiny_config(
        "t2v", dim=3072, num_heads=24, ffn_dim=8192, num_layers=8, text_dim=64, freq_dim=256, text_len=8
    )


def _write_gguf(path: Path) -> None:
    """A WAN GGUF file as ComfyUI-GGUF lays it out, the large tensors Q8_0 (random blocks under
    small scales: the values do not matter here, only their bytes), the rest F32."""
    import gguf
    import numpy as np
    import torch

    from fxswap.models import wan

    rng = np.random.default_rng(0)
    meta = wan.build(_rss_config(), device="meta", dtype=torch.bfloat16)
    w = gguf.GGUFWriter(path=None, arch="wan")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, p in meta.state_dict().items():
        shape = tuple(p.shape)
        if p.dim() == 2 and p.numel() > 1024 and shape[1] % 32 == 0 and "modulation" not in name:
            blocks = rng.integers(0, 256, size=(p.numel() // 32, 34), dtype=np.uint8)
            blocks[:, 0:2] = np.array([1e-3], dtype=np.float16).view(np.uint8)
            w.add_tensor(name, blocks.reshape(shape[0], -1), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            x = (rng.standard_normal(shape) * 0.02).astype(np.float32)
            w.add_tensor(name, x, raw_dtype=gguf.GGMLQuantizationType.F32)
    path.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rss_child(path: Path, calls: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from bench_rss import Sampler, _status

    import fxswap
    from fxswap.gguf import read_gguf
    from fxswap.models import wan
    from fxswap.stored import stored_weights

    import_rss = Sampler().rss()
    import torch._dynamo  # noqa: F401  (the compile stack: its code is RSS, not weights)

    import fxswap.compiler
    import fxswap.passes.planner  # noqa: F401

    try:
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    with read_gguf(path) as f:
        tensor_bytes = sum(t.nbytes for t in f.tensors.values())
    s = Sampler()
    baseline = s.rss()
    s.start()
    s.phase = "load"
    model = wan.load(path, config=_rss_config()).eval()
    kept = stored_weights(model)
    kw = wan.example_inputs(model.config, frames=1, height=16, width=16, dtype=torch.bfloat16)
    s.phase = "compile+first call"
    stored_total = sum(w.nbytes for w in kept.values())
    sm = fxswap.compile(
        model, mode="layerwise", max_vram_gb=0.5 * stored_total / GiB, backend="eager", reserve_mb=0
    )
    with torch.no_grad():
        out = sm(**kw)
        s.phase = "calls"
        for _ in range(calls - 1):
            out = sm(**kw)
    del out
    s.stop()
    hwm = _status("VmHWM")
    plan_bytes = max(p.peak_bytes for p in sm.plans)
    peak = max(s.peak, hwm if hwm_reset else 0)
    bound = baseline + int(1.1 * tensor_bytes) + plan_bytes + CONSTANT
    return {
        "file_bytes": path.stat().st_size,
        "file_tensor_bytes": tensor_bytes,
        "stored_weight_bytes": stored_total,
        "import_rss_bytes": import_rss,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "sampled_peak_rss_bytes": s.peak,
        "vmhwm_bytes": hwm if hwm_reset else None,
        "phase_peaks_bytes": s.phase_peak,
        "plan_device_bytes": plan_bytes,
        "constant_bytes": CONSTANT,
        "bound_bytes": bound,
        "within_bound": peak <= bound,
        "ratio_above_baseline_less_plan_to_file": round((peak - baseline - plan_bytes) / tensor_bytes, 4),
        "swapped_units": sum(not u.resident for u in sm.plans[0].units),
        "calls": calls,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }


def rss(path: Path, calls: int) -> dict[str, Any]:
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        _write_gguf(path)
    cmd = [sys.executable, __file__, "--child", "--file", str(path), "--calls", str(calls)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------- report
def _markdown(r: dict[str, Any]) -> str:
    lines = [f"# bench_quant ({r['machine']})", ""]
    if "predict" in r:
        lines += [
            "PREDICTED by fxswap's planner and simulator (card profiles, not measured): WAN 2.1 T2V-14B, "
            "832x480, one transformer call.",
            "",
            "| case | card | storage | host GiB | min budget GiB | moved GiB @12 | step ms @12 "
            "| moved GiB @16 | step ms @16 |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for x in r["predict"]:
            lines.append(
                f"| {x['case']} | {x['card']} | {x['storage']} | {x['host_gib']} | {x['min_budget_gib']} | "
                f"{x['moved_gib@12']} | {x['step_ms@12']} | {x['moved_gib@16']} | {x['step_ms@16']} |"
            )
        lines.append("")
    if "throughput" in r:
        t = r["throughput"]
        lines += [
            f"MEASURED: reference decoder (fxswap.quant, PyTorch on the CPU, {t['threads']} threads), "
            f"{t['shape'][0]}x{t['shape'][1]} to bf16; baseline torch.clone of the bf16 output "
            f"{t['baseline_clone_gbps']} GB/s.",
            "",
            "| type | GB/s of output | ratio to clone |",
            "|---|---:|---:|",
        ]
        lines += [f"| {k} | {v['gbps_out']} | {v['ratio_to_clone']} |" for k, v in t["types"].items()]
        lines.append("")
    if "rss" in r:
        x = r["rss"]
        lines += [
            f"MEASURED: RSS, Q8_0 WAN GGUF of {x['file_tensor_bytes'] / GiB:.2f} GiB of tensors, loaded, "
            f"compiled (eager, CPU, {x['swapped_units']} units swapped) and called {x['calls']} times: "
            f"peak {x['peak_rss_bytes'] / GiB:.2f} GiB = baseline {x['baseline_rss_bytes'] / GiB:.2f} + "
            f"plan device {x['plan_device_bytes'] / GiB:.2f} + "
            f"{x['ratio_above_baseline_less_plan_to_file']} x the file's "
            f"tensor bytes; bound (1.1 x + 256 MiB) {x['bound_bytes'] / GiB:.2f} GiB: "
            + ("within" if x["within_bound"] else "EXCEEDED"),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predict", action="store_true")
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--rss", action="store_true")
    ap.add_argument("--file", type=Path, default=Path("/tmp/fxswap_bench_quant/wan_q8_0.gguf"))
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_quant.json")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(rss_child(a.file, a.calls)))
        return
    if not (a.predict or a.throughput or a.rss):
        a.predict = a.throughput = a.rss = True
    import torch

    r: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        "command": "python benchmarks/bench_quant.py " + " ".join(sys.argv[1:]),
    }
    if a.out.exists():  # keep the parts not re-run
        old = json.loads(a.out.read_text())
        r.update({k: v for k, v in old.items() if k in ("predict", "throughput", "rss")})
    if a.throughput:
        r["throughput"] = throughput()
    if a.rss:
        r["rss"] = rss(a.file, a.calls)
        print(json.dumps(r["rss"], indent=1), flush=True)
    if a.predict:
        r["predict"] = predict()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
    a.out.with_suffix(".md").write_text(_markdown(r), encoding="utf-8")
    print(_markdown(r))


if __name__ == "__main__":
    main()
