"""Capture a model's repeated blocks once: Dynamo traces one block per distinct call, not all forty.

Dynamo's time grows with the number of ops and tensors it traces, and a video transformer repeats
one block 30 to 40 times. :func:`capture_with_blocks` traces the model with every repeated block
replaced by one opaque call, traces one block for each distinct way the blocks are called, and
inlines a copy of that block graph at every call. The result is the graph a whole-model capture
gives (same ops, same order, every weight a placeholder named by identity), made in a fraction of
the time.

Which modules are "repeated blocks" comes from the module tree, not from names: the children of one
parent whose names are numbers (``nn.ModuleList``, ``nn.Sequential``) and that are alike in every
way the forward can see: the same class for every submodule, the same parameter and buffer names,
shapes and dtypes, the same plain attributes (numbers, strings, dtypes, flags; an attribute that is
an object counts by its class and its own plain attributes; anything else by identity), and no
hooks. Two blocks alike by that test, called with inputs of the same shapes, dtypes and non-tensor
values, trace to the same graph: the one traced stands for the others, with their own weights.

Before (outer capture; ``blocks.1`` and ``blocks.2`` alike)::

    h1 = fxswap.block_capture._block_call(7, (h0, ctx), {})      # opaque: no weights, no ops
    h2 = fxswap.block_capture._block_call(8, (h1, ctx), {})

After inlining the block graph traced once (``linear(x, w)`` in the block)::

    l_blocks_1_w = placeholder                                  # added, named by identity
    l_blocks_2_w = placeholder
    linear = torch._C._nn.linear(h0, l_blocks_1_w)              # nn_module_stack: blocks.1...
    linear_1 = torch._C._nn.linear(linear, l_blocks_2_w)        # nn_module_stack: blocks.2...

Each inlined copy gets example values of its own (meta tensors, views sharing storage as in the
block), so the analysis sees forty activations, not one shared forty times.

Anything this path does not cover (a block's output that aliases its input or holds a non-tensor,
a block graph with constants, a block called with its whole output) raises :class:`_Unsupported`,
and the caller captures the whole model as before. ``FXSWAP_BLOCK_CAPTURE=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import operator
import os
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

__all__ = ["capture_with_blocks", "enabled", "repeated_blocks"]

logger = logging.getLogger("fxswap.capture")

_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, enum.Enum)


class _Unsupported(Exception):
    """This model's blocks cannot be captured once each; capture the whole model instead."""


def enabled() -> bool:
    """Whether block capture is on (``FXSWAP_BLOCK_CAPTURE=0`` turns it off)."""
    return os.environ.get("FXSWAP_BLOCK_CAPTURE", "1").strip().lower() not in ("0", "false", "no", "off")


def _plain(value: Any, depth: int = 0) -> Any:
    """A comparable stand-in for an attribute value (see the module docstring)."""
    if isinstance(value, _PLAIN):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_plain(v, depth + 1) for v in value))
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return ("dict", tuple(sorted((k, _plain(v, depth + 1)) for k, v in value.items())))
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        return ("id", id(value))
    if isinstance(value, torch.Tensor) or depth >= 2 or not hasattr(value, "__dict__"):
        return ("id", id(value))
    return ("obj", type(value), _attrs(value, depth + 1))


def _attrs(obj: Any, depth: int) -> tuple[Any, ...]:
    return tuple(
        sorted(
            (k, _plain(v, depth)) for k, v in vars(obj).items() if not k.startswith("_") and k != "training"
        )
    )


_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
)


def _fingerprint(block: torch.nn.Module) -> tuple[Any, ...] | None:
    """What the forward can see of ``block`` (None: it has hooks, or a forward of its own)."""
    parts: list[Any] = []
    for path, m in block.named_modules(remove_duplicate=False):
        if any(getattr(m, h, None) for h in _HOOKS) or "forward" in vars(m):
            return None
        tensors = tuple(
            (n, tuple(t.shape), t.dtype)
            for n, t in itertools.chain(m.named_parameters(recurse=False), m.named_buffers(recurse=False))
        )
        parts.append((path, type(m), tensors, _attrs(m, 0)))
    return tuple(parts)


