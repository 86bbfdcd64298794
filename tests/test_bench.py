"""`fxswap bench --sim`: rows, the invariants that hold by construction, writers, CLI entry points."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
from graphs import chain_graph

from fxswap.bench.graphs import fp8_ir
from fxswap.bench.hardware import PROFILES
from fxswap.bench.peers import PEER_POLICIES
from fxswap.bench.report import format_table, read_json, readme_table, summarize, write_csv, write_json
from fxswap.bench.rows import FXSWAP_POLICIES, BenchRow, bench_graph
from fxswap.bench.runner import add_bench_arguments, run_bench
from fxswap.graph_cache import ir_from_json, ir_to_json
from fxswap.ir import GraphIR, OpInfo, WeightInfo

MiB = 2**20
GiB = 2**30
ALL = FXSWAP_POLICIES + PEER_POLICIES
REQUIRED = ("model", "resolution", "frames", "dtype", "card", "budget_gb", "policy", "feasible", "step_ms",
            "resident_compute_ms", "bound_ms", "peak_bytes", "moved_bytes", "weight_bytes")  # fmt: skip


def _rows(
    n_blocks: int = 6, budgets: tuple[float, ...] = (0.35, 0.6, 0.9, 1.5), flops: float = 1e12
) -> list[BenchRow]:
    ir = chain_graph(n_blocks, weight_bytes=100 * MiB, act_bytes=10 * MiB, embed_bytes=50 * MiB,
                     head_bytes=50 * MiB, flops=flops)  # fmt: skip
    cards = [PROFILES["rtx4090"], PROFILES["rtx5090"], PROFILES["h100-sxm"]]
    return bench_graph(ir, model="chain", resolution="832x480", frames=81, dtype="bf16", cards=cards,
                       budgets_gb=budgets, policies=ALL, reserve_bytes=16 * MiB)  # fmt: skip


@pytest.mark.parametrize("flops", [1e10, 1e12])  # transfer-bound and compute-bound
def test_adaptive_invariants_hold_on_every_row(flops: float) -> None:
    rows = _rows(flops=flops)
    assert {r.policy for r in rows} == set(ALL)
    assert len(rows) == 3 * 4 * len(ALL)
    for r in rows:
        if r.policy == "fxswap-adaptive" and r.feasible:
            assert r.step_ms is not None and r.bound_ms is not None and r.peak_bytes is not None
            assert r.peak_bytes <= round(r.budget_gb * GiB)  # never above the budget
            assert r.step_ms >= r.bound_ms * (1 - 1e-9)  # never below the physical bound
            assert r.step_ms >= r.resident_compute_ms * (1 - 1e-9)
        if r.feasible and r.peak_bytes is not None:
            assert r.peak_bytes <= round(r.budget_gb * GiB), r
        if not r.feasible and r.policy not in FXSWAP_POLICIES:
            assert r.peak_bytes is not None and r.peak_bytes > round(r.budget_gb * GiB)  # says so, not hidden
    s = summarize(rows)
    assert s.adaptive_over_budget == 0 and s.adaptive_below_bound == 0
    assert s.adaptive_feasible > 0


def test_infeasible_budget_rows_are_reported() -> None:
    rows = _rows(budgets=(0.02,))
    assert rows and all(not r.feasible for r in rows)
    a = next(r for r in rows if r.policy == "fxswap-adaptive")
    assert a.step_ms is None and "infeasible" in a.setting
    assert "OOM" in format_table(rows)


def test_budget_above_card_vram_is_skipped() -> None:
    ir = chain_graph(2)
    rows = bench_graph(ir, model="c", resolution="x", frames=1, dtype="bf16", cards=[PROFILES["rtx4080"]],
                       budgets_gb=(12, 24), policies=("fxswap-layerwise",))  # fmt: skip
    assert {r.budget_gb for r in rows} == {12}


def test_a14b_rows_report_switch_cost_separately() -> None:
    ir = chain_graph(3)
    rows = bench_graph(ir, model="wan2.2-t2v-a14b", resolution="x", frames=1, dtype="bf16",
                       cards=[PROFILES["rtx4090"]], budgets_gb=(0.5,), policies=ALL, experts=2)  # fmt: skip
    for r in rows:
        if r.resident_bytes is not None:
            assert r.switch_ms == pytest.approx(
                r.resident_bytes / (PROFILES["rtx4090"].pinned_h2d_gbps * 1e9) * 1e3
            )


def test_fp8_resizes_linear_weights_only() -> None:
    ir = GraphIR(
        ops=(
            OpInfo("lin", "torch._C._nn.linear", "blocks.0.q", ("blocks.0.q.weight", "blocks.0.q.bias"),
                   64, 1e6, 0),
        ),
        weights=(
            WeightInfo("blocks.0.q.weight", (8, 4), "bfloat16", 64, "blocks.0.q"),
            WeightInfo("blocks.0.q.bias", (8,), "bfloat16", 16, "blocks.0.q"),
            WeightInfo("blocks.0.modulation", (1, 6, 4), "bfloat16", 48, "blocks.0"),
        ),
        buffers=(),
        inputs=(),
    )  # fmt: skip
    out = fp8_ir(ir)
    sizes = {w.name: w.nbytes for w in out.weights}
    assert sizes == {"blocks.0.q.weight": 32, "blocks.0.q.bias": 16, "blocks.0.modulation": 48}
    assert out.ops[0].flops == ir.ops[0].flops
    # the Linear holds a transient bf16 copy of its weight while it runs (same rule as `fxswap plan`)
    assert sum(b.nbytes for b in out.buffers) == 64


def test_json_csv_round_trip(tmp_path: Path) -> None:
    rows = _rows(n_blocks=3, budgets=(0.02, 0.5))
    write_json(rows, tmp_path / "r.json")
    assert read_json(tmp_path / "r.json") == rows
    data = json.loads((tmp_path / "r.json").read_text())
    assert all(k in data[0] for k in REQUIRED)
    write_csv(rows, tmp_path / "r.csv")
    with open(tmp_path / "r.csv") as fh:
        got = list(csv.DictReader(fh))
    assert len(got) == len(rows) and all(k in got[0] for k in REQUIRED)
    table = readme_table(rows, cases=[("chain", "832x480", 81)], cards=["rtx4090"])
    assert table.startswith("| model |") and "rtx5090" not in table and "chain" in table


def test_ir_json_round_trip() -> None:
    ir = chain_graph(2)
    assert ir_from_json(json.loads(json.dumps(ir_to_json(ir)))) == ir


def test_summary_counts_on_hand_made_rows() -> None:
    base = dict(model="m", resolution="r", frames=1, dtype="bf16", card="c", budget_gb=1.0,
                resident_compute_ms=100.0, bound_ms=100.0, weight_bytes=10, d2h_bytes=0, stall_ms=0.0,
                resident_bytes=0, switch_ms=None, setting="", peak_bytes=1, moved_bytes=1)  # fmt: skip
    rows = [
        BenchRow(**base, policy="fxswap-adaptive", feasible=True, step_ms=102.0),  # type: ignore[arg-type]
        BenchRow(**base, policy="mmgp", feasible=True, step_ms=101.0),  # type: ignore[arg-type]
        BenchRow(**base, policy="diffusers-group", feasible=True, step_ms=150.0),  # type: ignore[arg-type]
    ]
    s = summarize(rows)
    assert s.adaptive_within_3pct == 1 and s.faster_than["diffusers-group"] == 1
    assert s.slower_than["mmgp"] == 1 and s.slower_examples


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args(list(argv))


def test_run_bench_end_to_end_on_a_tiny_wan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = {k: tmp_path / f"b.{k}" for k in ("json", "csv", "md")}
    chart = tmp_path / "chart.png"
    rc = run_bench(_args("--sim", "--models", "tiny-t2v", "--cases", "480p17", "--cards", "rtx4090,rtx5090",
                         "--budgets-gb", "0.01,0.02", "--reserve-mb", "1", "--cache-dir", str(tmp_path / "c"),
                         "--json", str(out["json"]), "--csv", str(out["csv"]), "--md", str(out["md"]),
                         "--chart", str(chart)))  # fmt: skip
    assert rc == 0
    rows = read_json(out["json"])
    assert {r.dtype for r in rows} == {"bf16", "fp8"} and {r.policy for r in rows} == set(ALL)
    assert chart.stat().st_size > 1000 and "within 3%" in out["md"].read_text()
    assert "within 3% of the physical bound" in capsys.readouterr().out
    assert len(list((tmp_path / "c").glob("*.json"))) == 1  # the graph cached on disk (fxswap.graph_cache)


def test_run_bench_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_bench(_args()) == 2
    assert "--sim" in capsys.readouterr().err
    assert run_bench(_args("--sim", "--dtypes", "int4")) == 2
    assert "int4" in capsys.readouterr().err
    assert run_bench(_args("--sim", "--cards", "rtx9999")) == 2
    assert run_bench(_args("--sim", "--budgets-gb", "-1")) == 2
    assert run_bench(_args("--sim", "--cases", "8k")) == 2


def test_plot_timeline_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from fxswap.bench.plots import plot_timeline, timeline_parts
    from fxswap.passes.planner import build_plan
    from fxswap.swapplan import PlanOptions

    ir = chain_graph(6)
    plan = build_plan(ir, PlanOptions(mode="adaptive", max_vram_bytes=800 * MiB))
    parts = timeline_parts(plan, ir)
    # Each part by its definition, written out here from the plan's windows and the graph's buffers
    # (not the simulator's code): at op i, in flight = units with load_at <= i < wait_at, live =
    # units with wait_at <= i <= release_after, act = buffers with start <= i <= end + workspace.
    swapped = [u for u in plan.units if not u.resident]
    resident = sum(u.bytes for u in plan.units if u.resident)
    for i, op in enumerate(ir.ops):
        flight = sum(u.bytes for u in swapped if u.load_at <= i < u.wait_at)
        live = sum(u.bytes for u in swapped if u.wait_at <= i <= u.release_after)
        act = sum(b.nbytes for b in ir.buffers if b.start <= i <= b.end) + op.workspace_bytes
        want = (
            plan.reserve_bytes,
            resident,
            flight,
            live,
            act,
            plan.reserve_bytes + resident + flight + live + act,
        )
        got = tuple(parts[k][i] for k in ("reserve", "resident", "in_flight", "swapped_live", "act", "total"))
        assert got == want, i
    assert max(parts["total"]) == plan.peak_bytes  # and the plan's peak is the top of that sum
    assert any(parts["in_flight"])
    plot_timeline(plan, ir, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="num_ops"):
        timeline_parts(plan, chain_graph(2))


def test_compare_with_gpu_check_reports_error_per_variant() -> None:
    from fxswap.bench.gpu_compare import compare_with_gpu_check

    report = {
        "dry_run": True,
        "mode": "adaptive",
        "models": {
            "tiny-t2v": {
                "frames": 5, "height": 32, "width": 32, "budget_bytes": 10 * MiB,
                "variants": {"resident_eager": {"step_s": 0.002}, "fxswap_eager": {"error": "x"}},
            }
        },
    }  # fmt: skip
    out = compare_with_gpu_check(report, PROFILES["rtx4090"])
    by = {c["variant"]: c for c in out}
    assert set(by) == {"resident_eager", "fxswap_eager", "diffusers_group_offload"}
    r = by["resident_eager"]
    assert r["measured_ms"] == pytest.approx(2.0)
    assert r["error_pct"] == pytest.approx((r["predicted_ms"] / 2.0 - 1) * 100)
    assert by["fxswap_eager"]["measured_ms"] is None and by["fxswap_eager"]["error_pct"] is None
    assert by["fxswap_eager"]["predicted_ms"] >= r["predicted_ms"]
