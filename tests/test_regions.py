"""The first call: repeated blocks captured once and compiled once (issue 18).

Expected values come from outside the code under test: Inductor's and Dynamo's own counters (how
many graphs Inductor compiled, how many ops Dynamo traced), the whole-model capture (the reference
the block capture must reproduce), and the eager backend's run of the rewritten FX graph (the plan's
positions, which the compiled regions must keep).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fxswap
from fxswap import ops
from fxswap.models import wan
from tests.models import MLP, regionally_compiled

COMMON: dict[str, Any] = dict(reserve_mb=0, device="cpu")


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


class SixBlocks(nn.Module):
    """A prologue, six identical blocks and an epilogue."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(6))
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.inp(x))
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def _weights(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


@contextmanager
def _block_capture(on: bool) -> Iterator[None]:
    before = os.environ.get("FXSWAP_BLOCK_CAPTURE")
    os.environ["FXSWAP_BLOCK_CAPTURE"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FXSWAP_BLOCK_CAPTURE", None)
        else:
            os.environ["FXSWAP_BLOCK_CAPTURE"] = before


def _diffusers_wan() -> tuple[nn.Module, dict[str, Any]]:
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=3,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    kw = dict(
        hidden_states=torch.randn(1, 16, 2, 8, 8),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 8, 32),
        return_dict=False,
    )
    return m, kw


def _fxswap_wan() -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    cfg = wan.tiny_config("t2v")
    return wan.build(cfg).eval(), wan.example_inputs(cfg, frames=1, height=32, width=32)


def _mlp() -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    return MLP(n=5, d=32).eval(), {"x": torch.randn(4, 32)}


def _ir_facts(ir: Any) -> tuple[Any, ...]:
    ops_ = [(o.target, o.module, o.weights, o.out_bytes, o.flops, o.mem_bytes) for o in ir.ops]
    buffers = sorted((b.nbytes, b.start, b.end) for b in ir.buffers)
    return ops_, buffers, ir.weights, ir.inputs


@pytest.mark.parametrize(
    ("make", "fewer"),
    [(_diffusers_wan, True), (_fxswap_wan, True), (_mlp, False)],
    ids=["diffusers_wan", "fxswap_wan", "mlp"],
)
def test_block_capture_traces_each_block_once_and_gives_the_whole_capture(make: Any, fewer: bool) -> None:
    from torch._dynamo.utils import counters

    model, kw = make()
    traced: dict[bool, int] = {}
    irs = {}
    for on in (False, True):
        with _block_capture(on):
            before = counters["stats"]["calls_captured"]
            irs[on] = fxswap.trace(model, **kw).ir
            traced[on] = counters["stats"]["calls_captured"] - before
    # the same graph as the whole-model capture: ops, what they read, activations and their lives
    assert _ir_facts(irs[True]) == _ir_facts(irs[False])
    # Dynamo's own count of the ops it traced: the repeated blocks once, not once per block (an
    # MLP's blocks are one Linear each: nothing to save there, the graph must still be the same)
    if fewer:
        assert traced[True] < 0.75 * traced[False], traced


@pytest.mark.parametrize("edges", [False, True])
def test_six_blocks_compile_their_block_once(edges: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    from fxswap.regional import clear_programs

    monkeypatch.setenv("FXSWAP_EAGER_EDGES", "0" if edges else "1")
    clear_programs()
    torch.manual_seed(0)
    model = SixBlocks().eval()
    x = torch.randn(8, 32)
    with torch.no_grad():
        # Compiled edges: what torch.compile gives for the whole model; the default: what it gives
        # for each block with the rest eager (regional compilation).
        ref = torch.compile(model)(x) if edges else regionally_compiled(model)(x)
        torch._dynamo.reset()
    sm = fxswap.compile(model, mode="layerwise", max_vram_gb=2 * _weights(model) / 2**30, **COMMON)
    before = dict(counters["inductor"])
    with fresh_cache():
        out = sm(x)
    compiled = {
        k: v - before.get(k, 0) for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")
    }
    assert sm.plan is not None and all(u.resident for u in sm.plan.units)
    # Inductor compiled three graphs (its own counters, an empty cache): the prologue, the block,
    # which the six blocks share, and the epilogue; with FXSWAP_EAGER_EDGES=1 the prologue and the
    # epilogue run as FX's Python, as regional compilation leaves them: one graph.
    n = compiled.get("fxgraph_cache_miss", 0) + compiled.get("fxgraph_cache_bypass", 0)
    assert n == (3 if edges else 1), compiled
    assert torch.equal(out, ref)
    # a later call compiles nothing
    before = dict(counters["inductor"])
    sm(x)
    assert dict(counters["inductor"]) == before


class _Order(TorchDispatchMode):
    """Records the fxswap ops (by unit name) and the matmuls, in the order they run."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "namespace", "") == "fxswap":
            unit = getattr(ops.lookup(int(args[0])), "name", "?").split("/", 1)[-1]
            self.events.append(f"{func._schema.name.split('::')[-1]} {unit}")
        elif func._schema.name in ("aten::addmm", "aten::mm", "aten::linear"):
            self.events.append("matmul")
        return func(*args, **kwargs)


def _waits_and_releases(events: list[str]) -> list[str]:
    # A load may run anywhere between its anchor and its wait under Inductor
    # (docs/ops_and_inductor.md, rule 1); waits and releases sit exactly where the plan put them.
    return [e for e in events if not e.startswith(("load", "carry"))]


@pytest.mark.parametrize("mode", ["layerwise", "chunkwise"])
def test_swap_ops_keep_the_plans_positions_in_every_compiled_block(mode: str) -> None:
    torch.manual_seed(0)
    model = SixBlocks().eval()
    x = torch.randn(8, 32)
    budget = 0.6 * _weights(model) / 2**30
    eager = fxswap.compile(
        model, mode=mode, max_vram_gb=budget, backend="eager", block_size_mb=0.01, **COMMON
    )
    with torch.no_grad():
        want = eager(x)
    plan = eager.plan
    assert plan is not None and sum(not u.resident for u in plan.units) >= 3
    ind = fxswap.compile(model, plan=plan, backend="inductor", **COMMON)
    ind(x)  # build
    runs: dict[str, list[str]] = {}
    for name, sm in (("eager", eager), ("inductor", ind)):
        eager_mode = _Order()
        with eager_mode, torch.no_grad():
            got = sm(x)
        runs[name] = eager_mode.events
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    # every load issued, waited for and released, in the order of the eager FX graph (the plan's
    # positions), with the same matmuls between the waits and releases
    assert sorted(runs["inductor"]) == sorted(runs["eager"])
    assert _waits_and_releases(runs["inductor"]) == _waits_and_releases(runs["eager"])
    for e in runs["inductor"]:
        if e.startswith("load"):
            unit = e.split(" ", 1)[1]
            assert runs["inductor"].index(e) < runs["inductor"].index(f"wait {unit}")
    program = ind._current.fn if ind._current is not None else None
    assert program is not None and len(program.steps) >= 8  # prologue, six blocks, epilogue
    assert program.programs < len(program.steps)  # blocks alike share their program
    # In the code each step runs (Inductor's generated code, or FX's for the swap ops between two
    # regions' compute): the swap ops in the order of the region's canonical FX code. Layerwise (a
    # unit is a whole block), the wait runs before the block's matmuls and the release after them.
    swap = re.compile(r"torch\.ops\.fxswap\.(\w+)\.default\((-?\d+)")
    swapped_blocks = 0
    for i, step in enumerate(program.steps):
        if step.glue:
            body = step.compiled.code
        else:
            source = step.compiled.source_code
            body = source[source.index("def call(") :]
        assert [m.groups() for m in swap.finditer(body)] == [
            m.groups() for m in swap.finditer(step.region.code)
        ]
        kinds = [m.group(1) for m in swap.finditer(body)]
        if mode == "layerwise" and not step.glue and "release" in kinds:
            # this plan (the eager one) releases after the block's last matmul, before its
            # residual add: inside the block's program; the wait is in the glue before it
            swapped_blocks += 1
            lines = body.splitlines()
            mm = [j for j, line in enumerate(lines) if "extern_kernels." in line]
            release = next(j for j, line in enumerate(lines) if "fxswap.release" in line)
            assert mm and mm[-1] < release, (mm, release)
            before = program.steps[i - 1]
            assert before.glue and "fxswap.wait" in before.compiled.code
    assert swapped_blocks >= 1 or mode != "layerwise"


@pytest.mark.parametrize("mode", ["layerwise", "chunkwise"])
def test_block_units_run_between_blocks_and_blocks_share_one_program(mode: str) -> None:
    """Planned for Inductor, a unit read in a block is waited for before the block's first op and
    released after its last, whether it is the whole block (layerwise) or a part of it (chunkwise,
    here each weight its own unit): the swap ops run between the compiled blocks, so blocks alike
    run one program whichever of their units are swapped: Inductor compiles one graph in all."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    from fxswap.regional import clear_programs

    torch.manual_seed(0)
    model = SixBlocks().eval()
    x = torch.randn(8, 32)
    with torch.no_grad():
        ref = torch.compile(model)(x)
    clear_programs()
    sm = fxswap.compile(
        model,
        mode=mode,
        max_vram_gb=0.6 * _weights(model) / 2**30,
        backend="inductor",
        block_size_mb=0.01,
        **COMMON,
    )
    before = dict(counters["inductor"])
    order = _Order()
    with fresh_cache(), torch.no_grad():
        sm(x)  # build
        with order:
            out = sm(x)
    compiled = {
        k: v - before.get(k, 0) for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")
    }
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert sm.plan is not None
    swapped = [u.name for u in sm.plan.units if not u.resident and u.name.startswith("blocks.")]
    assert len(swapped) >= 2
    if mode == "chunkwise":
        # a unit is one Linear's weights; a swapped `down` is read only by the block's second matmul
        assert any(name.endswith(".down") for name in swapped), swapped
    # Inductor's own counter, empty cache: the block program only (the prologue and the epilogue
    # run as FX's Python by default, as regional compilation leaves them).
    assert compiled.get("fxgraph_cache_miss", 0) + compiled.get("fxgraph_cache_bypass", 0) == 1, compiled
    # Worked out from the model: matmul 0 is `inp`, block j's are 1 + 2j (`up`) and 2 + 2j (`down`).
    events = order.events
    for name in swapped:
        j = int(name.split(".")[1])
        matmuls_before = events[: events.index(f"wait {name}")].count("matmul")
        assert matmuls_before == 1 + 2 * j, (name, matmuls_before)
        matmuls_before = events[: events.index(f"release {name}")].count("matmul")
        assert matmuls_before == 3 + 2 * j, (name, matmuls_before)


@pytest.mark.slow  # one cold Inductor compile of a WAN block: about 30 s on a 2-core machine
def test_wan_default_is_bitwise_regional_compilation_and_compiles_the_block_only() -> None:
    """fxswap's WAN under Inductor, swapping: its numbered embedding Sequentials are not repeated
    blocks (Linears of other shapes) and run as FX's Python, as regional compilation leaves them;
    the output is bitwise that of `torch.compile` on each block with the rest eager."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    from fxswap.regional import clear_programs

    torch.manual_seed(0)
    cfg = wan.tiny_config("t2v")
    model = wan.build(cfg).eval().requires_grad_(False)
    kw = wan.example_inputs(cfg, frames=5, height=32, width=32)
    with torch.no_grad():
        ref = regionally_compiled(model)(**kw)
        torch._dynamo.reset()
        clear_programs()
        sm = fxswap.compile(model, mode="adaptive", max_vram_gb=0.6 * _weights(model) / 2**30, **COMMON)
        before = dict(counters["inductor"])
        with fresh_cache():
            out = sm(**kw)
    compiled = {
        k: v - before.get(k, 0) for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")
    }
    assert sm.plan is not None and any(not u.resident for u in sm.plan.units)
    assert torch.equal(out, ref)
    # Inductor's own counter, empty cache: the block program only (fxswap.fit's rounds included)
    assert compiled.get("fxgraph_cache_miss", 0) + compiled.get("fxgraph_cache_bypass", 0) == 1, compiled


def test_residents_are_copied_while_inductor_compiles_and_a_wrong_stand_in_compiles_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The build makes the resident weights' device copies in a thread while Inductor compiles with
    stand-ins of their layouts. A stand-in laid out unlike its copy (here: a matrix's strides
    transposed) must not reach the program: the build compiles again with the copies, and the
    output is the normal build's, bitwise."""
    import threading

    from fxswap.runtime import SwapRuntime

    torch.manual_seed(0)
    model = SixBlocks().eval()
    x = torch.randn(8, 32)
    options: dict[str, Any] = dict(
        mode="chunkwise", max_vram_gb=0.6 * _weights(model) / 2**30, backend="inductor", block_size_mb=0.01
    )
    with torch.no_grad():
        want = fxswap.compile(model, **options, **COMMON)(x)
    threads: list[str] = []
    real_resident, real_like = SwapRuntime.resident, SwapRuntime.resident_like

    def resident(self: SwapRuntime, fqn: str, tensor: torch.Tensor, decoded: bool = False) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        return real_resident(self, fqn, tensor, decoded)

    def transposed(self: SwapRuntime, fqn: str, tensor: torch.Tensor, decoded: bool = False) -> torch.Tensor:
        t = real_like(self, fqn, tensor, decoded)
        return t.t().contiguous().t() if t.dim() == 2 else t

    monkeypatch.setattr(SwapRuntime, "resident", resident)
    monkeypatch.setattr(SwapRuntime, "resident_like", transposed)
    sm = fxswap.compile(model, **options, **COMMON)
    with torch.no_grad(), caplog.at_level("WARNING", logger="fxswap.compiler"):
        got = sm(x)
    assert sm.plan is not None and any(u.resident for u in sm.plan.units)
    assert "fxswap-residents" in threads
    assert "laid out unlike its stand-in" in caplog.text
    assert torch.equal(got, want)
