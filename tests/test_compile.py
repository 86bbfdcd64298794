"""fxswap.compile end to end on the CPU: exactness, races, ledger, caching, experts, bad input.

Budgets come from the planner itself: the minimum (``BudgetInfeasibleError.min_vram_bytes``), the
midpoint to "all resident", and ten times the minimum (everything resident for these models).
Every eager run uses :class:`LateCopyBackend`, whose copies land late on another thread and read
NaN until then: a missing or misplaced wait would show up as NaN / inexact output.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxswap.api import plan as fx_plan
from fxswap.compiler import DeviceError, SignatureError, SwapModule, TrainingModeError
from fxswap.compiler import compile as fx_compile
from fxswap.errors import BudgetInfeasibleError, CaptureError, PlanError, PlanMismatchError
from fxswap.experts import compile_experts
from fxswap.models import wan
from fxswap.runtime import LateCopyBackend
from fxswap.swapplan import SwapPlan
from tests.models import MLP, Shared, regionally_compiled

MODES = ("layerwise", "chunkwise", "adaptive")
COMMON = dict(reserve_mb=0, block_size_mb=0.004)


# ----------------------------------------------------------------------------------------- models
class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x)).mean(dim=(2, 3))
        return self.head(x)


@dataclass
class Case:
    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    ref: Any


def _build(name: str) -> Case:
    torch.manual_seed(0)
    if name in ("wan_t2v", "wan_i2v"):
        cfg = wan.tiny_config(name.removeprefix("wan_"))
        m = wan.build(cfg).requires_grad_(False)
        args: tuple[Any, ...] = ()
        kwargs = wan.example_inputs(cfg, frames=5, height=32, width=32)
    else:
        m = {"mlp": MLP, "conv": ConvNet, "shared": Shared}[name]().requires_grad_(False)
        x = (
            torch.randn(2, 3, 12, 12)
            if name == "conv"
            else torch.randn(3, m.mid.in_features if name == "shared" else 64)
        )
        args, kwargs = (x,), {}
    m.eval()
    with torch.no_grad():
        ref = m(*args, **kwargs)
    return Case(m, args, kwargs, ref)


MODEL_NAMES = ("mlp", "conv", "shared", "wan_t2v", "wan_i2v")


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    return {}


def case(cases: dict[str, Case], name: str) -> Case:
    if name not in cases:
        cases[name] = _build(name)
    return cases[name]


def min_budget(c: Case, mode: str, backend: str = "eager") -> int:
    """The minimum fxswap reports for ``backend`` (Inductor's is its generated program's)."""
    with pytest.raises(BudgetInfeasibleError) as ei:
        fx_compile(c.model, mode=mode, max_vram_gb=1e-9, backend=backend, **COMMON)(*c.args, **c.kwargs)
    assert ei.value.mode == mode and ei.value.min_vram_bytes > 0
    return ei.value.min_vram_bytes


def weight_peak(plan: SwapPlan) -> int:
    """Weights on the device at the worst op: residents + units between their load and release."""
    peak = 0
    for i in range(plan.num_ops):
        live = sum(
            u.bytes
            for u in plan.units
            if not u.resident and u.load_at is not None and u.load_at <= i <= (u.release_after or 0)
        )
        peak = max(peak, live)
    return plan.resident_bytes + peak


def same(a: Any, b: Any, eq: Callable[[torch.Tensor, torch.Tensor], bool] = torch.equal) -> bool:
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(la) == len(lb) and all(eq(x, y) for x, y in zip(la, lb, strict=True))


# ---------------------------------------------------------------------------------- exactness matrix
@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_eager_exact_at_every_budget_with_late_copies(cases: dict[str, Case], name: str, mode: str) -> None:
    c = case(cases, name)
    lo = min_budget(c, mode)
    weights = sum(p.numel() * p.element_size() for p in c.model.parameters())
    swapped_counts = []
    for budget in (lo, (lo + lo + weights) // 2, 10 * lo + weights):
        sm = fx_compile(
            c.model, mode=mode, max_vram_gb=budget / 2**30, backend="eager",
            transfer_backend=LateCopyBackend(0.0005), **COMMON,
        )  # fmt: skip
        out = sm(*c.args, **c.kwargs)
        assert same(out, c.ref), f"{name} {mode} budget {budget}: not bitwise equal"
        plan = sm.plan
        assert plan is not None and plan.peak_bytes <= budget and plan.min_vram_bytes == lo
        assert sm.runtime.ledger.peak <= weight_peak(plan), "device weights exceeded the plan's prediction"
        swapped_counts.append(sum(not u.resident for u in plan.units))
    assert swapped_counts[0] > 0, "the minimum budget must swap something"
    assert swapped_counts[-1] == 0, "the largest budget keeps everything resident"


def test_ledger_bounded_and_flat_over_100_calls(cases: dict[str, Case]) -> None:
    c = case(cases, "mlp")
    lo = min_budget(c, "chunkwise")
    sm = fx_compile(c.model, mode="chunkwise", max_vram_gb=lo / 2**30, backend="eager", **COMMON)
    sm(*c.args)
    assert sm.plan is not None
    after_first = sm.runtime.ledger.bytes
    assert after_first == sm.plan.resident_bytes  # only residents stay between calls
    for _ in range(100):
        out = sm(*c.args)
    gc.collect()
    assert torch.equal(out, c.ref)
    assert sm.runtime.ledger.bytes == after_first
    assert sm.runtime.ledger.peak <= weight_peak(sm.plan)
    assert (
        sm.runtime.stats["loads"]
        == sm.runtime.stats["releases"]
        == 101 * sum(not u.resident for u in sm.plan.units)
    )


# ------------------------------------------------------------------------------------------ inductor
@pytest.fixture(scope="module")
def inductor_mlp(cases: dict[str, Case]) -> tuple[Case, SwapModule, int]:
    c = case(cases, "mlp")
    lo = min_budget(c, "adaptive", "inductor")
    sm = fx_compile(c.model, mode="adaptive", max_vram_gb=lo / 2**30, backend="inductor", **COMMON)
    return c, sm, lo


def test_inductor_equals_torch_compile_and_never_recompiles(inductor_mlp: Any) -> None:
    from torch._dynamo.utils import counters

    c, sm, _ = inductor_mlp
    # fxswap compiles the repeated blocks and runs the rest as FX's Python, as regional compilation
    # does: the same Inductor kernels on the blocks (the swap ops only hand in the weights), the
    # same eager ops between them.
    ok = counters["frames"]["ok"]
    ref = regionally_compiled(c.model)(*c.args)
    assert counters["frames"]["ok"] > ok, "the reference compiled nothing"
    out = sm(*c.args)
    assert torch.equal(out, ref)
    compiles = sm.stats["compiles"]  # the first call's: fxswap.fit may compile more than one plan
    frames = dict(counters["frames"])
    breaks = sum(counters["graph_break"].values())
    compiled_graphs = dict(counters["inductor"])
    for _ in range(5):
        assert torch.equal(sm(*c.args), ref)
    assert sm.stats["compiles"] == compiles and sm.stats["captures"] <= 1
    assert dict(counters["frames"]) == frames, "a later call went through Dynamo again"
    assert sum(counters["graph_break"].values()) == breaks
    assert dict(counters["inductor"]) == compiled_graphs, "a later call compiled again"
    assert sum(not u.resident for u in sm.plan.units) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["conv", "shared", "wan_t2v", "wan_i2v"])
def test_inductor_matches_torch_compile_slow(cases: dict[str, Case], name: str) -> None:
    c = case(cases, name)
    lo = min_budget(c, "adaptive", "inductor")
    from torch._inductor.utils import fresh_cache, run_and_get_code

    sm = fx_compile(c.model, mode="adaptive", max_vram_gb=lo / 2**30, backend="inductor", **COMMON)
    with fresh_cache():
        out, code = run_and_get_code(lambda: sm(*c.args, **c.kwargs))
    ref = torch.compile(c.model)(*c.args, **c.kwargs)
    # Not bitwise for conv / WAN (observed max abs diff 3e-8 / 2.4e-7, one or two fp32 ulps): the
    # weights reach Inductor as outputs of an extern op instead of graph inputs, so it fuses the bias
    # adds and layouts differently than for plain torch.compile. "shared" is bitwise equal.
    assert same(out, ref, lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    assert sm.plan is not None and sm.graph_module is not None
    n_swapped = sum(not u.resident for u in sm.plan.units)
    assert n_swapped > 0
    # The program kept (fxswap.fit may try several), region by region as it runs: a block program
    # shared by several blocks counts once per block.
    program = sm._current.fn if sm._current is not None else None
    assert program is not None
    # Inductor's generated code, and FX's for the glue between regions (swap ops at a region's edge)
    sources = [
        step.compiled.code if step.glue else getattr(step.compiled, "source_code", "")
        for step in program.steps
    ]
    body = "".join(src[src.index("def call(") :] if "def call(" in src else src for src in sources)
    for op in ("load", "wait", "release"):
        assert body.count(f"= torch.ops.fxswap.{op}.default(") == n_swapped, op  # none DCE'd


# ------------------------------------------------------------------------------------ signatures
def test_new_shape_gets_own_plan_and_strict_refuses(cases: dict[str, Case]) -> None:
    c = case(cases, "mlp")
    sm = fx_compile(c.model, mode="layerwise", max_vram_gb=1, backend="eager", **COMMON)
    sm(*c.args)
    x2 = torch.randn(5, 64)
    assert torch.equal(sm(x2), c.model(x2))
    assert len(sm.plans) == 2
    sm(*c.args)
    assert len(sm.plans) == 2  # cached
    strict = fx_compile(c.model, mode="layerwise", max_vram_gb=1, backend="eager", strict=True, **COMMON)
    strict(*c.args)
    with pytest.raises(SignatureError, match=r"strict=True.*\(5, 64\)"):
        strict(x2)


def test_other_dtype_is_a_new_signature_and_a_clear_error_if_the_model_cannot(cases: dict[str, Case]) -> None:
    c = case(cases, "mlp")
    before = {k: v.clone() for k, v in c.model.state_dict().items()}
    sm = fx_compile(c.model, mode="layerwise", max_vram_gb=1, backend="eager", **COMMON)
    sm(*c.args)
    with pytest.raises(SignatureError, match=r"float64.*weights are float32"):
        sm(c.args[0].double())
    assert len(sm.plans) == 1 and torch.equal(sm(*c.args), c.ref)  # the failed signature left nothing
    assert all(torch.equal(before[k], v) and v.device.type == "cpu" for k, v in c.model.state_dict().items())


# ------------------------------------------------------------------------------------------ plans
def test_given_plan_object_and_path(cases: dict[str, Case], tmp_path: Path) -> None:
    c = case(cases, "mlp")
    lo = min_budget(c, "chunkwise")
    sm = fx_compile(c.model, mode="chunkwise", max_vram_gb=lo / 2**30, backend="eager", **COMMON)
    sm(*c.args)
    assert sm.plan is not None
    path = tmp_path / "plan.json"
    sm.plan.save(path)
    for given in (sm.plan, path, str(path)):
        again = fx_compile(c.model, plan=given, backend="eager", max_vram_gb=99, **COMMON)
        assert torch.equal(again(*c.args), c.ref)
        assert again.plan == sm.plan
    # a plan made offline by fxswap.plan (fxswap.trace's capture) fits fxswap.compile's capture
    offline = fx_plan(c.model, *c.args, mode="chunkwise", max_vram_gb=lo / 2**30, **COMMON)
    assert offline == sm.plan
    assert torch.equal(fx_compile(c.model, plan=offline, backend="eager")(*c.args), c.ref)


def test_plan_for_another_model_is_refused_naming_the_field(cases: dict[str, Case]) -> None:
    c = case(cases, "mlp")
    other = MLP(n=6, d=32).requires_grad_(False)
    x = torch.randn(3, 32)
    plan = fx_plan(other, x, mode="layerwise", max_vram_gb=1, reserve_mb=0)
    before = {k: v.clone() for k, v in c.model.state_dict().items()}
    sm = fx_compile(c.model, plan=plan, backend="eager", **COMMON)
    with pytest.raises(PlanMismatchError, match="params|graph"):
        sm(*c.args)
    assert _unchanged(c.model, before) and sm.runtime.ledger.bytes == 0


# -------------------------------------------------------------------------------------- bad input
def _unchanged(m: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    sd = m.state_dict()
    return all(torch.equal(before[k], v) and v.device == before[k].device for k, v in sd.items())


def test_budget_too_small_states_minimum_and_changes_nothing(cases: dict[str, Case]) -> None:
    c = case(cases, "conv")
    before = {k: v.clone() for k, v in c.model.state_dict().items()}
    with pytest.raises(BudgetInfeasibleError) as ei:
        fx_compile(c.model, mode="layerwise", max_vram_gb=1e-9, backend="eager", **COMMON)(*c.args)
    assert ei.value.min_vram_bytes > 0 and ei.value.mode == "layerwise"
    assert "min" in str(ei.value).lower()
    assert _unchanged(c.model, before)


class Breaks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lin(x).sum().item() > 0:  # data-dependent control flow: not one graph
            return x
        return -x


def test_model_that_does_not_capture() -> None:
    m = Breaks().requires_grad_(False).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CaptureError, match=r"^fxswap\.compile could not capture .*test_compile\.py"):
        fx_compile(m, backend="eager")(torch.randn(2, 4))
    assert _unchanged(m, before)


def test_device_that_does_not_exist_fails_before_anything(cases: dict[str, Case]) -> None:
    c = case(cases, "mlp")
    for bad in ("cuda:7", "npu", "tpu:0"):
        with pytest.raises(DeviceError, match="device"):
            fx_compile(c.model, device=bad)
    sm = fx_compile(c.model, backend="eager", device="cpu", max_vram_gb=1, **COMMON)
    with pytest.raises(DeviceError, match="input"):
        sm(c.args[0].to("meta"))


def test_bad_arguments_are_named() -> None:
    m = MLP()
    with pytest.raises(ValueError, match="backend"):
        fx_compile(m, backend="tvm")
    with pytest.raises(ValueError, match="empty_cache_freq"):
        fx_compile(m, empty_cache_freq=-1)
    with pytest.raises(ValueError, match="mode"):
        fx_compile(m, mode="fastest")
    with pytest.raises(TypeError, match="plan"):
        fx_compile(m, plan=42)  # type: ignore[arg-type]


def test_empty_cache_freq_is_a_noop_on_cpu(cases: dict[str, Case], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = itertools.count()
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: next(calls))
    c = case(cases, "mlp")
    sm = fx_compile(c.model, backend="eager", max_vram_gb=1, empty_cache_freq=2, **COMMON)
    for _ in range(6):
        sm(*c.args)
    assert next(calls) == 0 and sm.stats["empty_cache"] == 0


def test_empty_cache_freq_counts_on_a_cuda_device(
    cases: dict[str, Case], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA branch, with the device type faked after building on the CPU (no GPU here)."""
    calls = itertools.count()
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: next(calls))
    c = case(cases, "mlp")
    sm = fx_compile(c.model, backend="eager", max_vram_gb=1, empty_cache_freq=2, **COMMON)
    sm(*c.args)
    sm.device = torch.device("cuda", 0)
    monkeypatch.setattr(sm, "_check_devices", lambda *a: None)
    for _ in range(5):
        sm(*c.args)
    assert next(calls) == 3 and sm.stats["empty_cache"] == 3  # calls 2, 4, 6


