"""Rewrite pass: insert fxswap load / wait / release nodes at a plan's points.

Before (Dynamo graph; ``blocks.1`` is a swapped unit, ``blocks.0`` resident)::

    def forward(self, w0, x, w1):
        a = torch._C._nn.linear(x, w0)
        b = torch.relu(a)
        c = torch._C._nn.linear(b, w1)
        return (c,)

After ``insert_swaps(gm, plan, ["blocks.0.weight", None, "blocks.1.weight"], unit_ids={"blocks.1": 7})``
with ``load_at = 1`` (before ``b``), ``wait_at = release_after = 2`` (``c``)::

    def forward(self, w0, x):                        # w1 is no longer a graph input
        a = torch._C._nn.linear(x, w0)
        fxswap_load_blocks_1 = torch.ops.fxswap.load.default(7, a)  # anchor a: not before a exists
        b = torch.relu(a)
        fxswap_wait_blocks_1 = torch.ops.fxswap.wait.default(7, fxswap_load_blocks_1)  # fresh tensors,
        getitem = fxswap_wait_blocks_1[0]                                             # owned by the graph
        c = torch._C._nn.linear(b, getitem)
        fxswap_release_blocks_1 = torch.ops.fxswap.release.default(7, fxswap_wait_blocks_1, c)
        # ^ the last reader of the unit's tensors: its device memory returns here
        return (c,)

NOTE (anchor choice): the anchor is a lower bound on where a compiler may
place the load. The op right before ``load_at`` is the tightest bound, but when it is a pointwise op
Inductor fuses into a kernel, making it an op input forces that activation to be materialised (it
was observed computed twice). So the anchor is the nearest earlier node whose output is realised
anyway (a matmul / conv / attention output, a graph input, or another fxswap token) and that the
anchor does not keep alive past its own last reader (see ``_load_anchor``). In eager FX the load
runs exactly at its point; under Inductor it can run at most back to that anchor.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import fx

try:  # private (torch.fx), present since torch 2.3; a plain GraphModule only costs the codegen
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # pragma: no cover
    _LazyGraphModule = fx.GraphModule  # type: ignore[misc,assignment]

from fxswap import ops
from fxswap.errors import PlanError

__all__ = ["insert_swaps"]

logger = logging.getLogger("fxswap.passes.rewrite")

# Ops whose output Inductor always materialises (extern kernels); safe load anchors.
_REALISED_TARGETS: frozenset[Any] = frozenset(
    {
        torch._C._nn.linear,
        torch.nn.functional.linear,
        torch.matmul,
        torch.bmm,
        torch.mm,
        torch.addmm,
        torch.baddbmm,
        torch.conv1d,
        torch.conv2d,
        torch.conv3d,
        torch.nn.functional.conv1d,
        torch.nn.functional.conv2d,
        torch.nn.functional.conv3d,
        torch.nn.functional.scaled_dot_product_attention,
        operator.matmul,
    }
)
_REALISED_METHODS = frozenset({"matmul", "mm", "bmm"})


class _UnitLike(Protocol):
    name: str
    params: tuple[str, ...]
    resident: bool
    load_node: str | None
    wait_node: str | None
    release_node: str | None
    carry_node: str | None


class _PlanLike(Protocol):
    @property
    def units(self) -> Sequence[Any]: ...


def _is_tensor_node(n: fx.Node) -> bool:
    return isinstance(n.meta.get("example_value", n.meta.get("val")), torch.Tensor)


def _is_realised(n: fx.Node) -> bool:
    if n.op == "placeholder":
        return _is_tensor_node(n)
    if n.target in (ops.load, ops.carry, ops.release):
        return True
    if n.op == "call_function" and n.target is operator.getitem and n.args and isinstance(n.args[0], fx.Node):
        return n.args[0].target is ops.wait  # a weight handed out by wait
    if not _is_tensor_node(n):
        return False
    if n.op == "call_function" and n.target in _REALISED_TARGETS:
        return True
    return n.op == "call_method" and n.target in _REALISED_METHODS


def _load_anchor(before: fx.Node, exclude: set[fx.Node], pos: Mapping[fx.Node, int]) -> fx.Node:
    # The nearest earlier realised node that the anchor does not keep alive longer than the graph
    # already does: an fxswap token (a shared 0-byte tensor), a graph input (the caller holds it for
    # the whole call), or an output still read at or after the load. Anchoring on a tensor whose
    # last reader comes before the load would hold it until the load runs: memory the plan's
    # liveness does not count (observed: a Linear output held across softmax and exp).
    at = pos[before]
    fallback: fx.Node | None = None
    n = before.prev
    while n.op != "root":
        if n not in exclude and _is_realised(n):
            if fallback is None:
                fallback = n
            if n.op == "placeholder" or n.target in (ops.load, ops.carry, ops.release):
                return n
            if any(pos.get(u, -1) >= at or u.op == "output" for u in n.users):
                return n
        n = n.prev
    if fallback is not None:
        return fallback
    raise PlanError(
        f"no tensor precedes node `{before.name}` to anchor a load on; the graph has no tensor input"
    )


def _precedes(a: fx.Node, b: fx.Node) -> bool:
    """Whether node ``a`` comes before node ``b`` in their graph."""
    n = a.next
    while n.op != "root":
        if n is b:
            return True
        n = n.next
    return False


def _tensor_handle(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """A tensor-valued node that exists only once ``node`` has run (for the release's `after`)."""
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, torch.Tensor):
        return node
    if isinstance(val, (tuple, list)):
        for i, v in enumerate(val):
            if isinstance(v, torch.Tensor):
                with graph.inserting_after(node):
                    g = graph.call_function(operator.getitem, (node, i))
                g.meta["example_value"] = v
                return g
    n = node.prev  # a non-tensor result (e.g. a size): fall back to the latest earlier tensor
    while n.op != "root" and not _is_tensor_node(n):
        n = n.prev
    if n.op == "root":
        raise PlanError(f"no tensor at or before node `{node.name}` to anchor a release on")
    return n


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    # NOTE: never edit Dynamo's own graph: adding or removing its placeholders breaks Dynamo's
    # bookkeeping (`_dynamo_source`, `grapharg`; docs/ops_and_inductor.md, pitfalls). graph_copy shares the
    # node meta dicts shallowly, which is cheap (no FakeTensor deep copies).
    g = fx.Graph(owning_module=None, tracer_cls=gm.graph._tracer_cls)
    g._codegen = gm.graph._codegen
    env: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, env)
    g.output(out)
    for old, new in env.items():
        if old.op == "placeholder":
            src = getattr(old, "_dynamo_source", None)
            if src is not None:
                new._dynamo_source = src
    # Lazy: its Python is generated when first run or printed. Under Inductor the rewritten graph
    # is cut into regions and never run whole, and printing a 40-block WAN's 7,000 nodes took
    # about 0.4 s per plan tried (twice: here and after the edits).
    return _LazyGraphModule(gm, g, class_name="FxswapGraphModule")