def repeated_blocks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's repeated blocks by path: numbered children of one parent that are alike (see the
    module docstring) with at least one other. Outermost first; nested blocks are not listed."""
    return {path: block for path, (block, _) in _repeated(model).items()}


def _repeated(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, int]]:
    """:func:`repeated_blocks` with each block's group: blocks alike share one (their fingerprint
    is computed once here, not again per call)."""
    found: dict[str, tuple[torch.nn.Module, int]] = {}
    groups: dict[Any, int] = {}
    for path, parent in model.named_modules():
        if any(path == p or path.startswith(p + ".") for p in found):
            continue
        children = [(n, c) for n, c in parent.named_children() if n.isdigit()]
        if len(children) < 2:
            continue
        alike: dict[Any, list[tuple[str, torch.nn.Module]]] = {}
        for n, c in children:
            fp = _fingerprint(c)
            if fp is not None:
                alike.setdefault(fp, []).append((n, c))
        for fp, members in alike.items():
            if len(members) >= 2:
                group = groups.setdefault(fp, len(groups))
                for n, c in members:
                    found[f"{path}.{n}" if path else n] = (c, group)
    return found


@dataclass
class _Call:
    path: str
    module: torch.nn.Module
    group: int  # blocks alike share a group
    # the outputs' structure and layouts per (group, input signature), shared by one capture's calls
    outputs: dict[Any, tuple[Any, list[tuple[tuple[int, ...], tuple[int, ...], torch.dtype]]]] = field(
        default_factory=dict
    )


_CALLS: dict[int, _Call] = {}
_CALLS_LOCK = threading.Lock()
_CALL_IDS = itertools.count(1)


def _signature(leaves: Sequence[Any], spec: Any, *, devices: bool = True) -> Any:
    """A block call's inputs as a key (``pytree.tree_flatten((args, kwargs))``'s leaves and spec):
    equal keys, equal traces for blocks alike. ``devices=False`` leaves the tensors' device out."""
    key: list[Any] = [str(spec)]
    for v in leaves:
        if isinstance(v, torch.Tensor):
            layout = (tuple(v.shape), tuple(v.stride()), v.dtype)
            key.append(("T", *layout, v.device.type) if devices else ("T", *layout))
        else:
            key.append(("V", _plain(v)))
    return tuple(key)


@torch._dynamo.allow_in_graph
def _block_call(call_id: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """One repeated block's forward, opaque to Dynamo (``allow_in_graph``): it becomes one node of
    the outer graph, and its output is made from the block's real forward once per signature."""
    from torch._guards import detect_fake_mode

    call = _CALLS[call_id]
    sig = (call.group, _signature(*pytree.tree_flatten((args, kwargs))))
    cached = call.outputs.get(sig)
    fake_mode = detect_fake_mode((args, kwargs))
    if cached is None:
        mod = call.module
        state = {
            n: (fake_mode.from_tensor(t) if fake_mode is not None else t)
            for n, t in itertools.chain(
                mod.named_parameters(remove_duplicate=False), mod.named_buffers(remove_duplicate=False)
            )
        }
        with torch.nn.utils.stateless._reparametrize_module(mod, state):
            out = type(mod).forward(mod, *args, **kwargs)
        leaves, spec = pytree.tree_flatten(out)
        if not leaves or any(not isinstance(v, torch.Tensor) for v in leaves):
            raise _Unsupported(f"block {call.path} returns a non-tensor")
        call.outputs[sig] = (spec, [(tuple(v.shape), tuple(v.stride()), v.dtype) for v in leaves])
        return out
    # Blocks alike given inputs alike return outputs alike: only the layouts are needed (running
    # the forward again, even on fake tensors, cost a tenth of a second per block).
    spec, metas = cached
    device = next(v.device for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor))
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        outs = [torch.empty_strided(s, st, dtype=d, device=device) for s, st, d in metas]
    return pytree.tree_unflatten(outs, spec)


@contextmanager
def _stubbed(blocks: dict[str, tuple[torch.nn.Module, int]]) -> Iterator[dict[int, _Call]]:
    mine: dict[int, _Call] = {}
    shared: dict[Any, Any] = {}
    with _CALLS_LOCK:
        for path, (block, group) in blocks.items():
            cid = next(_CALL_IDS)
            mine[cid] = _CALLS[cid] = _Call(path, block, group, shared)
    try:
        for cid, call in mine.items():

            def forward(*args: Any, _cid: int = cid, **kwargs: Any) -> Any:
                return _block_call(_cid, args, kwargs)

            call.module.forward = forward
        yield mine
    finally:
        for call in mine.values():
            vars(call.module).pop("forward", None)
        with _CALLS_LOCK:
            for cid in mine:
                _CALLS.pop(cid, None)


def _like(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=v.device)
    return v


def _meta_like(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device="meta")
    return v


def _rebased(values: Sequence[Any], storages: dict[int, Any], fresh: bool) -> list[Any]:
    """``values`` as meta tensors on the storages ``storages`` maps their storages to (views of one
    storage stay views of one). A storage not in the map gets a new one of its size (``fresh``), or
    its tensors are kept as they are."""
    out = []
    for t in values:
        key = int(t.untyped_storage()._cdata) if isinstance(t, torch.Tensor) else None
        if key is not None and key not in storages and fresh:
            nbytes = t.untyped_storage().nbytes()
            storages[key] = torch.empty(nbytes, dtype=torch.uint8, device="meta").untyped_storage()
        if key is None or key not in storages:
            out.append(t)
            continue
        n = torch.empty(0, dtype=t.dtype, device="meta")
        n.set_(storages[key], t.storage_offset(), t.shape, t.stride())
        out.append(n)
    return out