# ----------------------------------------------------------------------------------------- experts
def test_experts_one_budget_switch_releases_the_other(cases: dict[str, Case]) -> None:
    torch.manual_seed(1)
    high, low = MLP().requires_grad_(False), MLP().requires_grad_(False)
    x = torch.randn(3, 64)
    t_hi, t_lo = torch.tensor([900.0]), torch.tensor([100.0])

    class Wrap(nn.Module):  # WAN-like call: (x, t)
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.m(x) * t

    wh, wl = Wrap(high).eval(), Wrap(low).eval()
    ex = compile_experts(wh, wl, boundary=875.0, timestep_arg="t", mode="adaptive", max_vram_gb=1e-4,
                         backend="eager", **COMMON)  # fmt: skip
    assert torch.equal(ex(x, t=t_hi), wh(x, t_hi))
    hi_rt, lo_rt = ex.experts[0].runtime, ex.experts[1].runtime
    assert hi_rt.ledger.bytes > 0  # high's residents on the device
    assert torch.equal(ex(x, t_lo), wl(x, t_lo))
    gc.collect()
    assert hi_rt.ledger.bytes == 0, "switching experts must release the other's residents"
    assert lo_rt.ledger.bytes > 0
    assert hi_rt.ledger.peak <= 1e-4 * 2**30 and lo_rt.ledger.peak <= 1e-4 * 2**30
    assert torch.equal(ex.high(x, t_hi), wh(x, t_hi))
    gc.collect()
    assert lo_rt.ledger.bytes == 0
    assert len(ex.plans) == 2
    with pytest.raises(TypeError, match="compile_experts"):
        fx_compile([wh, wl], mode="adaptive", max_vram_gb=1e-4)  # type: ignore[arg-type]
    same_api = compile_experts(wh, wl, mode="adaptive", max_vram_gb=1e-4, backend="eager",
                               boundary=875.0, timestep_arg="t", **COMMON)  # fmt: skip
    assert torch.equal(same_api[1](x, t_lo), wl(x, t_lo))
    assert torch.equal(same_api(x, t_hi), wh(x, t_hi)) and torch.equal(same_api(x, t_lo), wl(x, t_lo))