def insert_swaps(
    gm: fx.GraphModule,
    plan: _PlanLike,
    placeholder_params: Sequence[str | None],
    *,
    unit_ids: Mapping[str, int],
) -> fx.GraphModule:
    """Return a copy of ``gm`` that loads, waits for and releases every swapped unit of ``plan``.

    Args:
        gm: the Dynamo graph (parameters as placeholders); not modified.
        plan: a ``SwapPlan`` (or anything with ``units`` carrying ``name``, ``params``,
            ``resident``, ``load_node``, ``wait_node``, ``release_node``, ``carry_node``: FX node
            names of ``gm``; ``carry_node`` is None for a unit not carried across calls; and
            ``spans``, for a weight several units load, the nodes from which to which each unit's
            copy serves its readers).
        placeholder_params: for each placeholder position of ``gm``, the weight's FQN, or None for
            a user input.
        unit_ids: the op id of every swapped unit (from ``SwapRuntime.add_unit``), baked into the
            graph as literal ints.

    Returns:
        The rewritten GraphModule. Placeholders of swapped weights are removed: call it with the user
        inputs and the resident weights only, in their original relative order. A plan with no
        swapped unit gives an unchanged copy.

    Raises:
        PlanError: a unit names a weight or node the graph does not have, or a use of a weight
            would precede its wait (the graph then fails ``lint``).
    """
    new = _copy(gm)
    graph = new.graph
    by_name = {n.name: n for n in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(placeholder_params):
        raise PlanError(
            f"`placeholder_params` has {len(placeholder_params)} entries but the graph has "
            f"{len(placeholders)} placeholders; pass one FQN (or None) per placeholder"
        )
    ph_of: dict[str, list[fx.Node]] = {}
    for ph, fqn in zip(placeholders, placeholder_params, strict=True):
        if fqn is not None:
            ph_of.setdefault(fqn, []).append(ph)

    def node(name: str | None, unit: str, what: str) -> fx.Node:
        if name is None or name not in by_name:
            raise PlanError(
                f"unit `{unit}`: {what} node {name!r} is not in the graph; was the plan made for it?"
            )
        return by_name[name]

    swapped = [u for u in plan.units if not u.resident]
    pos = {n: i for i, n in enumerate(graph.nodes)}
    # A swapped weight's placeholder is about to disappear: never anchor a load on it.
    swapped_phs = {ph for u in swapped for fqn in u.params for ph in ph_of.get(fqn, ())}
    # A weight loaded by several units (reloads): which of its readers each unit's copy serves,
    # as node positions (the plan's spans); every other weight goes to its one unit whole.
    serves: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for u in swapped:
        for sp in getattr(u, "spans", ()):
            first = node(sp.first_node, u.name, f"span start of `{sp.weight}`")
            last = node(sp.last_node, u.name, f"span end of `{sp.weight}`")
            serves.setdefault((u.name, sp.weight), []).append((pos[first], pos[last]))
    claimed: dict[str, list[tuple[int, int, str]]] = {}
    for (unit, w), ranges in serves.items():
        claimed.setdefault(w, []).extend((a, b, unit) for a, b in ranges)
    for w, claims in claimed.items():
        claims.sort()
        for (_, b, u1), (a, _, u2) in zip(claims, claims[1:], strict=False):
            if a <= b:
                raise PlanError(f"units `{u1}` and `{u2}` both claim readers of `{w}`; re-create the plan")
    erased: set[fx.Node] = set()
    carries: list[tuple[Any, int, fx.Node, dict[str, Any]]] = []
    for u in swapped:
        if u.name not in unit_ids:
            raise PlanError(f"unit `{u.name}` has no id in `unit_ids`; register it with the runtime first")
        uid = int(unit_ids[u.name])
        n_load = node(u.load_node, u.name, "load")
        n_wait = node(u.wait_node, u.name, "wait")
        n_rel = node(u.release_node, u.name, "release")
        tag = {"unit": u.name, "uid": uid}

        anchor = _load_anchor(n_load, swapped_phs, pos)
        # Node names carry the unit, so the rewritten code reads e.g. `fxswap_release_blocks_1 = ...`.
        label = u.name.replace(".", "_")
        with graph.inserting_before(n_load):
            tok = graph.create_node("call_function", ops.load, (uid, anchor), name=f"fxswap_load_{label}")
        tok.meta["fxswap"] = {**tag, "kind": "load"}
        with graph.inserting_before(n_wait):
            ws = graph.create_node("call_function", ops.wait, (uid, tok), name=f"fxswap_wait_{label}")
            ws.meta["fxswap"] = {**tag, "kind": "wait"}
            items = []
            for i, fqn in enumerate(u.params):
                if fqn not in ph_of:
                    raise PlanError(
                        f"unit `{u.name}` lists weight `{fqn}`, which is not a placeholder of the graph"
                    )
                g = graph.call_function(operator.getitem, (ws, i))
                g.meta["example_value"] = ph_of[fqn][0].meta.get("example_value")
                g.meta["fxswap_weight"] = fqn  # which weight it is (fxswap.passes.dequant)
                items.append(g)
        for fqn, g in zip(u.params, items, strict=True):
            own = serves.get((u.name, fqn))
            for ph in ph_of[fqn]:
                if ph in erased:
                    continue  # every reader already went to an earlier unit's copy
                if own is None:
                    ph.replace_all_uses_with(g)
                elif ph.users:

                    def mine(user: fx.Node, own: list[tuple[int, int]] = own) -> bool:
                        return any(a <= pos[user] <= b for a, b in own)

                    ph.replace_all_uses_with(g, delete_user_cb=mine)
                if not ph.users:
                    graph.erase_node(ph)
                    erased.add(ph)
        after = _tensor_handle(graph, n_rel)
        with graph.inserting_after(after):
            rel = graph.create_node(
                "call_function", ops.release, (uid, ws, after), name=f"fxswap_release_{label}"
            )
        rel.meta["fxswap"] = {**tag, "kind": "release"}
        if u.carry_node is not None:
            carries.append((u, uid, rel, tag))

    # Warm start: the next call's load of a unit, issued in this call's tail. Inserted once every
    # unit's own nodes exist, so that its anchor is the nearest realised node (often another unit's
    # token) rather than an early one that would let a compiler issue it far too soon; and never
    # before this call's release of the same unit (anchored on that release otherwise).
    for u, uid, rel, tag in carries:
        n_carry = node(u.carry_node, u.name, "carry")
        c_anchor = _load_anchor(n_carry, swapped_phs, pos)
        if c_anchor is rel or _precedes(c_anchor, rel):
            c_anchor = rel
        with graph.inserting_before(n_carry):
            c = graph.create_node(
                "call_function", ops.carry, (uid, c_anchor), name=f"fxswap_carry_{u.name.replace('.', '_')}"
            )
        c.meta["fxswap"] = {**tag, "kind": "carry"}

    left = [ph for ph in swapped_phs if ph not in erased and ph.users]
    if left:
        raise PlanError(
            f"node `{next(iter(left[0].users)).name}` reads `{left[0].name}`, a weight loaded once per "
            "place, outside every unit's span of it; was the plan made for this graph?"
        )
    try:
        graph.lint()
    except RuntimeError as e:
        raise PlanError(
            f"insert_swaps produced an invalid graph (a weight used before its wait?): {e}"
        ) from e
    new.recompile()
    if swapped:
        logger.info(
            "fxswap rewrite: %d swapped units, %d resident; %d fxswap nodes inserted",
            len(swapped),
            len(plan.units) - len(swapped),
            3 * len(swapped) + sum(u.carry_node is not None for u in swapped),
        )
    return new
