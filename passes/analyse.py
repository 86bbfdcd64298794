"""FX graph -> :class:`fxswap.ir.GraphIR`: the torch.fx-level analysis behind ``fxswap.trace``.

Works on the GraphModule a Dynamo backend receives: every node carries ``meta['example_value']``
(a FakeTensor, or a tuple/list of them) with its real shape and dtype, and parameters arrive as
placeholders. Views and aliases are folded into their base *storage*: two FakeTensors that share
an untyped storage are one allocation, whatever chain of ``view``/``transpose``/``chunk``/
``getitem``/``contiguous`` (no-op) produced them. Storage identity is exact where a list of
"view ops" would be a guess (``reshape`` and ``contiguous`` copy only sometimes).

This module has no global state; :func:`graph_ir` is a pure function of its arguments.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx

from fxswap.ir import BufferInfo, GraphIR, InputInfo, OpInfo, WeightInfo

__all__ = [
    "PlaceholderRole",
    "fp8_linear_storage",
    "graph_ir",
    "innermost_module",
    "merge_ranges",
    "module_path",
    "placeholder_roles",
    "stored_storage",
    "target_name",
]

_COMPUTE_OPS = ("call_function", "call_method", "call_module")

# Targets whose FLOPs are modelled, by printable name (see target_name).
_LINEAR = {"torch._C._nn.linear", "torch.nn.functional.linear"}
_MATMUL = {
    "torch.matmul",
    "torch.mm",
    "torch.bmm",
    "_operator.matmul",
    "operator.matmul",
    "Tensor.matmul",
    "Tensor.mm",
    "Tensor.bmm",
    "Tensor.__matmul__",
}
_ADDMM = {"torch.addmm", "torch.baddbmm", "Tensor.addmm", "Tensor.baddbmm"}
_CONV = {"torch.conv1d", "torch.conv2d", "torch.conv3d", "torch.convolution"}
_CONV_T = {"torch.conv_transpose1d", "torch.conv_transpose2d", "torch.conv_transpose3d"}
_SDPA = {"torch._C._nn.scaled_dot_product_attention", "torch.nn.functional.scaled_dot_product_attention"}
# SLA's fused sparse + linear branches (fxswap.models.sla): a custom op, so it is named by its
# qualified op name, whatever module path target_name puts in front of it.
_SLA_OP = "fxswap::sla_sparse_linear"

# Functional collectives (what passes.sequence_parallel emits and Inductor lowers), by target. Each
# is followed by a wait_tensor where its result is needed; the simulator runs the transfer on a
# collectives stream between the two (passes.simulate).
_C10D = torch.ops._c10d_functional
_ALL_TO_ALL = _C10D.all_to_all_single.default
_ALL_GATHER = _C10D.all_gather_into_tensor.default
_WAIT = _C10D.wait_tensor.default


@dataclass(frozen=True, slots=True)
class PlaceholderRole:
    """What one placeholder of the graph is: a named weight (``weight`` set) or a user input."""

    weight: str | None  # FQN for parameters/buffers, None for user inputs
    name: str  # FQN for weights; a readable input name (e.g. "context[0]") otherwise


def placeholder_roles(
    gm: fx.GraphModule,
    flat_inputs: Sequence[Any],
    weight_of: Mapping[int, str],
    input_name_of: Mapping[int, str],
    unknown: Callable[[int, fx.Node], str],
) -> list[PlaceholderRole]:
    """The role of each placeholder of a captured graph, by the identity of the object Dynamo
    passed for it (never by Dynamo's mangled placeholder names).

    The one placeholder loop of both captures (``fxswap.trace`` and ``fxswap.compile``).

    Args:
        gm: the captured graph.
        flat_inputs: the objects Dynamo passed, one per placeholder.
        weight_of: id(tensor) -> weight FQN for the model's parameters and buffers.
        input_name_of: id(tensor) -> readable name for the call's input tensors.
        unknown: names (or refuses, by raising) a placeholder that is neither, given its position
            and node.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    roles: list[PlaceholderRole] = []
    for i, (ph, value) in enumerate(zip(placeholders, flat_inputs, strict=True)):
        weight = weight_of.get(id(value))
        if weight is not None:
            roles.append(PlaceholderRole(weight=weight, name=weight))
            continue
        name = input_name_of.get(id(value))
        roles.append(PlaceholderRole(weight=None, name=name if name is not None else unknown(i, ph)))
    return roles


def target_name(node: fx.Node) -> str:
    """A stable printable name for a node's target, e.g. ``torch._C._nn.linear`` or ``Tensor.view``."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return str(node.target)
    target = node.target
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if module is None and name is not None and getattr(target, "__self__", None) is not None:
        # builtins bound to a module object, e.g. torch.relu is a method of torch._C._VariableFunctions
        owner = getattr(target, "__self__", None)
        module = getattr(owner, "__name__", None)
        if module == "torch._C._VariableFunctions":
            module = "torch"
    if name is None:
        return repr(target)
    if name.startswith("_VariableFunctionsClass."):
        # torch.rsqrt and friends report this private class as their qualname
        return "torch." + name.split(".", 1)[1]
    if module in (None, "torch._C._VariableFunctions"):
        module = "torch"
    return f"{module}.{name}"


_ROOT = re.compile(r"^[LG]\[['\"][^'\"]*['\"]\]")
_GETATTR = re.compile(r"getattr\(([^()]*), ['\"]([^'\"]*)['\"]\)")
_SUBSCRIPT = re.compile(r"\[['\"]?([^'\"\]]*)['\"]?\]")


def module_path(source: str) -> str:
    """Turn a Dynamo source string into a module FQN relative to the traced root.

    ``L['self'].blocks.0.attn``, ``L['self']._modules['blocks']._modules['0']._modules['attn']``,
    ``getattr(L['self'].blocks, '0').attn``, ``L['self'].blocks[0].attn`` and
    ``L['self'].__dict__['_modules']['blocks']...`` all give ``blocks.0.attn``; the root itself
    gives ``""``.
    """
    s = source
    while True:
        new = _GETATTR.sub(r"\1.\2", s)
        if new == s:
            break
        s = new
    s = _ROOT.sub("", s, count=1)
    s = _SUBSCRIPT.sub(r".\1", s)
    # A module called with its weights swapped in (fxswap.compile's capture) is reached through
    # ``__dict__['_modules']``: those are containers, not modules of the path.
    return ".".join(p for p in s.split(".") if p and p not in _CONTAINERS)


_CONTAINERS = frozenset({"__dict__", "_modules", "_parameters", "_buffers"})


def innermost_module(node: fx.Node) -> str:
    """The path of the innermost module a node ran in (``nn_module_stack``), e.g. ``blocks.3.ffn``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return module_path(str(path))


def _tensors(value: object) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _node_tensors(node: fx.Node) -> list[torch.Tensor]:
    return list(_tensors(node.meta.get("example_value", node.meta.get("val"))))


def _storage_key(t: torch.Tensor) -> int:
    # The address of the StorageImpl: equal exactly for tensors sharing one allocation. The
    # FakeTensors stay alive in node.meta for the whole analysis, so addresses are not reused.
    return int(t.untyped_storage()._cdata)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _arg_tensor(node: fx.Node, i: int, key: str | None = None) -> torch.Tensor | None:
    arg = node.args[i] if i < len(node.args) else (node.kwargs.get(key) if key else None)
    if isinstance(arg, fx.Node):
        ts = _node_tensors(arg)
        if len(ts) == 1:
            return ts[0]
    return None


def _flops(node: fx.Node, target: str, outs: list[torch.Tensor]) -> float:
    """Multiply-accumulate FLOPs (2 per MAC) from shapes; 0 for ops whose cost is memory traffic."""
    if not outs:
        return 0.0
    out_numel = outs[0].numel()
    if target in _LINEAR or target in _MATMUL:
        a = _arg_tensor(node, 0, "input")
        if a is None or a.dim() == 0:
            return 0.0
        return 2.0 * out_numel * a.shape[-1]
    if target in _ADDMM:
        a = _arg_tensor(node, 1, "mat1" if "addmm" in target else "batch1")
        if a is None or a.dim() == 0:
            return 0.0
        return 2.0 * out_numel * a.shape[-1]
    if target in _CONV:
        w = _arg_tensor(node, 1, "weight")
        if w is None:
            return 0.0
        # weight is (Cout, Cin/groups, *kernel): each output element is Cin/groups*prod(kernel) MACs
        return 2.0 * out_numel * math.prod(w.shape[1:])
    if target in _CONV_T:
        x = _arg_tensor(node, 0, "input")
        w = _arg_tensor(node, 1, "weight")
        if x is None or w is None:
            return 0.0
        # weight is (Cin, Cout/groups, *kernel): each input element scatters into that many outputs
        return 2.0 * x.numel() * math.prod(w.shape[1:])
    if target in _SDPA:
        q = _arg_tensor(node, 0, "query")
        k = _arg_tensor(node, 1, "key")
        v = _arg_tensor(node, 2, "value")
        if q is None or k is None or v is None or q.dim() < 2:
            return 0.0
        batch_heads = math.prod(q.shape[:-2])
        lq, lk = q.shape[-2], k.shape[-2]
        # Q@K^T (2*Lq*Lk*d) plus P@V (2*Lq*Lk*dv); = 4*B*H*Lq*Lk*d when d == dv
        return 2.0 * batch_heads * lq * lk * (q.shape[-1] + v.shape[-1])
    if target.endswith(_SLA_OP):
        return _sla_flops(node)
    return 0.0


def _sla_flops(node: fx.Node) -> float:
    """``sla_sparse_linear(q, k, v, c_q, s, z, lut, block_q, block_k)`` from its shapes.

    Sparse branch: every query attends to ``kept * block_k`` keys (QK^T and PV). Linear branch, when
    some key block is not kept: the kept blocks' sums ``s`` taken off the totals once per query
    block, ``phi(q) S`` and the denominator (the per-block sums themselves are a matmul in the graph).
    """
    q, v, c_q, lut = (_arg_tensor(node, i, key) for i, key in ((0, "q"), (2, "v"), (3, "c_q"), (6, "lut")))
    block_k = node.args[8] if len(node.args) > 8 else node.kwargs.get("block_k")
    if q is None or v is None or c_q is None or lut is None or not isinstance(block_k, int) or q.dim() != 4:
        return 0.0
    bh, length, d = math.prod(q.shape[:-2]), q.shape[-2], q.shape[-1]
    dv, cd = v.shape[-1], c_q.shape[-1]
    mq, kept = lut.shape[-2], lut.shape[-1]
    sparse = 2.0 * bh * length * kept * block_k * (d + dv)
    if kept >= -(-length // block_k):
        return sparse
    linear = 2.0 * bh * length * cd * dv + 2.0 * bh * length * cd + float(bh * mq * kept * cd * dv)
    return sparse + linear


def _group_size(group_name: object) -> int | None:
    """The size of the process group named ``group_name``, when this process has one by that name."""
    try:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group

        if dist.is_available() and dist.is_initialized() and isinstance(group_name, str):
            return int(_resolve_process_group(cast(Any, group_name)).size())
    except (ImportError, RuntimeError, ValueError, KeyError):
        pass
    return None


def _collective(node: fx.Node, op_index: Mapping[fx.Node, int]) -> tuple[str, int, int, int]:
    """``(kind, sent, received, waits_on)`` of a functional collective or its wait (see OpInfo);
    ``("", 0, 0, -1)`` for any other node.

    An all-to-all of ``P`` equal chunks keeps one chunk and sends the other ``P - 1`` (and receives
    as many), so ``(P - 1) / P`` of its input and output cross the link. ``P`` is the length of the
    split sizes the call names (passes.sequence_parallel always names them), else the group's size;
    unequal splits are counted as equal. An all-gather of ``P`` shards sends this rank's shard to
    ``P - 1`` ranks and receives the other ``P - 1`` shards.
    """
    if node.target is _WAIT:
        src = node.args[0] if node.args else None
        return ("wait", 0, 0, op_index.get(src, -1) if isinstance(src, fx.Node) else -1)
    if node.target is _ALL_TO_ALL:
        inp, out = _arg_tensor(node, 0, "input"), _node_tensors(node)
        splits = node.args[2] if len(node.args) > 2 else node.kwargs.get("input_split_sizes")
        ranks = len(splits) if isinstance(splits, (list, tuple)) and splits else None
        ranks = ranks or _group_size(node.args[3] if len(node.args) > 3 else node.kwargs.get("group_name"))
        in_b = _tensor_bytes(inp) if inp is not None else 0
        out_b = sum(_tensor_bytes(t) for t in out)
        if ranks is None:  # no split sizes and no such group here: the whole buffers, an upper bound
            return ("all_to_all", in_b, out_b, -1)
        return ("all_to_all", in_b * (ranks - 1) // ranks, out_b * (ranks - 1) // ranks, -1)
    if node.target is _ALL_GATHER:
        inp, out = _arg_tensor(node, 0, "input"), _node_tensors(node)
        in_b = _tensor_bytes(inp) if inp is not None else 0
        out_b = sum(_tensor_bytes(t) for t in out)
        ranks = out_b // in_b if in_b else 1
        return ("all_gather", in_b * (ranks - 1), out_b - in_b, -1)
    return ("", 0, 0, -1)


def _is_inplace(node: fx.Node, target: str) -> bool:
    last = target.rsplit(".", 1)[-1]
    if last.endswith("_") and not last.endswith("__"):
        return True
    if last in ("setitem", "__setitem__"):
        return True
    return bool(node.kwargs.get("inplace")) or "out" in node.kwargs


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Overlapping or touching op ranges merged, sorted; ranges of one op are dropped.

    >>> merge_ranges([(5, 9), (0, 2), (2, 4), (7, 7)])
    ((0, 4), (5, 9))
    """
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for r in ranges if r[0] < r[1]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


def graph_ir(gm: fx.GraphModule, roles: Sequence[PlaceholderRole]) -> GraphIR:
    """Describe ``gm`` as plain data.

    ``roles`` has one entry per placeholder of ``gm``, in graph order. Placeholders that hold no
    tensor (none appear with ``dynamic=False``) are skipped.

    - ``ops``: every call_function/call_method/call_module node in FX order. ``out_bytes`` counts
      only storages first seen at this node (views, aliases and in-place results count 0; a fresh
      op returning a tuple allocates each distinct storage among its elements). ``weights`` lists
      the weights whose storage (directly or through a view of it) the node reads.
    - ``buffers``: one per activation storage, ending at the last op that reads any alias of it, or
      at the last op if the graph returns it. Graph inputs span the whole call (0 to the last op):
      the caller still holds them after their last read.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(roles) != len(placeholders):
        raise ValueError(
            f"roles has {len(roles)} entries but the graph has {len(placeholders)} placeholders; "
            "pass one PlaceholderRole per placeholder, in graph order"
        )
    ops_nodes = [n for n in gm.graph.nodes if n.op in _COMPUTE_OPS]
    last_op = len(ops_nodes) - 1

    weight_of: dict[int, str] = {}  # storage -> weight FQN
    weight_tensor: dict[str, torch.Tensor] = {}
    buffer_name: list[str] = []
    buffer_bytes: list[int] = []
    buffer_start: list[int] = []
    buffer_of: dict[int, int] = {}  # storage -> index into the buffer_* lists
    inputs: list[InputInfo] = []

    for ph, role in zip(placeholders, roles, strict=True):
        ts = _node_tensors(ph)
        if len(ts) != 1:
            continue
        t = ts[0]
        key = _storage_key(t)
        if role.weight is not None:
            weight_of[key] = role.weight
            weight_tensor.setdefault(role.weight, t)
            continue
        inputs.append(
            InputInfo(name=role.name, shape=tuple(int(s) for s in t.shape), dtype=_dtype_name(t.dtype))
        )
        if key not in buffer_of:
            buffer_of[key] = len(buffer_name)
            # the placeholder's FX name: unique among node names, unlike the user-facing input name
            buffer_name.append(ph.name)
            buffer_bytes.append(int(t.untyped_storage().nbytes()))
            buffer_start.append(0)

    # The caller holds its inputs for the whole call (they are its tensors, not the graph's), so
    # their storage is live until the last op whatever the graph's last read of them.
    buffer_end = [max(last_op, 0)] * len(buffer_start)
    weight_first_use: dict[str, int] = {}
    ops: list[OpInfo] = []
    op_index = {n: i for i, n in enumerate(ops_nodes)}
    joined: dict[str, list[tuple[int, int]]] = {}

    def join_views(arg: fx.Node, tensors: Sequence[torch.Tensor], end: int) -> None:
        # A value made by an op that aliases a weight and is read at op ``end``: the two ops must
        # see the same loaded copy of that weight (see WeightInfo.joined).
        if arg.op == "placeholder":
            return
        for t in tensors:
            w = weight_of.get(_storage_key(t))
            if w is not None and op_index.get(arg, end) < end:
                joined.setdefault(w, []).append((op_index[arg], end))

    for i, node in enumerate(ops_nodes):
        outs = _node_tensors(node)
        target = target_name(node)

        read_tensors: list[torch.Tensor] = []
        for arg in node.all_input_nodes:
            if node.target is operator.getitem and isinstance(arg.meta.get("example_value"), (tuple, list)):
                # getitem reads one element of a tuple: the element it returns, not the others
                read_tensors.extend(outs)
                join_views(arg, outs, i)
            else:
                arg_tensors = _node_tensors(arg)
                read_tensors.extend(arg_tensors)
                join_views(arg, arg_tensors, i)

        weights: list[str] = []
        read_bytes = 0
        seen_read: set[int] = set()
        for t in read_tensors:
            key = _storage_key(t)
            if id(t) not in seen_read:
                seen_read.add(id(t))
                read_bytes += _tensor_bytes(t)
            w = weight_of.get(key)
            if w is not None:
                if w not in weights:
                    weights.append(w)
                weight_first_use.setdefault(w, i)
            b = buffer_of.get(key)
            if b is not None:
                buffer_end[b] = max(buffer_end[b], i)

        out_bytes = 0
        write_bytes = 0
        for t in outs:
            key = _storage_key(t)
            write_bytes += _tensor_bytes(t)
            if key in weight_of:
                w = weight_of[key]
                if w not in weights:
                    weights.append(w)
                weight_first_use.setdefault(w, i)
                continue
            if key in buffer_of:
                b = buffer_of[key]
                buffer_end[b] = max(buffer_end[b], i)
                continue
            nbytes = int(t.untyped_storage().nbytes())
            if nbytes == 0:
                continue
            buffer_of[key] = len(buffer_name)
            buffer_name.append(node.name)
            buffer_bytes.append(nbytes)
            buffer_start.append(i)
            buffer_end.append(i)
            out_bytes += nbytes

        pure_alias = out_bytes == 0 and not _is_inplace(node, target)
        mem_bytes = 0 if pure_alias else read_bytes + write_bytes
        collective, sent, received, waits_on = _collective(node, op_index)
        ops.append(
            OpInfo(
                name=node.name,
                target=target,
                module=innermost_module(node),
                weights=tuple(weights),
                out_bytes=out_bytes,
                flops=_flops(node, target, outs),
                mem_bytes=mem_bytes,
                collective=collective,
                sent_bytes=sent,
                received_bytes=received,
                waits_on=waits_on,
            )
        )

    for node in gm.graph.nodes:
        if node.op != "output":
            continue
        for arg in node.all_input_nodes:
            for t in _node_tensors(arg):
                b = buffer_of.get(_storage_key(t))
                if b is not None:
                    buffer_end[b] = max(buffer_end[b], last_op)
                w = weight_of.get(_storage_key(t))
                if w is not None and w in weight_first_use:
                    # a weight (or a view of it) the caller receives: one copy from its first read on
                    joined.setdefault(w, []).append((weight_first_use[w], max(last_op, 0)))

    ordered = sorted(weight_tensor, key=lambda w: weight_first_use.get(w, len(ops_nodes)))
    weights_info = tuple(
        WeightInfo(
            name=w,
            shape=tuple(int(s) for s in weight_tensor[w].shape),
            dtype=_dtype_name(weight_tensor[w].dtype),
            nbytes=_tensor_bytes(weight_tensor[w]),
            module=w.rsplit(".", 1)[0] if "." in w else "",
            joined=merge_ranges(joined.get(w, ())),
        )
        for w in ordered
    )
    buffers = tuple(
        BufferInfo(name=n, nbytes=b, start=s, end=max(e, s))
        for n, b, s, e in zip(buffer_name, buffer_bytes, buffer_start, buffer_end, strict=True)
    )
    return GraphIR(ops=tuple(ops), weights=weights_info, buffers=buffers, inputs=tuple(inputs))


def fp8_linear_storage(ir: GraphIR, linear_weights: set[str]) -> GraphIR:
    """The IR with ``linear_weights`` stored as float8_e4m3fn (1 byte per element).

    At use each fp8 Linear weight is upcast to the compute dtype, so each Linear op gets a
    transient buffer of the upcast copy, live during that op only. Activations are unchanged.
    """
    weights = []
    upcast: dict[str, int] = {}
    for w in ir.weights:
        if w.name in linear_weights:
            numel = math.prod(w.shape)
            upcast[w.name] = w.nbytes
            w = dataclasses.replace(w, dtype="float8_e4m3fn", nbytes=numel)
        weights.append(w)
    ops = []
    extra: list[BufferInfo] = []
    for i, op in enumerate(ir.ops):
        transient = sum(upcast.get(w, 0) for w in op.weights if op.target.endswith("linear"))
        if transient:
            extra.append(BufferInfo(name=f"{op.name}.weight_upcast", nbytes=transient, start=i, end=i))
            op = dataclasses.replace(op, out_bytes=op.out_bytes + transient)
        ops.append(op)
    buffers = sorted((*ir.buffers, *extra), key=lambda b: b.start)
    return dataclasses.replace(ir, ops=tuple(ops), weights=tuple(weights), buffers=tuple(buffers))


def stored_storage(
    ir: GraphIR, stored: Mapping[str, tuple[int, int, int]], in_graph: Collection[str] = ()
) -> GraphIR:
    """The IR of a model whose weights ``stored`` (name -> bytes as stored, bytes decoded, scratch of
    the decoder) are kept as their file stores them and decoded on the device before their first
    reader (``fxswap.passes.dequant``, ``fxswap.stored``).

    - each such weight counts its stored bytes: in host memory, over the link, and on the device
      from its unit's load to its release (or for the whole call, resident);
    - its decoded tensor is an activation from its first reader to its last, allocated by the first
      reader's op, with the decoder's scratch counted while that op runs;
    - the decoding is priced at that op (``dequant_bytes``: stored bytes read plus decoded written).

    A weight read by no op is left as it is. Each stored weight's record keeps its decoded size and
    scratch (``WeightInfo.decoded_nbytes``), so that a plan may keep a resident one decoded for the
    whole call instead (:func:`fxswap.passes.decode.decode_residents`), except those named in
    ``in_graph``, which are always decoded in the graph (a runtime patch follows their decode).
    """
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, op in enumerate(ir.ops):
        for w in op.weights:
            if w in stored:
                first.setdefault(w, i)
                last[w] = i
    weights = tuple(
        dataclasses.replace(
            w,
            nbytes=stored[w.name][0],
            decoded_nbytes=0 if w.name in in_graph else stored[w.name][1],
            decode_scratch_bytes=0 if w.name in in_graph else stored[w.name][2],
        )
        if w.name in first
        else w
        for w in ir.weights
    )
    extra: list[BufferInfo] = []
    add: dict[int, tuple[int, int, int]] = {}
    for w, i in first.items():
        nbytes, decoded, scratch = stored[w]
        extra.append(BufferInfo(name=f"{w}.dequant", nbytes=decoded, start=i, end=last[w]))
        o, s, d = add.get(i, (0, 0, 0))
        # Decoded one after another before the op: the scratch of the largest one, not their sum.
        add[i] = (o + decoded, max(s, scratch), d + nbytes + decoded)
    ops = tuple(
        dataclasses.replace(
            op,
            out_bytes=op.out_bytes + add[i][0],
            workspace_bytes=op.workspace_bytes + add[i][1],
            dequant_bytes=op.dequant_bytes + add[i][2],
        )
        if i in add
        else op
        for i, op in enumerate(ir.ops)
    )
    buffers = sorted((*ir.buffers, *extra), key=lambda b: b.start)
    return dataclasses.replace(ir, ops=ops, weights=weights, buffers=tuple(buffers))
