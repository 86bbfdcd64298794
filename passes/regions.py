"""Regions pass: cut a rewritten graph into stretches that compile once and run many times.

A video transformer is a prologue, N structurally identical blocks and an epilogue. Compiled as
one graph, Inductor's time grows with N; compiled block by block, each distinct block program is
compiled once and its code is called for every block that prints the same (what users know as
regional compilation). This pass finds the stretches and gives each one a canonical form, so that
equal stretches are recognised by their text.

Before (a rewritten graph; ``blocks.1`` swapped, ids build-local)::

    a  = linear(x, w0)                                   # module blocks.0
    l1 = torch.ops.fxswap.load.default(-7, a)            # load of blocks.1, before op b
    b  = relu(a)                                         # module blocks.0
    ws = torch.ops.fxswap.wait.default(-7, l1)           # wait of blocks.1, before op c
    g  = ws[0]
    c  = linear(b, g)                                    # module blocks.1
    r  = torch.ops.fxswap.release.default(-7, ws, c)     # release of blocks.1, after op c

After ``split_regions``: two regions, ``blocks.0`` (``a, l1, b``; outputs ``b`` and ``l1``) and
``blocks.1`` (``ws, g, c, r``; inputs ``b`` and ``l1``), each a GraphModule whose nodes, inputs
and unit ids are renamed canonically (``v0, v1, ...``; unit ids numbered by first appearance
inside the region, with their shapes folded in as :func:`unit_id` does). Two blocks with the
same ops, shapes and swap pattern print the same ``code`` (and ``signature``).

Where a node goes:

- a compute node goes to the block of its module (:func:`fxswap.passes.partition.block_key`
  of the innermost module of ``nn_module_stack``) when that path has a numbered component
  (``blocks.3``, ``layers.0``, ``0``); otherwise to the region between blocks (label ``""``). A
  run of unlabelled nodes between two nodes of one block belongs to that block.
- a ``load`` or ``wait`` (and the wait's items) goes where the next compute node goes: it sits
  before the op the plan names. A ``release`` or ``carry`` goes where the previous compute node
  went: it sits after its op. The swap ops are therefore exactly where the plan put them, inside
  the region that runs their op.

Every value a region reads from an earlier region (or a graph input, or a constant attribute) is
an input of its module; every value a later region or the graph's output reads is an output, and
so is every release and carry token (0 bytes; whether a later load is anchored on one must not
make two blocks alike print different code).
Nothing here knows about WAN: the repetition comes from the module tree the capture recorded.
"""

from __future__ import annotations

import functools
import hashlib
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxswap import ops
from fxswap.passes.analyse import innermost_module
from fxswap.passes.partition import block_labels

__all__ = ["Region", "RegionSplit", "region_labels", "split_regions", "unit_id"]

_BEFORE_OP = frozenset({ops.load, ops.wait})  # inserted before their op
_AFTER_OP = frozenset({ops.release, ops.carry})  # inserted after their op


def unit_id(position: int, shapes: Sequence[Sequence[int]], dtypes: Sequence[torch.dtype]) -> int:
    """A unit id for a graph's code: negative, a digest of the position and the unit's shapes and
    dtypes (Inductor's FX graph cache keys on the code, so shapes must show in it; see
    ``docs/ops_and_inductor.md``)."""
    text = repr((position, tuple(tuple(s) for s in shapes), [str(d) for d in dtypes]))
    return -1 - int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big")


@dataclass(frozen=True)
class Region:
    """One stretch of the graph, as a module that runs on its own.

    ``gm`` takes ``inputs`` (names of nodes of the original graph: placeholders, get_attr nodes
    or outputs of earlier regions) and returns a tuple of ``outputs`` (names of its own nodes that
    later regions or the graph's output read). ``units`` maps each unit id used in ``gm`` to the id
    it stands for in the original graph. ``code`` is ``gm``'s canonical text; ``signature`` says
    the same, node by node (op, canonical name, target, arguments), at a fraction of the cost of
    generating the code: regions alike have equal signatures. ``glue``: only swap ops (the ones
    before a region's first compute op or after its last), nothing to compile.

    ``graph`` (from ``build``) and ``gm`` are built when first asked for: of forty regions alike
    only one is ever compiled or run as such.
    """

    label: str
    build: Callable[[], fx.Graph] = field(repr=False, compare=False)
    owner: fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    units: dict[int, int]
    signature: str
    glue: bool = False

    @functools.cached_property
    def graph(self) -> fx.Graph:
        """The region's own graph (canonical names, placeholders in order of first use)."""
        return self.build()

    @functools.cached_property
    def code(self) -> str:
        """``gm``'s canonical Python (what Inductor compiles, printed)."""
        return self.graph.python_code(root_module="self").src

    @functools.cached_property
    def gm(self) -> fx.GraphModule:
        # The original module as root: a call_module target is copied over (Dynamo inlines
        # modules, so its graphs have none, but any FX graph may).
        return fx.GraphModule(self.owner, self.graph)


