"""``torch.compile(model, backend="fxswap", options=...)`` against ``fxswap.compile`` with the same options.

The backend is found by name through torch's ``torch_dynamo_backends`` entry point (the installed
package's metadata), not by importing fxswap's module first.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import pytest
import torch

import fxswap
from fxswap.integrations import dynamo
from fxswap.models import wan

KiB = 2**10


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)]).eval()


def _wan() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    cfg = wan.tiny_config("t2v", num_layers=3)
    model = wan.build(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model, wan.example_inputs(cfg, frames=5, height=32, width=32)


def _units(plan: fxswap.SwapPlan) -> list[tuple[str, tuple[str, ...], bool]]:
    return [(u.name, tuple(u.params), u.resident) for u in plan.units]


def test_entry_point_registers_the_backend() -> None:
    (ep,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "fxswap"]
    assert ep.value == "fxswap.integrations.dynamo:fxswap_backend"
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("fxswap") is dynamo.fxswap_backend


@pytest.mark.parametrize("mode", ["layerwise", "chunkwise", "adaptive"])
def test_mlp_equal_to_fxswap_compile(mode: str) -> None:
    model = _mlp()
    x = torch.randn(4, 64)
    opts: dict[str, Any] = {
        "max_vram_gb": 40 * KiB / 2**30,
        "mode": mode,
        "backend": "eager",
        "reserve_mb": 0,
        "warm_start": False,  # the backend's default; fxswap.compile is told the same
    }
    if mode == "chunkwise":
        opts["block_size_mb"] = 40 * KiB / 2**20
    torch._dynamo.reset()
    got = torch.compile(model, backend="fxswap", options=opts, fullgraph=True)(x)
    plan = dynamo.plans()[-1]
    sm = fxswap.compile(model, **opts)
    want = sm(x)
    assert torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(got, model(x))  # and both equal the unswapped model
    ref = sm.plan
    assert ref is not None
    assert _units(plan) == _units(ref)
    assert any(not u.resident for u in plan.units), "the budget must force swaps"
    for field in ("peak_bytes", "resident_bytes", "moved_bytes_per_call", "min_vram_bytes", "prefetch_depth"):
        assert getattr(plan, field) == getattr(ref, field), field
    assert plan.predicted_step_ms == pytest.approx(ref.predicted_step_ms)


def test_wan_equal_to_fxswap_compile_and_swaps_at_run_time() -> None:
    model, kw = _wan()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    opts = {
        "max_vram_gb": 0.6 * weights / 2**30,
        "mode": "layerwise",
        "backend": "eager",
        "reserve_mb": 0,
        "warm_start": False,
    }
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxswap", options=opts, fullgraph=True)
    got = compiled(**kw)
    got2 = compiled(**kw)  # a second call reuses the graph (no new plan)
    n_plans = len(dynamo.plans())
    compiled(**kw)
    assert len(dynamo.plans()) == n_plans
    plan = dynamo.plans()[-1]
    sm = fxswap.compile(model, **opts)
    want = sm(**kw)
    assert torch.equal(got, want) and torch.equal(got2, want)
    with torch.no_grad():
        assert torch.equal(got, model(**kw))
    assert sm.plan is not None and _units(plan) == _units(sm.plan)
    assert plan.swapped_bytes > 0


def test_inductor_equal_to_fxswap_compile_inductor() -> None:
    model = _mlp()
    x = torch.randn(4, 64)
    opts = {
        "max_vram_gb": 40 * KiB / 2**30,
        "mode": "layerwise",
        "backend": "inductor",
        "reserve_mb": 0,
        "warm_start": False,
    }
    torch._dynamo.reset()
    got = torch.compile(model, backend="fxswap", options=opts, fullgraph=True)(x)
    want = fxswap.compile(model, **opts)(x)
    assert torch.equal(got, want)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x))


def test_unknown_option_is_named() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_mlp(), backend="fxswap", options={"max_vram_gb": 1, "vram": 3})
    with pytest.raises(Exception, match="unknown option 'vram'.*max_vram_gb"):
        compiled(torch.randn(2, 64))


def test_infeasible_budget_names_the_minimum() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_mlp(), backend="fxswap", options={"max_vram_gb": 1e-9, "reserve_mb": 0})
    with pytest.raises(Exception, match="smallest budget"):
        compiled(torch.randn(2, 64))
