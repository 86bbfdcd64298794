"""insert_swaps on Dynamo graphs captured here with a tiny backend and hand-written plans.

Independent of the planner: units are duck-typed. Checks the inserted pattern, that Dynamo's graph
is left alone, errors, that memory is returned at the release node (probe + ledger), and that the
order, the release ops and the ownership of weights survive Inductor (read from its output code).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import probe_ops
import pytest
import torch
import torch.nn as nn
from torch import fx

from fxswap import ops
from fxswap.errors import PlanError
from fxswap.passes.rewrite import insert_swaps
from fxswap.runtime import LateCopyBackend, SwapRuntime

COMPUTE = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class Unit:
    name: str
    params: tuple[str, ...]
    resident: bool
    load_node: str | None = None
    wait_node: str | None = None
    release_node: str | None = None
    carry_node: str | None = None


@dataclass(frozen=True)
class Plan:
    units: tuple[Unit, ...]


def capture(model: nn.Module, *args: Any) -> tuple[fx.GraphModule, list[str | None]]:
    """Dynamo graph of model(*args) and the FQN per placeholder (None for inputs)."""
    got: list[tuple[fx.GraphModule, list[Any]]] = []

    def backend(gm: fx.GraphModule, ex: list[Any]) -> Any:
        got.append((gm, ex))
        return gm

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(*args)
    gm, ex = got[0]
    fqn = {id(p): n for n, p in model.named_parameters()}
    return gm, [fqn.get(id(e)) for e in ex]


def mlp(n: int = 4, d: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(d, d) for _ in range(n)]).requires_grad_(False)


def layer_plan(gm: fx.GraphModule, n: int, resident: set[int], depth: int = 1) -> Plan:
    """One unit per Linear layer i (op i), loaded `depth` ops ahead, released after its use."""
    names = [x.name for x in gm.graph.nodes if x.op in COMPUTE]
    units = []
    for i in range(n):
        use = names[i]
        units.append(
            Unit(str(i), (f"{i}.weight", f"{i}.bias"), i in resident, names[max(0, i - depth)], use, use)
        )
    return Plan(tuple(units))


def run_args(gm_new: fx.GraphModule, pp: list[str | None], model: nn.Module, rt: SwapRuntime, x: Any) -> list:
    named = dict(model.named_parameters())
    kept = {n.name for n in gm_new.graph.nodes if n.op == "placeholder"}
    phs = [n for n in capture_cache[id(model)].graph.nodes if n.op == "placeholder"]
    out = []
    for ph, f in zip(phs, pp, strict=True):
        if ph.name not in kept:
            continue
        out.append(x if f is None else rt.resident(f, named[f]))
    return out


capture_cache: dict[int, fx.GraphModule] = {}


@pytest.fixture(scope="module")
def mlp_graph() -> tuple[nn.Module, fx.GraphModule, list[str | None], torch.Tensor]:
    m = mlp()
    x = torch.randn(3, 16)
    gm, pp = capture(m, x)
    capture_cache[id(m)] = gm
    return m, gm, pp, x


def fx_ops(gm: fx.GraphModule) -> list[tuple[str, int]]:
    kind = {ops.load: "load", ops.wait: "wait", ops.release: "release"}
    return [(kind[n.target], n.args[0]) for n in gm.graph.nodes if n.target in kind]


def test_inserted_pattern_and_exact_eager(mlp_graph: Any) -> None:
    m, gm, pp, x = mlp_graph
    before = gm.code
    rt = SwapRuntime("cpu", backend=LateCopyBackend(0.002))
    plan = layer_plan(gm, 4, resident={0})
    uids = {
        u.name: rt.add_unit(u.name, [(p, dict(m.named_parameters())[p]) for p in u.params])
        for u in plan.units
        if not u.resident
    }
    new = insert_swaps(gm, plan, pp, unit_ids=uids)
    assert gm.code == before, "Dynamo's own graph must not be edited"
    seq = fx_ops(new)
    for uid in uids.values():
        kinds = [k for k, u in seq if u == uid]
        assert kinds == ["load", "wait", "release"]
    # unit ids are literal ints in the graph
    assert all(isinstance(u, int) for _, u in seq)
    # swapped weights are no longer graph inputs; the resident ones are
    ph = [n for n in new.graph.nodes if n.op == "placeholder"]
    assert len(ph) == 3  # 0.weight, 0.bias, x
    # each weight use reads the wait's output, and comes after it
    order = {n: i for i, n in enumerate(new.graph.nodes)}
    for n in new.graph.nodes:
        if n.target is ops.wait:
            users = [u for g in n.users if g.target is operator.getitem for u in g.users]
            rel = [u for u in n.users if u.target is ops.release]
            assert len(rel) == 1
            assert all(order[n] < order[u] < order[rel[0]] for u in users)
    # the code names each unit at its load, wait and release (the release is the free point)
    code = new.code
    for name in uids:
        for kind in ("load", "wait", "release"):
            assert re.search(rf"fxswap_{kind}_{name}\w* = torch\.ops\.fxswap\.{kind}\.default\(", code)
    args = run_args(new, pp, m, rt, x)
    for _ in range(3):
        assert torch.equal(new(*args)[0], m(x))
    assert rt.stats == {"loads": 9, "waits": 9, "releases": 9}


def test_empty_plan_is_a_copy(mlp_graph: Any) -> None:
    m, gm, pp, x = mlp_graph
    plan = layer_plan(gm, 4, resident={0, 1, 2, 3})
    new = insert_swaps(gm, plan, pp, unit_ids={})
    assert new is not gm and new.code == gm.code


def test_errors_name_unit_and_node(mlp_graph: Any) -> None:
    m, gm, pp, x = mlp_graph
    good = layer_plan(gm, 4, resident={0, 1, 2})
    u3 = good.units[3]
    bad_node = Plan(good.units[:3] + (Unit("3", u3.params, False, "nope", u3.wait_node, u3.release_node),))
    with pytest.raises(PlanError, match=r"unit `3`.*'nope'"):
        insert_swaps(gm, bad_node, pp, unit_ids={"3": 1})
    bad_param = Plan(
        good.units[:3] + (Unit("3", ("3.weight", "x.y"), False, u3.load_node, u3.wait_node, u3.release_node),)
    )
    with pytest.raises(PlanError, match="x.y"):
        insert_swaps(gm, bad_param, pp, unit_ids={"3": 1})
    names = [x.name for x in gm.graph.nodes if x.op in COMPUTE]
    # waits after its first use: the graph would read the weight before it exists
    late = Plan(
        good.units[:2]
        + (Unit("2", ("2.weight", "2.bias"), False, names[2], names[3], names[3]), good.units[3])
    )
    with pytest.raises(PlanError, match="invalid graph"):
        insert_swaps(gm, late, pp, unit_ids={"2": 1, "3": 2})
    with pytest.raises(PlanError, match="unit_ids"):
        insert_swaps(gm, layer_plan(gm, 4, resident=set()), pp, unit_ids={})


def _insert_probes(gm: fx.GraphModule, pid: int) -> fx.GraphModule:
    """A probe right before and right after every release node (probe reads the ledger)."""
    g = gm.graph
    for rel in [n for n in g.nodes if n.target is ops.release]:
        with g.inserting_before(rel):
            pre = g.call_function(probe_ops.probe, (pid, rel.args[2]))
        rel.update_arg(2, pre)  # the release now comes after the "before" probe
        with g.inserting_after(rel):
            g.call_function(probe_ops.probe, (pid, rel))
    g.lint()
    gm.recompile()
    return gm


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_memory_returns_at_release(mlp_graph: Any, backend: str) -> None:
    """The ledger (tensor finalizers) drops by exactly the unit's bytes across each release node."""
    m, gm, pp, x = mlp_graph
    rt = SwapRuntime("cpu")
    plan = layer_plan(gm, 4, resident=set(), depth=0)
    named = dict(m.named_parameters())
    uids = {u.name: rt.add_unit(u.name, [(p, named[p]) for p in u.params]) for u in plan.units}
    seen: list[int] = []
    pid = probe_ops.register_probe(lambda: seen.append(rt.ledger.bytes))
    try:
        new = _insert_probes(insert_swaps(gm, plan, pp, unit_ids=uids), pid)
        args = run_args(new, pp, m, rt, x)
        if backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            with torch._inductor.config.patch(reorder_for_locality=False):
                fn = compile_fx(new, args)
        else:
            fn = new.forward
        out = fn(*args)
        assert torch.equal(out[0], m(x)) if backend == "eager" else torch.allclose(out[0], m(x))
    finally:
        probe_ops.unregister_probe(pid)
    unit_bytes = (16 * 16 + 16) * 4
    assert len(seen) == 8
    for before, after in zip(seen[0::2], seen[1::2], strict=True):
        assert before == unit_bytes, seen  # depth 0: exactly this unit is on the device
        assert after == 0, seen  # ... and gone right after its release node
    assert rt.ledger.bytes == 0