def test_swapped_weights_share_the_stores_host_copy(cases: dict[str, Case]) -> None:
    """On CUDA the store pins a copy; the model's tensor is pointed at it (one host copy, same values)."""
    c = case(cases, "mlp")
    m = MLP().requires_grad_(False).eval()
    m.load_state_dict(c.model.state_dict())
    sm = fx_compile(m, mode="layerwise", max_vram_gb=1e-9 + 20000 / 2**30, backend="eager", **COMMON)
    sm(*c.args)
    name = "blocks.3.weight"
    param = dict(m.named_parameters())[name]
    sm.runtime.store._tensors[name] = param.detach().clone()  # what pinning does on CUDA
    sm._builder._share_host_copies({name})
    assert param.data_ptr() == sm.runtime.store[name].data_ptr()
    assert torch.equal(sm(*c.args), c.ref) and param.device.type == "cpu"


def test_storage_dtype_fp8_within_plan_and_independent_of_budget(cases: dict[str, Case]) -> None:
    """fp8 storage: swapped weights travel as fp8 and are cast on the device; the staging copy is
    planned (reserve), so the ledger stays within the plan's weights + reserve; every float weight
    is rounded through fp8 whether swapped or resident, so each budget gives the same output."""
    import copy

    fp8 = torch.float8_e4m3fn
    c = case(cases, "mlp")
    rounded = copy.deepcopy(c.model)
    with torch.no_grad():
        for p in rounded.parameters():
            s = float(torch.tensor(float(p.abs().max()) / 448.0, dtype=torch.float32))  # amax / fp8 max
            p.copy_((p / s).to(fp8).to(p.dtype) * s)
        ref = rounded(*c.args)
    largest = max(p.numel() for p in c.model.parameters())  # bytes of its fp8 staging copy
    with pytest.raises(BudgetInfeasibleError) as ei:
        fx_compile(c.model, mode="layerwise", max_vram_gb=1e-9, backend="eager", storage_dtype=fp8,
                   **COMMON)(*c.args)  # fmt: skip
    lo = ei.value.min_vram_bytes
    assert lo == min_budget(c, "layerwise") + largest  # the minimum includes the staging reserve
    swapped_counts, beyond = [], []
    for budget in (lo, lo + 20_000, 10 * lo):
        sm = fx_compile(c.model, mode="layerwise", max_vram_gb=budget / 2**30, backend="eager",
                        storage_dtype=fp8, transfer_backend=LateCopyBackend(0.0002), **COMMON)  # fmt: skip
        out = sm(*c.args)
        plan = sm.plan
        assert plan is not None and plan.peak_bytes <= budget
        assert torch.equal(out, ref), f"budget {budget}: output depends on which weights are swapped"
        assert plan.reserve_bytes == largest  # COMMON asks for no reserve: all of it is staging
        swapped = {p for u in plan.units if not u.resident for p in u.params}
        assert all(sm.runtime.store[p].dtype == fp8 for p in swapped)
        assert sm.runtime.ledger.peak <= weight_peak(plan) + plan.reserve_bytes
        swapped_counts.append(len(swapped))
        beyond.append(sm.runtime.ledger.peak - weight_peak(plan))
    assert swapped_counts[0] > 0 and swapped_counts[-1] == 0
    assert max(beyond) <= largest
    # Without the reserve the promise would break: with no prefetch no other unit in flight has
    # slack (staging narrower than counted), so the cast's staging shows beyond the units.
    sm = fx_compile(c.model, mode="layerwise", max_vram_gb=lo / 2**30, backend="eager", storage_dtype=fp8,
                    max_prefetch_depth=0, **COMMON)  # fmt: skip
    assert torch.equal(sm(*c.args), ref) and sm.plan is not None
    assert 0 < sm.runtime.ledger.peak - weight_peak(sm.plan) <= sm.plan.reserve_bytes
    assert all(p.dtype == torch.float32 for p in c.model.parameters())  # the model keeps its dtype


