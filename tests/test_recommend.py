"""``fxswap.recommend`` and ``fxswap recommend``: every figure is what the planner gives for that setting.

The model is WAN 1.3B cut to 2 blocks at 256x256, 9 frames (a graph that plans in milliseconds); the
card is the rtx4090 profile's rates with a small memory so that the budget grid crosses from
"everything swapped" to "everything resident". Expected figures are made here with ``fxswap.plan``
on a separately built meta model, not taken from the recommendation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import fxswap
import fxswap.capture
from fxswap.api import make_options, plan_traced
from fxswap.bench.costmodel import plan_rates
from fxswap.bench.hardware import get_profile
from fxswap.bench.recommendations import NoCudaError, Recommendation, recommend
from fxswap.cli import _parser, main
from fxswap.models import wan

GiB = 2**30
ARGS: dict[str, Any] = {
    "model": "wan2.1-t2v-1.3b",
    "layers": 2,
    "resolution": (256, 256),
    "frames": 9,
    "card": "rtx4090",
    "step_gb": 0.05,
}
VRAM_GB = 0.8


@pytest.fixture(scope="module")
def rec() -> Recommendation:
    return recommend(VRAM_GB, **ARGS)


@pytest.fixture(scope="module")
def meta_model() -> Any:
    """A separate capture of the same model and input (fxswap.trace on a fresh meta build)."""
    model = wan.build("wan2.1-t2v-1.3b", device="meta", dtype=torch.bfloat16, num_layers=2)
    inputs = wan.example_inputs(
        model.config, frames=9, height=256, width=256, device="meta", dtype=torch.bfloat16
    )
    return fxswap.trace(model, **inputs)


def _plan(traced: Any, mode: str, gb: float, block: float) -> Any:
    # the card's rates as `fxswap plan --card rtx4090` passes them
    opts = make_options(mode=mode, max_vram_gb=gb, block_size_mb=block, **plan_rates(get_profile("rtx4090")))
    return plan_traced(traced, opts)


def test_three_settings_each_as_the_planner_predicts(rec: Recommendation, meta_model: Any) -> None:
    assert [s.label for s in rec.settings] == ["balanced", "memory-saving", "fastest"]
    assert rec.usable_bytes == int(0.9 * VRAM_GB * GiB)
    for s in rec.settings:
        p = _plan(meta_model, s.mode, s.max_vram_gb, s.block_size_mb)
        assert (s.peak_bytes, s.moved_bytes_per_call, s.resident_bytes) == (
            p.peak_bytes,
            p.moved_bytes_per_call,
            p.resident_bytes,
        )
        assert s.predicted_step_ms == pytest.approx(p.predicted_step_ms)
        assert s.peak_bytes <= s.max_vram_gb * GiB <= rec.usable_bytes
    saving, balanced, fastest = (rec.setting(n) for n in ("memory-saving", "balanced", "fastest"))
    assert saving.max_vram_gb <= balanced.max_vram_gb <= fastest.max_vram_gb
    assert fastest.predicted_step_ms <= min(s.predicted_step_ms for s in rec.settings) + 1e-9
    assert saving.predicted_step_ms <= 1.25 * fastest.predicted_step_ms
    assert balanced.predicted_step_ms <= 1.05 * fastest.predicted_step_ms


def test_fastest_is_not_beaten_by_other_settings(rec: Recommendation, meta_model: Any) -> None:
    # a brute force over budgets off the recommendation's grid and every mode
    fastest = rec.setting("fastest")
    usable_gb = rec.usable_bytes / GiB
    for frac in (0.55, 0.7, 0.85, 1.0):
        gb = usable_gb * frac
        for mode, block in (("layerwise", 300), ("chunkwise", 100), ("chunkwise", 800), ("adaptive", 300)):
            try:
                p = _plan(meta_model, mode, gb, block)
            except fxswap.BudgetInfeasibleError:
                continue
            assert p.predicted_step_ms >= fastest.predicted_step_ms * (1 - 1e-6), (mode, gb, block)


def test_smallest_budget_is_the_planners_minimum(rec: Recommendation, meta_model: Any) -> None:
    gb = rec.min_vram_bytes / GiB
    assert _plan(meta_model, rec.min_mode, gb, 300).peak_bytes <= rec.min_vram_bytes
    with pytest.raises(fxswap.BudgetInfeasibleError):
        _plan(meta_model, rec.min_mode, (rec.min_vram_bytes - 2**20) / GiB, 300)
    for mode, b in rec.min_by_mode.items():
        assert b >= rec.min_vram_bytes
        assert mode in ("adaptive", "layerwise", "chunkwise")


def test_captures_once_for_all_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []
    real = fxswap.capture.trace

    def counting(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(fxswap.capture, "trace", counting)
    monkeypatch.setenv("FXSWAP_CACHE_DIR", str(tmp_path))  # an empty graph cache
    r = recommend(VRAM_GB, **ARGS)
    assert len(calls) == 1
    assert r.plans_made > 10
    again = recommend(VRAM_GB, **ARGS)  # the graph from the cache: no capture at all
    assert len(calls) == 1 and again.settings == r.settings
    recommend(VRAM_GB, cache=False, **ARGS)
    assert len(calls) == 2


def test_nothing_fits_says_so_with_the_minimum() -> None:
    r = recommend(0.2, **ARGS)
    assert r.settings == ()
    text = r.report()
    assert "nothing fits" in text and f"{r.min_vram_bytes / GiB:.2f} GiB" in text
    with pytest.raises(KeyError, match="balanced"):
        r.setting("balanced")


def test_card_memory_when_no_vram_given() -> None:
    # a coarse grid: the card's 24 GiB are far above this tiny graph's needs
    r = recommend(card="rtx4090", **{**{k: v for k, v in ARGS.items() if k != "card"}, "step_gb": 4})
    assert r.vram_bytes == get_profile("rtx4090").vram_bytes
    assert "profile rtx4090" in r.vram_source


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_without_vram_or_card_and_no_cuda_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    args = {k: v for k, v in ARGS.items() if k != "card"}
    with pytest.raises(NoCudaError, match="--vram 20"):
        recommend(**args)
    assert main(["recommend", "--model", "wan2.1-t2v-1.3b", "--layers", "2"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_public_name() -> None:
    import fxswap.bench.recommendations

    assert fxswap.recommend is fxswap.bench.recommendations.recommend  # no submodule shadows the function


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="`model`='wan9'"):
        recommend(20, model="wan9")
    with pytest.raises(ValueError, match="`vram_gb`=-1"):
        recommend(-1, **ARGS)
    with pytest.raises(ValueError, match="`step_gb`=0"):
        recommend(20, **{**ARGS, "step_gb": 0})
    with pytest.raises(ValueError, match="frames"):
        recommend(20, **{**ARGS, "frames": 10})


def test_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["recommend", "--vram", str(VRAM_GB), "--model", "wan2.1-t2v-1.3b", "--layers", "2"]
    argv += ["--resolution", "256x256", "--frames", "9", "--card", "rtx4090", "--step-gb", "0.05"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "not measured" in out
    rows = {
        line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ") and line.split()
    }
    r = recommend(VRAM_GB, **ARGS)
    for s in r.settings:
        row = rows[s.label]
        assert row[1] == s.mode and math.isclose(float(row[2]), s.max_vram_gb)
    assert main([*argv[:2], "0.2", *argv[3:]]) == 2  # nothing fits: exit 2, as `fxswap plan`
    with pytest.raises(SystemExit):
        main(["recommend", "--vram", "20", "--model", "wan9"])
    assert "unknown model 'wan9'" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("plan", "bench", "calibrate", "recommend"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: fxswap {cmd}" in out
    # every option of every subcommand says what it does
    sub = next(a for a in _parser()._actions if a.dest == "command")
    for cmd, parser in sub.choices.items():  # type: ignore[attr-defined]
        for action in parser._actions:
            if action.dest != "help":
                assert action.help, f"fxswap {cmd}: {action.option_strings or action.dest} has no help text"


# ------------------------------------------------------------------------------ everyday output
def test_progress_bars_quiet_unless_a_terminal_or_forced(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fxswap.models.wan import load
    from fxswap.models.wan_checkpoint import save

    cfg = wan.tiny_config("t2v", num_layers=2)
    save(wan.build(cfg), tmp_path / "tiny.safetensors")
    monkeypatch.delenv("FXSWAP_PROGRESS", raising=False)
    load(tmp_path / "tiny.safetensors", config=cfg)  # stderr is not a terminal here: no bar
    assert "loading tiny.safetensors" not in capsys.readouterr().err
    monkeypatch.setenv("FXSWAP_PROGRESS", "1")
    load(tmp_path / "tiny.safetensors", config=cfg)
    assert "loading tiny.safetensors" in capsys.readouterr().err
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(4)]).eval()
    fxswap.compile(model, mode="layerwise", max_vram_gb=10e3 / GiB, reserve_mb=0, backend="eager")(
        torch.randn(2, 32)
    )
    assert "host copies" in capsys.readouterr().err
    monkeypatch.setenv("FXSWAP_PROGRESS", "0")
    load(tmp_path / "tiny.safetensors", config=cfg)
    assert capsys.readouterr().err == ""


def test_one_log_line_per_plan(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(4)]).eval()
    sm = fxswap.compile(model, mode="layerwise", max_vram_gb=10e3 / GiB, reserve_mb=0, backend="eager")
    with caplog.at_level(logging.INFO, logger="fxswap"):
        sm(torch.randn(2, 32))
        sm(torch.randn(2, 32))  # same signature: no new plan, no new line
        sm(torch.randn(3, 32))  # a new signature: a new plan
    lines = [r.getMessage() for r in caplog.records if "planned" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert sm.plans[0].mode == "layerwise" and "mode layerwise" in lines[0] and "predicted peak" in lines[0]


# ------------------------------------------------- the choice on a planner whose answers are a formula
# A stand-in planner with closed-form answers, so that every recommended figure can be worked out by
# hand from the rules in fxswap.bench.recommendations' docstring:
#   minimum budget (GiB) per candidate: adaptive 0.30, layerwise 0.40, chunkwise 200/300/500 MiB:
#       0.35 / 0.45 / 0.60
#   step time (ms) at budget b GiB: 100 + 100 * max(0, 1 - b), plus 6 for layerwise, 3 for chunkwise
#   peak = min + (b - min) / 2, resident = b / 4, moved = 1 GiB - resident (bytes, from GiB)
_MIN_GB = {("adaptive", 300.0): 0.30, ("layerwise", 300.0): 0.40, ("chunkwise", 200.0): 0.35,
           ("chunkwise", 300.0): 0.45, ("chunkwise", 500.0): 0.60}  # fmt: skip
_PENALTY_MS = {"adaptive": 0.0, "layerwise": 6.0, "chunkwise": 3.0}


def _formula_plan(ir: Any, opts: Any) -> Any:
    from types import SimpleNamespace

    key = (opts.mode, opts.block_size_bytes / 2**20)
    lo = _MIN_GB[key]
    b = opts.max_vram_bytes / GiB
    if b < lo - 1e-12:
        raise fxswap.BudgetInfeasibleError(
            "below the formula's minimum", min_vram_bytes=round(lo * GiB), mode=opts.mode
        )
    return SimpleNamespace(
        peak_bytes=round((lo + (b - lo) / 2) * GiB),
        predicted_step_ms=100 + 100 * max(0.0, 1 - b) + _PENALTY_MS[opts.mode],
        predicted_stall_ms=0.0,
        resident_bytes=round(b / 4 * GiB),
        moved_bytes_per_call=round((1 - b / 4) * GiB),
    )


def test_the_choice_on_a_formula_planner(monkeypatch: pytest.MonkeyPatch) -> None:
    import fxswap.bench.recommendations as recs
    import fxswap.passes.planner

    monkeypatch.setattr(recs, "_capture", lambda *a, **k: (None, 0.0))
    monkeypatch.setattr(fxswap.passes.planner, "build_plan", _formula_plan)
    # card 2 GiB, headroom 0.25 GiB: usable 1.75 GiB; grid step 0.25 GiB from the least minimum
    # (0.30 -> 0.50): budgets 0.50, 0.75, 1.00, 1.25, 1.50, 1.75
    r = recs.recommend(2.0, model="wan2.1-t2v-1.3b", headroom_gb=0.25, step_gb=0.25)
    assert r.usable_bytes == round(1.75 * GiB)
    assert r.min_vram_bytes == round(0.30 * GiB) and r.min_mode == "adaptive"
    assert r.min_by_mode == {
        "adaptive": round(0.30 * GiB),
        "layerwise": round(0.40 * GiB),
        "chunkwise": round(0.35 * GiB),
    }
    # best time 100 ms (adaptive at b >= 1). fastest: within 1% (<= 101 ms) only adaptive at
    # 1.00..1.75 (chunkwise is 103): the largest budget, 1.75 GiB.
    # memory-saving: within 25% (<= 125 ms): adaptive at 0.75 (125 ms) is the smallest budget
    # (layerwise there is 131, chunkwise 128; at 0.50 adaptive is 150).
    # balanced: half way between 0.75 and 1.75 = 1.25, less half a step = 1.125; within 5%
    # (<= 105 ms): adaptive (100) and chunkwise (103) at b >= 1; the smallest budget >= 1.125 is
    # 1.25, and there adaptive is the faster.
    got = {s.label: (s.mode, s.max_vram_gb, s.block_size_mb) for s in r.settings}
    assert got == {
        "fastest": ("adaptive", 1.75, 300.0),
        "memory-saving": ("adaptive", 0.75, 300.0),
        "balanced": ("adaptive", 1.25, 300.0),
    }
    for s in r.settings:
        lo, b = 0.30, s.max_vram_gb
        assert s.predicted_step_ms == pytest.approx(100 + 100 * max(0.0, 1 - b))
        assert s.peak_bytes == round((lo + (b - lo) / 2) * GiB)
        assert (s.resident_bytes, s.moved_bytes_per_call) == (round(b / 4 * GiB), round((1 - b / 4) * GiB))
    # plans made: 5 probes for the minima, then per budget every candidate whose minimum fits:
    # 0.50: 4 (not chunkwise 500), 0.75..1.75: 5 each (5 budgets)
    assert r.plans_made == 5 + 4 + 5 * 5