# ------------------------------------------------------------------------------------------- inductor
@pytest.fixture(scope="module")
def inductor_run(mlp_graph: Any) -> dict[str, Any]:
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.utils import fresh_cache, run_and_get_code

    m, gm, pp, x = mlp_graph
    rt = SwapRuntime("cpu", backend=LateCopyBackend(0.002))
    plan = layer_plan(gm, 4, resident={0}, depth=1)
    named = dict(m.named_parameters())
    uids = {
        u.name: rt.add_unit(u.name, [(p, named[p]) for p in u.params]) for u in plan.units if not u.resident
    }
    new = insert_swaps(gm, plan, pp, unit_ids=uids)
    args = run_args(new, pp, m, rt, x)
    holder: dict[str, Any] = {}

    def go() -> Any:
        with torch._inductor.config.patch(reorder_for_locality=False):
            holder["fn"] = compile_fx(new, args)
        return holder["fn"](*args)

    with fresh_cache():
        out, code = run_and_get_code(go)
    return {
        "m": m,
        "x": x,
        "new": new,
        "fn": holder["fn"],
        "args": args,
        "out": out,
        "code": code[0],
        "rt": rt,
    }


def test_inductor_keeps_every_op_in_fx_order(inductor_run: dict[str, Any]) -> None:
    code = inductor_run["code"]
    body = code[code.index("def call(") :]
    got = [
        (k, int(u)) for k, u in re.findall(r"torch\.ops\.fxswap\.(load|wait|release)\.default\((\d+)", body)
    ]
    assert got == fx_ops(inductor_run["new"])  # none DCE'd (release included), none reordered
    # loads are issued before the matmul they should overlap with (not sunk past it)
    lines = [ln.strip() for ln in body.splitlines()]
    kinds = [
        "L" if "= torch.ops.fxswap.load.default(" in ln else "M"
        for ln in lines
        if "= torch.ops.fxswap.load.default(" in ln or ln.startswith("extern_kernels.addmm(")
    ]
    assert "".join(kinds) == "LMLMLMM", kinds  # load(1) before mm0, load(2) before mm1, ...