def test_storage_dtype_with_a_plan_that_reserves_no_staging_is_refused(cases: dict[str, Case]) -> None:
    c = case(cases, "mlp")
    plan = fx_plan(c.model, *c.args, mode="layerwise", max_vram_gb=1, **COMMON)
    sm = fx_compile(c.model, plan=plan, backend="eager", storage_dtype=torch.float8_e4m3fn)
    with pytest.raises(PlanError, match=r"reserve_mb >= 1"):
        sm(*c.args)
    assert sm.runtime.ledger.bytes == 0 and not sm.plans
    # integer and complex buffers are never narrowed (their values would change)
    from fxswap.runtime import stored_dtype

    assert stored_dtype(torch.int64, torch.float8_e4m3fn) == torch.int64
    assert stored_dtype(torch.complex64, torch.float16) == torch.complex64
    assert stored_dtype(torch.float16, torch.float32) == torch.float16  # never widened
    assert stored_dtype(torch.bfloat16, torch.float8_e5m2) == torch.float8_e5m2


def test_training_mode_is_refused_naming_the_fix(cases: dict[str, Case]) -> None:
    c = case(cases, "mlp")
    sm = fx_compile(c.model, mode="layerwise", max_vram_gb=1, backend="eager", **COMMON)
    assert torch.equal(sm(*c.args), c.ref)
    try:
        c.model.blocks[2].train()  # one submodule is enough to change dropout / batch norm
        with pytest.raises(TrainingModeError, match=r"model\.eval\(\).*|blocks\.2"):
            sm(*c.args)
        fresh = fx_compile(MLP().requires_grad_(False), backend="eager", max_vram_gb=1, **COMMON)
        with pytest.raises(TrainingModeError, match=r"Fix: call model\.eval\(\)"):
            fresh(*c.args)
        assert fresh.runtime.ledger.bytes == 0 and not fresh.plans
    finally:
        c.model.eval()
    assert torch.equal(sm(*c.args), c.ref)


