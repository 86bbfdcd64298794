"""Golden tests of the rewritten graph: the code ``fxswap.compile`` runs (its FX graph after
``passes.rewrite.insert_swaps``) for two small models in every mode, kept as text under
``tests/golden/``. A change to capture, planning or the rewrite shows up here as a readable diff.

Regenerate after an intended change, then review the diff like code::

    FXSWAP_REGEN_GOLDEN=1 python -m pytest -q tests/test_rewrite_golden.py

Also checked here: the rewritten graph is the same for the same model and plan in two builds of one
process and in another process (unit ids are build-local, so Inductor's FX graph cache can hit).
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from models import MLP

import fxswap
from fxswap.models import wan

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("FXSWAP_REGEN_GOLDEN") == "1"
MODES = ("layerwise", "chunkwise", "adaptive")
# Budgets between each model's smallest (layerwise needs the most) and its weight bytes, so that
# some units are swapped and some stay resident in every mode; reserve 0 is exact on the CPU.
BUDGET_BYTES = {"mlp": 40_000, "wan": 300_000}
OPTIONS = {"block_size_mb": 0.01, "reserve_mb": 0, "backend": "eager", "device": "cpu"}


def _mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return MLP(n=6, d=64).eval().requires_grad_(False), (torch.randn(4, 64),), {}


def _wan() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = wan.tiny_config("t2v", num_layers=2)
    model = wan.build(config).eval().requires_grad_(False)
    return model, (), wan.example_inputs(config, frames=1, height=16, width=16)


MODELS = {"mlp": _mlp, "wan": _wan}


def _compiled_code(name: str, mode: str) -> tuple[str, int]:
    model, args, kwargs = MODELS[name]()
    sm = fxswap.compile(model, mode=mode, max_vram_gb=BUDGET_BYTES[name] / 2**30, **OPTIONS)
    try:
        with torch.no_grad():
            ref = model(*args, **kwargs)
        assert torch.equal(sm(*args, **kwargs), ref)  # the golden program computes the model
        assert sm.plan is not None
        swapped = sum(not u.resident for u in sm.plan.units)
        return sm.code, swapped
    finally:
        sm.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_rewritten_code_matches_golden(name: str, mode: str) -> None:
    code, swapped = _compiled_code(name, mode)
    assert swapped > 0, "the golden budget must swap something"
    path = GOLDEN / f"{name}_{mode}.py.txt"  # .txt: not collected, linted or type-checked
    if REGEN:
        path.write_text(code, encoding="utf-8")
    assert path.exists(), f"{path} is missing. Fix: FXSWAP_REGEN_GOLDEN=1 python -m pytest {__file__}"
    want = path.read_text(encoding="utf-8")
    if code != want:
        diff = "".join(
            difflib.unified_diff(
                want.splitlines(keepends=True), code.splitlines(keepends=True), str(path), "now"
            )
        )
        pytest.fail(
            f"the rewritten graph of {name} ({mode}) changed; if intended, regenerate with "
            f"FXSWAP_REGEN_GOLDEN=1 and review:\n{diff}"
        )
    # the golden text holds one load, wait and release per swapped unit
    for op in ("load", "wait", "release"):
        assert code.count(f"torch.ops.fxswap.{op}.default(") == swapped


def test_two_builds_in_one_process_print_the_same_code() -> None:
    """Two compiled models of one model and plan, alive together: same code, own units, exact."""
    model, args, _ = _mlp()
    opts = {**OPTIONS, "mode": "chunkwise", "max_vram_gb": BUDGET_BYTES["mlp"] / 2**30}
    a = fxswap.compile(model, **opts)
    b = fxswap.compile(model, **opts)
    ref = model(*args)
    assert torch.equal(a(*args), ref) and torch.equal(b(*args), ref)
    assert a.code == b.code and "torch.ops.fxswap.load.default(-" in a.code
    # each compiled model registered its own units with the process-wide registry
    ids_a, ids_b = set(a.runtime.unit_ids.values()), set(b.runtime.unit_ids.values())
    assert ids_a and ids_b and not ids_a & ids_b
    a.close()
    assert torch.equal(b(*args), ref)  # b's units survive a's close
    b.close()


def test_rewritten_graph_is_the_same_in_another_process() -> None:
    code, _ = _compiled_code("mlp", "layerwise")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_rewrite_golden import _compiled_code
        sys.stdout.write(_compiled_code("mlp", "layerwise")[0])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    assert out == code


def test_units_of_another_shape_get_other_graph_ids() -> None:
    """Same code but for the swapped weights' shapes must not print the same code (Inductor's FX
    graph cache is keyed on code and inputs)."""

    class Wide(torch.nn.Module):
        def __init__(self, hidden: int) -> None:
            super().__init__()
            self.up = torch.nn.Linear(16, hidden, bias=False)
            self.down = torch.nn.Linear(hidden, 16, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.relu(self.up(x)))

    x = torch.randn(2, 16)
    codes = []
    for hidden in (32, 48):
        m = Wide(hidden).eval().requires_grad_(False)
        # 3800 bytes: one unit (2048 or 3072 bytes) at a time fits, both together do not
        sm = fxswap.compile(m, mode="layerwise", max_vram_gb=3800 / 2**30, **OPTIONS)
        assert torch.equal(sm(x), m(x))
        assert sm.plan is not None and all(not u.resident for u in sm.plan.units)
        codes.append(sm.code)
        sm.close()
    strip = [re.sub(r"\(-\d+,", "(ID,", c) for c in codes]
    assert strip[0] == strip[1], "the two graphs differ only in their units' ids"
    assert codes[0] != codes[1]


def test_a_graph_with_build_local_ids_refuses_to_run_unbound() -> None:
    """Run outside its compiled model, a graph's negative ids name no unit: a clear KeyError, never
    another model's weights."""
    model, args, _ = _mlp()
    sm = fxswap.compile(model, mode="layerwise", max_vram_gb=BUDGET_BYTES["mlp"] / 2**30, **OPTIONS)
    sm(*args)
    gm = sm.graph_module
    assert gm is not None
    flat = sm._builder.flat(sm._entries[next(iter(sm._entries))], {"args": (), "kwargs": {"x": args[0]}})
    with pytest.raises(KeyError, match="not in the unit table bound for this call"):
        gm(*flat)
    sm.close()