def test_inductor_never_reuses_weight_buffers(inductor_run: dict[str, Any]) -> None:
    code = inductor_run["code"]
    weights = set(re.findall(r"(buf\d+) = buf\d+\[\d+\]", code))  # elements of wait's list
    assert weights
    reused = set(re.findall(r"buf\d+ = (buf\d+); del buf\d+  # reuse", code))
    assert not (weights & reused), f"Inductor reused weight buffers {weights & reused}"


def test_inductor_exact_over_calls_host_copies_intact(inductor_run: dict[str, Any]) -> None:
    m, x, fn, args = inductor_run["m"], inductor_run["x"], inductor_run["fn"], inductor_run["args"]
    ref = torch.compile(m, backend="inductor")(x)
    assert torch.equal(inductor_run["out"][0], ref)
    host = [inductor_run["rt"].store[f"{i}.weight"].clone() for i in range(1, 4)]
    for _ in range(3):
        assert torch.equal(fn(*list(args))[0], ref)  # a reused (overwritten) weight would break this
    for i, h in enumerate(host, start=1):
        assert torch.equal(inductor_run["rt"].store[f"{i}.weight"], h)


def test_load_anchor_skips_fusible_pointwise_and_swapped_weights() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).requires_grad_(False)
    x = torch.randn(2, 8)
    gm, pp = capture(m, x)
    names = [n.name for n in gm.graph.nodes if n.op in COMPUTE]  # linear, relu, linear
    rt = SwapRuntime("cpu")
    named = dict(m.named_parameters())
    plan = Plan((
        Unit("0", ("0.weight", "0.bias"), True),
        Unit("2", ("2.weight", "2.bias"), False, names[2], names[2], names[2]),  # load right after relu
    ))  # fmt: skip
    uid = rt.add_unit("2", [(p, named[p]) for p in ("2.weight", "2.bias")])
    new = insert_swaps(gm, plan, pp, unit_ids={"2": uid})
    load = next(n for n in new.graph.nodes if n.target is ops.load)
    # Not the fusible relu (Inductor would materialise it twice) and not the first linear's output
    # (read last by relu: anchoring on it would hold it until the load runs): the graph input,
    # which the caller holds for the whole call anyway.
    assert load.args[1].name not in (names[0], names[1]) and load.args[1].op == "placeholder"
    assert load.args[1].meta["example_value"].shape == x.shape
    assert load.prev.name == names[1], "the load itself still sits right before its planned op"
    phs = [n for n in new.graph.nodes if n.op == "placeholder"]
    capture_cache[id(m)] = gm
    assert torch.equal(new(*run_args(new, pp, m, rt, x))[0], m(x)) and len(phs) == 3


