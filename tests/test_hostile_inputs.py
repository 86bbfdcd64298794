"""Hostile files and bad inputs: fxswap's own clear error, never another exception, nothing changed.

- A hypothesis test mutates a saved plan JSON (bytes flipped, fields dropped, values replaced by
  other types, numbers pushed out of range) and loads it: either an equal plan (the mutation was a
  no-op) or :class:`fxswap.PlanError`, never any other exception.
- A table of bad inputs (arguments, plans, checkpoints, call inputs, models that do not capture):
  each asserts the error type, the key words of its message, and that nothing changed: the model's
  weights, the files involved, the op registry, the compiled model's plans and device bytes.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxswap import ops
from fxswap.api import plan as fx_plan
from fxswap.compiler import DeviceError, SignatureError, TrainingModeError
from fxswap.compiler import compile as fx_compile
from fxswap.errors import BudgetInfeasibleError, CaptureError, CheckpointError, PlanError, PlanMismatchError
from fxswap.experts import compile_experts
from fxswap.models.wan import load as wan_load
from fxswap.models.wan_checkpoint import load_state_dict
from fxswap.swapplan import SwapPlan, load_plan
from tests.models import MLP

GiB = 2**30


def _mlp(seed: int = 0, n: int = 4) -> MLP:
    torch.manual_seed(seed)
    return MLP(n=n, d=32).eval().requires_grad_(False)


X = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved_plan() -> SwapPlan:
    return fx_plan(_mlp(), X, mode="layerwise", max_vram_gb=1e-4, reserve_mb=0, block_size_mb=0.004)


# --------------------------------------------------------------------------- mutated plan JSON
def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


OTHER_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([-1, 0, 2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def mutations(draw: st.DrawFn, text: str) -> str:
    kind = draw(st.sampled_from(["flip", "drop", "replace", "number"]))
    if kind == "flip":
        raw = bytearray(text.encode())
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << draw(st.integers(0, 7))
        return raw.decode("utf-8", errors="surrogateescape")
    data = json.loads(text)
    path = draw(st.sampled_from(_paths(data)))
    parent = data
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if kind == "drop":
        del parent[key]
    elif kind == "replace":
        parent[key] = draw(OTHER_VALUES)
    else:
        v = parent[key]
        base = v if isinstance(v, (int, float)) and not isinstance(v, bool) else 0
        parent[key] = draw(st.sampled_from([-1, -base - 1, base * 2**40 + 1, 2**64, -(2**64), 1e308, -1e308]))
    return json.dumps(data)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_plan_json_is_equal_or_plan_error(
    saved_plan: SwapPlan, data: st.DataObject, tmp_path: Path
) -> None:
    text = saved_plan.to_json()
    bad = data.draw(mutations(text))
    path = tmp_path / "plan.json"
    path.write_bytes(bad.encode("utf-8", errors="surrogateescape"))
    try:
        got = load_plan(path)
    except PlanError as e:
        assert "`" in str(e) or "JSON" in str(e) or "UTF-8" in str(e), str(e)  # names a field or the format
        return
    assert got == saved_plan


# --------------------------------------------------------------------------------- the table
@dataclass
class World:
    """What a bad input must leave as it was."""

    tmp: Path
    model: MLP
    good_plan: Path
    # The files a case wrote as its own bad input since the snapshot, with the bytes it wrote: the
    # only change to the directory a case may make.
    written: dict[str, bytes] = dataclasses.field(default_factory=dict)
    # Taken by a case that first builds something legitimately (a compiled model, a good call)
    # right before its bad call; else the test's snapshot before the case is the reference.
    marked: dict[str, Any] | None = None

    def snapshot(self) -> dict[str, Any]:
        gc.collect()
        self.written = {}
        return {
            "weights": {k: v.clone() for k, v in self.model.state_dict().items()},
            "files": {p.name: p.read_bytes() for p in sorted(self.tmp.iterdir()) if p.is_file()},
            "units": len(ops._UNITS),
        }

    def mark(self) -> None:
        """The state right before the bad call (after the case's legitimate setup)."""
        self.marked = self.snapshot()

    def same(self, before: dict[str, Any]) -> bool:
        written = dict(self.written)
        now = self.snapshot()
        w0, w1 = before["weights"], now["weights"]
        return (
            w0.keys() == w1.keys()
            and all(torch.equal(w0[k], w1[k]) for k in w0)
            and {**before["files"], **written} == now["files"]
            and before["units"] == now["units"]
        )


def _write(w: World, name: str, data: bytes) -> Path:
    p = w.tmp / name
    p.write_bytes(data)
    w.written[name] = data
    return p


def _input_file(w: World, name: str, make: Callable[[Path], None]) -> Path:
    """A bad input file the case makes with a library writer (recorded as written by the case)."""
    p = w.tmp / name
    make(p)
    w.written[name] = p.read_bytes()
    return p


def _edited(w: World, edit: Callable[[dict[str, Any]], None], name: str) -> Path:
    data = json.loads(w.good_plan.read_text())
    edit(data)
    return _write(w, name, json.dumps(data).encode())


def _compile_call(w: World, **kw: Any) -> Any:
    args = dict(mode="layerwise", max_vram_gb=1, backend="eager", reserve_mb=0)
    args.update(kw)
    return fx_compile(w.model, **args)(X)


class Breaks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lin(x).sum().item() > 0:  # data-dependent control flow
            return x
        return -x


class Opaque:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class OpaqueOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> Any:
        return Opaque(self.lin(x))


class ReturnsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> Any:
        return self.lin(x), self.lin.weight


def _not_capturing(cls: type[nn.Module]) -> Callable[[World], Any]:
    def run(w: World) -> Any:
        m = cls().eval().requires_grad_(False)
        return fx_compile(m, backend="eager", max_vram_gb=1, reserve_mb=0)(torch.randn(2, 4))

    return run


def _evil_pickle(w: World) -> Any:
    marker = w.tmp / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    p = _input_file(
        w, "evil.pth", lambda p: torch.save({"patch_embedding.weight": torch.zeros(2, 2), "x": Payload()}, p)
    )
    try:
        return load_state_dict(p)
    finally:
        assert not marker.exists(), "the pickle's payload ran"


def _training(w: World) -> Any:
    sm = fx_compile(w.model, backend="eager", max_vram_gb=1, reserve_mb=0)
    w.mark()
    w.model.blocks[1].train()
    try:
        return sm(X)
    finally:
        w.model.eval()


def _strict_new_shape(w: World) -> Any:
    sm = fx_compile(w.model, backend="eager", max_vram_gb=1, reserve_mb=0, strict=True)
    sm(X)
    w.__dict__["last"] = sm
    w.mark()
    before = (len(sm.plans), sm.runtime.ledger.bytes)
    try:
        return sm(torch.randn(5, 32))
    finally:
        assert (len(sm.plans), sm.runtime.ledger.bytes) == before


def _wrong_dtype(w: World) -> Any:
    sm = fx_compile(w.model, backend="eager", max_vram_gb=1, reserve_mb=0)
    w.mark()
    try:
        return sm(X.to(torch.float64))
    finally:
        assert not sm.plans and sm.runtime.ledger.bytes == 0


def _meta_input(w: World) -> Any:
    sm = fx_compile(w.model, backend="eager", max_vram_gb=1, reserve_mb=0)
    w.mark()
    return sm(X.to("meta"))


def _plan_for_other_model(w: World) -> Any:
    other = fx_plan(_mlp(seed=0, n=3), X, mode="layerwise", max_vram_gb=1, reserve_mb=0)
    p = _input_file(w, "other_plan.json", other.save)
    return fx_compile(w.model, plan=p, backend="eager")(X)


def _truncated_safetensors(w: World) -> Any:
    from safetensors.torch import save_file

    good = _input_file(
        w, "good.safetensors", lambda p: save_file({"patch_embedding.weight": torch.zeros(4, 4)}, str(p))
    )
    cut = _write(w, "cut.safetensors", good.read_bytes()[:-7])
    return load_state_dict(cut)


def _unknown_layout(w: World) -> Any:
    from safetensors.torch import save_file

    p = _input_file(
        w, "vae.safetensors", lambda p: save_file({"encoder.conv1.weight": torch.zeros(2)}, str(p))
    )
    return wan_load(p)


# (id, action, error type, key words that must all appear in the message)
CASES: list[tuple[str, Callable[[World], Any], type[BaseException], tuple[str, ...]]] = [
    # arguments
    ("mode", lambda w: fx_compile(w.model, mode="fastest"), ValueError, ("mode", "fastest")),
    ("negative budget", lambda w: fx_compile(w.model, max_vram_gb=-1), ValueError, ("max_vram_gb", "-1")),
    (
        "nan budget",
        lambda w: fx_compile(w.model, max_vram_gb=float("nan")),
        ValueError,
        ("max_vram_gb", "nan"),
    ),
    ("block size", lambda w: fx_compile(w.model, block_size_mb=0), ValueError, ("block_size_mb", "0")),
    ("reserve", lambda w: fx_compile(w.model, reserve_mb=-5), ValueError, ("reserve_mb", "-5")),
    ("backend", lambda w: fx_compile(w.model, backend="tvm"), ValueError, ("backend", "tvm")),
    (
        "empty_cache_freq",
        lambda w: fx_compile(w.model, empty_cache_freq=-1),
        ValueError,
        ("empty_cache_freq",),
    ),
    ("device index", lambda w: fx_compile(w.model, device="cuda:7"), DeviceError, ("cuda:7", "Fix")),
    ("device type", lambda w: fx_compile(w.model, device="tpu"), DeviceError, ("tpu", "Fix")),
    ("device garbage", lambda w: fx_compile(w.model, device="gpu!!"), DeviceError, ("gpu!!", "not a device")),
    ("pin_share", lambda w: fx_compile(w.model, pin_share=1.5), ValueError, ("pin_share", "1.5")),
    ("plan type", lambda w: fx_compile(w.model, plan=42), TypeError, ("plan", "int")),  # type: ignore[arg-type]
    ("unknown option", lambda w: fx_compile(w.model, turbo=True), TypeError, ("turbo", "options")),
    ("model type", lambda w: fx_compile("model.safetensors"), TypeError, ("model", "str")),  # type: ignore[arg-type]
    ("one expert", lambda w: compile_experts(w.model), ValueError, ("at least two",)),
    # plans
    (
        "plan not json",
        lambda w: fx_compile(w.model, plan=_write(w, "p1.json", b"{not json")),
        PlanError,
        ("JSON",),
    ),
    ("plan binary", lambda w: load_plan(_write(w, "p2.json", b"\xff\xfe\x00garbage")), PlanError, ("UTF-8",)),
    (
        "plan missing field",
        lambda w: load_plan(_edited(w, lambda d: d.pop("units"), "p3.json")),
        PlanError,
        ("units", "re-create"),
    ),
    (
        "plan edited",
        lambda w: load_plan(_edited(w, lambda d: d.update(peak_bytes=1), "p4.json")),
        PlanError,
        ("content_sha256", "edited"),
    ),
    (
        "plan schema",
        lambda w: load_plan(_edited(w, lambda d: d.update(schema_version=99), "p5.json")),
        PlanError,
        ("schema_version", "99"),
    ),
    (
        "plan wrong type",
        lambda w: load_plan(_edited(w, lambda d: d.update(max_vram_bytes="lots"), "p6.json")),
        PlanError,
        ("max_vram_bytes", "lots"),
    ),
    ("plan array", lambda w: load_plan(_write(w, "p7.json", b"[1, 2]")), PlanError, ("object",)),
    ("plan other model", _plan_for_other_model, PlanMismatchError, ("does not match", "Fix")),
    # checkpoints
    ("pickle payload", _evil_pickle, CheckpointError, ("evil.pth", "refused")),
    (
        "bare pickle",
        lambda w: load_state_dict(_write(w, "bare.pth", pickle.dumps({"head.modulation": [1.0]}))),
        CheckpointError,
        ("bare.pth", "refused"),
    ),
    ("truncated safetensors", _truncated_safetensors, CheckpointError, ("cut.safetensors",)),
    ("unknown layout", _unknown_layout, CheckpointError, ("encoder.conv1.weight", "original")),
    ("missing checkpoint", lambda w: load_state_dict(w.tmp / "nope.safetensors"), CheckpointError, ("nope",)),
    # inputs
    (
        "budget too small",
        lambda w: _compile_call(w, max_vram_gb=1e-9),
        BudgetInfeasibleError,
        ("max_vram_gb",),
    ),
    ("training mode", _training, TrainingModeError, ("training", "model.eval()")),
    ("strict new shape", _strict_new_shape, SignatureError, ("strict=True", "(5, 32)")),
    ("wrong dtype", _wrong_dtype, SignatureError, ("float64", "Fix")),
    ("input on meta", _meta_input, DeviceError, ("meta", "Fix")),
    # models that do not capture
    ("graph break", _not_capturing(Breaks), CaptureError, ("fxswap.compile", "test_hostile_inputs.py")),
    ("opaque output", _not_capturing(OpaqueOut), CaptureError, ("Opaque", "Fix")),
    ("returns a weight", _not_capturing(ReturnsWeight), CaptureError, ("not a graph output", "Fix")),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("hostile")
    m = _mlp()
    plan_path = tmp / "good_plan.json"
    fx_plan(m, X, mode="layerwise", max_vram_gb=1, reserve_mb=0).save(plan_path)
    return World(tmp, m, plan_path)


def test_table_has_at_least_25_cases() -> None:
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "action", "etype", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_its_error_and_changes_nothing(
    world: World,
    name: str,
    action: Callable[[World], Any],
    etype: type[BaseException],
    words: tuple[str, ...],
) -> None:
    # The reference is the state before the FIRST bad call of this case (or right before it, after
    # the case's legitimate setup: World.mark); the only change allowed is the bad input file the
    # case itself wrote, byte for byte as written.
    world.marked = None
    before = world.snapshot()
    with pytest.raises(etype) as ei:
        action(world)
    if world.marked is not None:
        before = world.marked
    msg = str(ei.value)
    missing = [k for k in words if k.lower() not in msg.lower()]
    assert not missing, (missing, msg)
    assert world.same(before), "a bad input changed the weights, a file or the op registry"
    with torch.no_grad():
        assert torch.equal(world.model(X), _mlp()(X))