def test_failed_run_drops_its_pending_loads(cases: dict[str, Case]) -> None:
    """A graph that fails between a load and its wait leaves no transfer behind: the next call is
    exact and the device memory of the stale loads is returned."""
    c = case(cases, "mlp")
    lo = min_budget(c, "layerwise")
    sm = fx_compile(c.model, mode="layerwise", max_vram_gb=lo / 2**30, backend="eager", **COMMON)
    sm(*c.args)
    assert sm.graph_module is not None and sm.plan is not None
    resident = sm.plan.resident_bytes
    # fail in the middle of the graph, at the second unit's wait: its load was issued, never waited
    from fxswap import ops

    target = [n for n in sm.graph_module.graph.nodes if n.target is ops.wait][1]
    real = target.target

    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("injected failure")

    target.target = boom
    sm.graph_module.recompile()
    sm._current.fn = sm.graph_module.forward  # type: ignore[union-attr]
    discarded: list[int] = []
    discard = sm.runtime.discard_pending
    sm.runtime.discard_pending = lambda: discarded.append(discard()) or discarded[-1]  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="injected"):
        sm(*c.args)
    assert discarded == [1]
    gc.collect()
    assert sm.runtime.ledger.bytes == resident
    assert all(not u.pending for u in sm.runtime._units)
    target.target = real
    sm.graph_module.recompile()
    sm._current.fn = sm.graph_module.forward  # type: ignore[union-attr]
    for _ in range(3):
        assert torch.equal(sm(*c.args), c.ref)
    gc.collect()
    assert sm.runtime.ledger.bytes == resident