# ----------------------------------------------------------------- positions worked out by hand
def _listing(gm: fx.GraphModule) -> list[str]:
    """The compute nodes in graph order: fxswap ops as ``kind(unit)``, getitems folded away, every
    other op by its node name."""
    kind = {ops.load: "load", ops.wait: "wait", ops.release: "release", ops.carry: "carry"}
    out = []
    for n in gm.graph.nodes:
        if n.target in kind:
            out.append(f"{kind[n.target]}({n.meta['fxswap']['unit']})")
        elif n.op in COMPUTE and n.target is not operator.getitem:
            out.append(n.name)
    return out


def test_a_two_layer_unit_is_released_after_its_last_reader_by_hand(mlp_graph: Any) -> None:
    """Unit `mid` holds layers 1 and 2 of the 4-layer MLP (ops input_1..input_4 read layers 0..3).
    Its readers are input_2 (layer 1) and input_3 (layer 2): the first is input_2, the last input_3.
    Planned by hand: load before input_1, wait before input_2, release after input_3 (its LAST
    reader); layers 0 and 3 resident. A rewrite that freed the unit after its first reader would put
    the release between input_2 and input_3, while input_3 still reads layer 2's weights."""
    m, gm, pp, x = mlp_graph
    rt = SwapRuntime("cpu")
    named = dict(m.named_parameters())
    params = ("1.weight", "1.bias", "2.weight", "2.bias")
    plan = Plan((
        Unit("first", ("0.weight", "0.bias"), True),
        Unit("mid", params, False, load_node="input_1", wait_node="input_2", release_node="input_3"),
        Unit("last", ("3.weight", "3.bias"), True),
    ))  # fmt: skip
    uid = rt.add_unit("mid", [(p, named[p]) for p in params])
    new = insert_swaps(gm, plan, pp, unit_ids={"mid": uid})
    assert _listing(new) == [
        "load(mid)",
        "input_1",
        "wait(mid)",
        "input_2",
        "input_3",
        "release(mid)",
        "input_4",
    ]
    # the release's `after` argument is the last reader itself (positions 0-based over the listing:
    # input_3 at 4, the release at 5)
    rel = next(n for n in new.graph.nodes if n.target is ops.release)
    assert rel.args[2].name == "input_3"
    assert torch.equal(new(*run_args(new, pp, m, rt, x))[0], m(x))


class _Tied(nn.Module):
    """One Linear read twice: op 0 `lin(x)`, op 1 `relu`, op 2 `lin(relu)`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.relu(self.lin(x)))


def test_a_weight_read_twice_is_released_after_its_second_read_by_hand() -> None:
    """By hand: the graph is [linear (reads lin), relu, linear_1 (reads lin)]; the unit's first
    reader is op 0, its last op 2. Load and wait before op 0, release after op 2."""
    m = _Tied().requires_grad_(False)
    x = torch.randn(2, 8)
    gm, pp = capture(m, x)
    names = [n.name for n in gm.graph.nodes if n.op in COMPUTE]
    assert len(names) == 3 and "relu" in names[1]
    first, last = names[0], names[2]
    rt = SwapRuntime("cpu")
    named = dict(m.named_parameters())
    uid = rt.add_unit("lin", [(p, named[p]) for p in ("lin.weight", "lin.bias")])
    plan = Plan((Unit("lin", ("lin.weight", "lin.bias"), False, first, first, last),))
    new = insert_swaps(gm, plan, pp, unit_ids={"lin": uid})
    assert _listing(new) == ["load(lin)", "wait(lin)", first, names[1], last, "release(lin)"]
    capture_cache[id(m)] = gm
    assert torch.equal(new(*run_args(new, pp, m, rt, x))[0], m(x))


def test_loads_sit_where_planned_by_hand(mlp_graph: Any) -> None:
    """Layers 1, 2, 3 swapped, each loaded two ops ahead of its reader (clamped at op 0), waited and
    released at its reader; layer 0 resident. By hand, over ops input_1..input_4 (0..3): unit 1 is
    loaded before op max(0, 1-2) = 0, unit 2 before op 0, unit 3 before op 1. Ops placed before the
    same op keep the plan's unit order: before op 1 come unit 1's wait, then unit 3's load."""
    m, gm, pp, x = mlp_graph
    rt = SwapRuntime("cpu")
    named = dict(m.named_parameters())
    plan = layer_plan(gm, 4, resident={0}, depth=2)
    uids = {
        u.name: rt.add_unit(u.name, [(p, named[p]) for p in u.params]) for u in plan.units if not u.resident
    }
    new = insert_swaps(gm, plan, pp, unit_ids=uids)
    assert _listing(new) == [
        "load(1)",
        "load(2)",
        "input_1",
        "wait(1)",
        "load(3)",
        "input_2",
        "release(1)",
        "wait(2)",
        "input_3",
        "release(2)",
        "wait(3)",
        "input_4",
        "release(3)",
    ]
    assert torch.equal(new(*run_args(new, pp, m, rt, x))[0], m(x))
