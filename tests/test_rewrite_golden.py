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
