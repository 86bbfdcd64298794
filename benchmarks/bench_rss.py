"""Host RAM: peak RSS through load, compile and 20 calls of a >= 1 GB WAN model read from safetensors.

The claim checked: fxswap keeps ONE host copy of the weights, so

    peak RSS <= baseline + 1.1 x weight bytes + plan device bytes + C

where ``baseline`` is the process's RSS after importing torch, fxswap and the compile stack it
uses (Dynamo, the planner; measured separately: ``import_rss_bytes`` is the RSS after ``import
torch, fxswap`` alone), before the model exists,
the plan's device bytes are ``max(plan.peak_bytes)`` (on the CPU the "device" is host memory too:
the resident copies, the units in flight and the activations live in RAM), and ``C`` = 256 MiB
covers Dynamo's capture, the planner and the allocator's slack. RSS is sampled every millisecond
by a thread reading ``/proc/self/statm`` and checked against the kernel's high-water mark
(``VmHWM``, reset after the imports through ``/proc/self/clear_refs``).

The model (WAN 2.1 structure, dim 2048, 5 blocks, fp32, 1.14 GB) is written once with
``fxswap.models.wan_checkpoint.save`` and loaded in a fresh process with ``fxswap.models.wan.load``
(the file is memory-mapped: the parameters are views of the mapping).

    python benchmarks/bench_rss.py                # writes the file under /tmp once, then measures
    python benchmarks/bench_rss.py --budget-gb 0.2 --calls 20

Writes ``benchmarks/results/bench_rss.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
CONSTANT = 256 * MiB


def _config() -> Any:
    from fxswap.models import wan

    return wan.tiny_config(
        "t2v", dim=2048, num_heads=16, ffn_dim=4096, num_layers=5, text_dim=64, freq_dim=32
    )


def _write(path: Path) -> None:
    import torch

    from fxswap.models import wan
    from fxswap.models.wan_checkpoint import save

    cfg = _config()
    meta = wan.build(cfg, device="meta")
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in meta.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save(sd, path, config=cfg)


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class Sampler:
    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self.phase_peak: dict[str, int] = {}
        self.phase = "start"
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            r = self.rss()
            self.peak = max(self.peak, r)
            self.phase_peak[self.phase] = max(self.phase_peak.get(self.phase, 0), r)
            time.sleep(0.001)

    def start(self) -> None:
        self._t.start()

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def child(path: Path, budget_gb: float, calls: int) -> dict[str, Any]:
    import torch

    import fxswap
    from fxswap.models import wan

    import_rss = Sampler().rss()
    import torch._dynamo  # noqa: F401  (the compile stack: its code is RSS, not weights)

    import fxswap.compiler
    import fxswap.passes.planner  # noqa: F401

    try:  # reset the kernel's high-water mark to the post-import level
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    s = Sampler()
    baseline = s.rss()
    s.start()
    s.phase = "load"
    model = wan.load(path).eval().requires_grad_(False)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    cfg = model.config
    kw = wan.example_inputs(cfg, frames=1, height=16, width=16)
    s.phase = "compile+first call"
    sm = fxswap.compile(model, mode="adaptive", max_vram_gb=budget_gb, backend="eager", reserve_mb=0)
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
    bound = baseline + int(1.1 * weights) + plan_bytes + CONSTANT
    return {
        "weights_bytes": weights,
        "file_bytes": path.stat().st_size,
        "import_rss_bytes": import_rss,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "sampled_peak_rss_bytes": s.peak,
        "vmhwm_bytes": hwm if hwm_reset else None,
        "phase_peaks_bytes": s.phase_peak,
        "plan_device_bytes": plan_bytes,
        "plan": sm.plans[0].summary(),
        "budget_gb": budget_gb,
        "calls": calls,
        "constant_bytes": CONSTANT,
        "bound_bytes": bound,
        "within_bound": peak <= bound,
        "ratio_to_weights": round((peak - baseline - plan_bytes) / weights, 4),
        "ratio_to_weights_incl_plan": round((peak - baseline) / weights, 4),
        "host_copies": {"pinned": sm.runtime.store.pinned_bytes, "pageable": sm.runtime.store.pageable_bytes},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--file", type=Path, default=Path("/tmp/fxswap_bench_rss/wan_dim2048_5blocks.safetensors")
    )
    ap.add_argument("--budget-gb", type=float, default=0.25)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_rss.json")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.file, a.budget_gb, a.calls)))
        return
    if not a.file.exists():
        print(f"writing {a.file} ...", flush=True)
        sys.path.insert(0, str(ROOT))
        _write(a.file)
    cmd = [sys.executable, __file__, "--child", "--file", str(a.file), "--budget-gb", str(a.budget_gb)]
    cmd += ["--calls", str(a.calls)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(r, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
    if not r["within_bound"]:
        raise SystemExit("peak RSS above the bound")


if __name__ == "__main__":
    main()