# --------------------------------------------- the 4-layer MLP's rewrite against a listing by hand
def _listing(gm: torch.fx.GraphModule) -> list[str]:
    """Every node as ``name = target(args)``; fxswap ops as ``fxswap.KIND`` with the unit id shown
    as ID (ids are build-local numbers, not part of what is checked)."""
    from fxswap import ops

    kinds = {ops.load: "fxswap.load", ops.wait: "fxswap.wait", ops.release: "fxswap.release"}
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            out.append(f"input {n.name}")
            continue
        if n.op == "output":
            out.append(f"return {n.args[0]!r}")
            continue
        args = [a.name if isinstance(a, torch.fx.Node) else repr(a) for a in n.args]
        if n.target in kinds:
            target, args = kinds[n.target], ["ID", *args[1:]]
        else:
            target = getattr(n.target, "__name__", str(n.target))
        out.append(f"{n.name} = {target}({', '.join(args)})")
    return out


# Worked out by hand for the plan in the test below: blocks.0 resident; blocks.1..3 swapped, block
# k loaded one op ahead of its linear (before the gelu of block k-1), waited for right before its
# linear and released right after it (its only reader). A load's anchor is the nearest earlier
# tensor that is still read at the load, or an fxswap token: `linear` for block 1 (gelu reads it),
# the previous block's release token for blocks 2 and 3. A wait hands out the unit's tensors in
# the unit's order (weight, bias), and the linear reads them in place of the placeholders, which
# are gone from the inputs.
MLP4_EXPECTED = """\
input l_args_0_
input l_blocks_0_weight
input l_blocks_0_bias
linear = linear(l_args_0_, l_blocks_0_weight, l_blocks_0_bias)
fxswap_load_blocks_1 = fxswap.load(ID, linear)
x = gelu(linear)
fxswap_wait_blocks_1 = fxswap.wait(ID, fxswap_load_blocks_1)
getitem = getitem(fxswap_wait_blocks_1, 0)
getitem_1 = getitem(fxswap_wait_blocks_1, 1)
linear_1 = linear(x, getitem, getitem_1)
fxswap_release_blocks_1 = fxswap.release(ID, fxswap_wait_blocks_1, linear_1)
fxswap_load_blocks_2 = fxswap.load(ID, fxswap_release_blocks_1)
x_1 = gelu(linear_1)
fxswap_wait_blocks_2 = fxswap.wait(ID, fxswap_load_blocks_2)
getitem_2 = getitem(fxswap_wait_blocks_2, 0)
getitem_3 = getitem(fxswap_wait_blocks_2, 1)
linear_2 = linear(x_1, getitem_2, getitem_3)
fxswap_release_blocks_2 = fxswap.release(ID, fxswap_wait_blocks_2, linear_2)
fxswap_load_blocks_3 = fxswap.load(ID, fxswap_release_blocks_2)
x_2 = gelu(linear_2)
fxswap_wait_blocks_3 = fxswap.wait(ID, fxswap_load_blocks_3)
getitem_4 = getitem(fxswap_wait_blocks_3, 0)
getitem_5 = getitem(fxswap_wait_blocks_3, 1)
linear_3 = linear(x_2, getitem_4, getitem_5)
fxswap_release_blocks_3 = fxswap.release(ID, fxswap_wait_blocks_3, linear_3)
x_3 = gelu(linear_3)
return (x_3,)"""


