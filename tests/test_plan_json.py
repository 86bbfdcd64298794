"""SwapPlan JSON: round trip, file save/load, tampering refused, fingerprint mismatches refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fxswap.errors import PlanError, PlanMismatchError
from fxswap.ir import GraphIR, InputInfo, WeightInfo
from fxswap.passes.planner import build_plan
from fxswap.swapplan import (
    FINGERPRINT_FIELDS,
    SCHEMA_VERSION,
    PlanOptions,
    SwapPlan,
    fingerprint_parts,
    load_plan,
)
from tests.graphs import chain_graph

MiB = 2**20
GiB = 2**30


@pytest.fixture
def graph() -> GraphIR:
    return chain_graph(5, weight_bytes=100 * MiB, act_bytes=20 * MiB)


@pytest.fixture
def options() -> PlanOptions:
    return PlanOptions(mode="layerwise", max_vram_bytes=900 * MiB, reserve_bytes=64 * MiB)


@pytest.fixture
def plan(graph: GraphIR, options: PlanOptions) -> SwapPlan:
    p = build_plan(graph, options)
    assert any(u.resident for u in p.units) and any(not u.resident for u in p.units)
    return p


def test_json_round_trip_equal(plan: SwapPlan) -> None:
    again = SwapPlan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()


def test_json_has_required_fields(plan: SwapPlan) -> None:
    data = json.loads(plan.to_json())
    for key in (
        "schema_version",
        "fingerprint",
        "mode",
        "max_vram_bytes",
        "block_size_bytes",
        "peak_bytes",
        "resident_bytes",
        "swapped_bytes",
        "units",
    ):
        assert key in data
    assert data["schema_version"] == SCHEMA_VERSION
    for u in data["units"]:
        assert isinstance(u["name"], str) and isinstance(u["params"], list)
        assert isinstance(u["bytes"], int) and isinstance(u["resident"], bool)


def test_save_and_load(plan: SwapPlan, tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    plan.save(path)
    assert load_plan(path) == plan
    assert b"pickle" not in path.read_bytes()


def _edit(plan: SwapPlan, change: object) -> str:
    data = json.loads(plan.to_json())
    change(data)  # type: ignore[operator]
    return json.dumps(data)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("peak_bytes"), "peak_bytes"),
        (lambda d: d.pop("schema_version"), "schema_version"),
        (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "schema_version"),
        (lambda d: d.update(peak_bytes="12"), "peak_bytes"),
        (lambda d: d.update(mode=3), "mode"),
        (lambda d: d.update(extra_field=1), "extra_field"),
        (lambda d: d["units"][0].pop("params"), "params"),
        (lambda d: d["units"][0].update(resident="yes"), "resident"),
        (lambda d: d["units"][1].update(load_at=None, wait_at=1.5), "wait_at"),
        (lambda d: d.update(peak_bytes=d["peak_bytes"] - 1), "content_sha256"),
        (lambda d: d["units"][0].update(bytes=d["units"][0]["bytes"] + 1), "content_sha256"),
        (lambda d: d.pop("content_sha256"), "content_sha256"),
        (lambda d: d["fingerprint_parts"].pop("graph"), "fingerprint_parts"),
    ],
)
def test_tampered_json_names_field(plan: SwapPlan, change: object, field: str) -> None:
    with pytest.raises(PlanError, match=f"`[^`]*{field}`"):
        SwapPlan.from_json(_edit(plan, change))


def test_edited_bytes_refused(plan: SwapPlan) -> None:
    text = plan.to_json()
    key = f'"peak_bytes": {plan.peak_bytes}'
    assert key in text
    edited = text.replace(key, f'"peak_bytes": {plan.peak_bytes - 1}')
    with pytest.raises(PlanError, match="content_sha256"):
        SwapPlan.from_json(edited)


def test_consistent_forgery_with_fresh_checksum_still_checked(plan: SwapPlan) -> None:
    import hashlib

    data = json.loads(plan.to_json())
    data.pop("content_sha256")
    data["resident_bytes"] += 1
    data["content_sha256"] = hashlib.sha256(
        json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    with pytest.raises(PlanError, match="`resident_bytes`"):
        SwapPlan.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", '{"schema_version": 1}'])
def test_invalid_json_is_plan_error(text: str) -> None:
    with pytest.raises(PlanError):
        SwapPlan.from_json(text)


def test_binary_file_is_plan_error(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PlanError):
        load_plan(path)


def _swap_input(g: GraphIR, shape: tuple[int, ...] | None = None, dtype: str | None = None) -> GraphIR:
    x = g.inputs[0]
    return dataclasses.replace(
        g, inputs=(InputInfo(x.name, shape or x.shape, dtype or x.dtype),) + g.inputs[1:]
    )


def _swap_weight_dtype(g: GraphIR) -> GraphIR:
    w = g.weights[0]
    return dataclasses.replace(
        g, weights=(WeightInfo(w.name, w.shape, "float16", w.nbytes, w.module),) + g.weights[1:]
    )


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda g, o: (chain_graph(6, weight_bytes=100 * MiB, act_bytes=20 * MiB), o), "graph"),
        (lambda g, o: (_swap_input(g, shape=(2, 16)), o), "inputs"),
        (lambda g, o: (_swap_input(g, dtype="float32"), o), "inputs"),
        (lambda g, o: (_swap_weight_dtype(g), o), "params"),
        (lambda g, o: (g, dataclasses.replace(o, max_vram_bytes=o.max_vram_bytes + 1)), "options"),
        (lambda g, o: (g, dataclasses.replace(o, mode="adaptive")), "options"),
    ],
)
def test_plan_refused_for_other_graph_input_dtype_options(
    graph: GraphIR, options: PlanOptions, plan: SwapPlan, mutate: object, field: str
) -> None:
    plan.check_compatible(fingerprint_parts(graph, options))
    g2, o2 = mutate(graph, options)  # type: ignore[operator]
    with pytest.raises(PlanMismatchError, match=field) as info:
        plan.check_compatible(fingerprint_parts(g2, o2))
    assert field in info.value.fields  # type: ignore[attr-defined]
    assert set(info.value.fields) <= set(FINGERPRINT_FIELDS)  # type: ignore[attr-defined]


def test_fingerprint_is_stable_and_covers_parts(graph: GraphIR, options: PlanOptions, plan: SwapPlan) -> None:
    parts = fingerprint_parts(graph, options)
    assert tuple(parts) == FINGERPRINT_FIELDS
    assert plan.parts == parts
    assert build_plan(graph, options).fingerprint == plan.fingerprint


def test_plan_is_frozen(plan: SwapPlan) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.peak_bytes = 0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.units[0].resident = False  # type: ignore[misc]
