"""The house rules of the public API: one way to configure, every error in ``fxswap.errors`` and
exported, the plan codec's field table in step with the records."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

import fxswap
from fxswap import errors
from fxswap.options import OPTIONAL_OPTIONS, PlanOptions
from fxswap.plan_json import PLAN_FIELDS, SPAN_FIELDS, UNIT_FIELDS
from fxswap.swapplan import SwapPlan, SwapUnit, WeightSpan

ROOT = Path(__file__).resolve().parents[1]
PLANNER_OPTIONS = ("mode", "max_vram_gb", "block_size_mb", *OPTIONAL_OPTIONS)


def _params(fn: object) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_plan_and_compile_take_the_same_planner_options_with_the_same_defaults() -> None:
    plan, comp = _params(fxswap.plan), _params(fxswap.compile)
    for name in PLANNER_OPTIONS:
        assert name in plan and name in comp, name
        assert plan[name].default == comp[name].default, name
        assert plan[name].annotation == comp[name].annotation, name
        assert plan[name].kind is comp[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    # and nothing else of the planner's: every PlanOptions.from_user argument is one of them
    user = set(_params(PlanOptions.from_user)) - {"cls"}
    assert user == set(PLANNER_OPTIONS)


def test_every_compile_knob_is_keyword_only_after_model() -> None:
    params = list(_params(fxswap.compile).values())
    assert params[0].name == "model" and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    kinds = {p.name: p.kind for p in params[1:]}
    assert kinds.pop("unknown") is inspect.Parameter.VAR_KEYWORD
    assert set(kinds.values()) == {inspect.Parameter.KEYWORD_ONLY}
    with pytest.raises(TypeError):
        fxswap.compile(torch.nn.Linear(2, 2), "layerwise")  # type: ignore[misc]


def test_documented_call_and_experts_entry_point() -> None:
    sm = fxswap.compile(torch.nn.Linear(2, 2).eval(), mode="adaptive", max_vram_gb=16, device="cpu")
    assert isinstance(sm, fxswap.SwapModule) and sm.options.max_vram_bytes == 16 * 2**30
    sm.close()
    with pytest.raises(TypeError, match=r"fxswap\.compile_experts"):
        fxswap.compile([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])  # type: ignore[arg-type]


def _exception_classes(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            bases = [ast.unparse(b) for b in node.bases]
            if any(b.endswith(("Error", "Exception", "Mismatch")) for b in bases):
                names.append(node.name)
    return names


def test_every_exception_lives_in_errors_and_is_exported() -> None:
    elsewhere = {
        str(p.relative_to(ROOT)): _exception_classes(p)
        for d in ("fxswap", "passes")
        for p in (ROOT / d).rglob("*.py")
        if p.name != "errors.py"
    }
    assert {k: v for k, v in elsewhere.items() if v} == {}
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.FxswapError), name
        assert getattr(fxswap, name) is cls, name
        assert name in fxswap.__all__, name
    assert issubclass(fxswap.DeviceOutOfMemoryError, torch.OutOfMemoryError)


def test_codec_field_table_follows_the_records() -> None:
    assert list(PLAN_FIELDS) == [f.name for f in dataclasses.fields(SwapPlan)]
    assert list(UNIT_FIELDS) == [f.name for f in dataclasses.fields(SwapUnit)]
    assert list(SPAN_FIELDS) == [f.name for f in dataclasses.fields(WeightSpan)]
    # each table kind's label is the field's annotation (what an error names)
    for table, record in ((PLAN_FIELDS, SwapPlan), (UNIT_FIELDS, SwapUnit), (SPAN_FIELDS, WeightSpan)):
        for f in dataclasses.fields(record):
            label = table[f.name][1]
            if label not in ("fingerprint parts", "units"):
                assert label == f.type, f.name