@dataclass(frozen=True)
class RegionSplit:
    """The regions in execution order, and what the graph returns: per output leaf, the name of
    the node it is (``None`` for a constant, then in ``constants``)."""

    regions: tuple[Region, ...]
    placeholders: tuple[str, ...]
    outputs: tuple[str | None, ...]
    constants: tuple[Any, ...]
    output_is_tuple: bool


def _wait_of(node: fx.Node) -> fx.Node | None:
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        src = node.args[0]
        if src.target is ops.wait:
            return src
    return None


def _items(wait: fx.Node) -> list[fx.Node]:
    """The getitem nodes of a wait, one per weight of its unit, in order."""
    # The rewrite makes one item per weight of the unit, so the indices are 0..n-1.
    items = {int(u.args[1]): u for u in wait.users if _wait_of(u) is wait}  # type: ignore[arg-type]
    if sorted(items) != list(range(len(items))):
        raise ValueError(f"wait `{wait.name}` is released in another region but not every weight has an item")
    return [items[i] for i in range(len(items))]


def region_labels(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """The region label of every node that runs (not placeholders, get_attr or output): a block
    path such as ``"blocks.3"``, or ``""`` between blocks. See the module docstring."""
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    swap = [n.target in ops.FXSWAP_OPS or _wait_of(n) is not None for n in nodes]
    compute = [i for i, s in enumerate(swap) if not s]
    label: list[str | None] = [None] * len(nodes)
    for i, lab in zip(compute, block_labels([innermost_module(nodes[i]) for i in compute]), strict=True):
        label[i] = lab
    # The swap ops: before their op (load, wait, the wait's items) or after it (release, carry).
    nxt: str | None = None
    for i in range(len(nodes) - 1, -1, -1):
        if not swap[i]:
            nxt = label[i]
        elif nodes[i].target not in _AFTER_OP:
            label[i] = nxt
    prev: str | None = None
    for i in range(len(nodes)):
        if not swap[i]:
            prev = label[i]
        elif nodes[i].target in _AFTER_OP or label[i] is None:
            label[i] = prev if prev is not None else (label[i] or "")
    for i in range(len(nodes)):
        if label[i] is None:
            label[i] = ""
    # A wait's items stay with their wait (the list it returns never crosses a region).
    out = {n: str(lab) for n, lab in zip(nodes, label, strict=True)}
    for n in nodes:
        w = _wait_of(n)
        if w is not None:
            out[n] = out[w]
    return out


def split_regions(
    gm: fx.GraphModule,
    unit_meta: Callable[[int], tuple[Sequence[Sequence[int]], Sequence[torch.dtype]]],
    *,
    labels: dict[fx.Node, str] | None = None,
) -> RegionSplit:
    """Cut ``gm`` into regions (see the module docstring).

    Args:
        gm: a graph the rewrite produced (or any FX graph; without fxswap ops nothing changes).
        unit_meta: shapes and dtypes of the unit behind an id of ``gm``.
        labels: region labels per node (default :func:`region_labels`).

    Returns:
        The regions in order; running them one after the other on the graph's placeholders
        computes what ``gm`` computes.
    """
    labels = region_labels(gm) if labels is None else labels
    runs: list[tuple[str, list[fx.Node]]] = []
    for n in gm.graph.nodes:
        if n not in labels:
            continue
        lab = labels[n]
        # A wait and its items form one piece; a label change inside it cannot happen (same label).
        if runs and runs[-1][0] == lab:
            runs[-1][1].append(n)
        else:
            runs.append((lab, [n]))
    pieces = _cut_glue(runs)
    region_of: dict[fx.Node, int] = {n: r for r, (_, ns, _) in enumerate(pieces) for n in ns}
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    # A release in another region than its wait (a unit used across blocks) takes the wait's
    # items, not its list: only tensors cross regions.
    lists = {
        n: _items(n.args[1])
        for n in region_of
        if n.target is ops.release and isinstance(n.args[1], fx.Node) and region_of[n.args[1]] != region_of[n]
    }
    # Which regions read each value (the output counts as a reader after every region).
    late = len(pieces)
    readers: dict[fx.Node, set[int]] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            for a in n.all_input_nodes:
                readers.setdefault(a, set()).add(late)
        elif n in region_of:
            reads = [a for a in n.all_input_nodes if n not in lists or a is not n.args[1]]
            for a in [*reads, *lists.get(n, [])]:
                readers.setdefault(a, set()).add(region_of[n])
    regions: list[Region] = []
    for r, (lab, nodes, glue) in enumerate(pieces):
        regions.append(_region(gm, lab, nodes, r, region_of, readers, unit_meta, lists, glue))
    result = output_node.args[0]
    leaves = list(result) if isinstance(result, (tuple, list)) else [result]
    return RegionSplit(
        regions=tuple(regions),
        placeholders=tuple(n.name for n in gm.graph.nodes if n.op == "placeholder"),
        outputs=tuple(a.name if isinstance(a, fx.Node) else None for a in leaves),
        constants=tuple(None if isinstance(a, fx.Node) else a for a in leaves),
        output_is_tuple=isinstance(result, (tuple, list)),
    )


def _is_swap(n: fx.Node) -> bool:
    return n.target in ops.FXSWAP_OPS or _wait_of(n) is not None


def _cut_glue(runs: list[tuple[str, list[fx.Node]]]) -> list[tuple[str, list[fx.Node], bool]]:
    """Each run cut into its leading swap ops (loads, waits and the waits' items), its compute, and
    its trailing swap ops (releases, carries); swap ops between two runs' compute merge into one
    glue piece. Order is unchanged: the glue runs exactly where its ops stood."""
    pieces: list[tuple[str, list[fx.Node], bool]] = []

    def add(label: str, nodes: list[fx.Node], glue: bool) -> None:
        if not nodes:
            return
        if glue and pieces and pieces[-1][2]:
            pieces[-1][1].extend(nodes)
        else:
            pieces.append((label, list(nodes), glue))

    for label, nodes in runs:
        i = 0
        while i < len(nodes) and _is_swap(nodes[i]) and nodes[i].target not in _AFTER_OP:
            i += 1
        j = len(nodes)
        while j > i and nodes[j - 1].target in _AFTER_OP:
            j -= 1
        head, core, tail = nodes[:i], nodes[i:j], nodes[j:]
        # A wait's items go with it, wherever the rewrite put them (an item only reads its wait).
        waits = {n for n in head if n.target is ops.wait}
        items = [n for n in core if _wait_of(n) in waits]
        if items:
            head = head + items
            core = [n for n in core if _wait_of(n) not in waits]
        if not any(not _is_swap(n) for n in core):
            add(label, head + core + tail, True)
            continue
        add(label, head, True)
        add(label, core, False)
        add(label, tail, True)
    return pieces


class _Canon(str):
    """A node's canonical name, printed bare (as FX prints a node in an argument list)."""

    def __repr__(self) -> str:
        return str(self)


def _region(
    owner: fx.GraphModule,
    label: str,
    nodes: list[fx.Node],
    r: int,
    region_of: dict[fx.Node, int],
    readers: dict[fx.Node, set[int]],
    unit_meta: Callable[[int], tuple[Sequence[Sequence[int]], Sequence[torch.dtype]]],
    lists: dict[fx.Node, list[fx.Node]],
    glue: bool,
) -> Region:
    # NOTE: the signature is written straight from the nodes; the region's own graph is built only
    # when asked for (Region.graph): of forty regions alike one is compiled, and building every
    # graph cost about 0.3 s per plan for a 40-block WAN.
    inputs: list[str] = []
    canon: dict[fx.Node, _Canon] = {}
    local: dict[int, int] = {}  # original id -> id in this region
    lines: list[str] = []

    def value(a: fx.Node) -> _Canon:
        if a not in canon:
            canon[a] = _Canon(f"in{len(inputs)}")
            inputs.append(a.name)
            lines.append(f"placeholder {canon[a]}")
        return canon[a]

    def local_id(uid: int) -> int:
        if uid not in local:
            shapes, dtypes = unit_meta(uid)
            local[uid] = unit_id(len(local), shapes, dtypes)
        return local[uid]

    def own_args(n: fx.Node) -> tuple[Any, ...]:
        # a release in another region than its wait reads the wait's items, not the wait
        return (*n.args[:1], lists[n], *n.args[2:]) if n in lists else n.args

    for k, n in enumerate(nodes):
        args = fx.node.map_arg(own_args(n), value)
        kwargs = fx.node.map_arg(n.kwargs, value)
        if n.target in ops.FXSWAP_OPS:
            args = (local_id(int(n.args[0])), *args[1:])  # type: ignore[arg-type]
        canon[n] = _Canon(f"v{k}")
        lines.append(f"{n.op} {canon[n]} {n.target!r} {args!r} {kwargs!r}")
    # Release and carry tokens (0 bytes) are always outputs: whether the next region anchors a load
    # on them must not make two blocks alike print different code.
    outputs = [n for n in nodes if any(q > r for q in readers.get(n, ())) or n.target in _AFTER_OP]
    lines.append(f"output {tuple(canon[n] for n in outputs)!r}")
    uids = dict(local)

    def build() -> fx.Graph:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}

        def node_of(a: fx.Node) -> fx.Node:
            if a not in env:
                ph = graph.placeholder(str(canon[a]))
                ph.meta = dict(a.meta)
                env[a] = ph
            return env[a]

        for n in nodes:
            args = fx.node.map_arg(own_args(n), node_of)
            kwargs = fx.node.map_arg(n.kwargs, node_of)
            if n.target in ops.FXSWAP_OPS:
                args = (uids[int(n.args[0])], *args[1:])  # type: ignore[arg-type]
            new = graph.create_node(n.op, n.target, args, kwargs, name=str(canon[n]))
            new.meta = dict(n.meta)
            env[n] = new
        graph.output(tuple(env[n] for n in outputs))
        return graph

    return Region(
        label=label,
        build=build,
        owner=owner,
        inputs=tuple(inputs),
        outputs=tuple(n.name for n in outputs),
        units={v: k for k, v in local.items()},
        signature="\n".join(lines),
        glue=glue,
    )