def capture_with_blocks(
    capture: Callable[[Callable[..., Any], tuple[Any, ...], torch.nn.Module], Any],
    entry: Callable[..., Any],
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Capture ``entry(model, args, kwargs)`` with each repeated block traced once (module docstring).

    Args:
        capture: runs one Dynamo capture, ``capture(fn, fn_args, module) -> DynamoGraph`` (with
            ``run=True``: the result and the graph's outputs are needed to map block outputs).
        entry: the function to capture, called as ``entry(model, args, kwargs)``.
        model: the model; its weights are whatever its attributes hold now (meta or real).
        args, kwargs: the call's inputs.

    Returns:
        The ``DynamoGraph`` of the whole call, blocks inlined, weights of the blocks added as
        placeholders (and to its ``inputs``, as the tensors themselves).

    Raises:
        _Unsupported: this model's blocks cannot be captured this way (capture the whole model).
    """
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        # they would run around the opaque call and again inside the block's own trace
        raise _Unsupported("global module hooks are registered")
    blocks = _repeated(model)
    if not blocks:
        raise _Unsupported("no repeated blocks")
    with _stubbed(blocks) as calls:
        outer = capture(entry, (model, args, kwargs), model)
    gm: fx.GraphModule = outer.gm
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _block_call]
    if not nodes:
        raise _Unsupported("no block was called")
    inputs = list(outer.inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ph_of = {id(v): p for p, v in zip(placeholders, inputs, strict=True)}
    traced: dict[Any, Any] = {}
    remap: dict[int, Any] = {}  # storage of an opaque call's output -> storage of its inlined value
    outer_nodes = set(gm.graph.nodes)
    for node in nodes:
        call = calls[int(node.args[0])]
        leaves, spec = pytree.tree_flatten((node.args[1], node.args[2]))
        values = [_example(a) if isinstance(a, fx.Node) else a for a in leaves]
        # Without devices: the example values of inlined blocks are meta stand-ins (fresh storages
        # for the analysis), while the call's device is one for the whole capture.
        sig = (call.group, _signature(values, spec, devices=False))
        if sig not in traced:
            traced[sig] = _trace_block(capture, entry, call.module, spec, values)
        placeholders = _inline(gm, node, call, leaves, traced[sig], inputs, ph_of, placeholders, remap)
    inlined = set(gm.graph.nodes) - outer_nodes
    for n in gm.graph.nodes:
        if n not in inlined and n.op != "placeholder":
            val = _example(n)
            if val is not None:
                flat, vspec = pytree.tree_flatten(val)
                n.meta["example_value"] = pytree.tree_unflatten(_rebased(flat, remap, fresh=False), vspec)
    gm.graph.lint()
    gm.recompile()
    logger.info(
        "fxswap: captured %s with %d block calls traced as %d block graph(s)",
        type(model).__name__,
        len(nodes),
        len(traced),
    )
    return type(outer)(gm, inputs, outer.result, outer.outputs)


def _example(n: fx.Node) -> Any:
    return n.meta.get("example_value", n.meta.get("val"))


@dataclass
class _Traced:
    gm: fx.GraphModule
    weight_of: dict[int, str]  # placeholder index -> the block's weight name
    leaf_of: dict[int, int]  # placeholder index -> index of the call's argument leaf
    out_spec: Any
    out_nodes: list[fx.Node]  # per result leaf, the block graph's node


def _trace_block(
    capture: Callable[[Callable[..., Any], tuple[Any, ...], torch.nn.Module], Any],
    entry: Callable[..., Any],
    block: torch.nn.Module,
    spec: Any,
    values: list[Any],
) -> _Traced:
    # Inputs like the call's on the call's device (an op's output strides can depend on the
    # device, e.g. attention's, and with them whether a later reshape is a view); the block keeps
    # its own weights (meta for fxswap.compile's capture). The block graph runs on fake tensors.
    meta_leaves = [_like(v) for v in values]
    args, kwargs = pytree.tree_unflatten(meta_leaves, spec)
    g = capture(entry, (block, tuple(args), dict(kwargs)), block)
    named = dict(block.named_parameters(remove_duplicate=False)) | dict(
        block.named_buffers(remove_duplicate=False)
    )
    weight_ids: dict[int, str] = {}
    for n, t in named.items():
        weight_ids.setdefault(id(t), n)
    leaf_ids = {id(t): i for i, t in enumerate(meta_leaves) if isinstance(t, torch.Tensor)}
    weight_of: dict[int, str] = {}
    leaf_of: dict[int, int] = {}
    for i, v in enumerate(g.inputs):
        if id(v) in weight_ids:
            weight_of[i] = weight_ids[id(v)]
        elif id(v) in leaf_ids:
            leaf_of[i] = leaf_ids[id(v)]
        else:
            raise _Unsupported("a block graph input is neither a weight nor an argument")
    if any(n.op in ("get_attr", "call_module") for n in g.gm.graph.nodes):
        raise _Unsupported("the block graph holds constants or modules")
    result_leaves, out_spec = pytree.tree_flatten(g.result)
    index = {id(t): j for j, t in enumerate(g.outputs)}
    out_node = next(n for n in g.gm.graph.nodes if n.op == "output")
    graph_outs = list(out_node.args[0])
    out_nodes = []
    for leaf in result_leaves:
        if not isinstance(leaf, torch.Tensor) or id(leaf) not in index:
            raise _Unsupported("a block output is not a computed tensor")
        target = graph_outs[index[id(leaf)]]
        if not isinstance(target, fx.Node) or target.op == "placeholder":
            raise _Unsupported("a block returns an input as is")
        out_nodes.append(target)
    return _Traced(g.gm, weight_of, leaf_of, out_spec, out_nodes)


def _inline(
    gm: fx.GraphModule,
    node: fx.Node,
    call: _Call,
    leaves: list[Any],
    traced: _Traced,
    inputs: list[Any],
    ph_of: dict[int, fx.Node],
    placeholders: list[fx.Node],
    remap: dict[int, Any],
) -> list[fx.Node]:
    from fxswap.passes.analyse import module_path

    graph = gm.graph
    named = dict(call.module.named_parameters(remove_duplicate=False)) | dict(
        call.module.named_buffers(remove_duplicate=False)
    )
    env: dict[fx.Node, fx.Node] = {}
    block_phs = [n for n in traced.gm.graph.nodes if n.op == "placeholder"]
    for i, ph in enumerate(block_phs):
        if i in traced.leaf_of:
            a = leaves[traced.leaf_of[i]]
            if not isinstance(a, fx.Node):
                raise _Unsupported("a block's tensor argument is a constant")
            env[ph] = a
            continue
        tensor = named[traced.weight_of[i]]
        if id(tensor) not in ph_of:
            with graph.inserting_after(placeholders[-1]):
                new = graph.placeholder(f"l_{call.path}_{traced.weight_of[i]}".replace(".", "_"))
            new.meta["example_value"] = _meta_like(tensor)
            ph_of[id(tensor)] = new
            inputs.append(tensor)
            placeholders = [*placeholders, new]
        env[ph] = ph_of[id(tensor)]
    # Views of a block's inputs and weights share the storage of the outer graph's values, as in a
    # whole-model capture (the analysis folds a view into the storage it reads).
    storages: dict[int, Any] = {}
    for ph in block_phs:
        inner, outer = _example(ph), _example(env[ph])
        if isinstance(inner, torch.Tensor) and isinstance(outer, torch.Tensor):
            storages[int(inner.untyped_storage()._cdata)] = outer.untyped_storage()
    prefix = call.path
    with graph.inserting_before(node):
        for n in traced.gm.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            new = graph.node_copy(n, lambda a: env[a])
            meta = dict(n.meta)
            val = meta.get("example_value")
            if val is not None:
                flat, vspec = pytree.tree_flatten(val)
                meta["example_value"] = pytree.tree_unflatten(_rebased(flat, storages, fresh=True), vspec)
            meta.pop("val", None)
            stack = meta.get("nn_module_stack")
            if stack:
                meta["nn_module_stack"] = {
                    k: (_join(prefix, module_path(str(path))), cls) for k, (path, cls) in stack.items()
                }
            else:
                meta["nn_module_stack"] = {"fxswap_block": (prefix, type(call.module))}
            new.meta = meta
            env[n] = new
    results = [env[o] for o in traced.out_nodes]
    # Values of the outer graph that alias the opaque call's outputs (``x.float()`` of a float
    # block output is the output itself) now alias the inlined outputs.
    for old, new_node in zip(pytree.tree_leaves(_example(node)), results, strict=True):
        new_val = _example(new_node)
        if isinstance(old, torch.Tensor) and isinstance(new_val, torch.Tensor):
            remap[int(old.untyped_storage()._cdata)] = new_val.untyped_storage()
    tree = pytree.tree_unflatten(results, traced.out_spec)
    _replace_uses(node, tree)
    graph.erase_node(node)
    return placeholders


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if path else prefix


def _replace_uses(node: fx.Node, tree: Any) -> None:
    if isinstance(tree, fx.Node):
        node.replace_all_uses_with(tree)
        return
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and user.args[0] is node:
            _replace_uses(user, tree[user.args[1]])
            user.graph.erase_node(user)
        else:
            raise _Unsupported("a block's whole output is used as one value")
