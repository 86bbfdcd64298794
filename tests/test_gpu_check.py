"""benchmarks/gpu_check.py: the CPU dry run goes through the GPU run's code path and writes its schema;
the helpers that read traces and generated code are checked against hand-made inputs."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def _gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# The schema the device run is read with (written here, not taken from the script).
TOP = {"schema_version", "command", "dry_run", "device", "torch", "python", "dtype", "steps", "mode",
       "time_limit_s", "calibration", "allocator_rules", "multi_gpu", "cases", "skipped", "errors",
       "finished", "elapsed_s"}  # fmt: skip
# one rank of the multi-GPU case, and the case across ranks
RANK = {
    "rank",
    "device",
    "backend",
    "resident_1gpu",
    "fxswap_resident",
    "fxswap_swapping",
    "reference_max_abs",
}
MULTI = {"ranks", "dtype", "model", "frames", "height", "width", "tolerance", "per_rank", "bitwise",
         "max_abs_diff", "within_tolerance", "within_plan", "step_s_resident_1gpu", "step_s_2ranks_resident",
         "step_s_2ranks_swapping", "step_2ranks_resident_vs_1gpu"}  # fmt: skip
CASE = {"model", "frames", "height", "width", "copy_bound", "weight_bytes", "input_bytes", "min_vram_bytes",
        "budgets", "step_vs_resident",
        "budgets_gib", "variants"}  # fmt: skip
MEASURED = {"first_call_s", "step_s", "step_s_all", "baseline_allocated_bytes", "baseline_reserved_bytes",
            "peak_allocated_first_call", "peak_reserved_first_call", "peak_allocated", "peak_reserved",
            "alloc_retries", "exact_every_step", "exact_per_call", "max_abs_diff", "wall_s",
            "fragmentation_at_peak", "inactive_split_peak_bytes", "memory"}  # fmt: skip
MEMORY = {"plan_peak_bytes", "max_memory_allocated_above_entry", "max_memory_reserved_above_entry",
          "plan_terms", "fragmentation_at_peak_bytes", "inactive_split_peak_bytes",
          "allocated_minus_plan_peak", "reserved_minus_plan_peak"}  # fmt: skip
TERMS = {"peak_op", "weights_rounding_bytes", "activation_rounding_at_peak_bytes",
         "kept_library_workspace_bytes", "op_workspace_at_peak_bytes"}  # fmt: skip
FXSWAP = MEASURED | {"budget_bytes", "plan_peak_bytes", "plan_resident_bytes", "plan_partition",
                     "plan_prefetch_depth", "moved_bytes_per_call", "copy_ms_at_measured_rate",
                     "predicted_step_ms", "predicted_compute_ms", "predicted_over_measured", "swapped_units",
                     "units", "within_budget", "peak_minus_plan_peak", "reserved_within_budget",
                     "ledger_peak_bytes", "ops", "pinned_bytes_counted", "pinned_payload_bytes",
                     "pageable_bytes"}  # fmt: skip
TRACE = {"h2d_copies", "h2d_pinned", "h2d_pageable", "h2d_copy_ms", "h2d_ms_beside_kernels",
         "h2d_share_beside_kernels", "kernels", "kernel_ms", "copy_streams", "kernel_streams",
         "copies_on_own_stream", "trace_file", "trace_bytes"}  # fmt: skip
ORDER = {"fx_ops", "generated_ops", "same_order", "first_difference_at", "around_difference",
         "load_wait_release_in_order", "loads_beside_held_units_fx",
         "loads_beside_held_units_generated", "generated_code_found"}  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    report = _gpu_check().main(["--dry-run", "--models", "tiny-t2v-2blocks", "--out-dir", str(out)])
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # the hard-limit alarm is disarmed
    return report, out


def test_dry_run_writes_the_schema(dry_run: tuple[dict[str, Any], Path]) -> None:
    report, out = dry_run
    assert json.loads((out / "gpu_check.json").read_text()) == json.loads(json.dumps(report))
    assert set(report) == TOP
    assert report["finished"] and not report["errors"], report["errors"]
    assert "skipped" in report["allocator_rules"]  # no CUDA allocator on the CPU
    # not run, and said so: the dry run has no GPU (test_multi_gpu_ranks_on_the_cpu runs its code)
    assert report["multi_gpu"] == {
        "skipped": "0 GPUs (--dry-run uses the CPU): the sequence-parallel case needs 2"
    }
    cal = report["calibration"]
    assert cal["measured"]["pinned_h2d_gbps"] > 0 and cal["measured"]["matmul_tflops"] > 0
    assert cal["profile"]["name"].startswith("cpu-memcpy-")  # labelled: not a GPU figure
    assert list(report["cases"]) == ["tiny-t2v-2blocks@32p5", "tiny-t2v-2blocks@32p1"]
    for case in report["cases"].values():
        assert set(case) >= CASE
        b = case["budgets"]
        assert b["min"] == case["min_vram_bytes"] < b["mid"] < b["large"]
        assert b["min"] < case["weight_bytes"]
        v = case["variants"]
        assert set(v["resident_eager"]) >= MEASURED
        for name in ("fxswap_eager@min", "fxswap_eager_depth0@min", "fxswap_eager@mid", "fxswap_eager@large"):
            assert set(v[name]) >= FXSWAP, name
            assert v[name]["exact_per_call"] == [True] * 4, name  # warm-up + 3 timed, bitwise
            assert len(v[name]["step_s_all"]) == 3
            assert v[name]["ledger_peak_bytes"] <= v[name]["budget_bytes"]
            assert v[name]["swapped_units"] > 0
            mem = v[name]["memory"]
            assert set(mem) == MEMORY and set(mem["plan_terms"]) == TERMS, name
            assert mem["plan_peak_bytes"] == v[name]["plan_peak_bytes"]
            # the CPU: no allocator peaks, and the identity rules add no rounding, no kept workspace
            assert (
                mem["max_memory_allocated_above_entry"] is None and mem["fragmentation_at_peak_bytes"] is None
            )
            t = mem["plan_terms"]
            assert t["weights_rounding_bytes"] == t["activation_rounding_at_peak_bytes"] == 0
            assert t["kept_library_workspace_bytes"] == 0 and t["op_workspace_at_peak_bytes"] >= 0
        assert v["resident_eager"]["memory"]["plan_peak_bytes"] is None
        assert v["fxswap_eager_depth0@min"]["plan_prefetch_depth"] == 0
        assert (
            v["fxswap_eager_depth0@min"]["moved_bytes_per_call"]
            == v["fxswap_eager@min"]["moved_bytes_per_call"]
        )
        # the peer runs on the CPU without streams; same weights, so fp32 outputs agree
        peer = v["diffusers_group_offload"]
        assert peer["use_stream"] is False and peer["max_abs_diff"] <= 1e-5
        assert "skipped" in v["fxswap_eager@peer_peak"]  # no allocator peak on the CPU
        # another program takes the memory (injected at the first load on the CPU): re-planned, exact
        oom = v["fxswap_eager_oom_recovery@large"]
        assert oom["recoveries"] == 1 and oom["exact_after_recovery"] is True, oom
        for name in ("resident_compiled", "fxswap_inductor@min"):
            assert "skipped" in v[name]
        assert {"copy_ms", "step_ms", "hidden_share_vs_resident", "hidden_share_vs_depth0"} <= set(
            case["overlap"]
        )
        ratio = case["step_vs_resident"]["fxswap_eager@min"]
        assert ratio == round(v["fxswap_eager@min"]["step_s"] / v["resident_eager"]["step_s"], 4)


def test_dry_run_goes_through_the_cuda_path_checks(dry_run: tuple[dict[str, Any], Path]) -> None:
    report, _ = dry_run
    found = [(k, c["variants"]["issue22_cuda_path@min"]) for k, c in report["cases"].items()
             if "issue22_cuda_path@min" in c["variants"]]  # fmt: skip
    assert [k for k, _ in found] == ["tiny-t2v-2blocks@32p1"]  # once, on the first copy-bound case
    v = found[0][1]
    assert "error" not in v, v.get("error")
    # on the CPU the device-only checks say so; the rest runs the same code as on the GPU
    for key in ("host_syncs", "other_stream", "capture_refused"):
        assert "skipped" in v[key], key
    assert v["pageable"]["exact"] is True and v["fp8"] == {"finite": True, "equal_across_budgets": True}
    assert set(v["pinned_host"]) >= {"pinned_bytes", "after_build", "after_close"}


def test_dry_run_profiles_one_copy_bound_step(dry_run: tuple[dict[str, Any], Path]) -> None:
    report, out = dry_run
    traced = [
        (k, n) for k, c in report["cases"].items() for n, v in c["variants"].items() if "profiled_step" in v
    ]
    assert traced == [("tiny-t2v-2blocks@32p1", "fxswap_eager@min")]  # the first copy-bound case
    prof = report["cases"][traced[0][0]]["variants"][traced[0][1]]["profiled_step"]
    assert set(prof) == TRACE
    with gzip.open(out / prof["trace_file"], "rt") as f:
        events = json.load(f)["traceEvents"]
    # the fxswap ops ran inside the profiled step (CPU events of the custom ops)
    assert any("fxswap::load" in str(e.get("name")) for e in events)


def test_deadline_skips_and_keeps_valid_json(tmp_path: Path) -> None:
    report = _gpu_check().main(["--dry-run", "--models", "tiny-t2v-2blocks", "--cases", "32p1",
                                "--time-limit", "0", "--out-dir", str(tmp_path)])  # fmt: skip
    assert report["finished"] and report["calibration"] is not None
    assert report["skipped"] and json.loads((tmp_path / "gpu_check.json").read_text())["skipped"]


@pytest.mark.slow
def test_dry_run_inductor_checks_generated_code_order(tmp_path: Path) -> None:
    skip = ",".join(["fxswap_eager@mid", "fxswap_eager@large", "fxswap_inductor@mid", "fxswap_inductor@large",
                     "diffusers_group_offload"])  # fmt: skip
    report = _gpu_check().main(["--dry-run", "--dry-run-inductor", "--models", "tiny-t2v-2blocks", "--cases",
                                "32p1", "--skip", skip, "--out-dir", str(tmp_path)])  # fmt: skip
    assert not report["errors"], report["errors"]
    v = report["cases"]["tiny-t2v-2blocks@32p1"]["variants"]
    ind = v["fxswap_inductor@min"]
    assert set(ind) >= FXSWAP and set(ind["generated_code_order"]) >= ORDER
    order = ind["generated_code_order"]
    assert order["generated_code_found"]
    assert order["fx_ops"] == order["generated_ops"] == 3 * ind["swapped_units"]  # per call: l, w, r
    assert order["load_wait_release_in_order"]
    assert len(ind["exact_per_call"]) == 4 and ind["max_abs_diff"] is not None and ind["max_abs_diff"] < 1e-4


@pytest.mark.slow  # 2 processes importing torch and fxswap, 3 eager builds each
def test_multi_gpu_ranks_on_the_cpu() -> None:
    """The multi-GPU case's ranks (processes of the script, as on a GPU machine) with gloo on the
    CPU: its code runs before a machine with several GPUs is ever lent."""
    res = _gpu_check().run_ranks(2, dry_run=True, steps=3, timeout_s=300)
    assert set(res) == MULTI, {r.get("rank"): r.get("traceback") for r in res["per_rank"]}
    for rank, r in enumerate(res["per_rank"]):
        assert set(r) == RANK and (r["rank"], r["backend"]) == (rank, "gloo")
        for k in ("fxswap_resident", "fxswap_swapping"):
            assert r[k]["plan_degree_rank"] == [2, rank]
            assert r[k]["exact_per_call"] == [True] * 4  # eager on the CPU: bitwise
            assert r[k]["within_plan"] is None  # no allocator peaks on the CPU
        assert r["fxswap_resident"]["swapped_units"] == 0 < r["fxswap_swapping"]["swapped_units"]
        assert r["fxswap_swapping"]["budget_bytes"] == int(0.6 * r["fxswap_resident"]["plan_peak_bytes"])
    assert res["bitwise"] is True and res["max_abs_diff"] == 0.0 and res["within_tolerance"] is True
    assert res["within_plan"] is None
    assert res["step_s_2ranks_resident"] == max(r["fxswap_resident"]["step_s"] for r in res["per_rank"])


# ---------------------------------------------------------------------------------------- helpers
def test_analyse_trace_overlap_by_hand(tmp_path: Path) -> None:
    events = [
        {"ph": "X", "cat": "kernel", "name": "k1", "ts": 0, "dur": 100, "args": {"stream": 7}},
        {"ph": "X", "cat": "kernel", "name": "k2", "ts": 50, "dur": 100, "args": {"stream": 7}},  # 0..150
        {"ph": "X", "cat": "kernel", "name": "k3", "ts": 300, "dur": 50, "args": {"stream": 7}},
        # 100 us copy, 50 of it beside k1/k2 (100..150); pinned, side stream
        {
            "ph": "X",
            "cat": "gpu_memcpy",
            "name": "Memcpy HtoD (Pinned -> Device)",
            "ts": 100,
            "dur": 100,
            "args": {"stream": 20},
        },
        # 100 us copy, 50 beside k3 (300..350); pageable
        {
            "ph": "X",
            "cat": "gpu_memcpy",
            "name": "Memcpy HtoD (Pageable -> Device)",
            "ts": 250,
            "dur": 100,
            "args": {"stream": 20},
        },
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": 0, "dur": 10},
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 0},
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    got = _gpu_check().analyse_trace(path)
    assert got["h2d_copies"] == 2 and got["h2d_pinned"] == 1 and got["h2d_pageable"] == 1
    assert got["h2d_copy_ms"] == 0.2 and got["h2d_ms_beside_kernels"] == 0.1
    assert got["h2d_share_beside_kernels"] == 0.5
    assert got["kernels"] == 3 and got["kernel_ms"] == 0.25
    assert got["copies_on_own_stream"] is True


def test_generated_sequence_and_order_report() -> None:
    gc = _gpu_check()
    src = (
        "buf0 = torch.ops.fxswap.load.default(12, arg3_1)\n"
        "buf1 = torch.ops.fxswap.wait.default(12, buf0)\n"
        "buf2 = torch.ops.fxswap.load.default(13, buf1)\n"
        "buf9 = torch.ops.fxswap.release.default(12, [buf3, buf4], buf8)\n"
        "buf5 = torch.ops.fxswap.wait.default(13, buf2)\n"
        "buf7 = torch.ops.fxswap.release.default(13, [buf6], buf5)\n"
    )
    gen = gc.generated_sequence([src])
    assert gen == [("load", 12), ("wait", 12), ("load", 13), ("release", 12), ("wait", 13), ("release", 13)]
    same = gc.order_report(gen, gen)
    assert same["same_order"] and same["first_difference_at"] is None
    assert same["loads_beside_held_units_generated"] == 1  # load 13 while 12 is held
    late = [("load", 12), ("wait", 12), ("release", 12), ("load", 13), ("wait", 13), ("release", 13)]
    rep = gc.order_report(gen, late)
    assert not rep["same_order"] and rep["first_difference_at"] == 2
    assert rep["load_wait_release_in_order"] and rep["loads_beside_held_units_generated"] == 0
    bad = gc.order_report(gen, [("wait", 12), ("load", 12), ("release", 12)])
    assert not bad["load_wait_release_in_order"]


def test_depth0_plan_moves_every_load_onto_its_wait() -> None:
    import fxswap
    from fxswap.models import wan

    cfg = wan.tiny_config("t2v", num_layers=2)
    m = wan.build(cfg, device="meta")
    plan = fxswap.plan(m, **wan.example_inputs(cfg, frames=1, height=32, width=32, device="meta"),
                       mode="layerwise", max_vram_gb=4e-4, reserve_mb=0)  # fmt: skip
    swapped = [u for u in plan.units if not u.resident]
    assert swapped and any(u.load_at < u.wait_at for u in swapped)  # the original prefetches
    d0 = _gpu_check().depth0_plan(plan)
    assert d0.prefetch_depth == 0 and d0.fingerprint == plan.fingerprint
    for u, v in zip(plan.units, d0.units, strict=True):
        if u.resident:
            assert v == u
        else:
            assert (v.load_at, v.load_node, v.wait_at, v.release_after) == (
                u.wait_at, u.wait_node, u.wait_at, u.release_after)  # fmt: skip


def test_parameters_on_meta_keeps_buffers() -> None:
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("table", torch.arange(3.0), persistent=False)

    register = torch.nn.Module.register_parameter
    with _gpu_check()._parameters_on_meta():
        m = M()
    assert torch.nn.Module.register_parameter is register
    assert m.lin.weight.device.type == "meta" and isinstance(m.lin.weight, torch.nn.Parameter)
    assert torch.equal(m.table, torch.arange(3.0))