def test_rewritten_code_shows_each_units_release(cases: dict[str, Case]) -> None:
    c = case(cases, "mlp")
    lo = min_budget(c, "layerwise")
    sm = fx_compile(c.model, mode="layerwise", max_vram_gb=lo / 2**30, backend="eager", **COMMON)
    assert sm.code == ""
    sm(*c.args)
    assert sm.plan is not None
    code = sm.code
    lines = code.splitlines()
    for u in (u for u in sm.plan.units if not u.resident):
        label = u.name.replace(".", "_")
        at = [i for i, ln in enumerate(lines) if ln.strip().startswith(f"fxswap_release_{label} = torch")]
        load = [i for i, ln in enumerate(lines) if ln.strip().startswith(f"fxswap_load_{label} = torch")]
        assert len(at) == 1 and len(load) == 1 and load[0] < at[0], u.name
        # the release is emitted right after the plan's release node
        assert lines[at[0] - 1].lstrip().startswith(f"{u.release_node} = ")


def test_wan22_a14b_experts_tiny() -> None:
    """Two tiny WAN 2.2 experts, one budget, picked by timestep like WAN 2.2 (boundary 0.875)."""
    cfg = wan.tiny_config("t2v", boundary=0.875, num_experts=2)
    experts = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        experts.append(wan.build(cfg).requires_grad_(False).eval())
    kw = wan.example_inputs(cfg, frames=5, height=32, width=32)
    budget = 400_000  # bytes: below either expert's weights (~564 KB), above its minimum
    ex = compile_experts(*experts, boundary=875.0, mode="adaptive", max_vram_gb=budget / 2**30,
                         backend="eager", transfer_backend=LateCopyBackend(0.0002), **COMMON)  # fmt: skip
    rts = [e.runtime for e in ex.experts]
    # One ledger for both experts: its peak is what the two together ever held on the device, so it
    # proves the other expert's residents are gone before the new expert's are made.
    rts[1].ledger = rts[0].ledger
    for t, want in ((999.0, 0), (900.0, 0), (500.0, 1), (100.0, 1), (950.0, 0)):
        assert wan.select_expert(cfg, t) == want
        args = dict(kw, timestep=torch.tensor([t]))
        with torch.no_grad():
            ref = experts[want](**args)
        assert torch.equal(ex(**args), ref)
        gc.collect()
        assert rts[want].resident_bytes > 0 and rts[1 - want].resident_bytes == 0
        assert rts[0].ledger.bytes == rts[want].resident_bytes, "the idle expert must hold no device memory"
    for e in ex.experts:
        assert e.plan is not None and e.plan.peak_bytes <= budget
        assert any(not u.resident for u in e.plan.units)
    assert rts[0].ledger.peak <= max(weight_peak(e.plan) for e in ex.experts)  # type: ignore[arg-type]


