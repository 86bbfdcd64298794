"""The regional program's generated function against its step loop, and the layouts it assumes.

A steady call runs one generated Python function (``fxswap.regional._straight_line``): the glue
steps' swap ops are written out in it and call the units directly, not through the dispatcher; under
a dispatch mode the program runs its step loop (``RegionalProgram.run``), whose op order
``tests/test_regions.py`` checks against the plan. Here the two must agree on what can be observed
without fxswap's own bookkeeping: the output (bitwise), the order of every unit's load, wait and
release among the model's matmuls (torch's profiler, one clock for both), and every allocation and
free in order (torch's allocator events, :mod:`fxswap.oracle`).

The compiled regions run without Inductor's per-input size asserts, so a call whose tensors have
other strides than the ones built for must be a new signature, not a silent misread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

import fxswap
from fxswap.oracle import measure
from fxswap.runtime import _Unit
from tests.test_regions import SixBlocks, _weights

COMMON: dict[str, Any] = dict(reserve_mb=0, device="cpu", backend="inductor")


class _Passthrough(TorchDispatchMode):
    """Changes nothing; its presence makes the program take its step loop."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


@contextmanager
def _named_unit_events(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each unit's load, carry, wait and release appears in torch's profiler under its name."""
    for method, label in (
        ("start_load", "load"),
        ("start_carry", "carry"),
        ("finish_wait", "wait"),
        ("on_release", "release"),
    ):
        original = getattr(_Unit, method)

        def wrapped(self: _Unit, *a: Any, _original: Any = original, _label: str = label) -> Any:
            with record_function(f"fxswap-test {_label} {self.name.split('/', 1)[-1]}"):
                return _original(self, *a)

        monkeypatch.setattr(_Unit, method, wrapped)
    yield


def _outermost(event: Any) -> bool:
    # under a dispatch mode an op is recorded twice: as called, and inside, as the mode runs it
    parent = event.cpu_parent
    while parent is not None and parent.name != event.name:
        parent = parent.cpu_parent
    return parent is None


def _order(sm: Any, x: torch.Tensor, mode: TorchDispatchMode | None) -> tuple[list[str], int, torch.Tensor]:
    """The unit events and matmuls of one call in time order, the fxswap ops the dispatcher saw,
    and the output."""
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        if mode is None:
            out = sm(x)
        else:
            with mode:
                out = sm(x)
    names: list[tuple[int, str]] = []
    dispatched = 0
    for e in prof.events():
        if e.name.startswith("fxswap-test "):
            names.append((e.time_range.start, e.name.split(" ", 1)[1]))
        elif _outermost(e) and e.name in ("aten::addmm", "aten::mm"):
            names.append((e.time_range.start, "matmul"))
        elif _outermost(e) and e.name.startswith("fxswap::"):
            dispatched += 1
    return [n for _, n in sorted(names)], dispatched, out


def _timeline(sm: Any, x: torch.Tensor, mode: TorchDispatchMode | None) -> list[int]:
    with measure("cpu") as m, torch.no_grad():
        if mode is None:
            out = sm(x)
        else:
            with mode:
                out = sm(x)
        del out
    return [b for _, b in m.events]


@pytest.mark.parametrize("mode", ["layerwise", "chunkwise"])
def test_the_generated_function_runs_like_the_step_loop(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = SixBlocks().eval()
    x = torch.randn(8, 32)
    sm = fxswap.compile(
        model, mode=mode, max_vram_gb=0.6 * _weights(model) / 2**30, block_size_mb=0.01, **COMMON
    )
    with torch.no_grad():
        sm(x)  # build
        sm(x)  # a steady call: the next ones start from what this one carried
    assert sm.plan is not None and sum(not u.resident for u in sm.plan.units) >= 2
    with _named_unit_events(monkeypatch):
        straight, straight_dispatched, out = _order(sm, x, None)
        loop, loop_dispatched, out_loop = _order(sm, x, _Passthrough())
    assert torch.equal(out, out_loop)
    swaps = [e for e in loop if e != "matmul"]
    assert any(e.startswith("wait ") for e in swaps) and any(e.startswith("release ") for e in swaps)
    assert straight == loop
    # the step loop dispatches every swap op; the generated function only those inside compiled
    # code: at least the glue's waits between blocks went straight to their units
    assert loop_dispatched == len(swaps)
    assert straight_dispatched < loop_dispatched
    # every allocation and free, in order, as torch's allocator reports them
    first = _timeline(sm, x, None)
    assert first == _timeline(sm, x, _Passthrough())
    assert first == _timeline(sm, x, None)
    assert any(b > 0 for b in first) and any(b < 0 for b in first)


class _Rows(nn.Module):
    """Reads its input along its rows: a transposed input of the same shape is a different matrix."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.relu(b(x)) + x
        return x


def test_a_call_with_other_strides_is_a_new_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    # compiled edges: the user's tensor goes straight into compiled code, which has no assert
    monkeypatch.setenv("FXSWAP_EAGER_EDGES", "0")
    torch.manual_seed(0)
    model = _Rows().eval()
    sm = fxswap.compile(model, mode="layerwise", max_vram_gb=2 * _weights(model) / 2**30, **COMMON)
    a = torch.randn(16, 16)
    b = torch.randn(16, 16).t()  # same shape, dtype and device; strides (1, 16)
    with torch.no_grad():
        sm(a)
        got = sm(b)
        want = model(b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(sm.plans) == 2
    # strides of a dimension of length 1 address nothing: the same signature
    c = torch.randn(1, 16, 16)
    d = torch.as_strided(torch.randn(16 * 16), (1, 16, 16), (7, 16, 1))
    with torch.no_grad():
        sm(c)
        plans = len(sm.plans)
        torch.testing.assert_close(sm(d), model(d), rtol=1e-5, atol=1e-5)
    assert len(sm.plans) == plans == 3


def test_the_first_call_checks_each_compiled_region_input_against_its_layout() -> None:
    """The regions have no asserts of their own: a program's first call checks every compiled
    region's arguments against the layouts it was compiled for, then the generated function runs.
    Here one recorded layout is made wrong (a matrix's strides transposed), as a kernel outside the
    blocks laying out its output unlike its meta function would make it."""
    import dataclasses

    from fxswap import ops
    from fxswap.errors import LayoutError
    from fxswap.regional import RegionalProgram

    torch.manual_seed(0)
    model = SixBlocks().eval()
    x = torch.randn(8, 32)
    sm = fxswap.compile(model, mode="layerwise", max_vram_gb=2 * _weights(model) / 2**30, **COMMON)
    with torch.no_grad():
        want = sm(x)
    entry = sm._current
    assert entry is not None
    program = entry.fn
    args, kwargs = sm._canonical((x,), {})

    def again(steps: list[Any]) -> RegionalProgram:
        return RegionalProgram(
            steps,
            program.n_slots,
            program.constants,
            program.outputs,
            program.output_constants,
            program.n_inputs,
        )

    steps = list(program.steps)
    k = next(i for i, st in enumerate(steps) if not st.glue)
    layouts = list(steps[k].key[1])
    j = next(i for i, lay in enumerate(layouts) if lay[0] == "T" and len(lay[1]) == 2 and min(lay[1]) > 1)
    tag, shape, stride, *rest = layouts[j]
    layouts[j] = (tag, shape, stride[::-1], *rest)
    steps[k] = dataclasses.replace(steps[k], key=(steps[k].key[0], tuple(layouts), *steps[k].key[2:]))
    with torch.no_grad(), ops.bound_units(entry.units):
        flat = sm._builder.flat(entry, {"args": args, "kwargs": kwargs})
        with pytest.raises(LayoutError, match="compiled for"):
            again(steps)(*flat)
        fresh = again(list(program.steps))
        first = fresh(*flat)[0]  # checked
        second = fresh(*flat)[0]  # the generated function
    assert torch.equal(first, want) and torch.equal(second, want)