def test_mlp4_rewrite_matches_the_listing_written_by_hand() -> None:
    from dataclasses import dataclass

    from fxswap.passes.rewrite import insert_swaps
    from fxswap.runtime import SwapRuntime

    @dataclass(frozen=True)
    class U:
        name: str
        params: tuple[str, ...]
        resident: bool
        load_node: str | None = None
        wait_node: str | None = None
        release_node: str | None = None
        carry_node: str | None = None

    @dataclass(frozen=True)
    class P:
        units: tuple[U, ...]

    torch.manual_seed(0)
    model = MLP(n=4, d=64).eval().requires_grad_(False)
    x = torch.randn(4, 64)
    traced = fxswap.trace(model, x)
    params = lambda k: (f"blocks.{k}.weight", f"blocks.{k}.bias")  # noqa: E731
    # ops: linear (0), x (1), linear_1 (2), x_1 (3), linear_2 (4), x_2 (5), linear_3 (6), x_3 (7)
    plan = P((
        U("blocks.0", params(0), True),
        U("blocks.1", params(1), False, "x", "linear_1", "linear_1"),
        U("blocks.2", params(2), False, "x_1", "linear_2", "linear_2"),
        U("blocks.3", params(3), False, "x_2", "linear_3", "linear_3"),
    ))  # fmt: skip
    rt = SwapRuntime("cpu")
    named = dict(model.named_parameters())
    ids = {u.name: rt.add_unit(u.name, [(p, named[p]) for p in u.params]) for u in plan.units[1:]}
    new = insert_swaps(traced.gm, plan, traced.placeholder_params, unit_ids=ids)
    got = _listing(new)
    want = MLP4_EXPECTED.splitlines()
    assert got == want, "\n".join(difflib.unified_diff(want, got, "by hand", "rewrite", lineterm=""))
    # and the rewritten program computes the model
    out = new(x, named["blocks.0.weight"], named["blocks.0.bias"])
    assert torch.equal(out[0], model(x))