def test_outputs_in_containers_are_rebuilt_and_opaque_outputs_refused() -> None:
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> dict[str, Any]:
            h = self.a(x)
            return {"h": h, "out": [self.b(h), 3], "none": None}

    class Opaque:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    class OpaqueOut(DictOut):
        def forward(self, x: torch.Tensor) -> Any:  # type: ignore[override]
            return Opaque(self.a(x))

    torch.manual_seed(0)
    m = DictOut().requires_grad_(False).eval()
    x = torch.randn(2, 8)
    out = fx_compile(m, mode="layerwise", max_vram_gb=1e-4, backend="eager", **COMMON)(x)
    ref = m(x)
    assert out.keys() == ref.keys() and out["out"][1] == 3 and out["none"] is None
    assert torch.equal(out["h"], ref["h"]) and torch.equal(out["out"][0], ref["out"][0])
    with pytest.raises(CaptureError, match="Opaque"):
        fx_compile(OpaqueOut().requires_grad_(False).eval(), backend="eager", max_vram_gb=1, **COMMON)(x)


# ---------------------------------------------------------------------------- CUDA (skipped on CPU)
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_cuda_within_budget_and_matches_resident(backend: str) -> None:
    """On a GPU: the allocator's peak stays within the plan, weights are pinned, results match."""
    import copy

    torch.manual_seed(0)
    host = MLP(n=8, d=1024).requires_grad_(False).eval()  # 8 x 4 MiB weights
    x = torch.randn(64, 1024, device="cuda")
    resident = copy.deepcopy(host).cuda()
    ref = resident(x) if backend == "eager" else torch.compile(resident)(x)
    del resident
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    from fxswap.workspace import device_rules_for

    # half the weights, plus the cuBLAS workspace the plan holds for the whole call
    # (passes.device_rules: 8.1 MiB on most cards, 32 MiB on sm_90 and later)
    budget = 16 * 2**20 + device_rules_for("cuda").kept_bytes()
    sm = fx_compile(host, mode="layerwise", max_vram_gb=budget / 2**30, backend=backend, device="cuda",
                    reserve_mb=1)  # fmt: skip
    out = sm(x)  # first call: capture, plan, (compile), run
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()  # residents + x + out
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        out = sm(x)
    torch.cuda.synchronize()
    assert sm.plan is not None and any(not u.resident for u in sm.plan.units)
    assert torch.cuda.max_memory_allocated() - base <= sm.plan.peak_bytes
    if backend == "eager":
        assert torch.equal(out, ref)
    else:
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert sm.runtime.store.pinned_bytes > 0
    swapped = [p for u in sm.plan.units if not u.resident for p in u.params]
    assert all(dict(host.named_parameters())[p].is_pinned() for p in swapped)  # one host copy
    assert all(p.device.type == "cpu" for p in host.parameters())
