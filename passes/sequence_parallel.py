"""Sequence parallelism on a captured graph: token-indexed activations sharded across the ranks of a
``torch.distributed`` process group, Ulysses all-to-alls around each self-attention.

:func:`shard_sequence` rewrites the Dynamo FX graph that capture produced, before analyse reads it,
so that every later stage (liveness, the planner, the rewrite) sees one rank's program: its own
slice of the tokens, the collectives and their buffers. Before (one rank, ``N`` tokens, ``H`` heads)::

    x = conv3d(video).flatten(2)                  # [B, D, N]      tokens are born here
    t = x.transpose(1, 2)                         # [B, N, D]
    q = t @ Wq ... .transpose(1, 2)               # [B, H, N, d]
    o = scaled_dot_product_attention(q, k, v)     # self-attention
    c = scaled_dot_product_attention(o2, kc, vc)  # cross-attention, kc/vc from the text
    y = head(c).reshape(B, f, h, w, ...)          # unpatchify: the token dim is split
    return y

After, on rank ``r`` of ``P``::

    x = conv3d(video).flatten(2).narrow(2, r*N/P, N/P)       # [B, D, N/P]
    ...
    q = all_to_all(q: [B, H, N/P, d] -> [B, H/P, N, d])      # same for k and v
    o = scaled_dot_product_attention(q, k, v)               # a head group, all tokens
    o = all_to_all(o: [B, H/P, N, d] -> [B, H, N/P, d])
    c = scaled_dot_product_attention(o2, kc, vc)             # queries sharded, keys/values full
    y = all_gather(head(c), token dim).reshape(B, f, h, w, ...)
    return y

Where the token dimension is, is found on the graph, not from names: the first self-attention
(an SDPA whose query, key and value trace back to one origin) is followed backwards along the
dimension that carries its query tokens, through the ops whose dimension mapping is known, to the
op where that dimension is created (the ``flatten`` after a patch embedding). From there the token
dimension is propagated forwards with the shapes Dynamo recorded (``meta['example_value']``):

- row-local ops (pointwise, ``linear``, norms over other dims, views that keep the dim) keep it;
- a replicated operand that meets a sharded one with the full token count on the same
  (broadcast) dimension is sliced to this rank's rows (RoPE tables, per-token modulation);
- ``scaled_dot_product_attention``: all-to-alls when key and value are sharded too
  (self-attention), nothing when they are replicated (cross-attention: full keys and values);
- any other op (a reshape that splits or merges the token dim, a reduction over it, an op the
  rules do not know) gets its sharded inputs all-gathered first, so the result is always the
  single-process one; the report lists every gather and why.

The collectives are ``torch.ops._c10d_functional`` ops (each followed by ``wait_tensor``), the
functional collectives Inductor lowers. The per-head arithmetic of attention is unchanged and every
other op sees the same rows, so outputs match one process's up to the BLAS kernel chosen for a
shorter row count (see ``docs/sequence_parallel.md``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxswap.errors import SequenceParallelError

__all__ = [
    "ALL_GATHER",
    "ALL_TO_ALL",
    "COLLECTIVES",
    "SequenceParallel",
    "collective_workspace",
    "find_token_origin",
    "lingering_bytes",
    "ShardReport",
    "SequenceParallelError",
    "refresh_example_values",
    "shard_sequence",
]

_C10D = torch.ops._c10d_functional
ALL_TO_ALL = _C10D.all_to_all_single.default
ALL_GATHER = _C10D.all_gather_into_tensor.default
WAIT = _C10D.wait_tensor.default
COLLECTIVES = frozenset({ALL_TO_ALL, ALL_GATHER, WAIT})


@dataclass(frozen=True)
class SequenceParallel:
    """What :func:`shard_sequence` shards for: ``degree`` ranks of the process group named
    ``group_name`` (``ProcessGroup.group_name``); this process is ``rank`` in it."""

    degree: int
    rank: int
    group_name: str

    def __post_init__(self) -> None:
        if self.degree < 1 or not 0 <= self.rank < self.degree:
            raise ValueError(f"rank {self.rank} of degree {self.degree}: need 0 <= rank < degree")


@dataclass(frozen=True)
class ShardReport:
    """What :func:`shard_sequence` did: the origin of the token dim, the tokens, and per kind of
    rewrite the node names (gathers with the op that needed them)."""

    origin: str
    origin_dim: int
    tokens: int
    self_attention: tuple[str, ...]
    cross_attention: tuple[str, ...]
    sliced: tuple[str, ...]  # replicated operands narrowed to this rank's tokens
    gathered: tuple[tuple[str, str], ...]  # (sharded node, the op that needed it whole)
    # bytes each all-to-all sends from this rank, in graph order (its input, less the part it keeps)
    alltoall_sent: tuple[int, ...] = ()

    def alltoall_ms(self, link_gbps: float) -> float:
        """Predicted time of one call's all-to-alls on a link of ``link_gbps`` GB/s per rank, one
        after another and overlapping nothing (an upper bound: NCCL may overlap send and receive)."""
        return sum(self.alltoall_sent) / (link_gbps * 1e9) * 1e3


# --------------------------------------------------------------------------------------------------
# Op kinds (Dynamo graphs call torch functions and Tensor methods, not aten ops)
# --------------------------------------------------------------------------------------------------

_POINTWISE = frozenset(
    {
        "add", "sub", "mul", "truediv", "div", "floordiv", "pow", "neg", "rsqrt", "sqrt", "exp",
        "log", "cos", "sin", "tanh", "sigmoid", "silu", "gelu", "relu", "erf", "abs", "clamp",
        "where", "maximum", "minimum", "float", "half", "bfloat16", "double", "contiguous", "clone",
        "__add__", "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__", "iadd", "imul",
        "square", "reciprocal", "sign", "softplus", "mish", "hardswish", "leaky_relu", "dropout",
        "addcmul", "addcdiv", "lerp",
    }
)  # fmt: skip
_DTYPE_ONLY = frozenset({"to", "type_as", "type"})  # later tensor args give a dtype/device only
_LIKE = frozenset({"empty_like", "zeros_like", "ones_like", "full_like"})  # the shape of arg 0
_REDUCE = frozenset({"mean", "sum", "amax", "amin", "var", "std", "norm", "prod"})
_SOFTMAX = frozenset({"softmax", "log_softmax"})
_SPLIT = frozenset({"chunk", "split", "tensor_split", "unbind"})
_SDPA = frozenset({"scaled_dot_product_attention"})


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return str(getattr(node.target, "__name__", node.target))


def _a(node: fx.Node) -> tuple[Any, ...]:
    # node.args typed loosely: FX's Argument union would need a cast at every read
    return tuple(node.args)


def _qkv(node: fx.Node) -> tuple[Any, Any, Any]:
    """An SDPA call's query, key and value, passed by position or by keyword (diffusers)."""
    args = _a(node)
    names = ("query", "key", "value")
    q, k, v = (args[i] if len(args) > i else node.kwargs.get(n) for i, n in enumerate(names))
    return q, k, v


def _val(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _is_tensor_node(a: Any) -> bool:
    return isinstance(a, fx.Node) and isinstance(_val(a), torch.Tensor)


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in _val(node).shape)


def _arg(node: fx.Node, i: int, key: str, default: Any = None) -> Any:
    if len(_a(node)) > i:
        return _a(node)[i]
    return node.kwargs.get(key, default)


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _mutates(node: fx.Node) -> bool:
    name = _name(node)
    return node.target is operator.setitem or (
        node.op == "call_method" and name.endswith("_") and not name.startswith("__")
    )


def _reshape_dim(src: Sequence[int], dst: Sequence[int], d: int) -> int | None:
    """The dim of ``dst`` that is dim ``d`` of ``src`` under a row-major reshape, or None when the
    reshape merges or splits it: the dim whose size and prefix product (elements before one step
    of it) equal dim ``d``'s."""
    before = math.prod(src[:d])
    for j in range(len(dst)):
        if math.prod(dst[:j]) == before and dst[j] == src[d]:
            return j
    return None


def _getitem_map(index: Any, rank: int) -> list[int | None] | None:
    """Output dim of each input dim under a basic ``tensor[index]`` (None: the dim is indexed by an
    int or sliced partially... only full slices keep a dim); None when the index is not basic."""
    idx = index if isinstance(index, tuple) else (index,)
    n_used = sum(1 for x in idx if x is not None and x is not Ellipsis)
    out: list[int | None] = []
    o = 0
    for x in idx:
        if x is None:
            o += 1
        elif x is Ellipsis:
            for _ in range(rank - n_used):
                out.append(o)
                o += 1
        elif isinstance(x, int):
            out.append(None)
        elif isinstance(x, slice) and x == slice(None, None, None):
            out.append(o)
            o += 1
        elif isinstance(x, slice):
            out.append(-1)  # a partial slice: the dim stays but its rows change
            o += 1
        else:
            return None
    while len(out) < rank:
        out.append(o)
        o += 1
    return out


# --------------------------------------------------------------------------------------------------
# Backward: where the token dim of a self-attention's queries is born
# --------------------------------------------------------------------------------------------------


def _inplace_pointwise(node: fx.Node) -> bool:
    """``x.add_(y)``, ``x.addcmul_(a, b)``: a pointwise op written into its first operand."""
    name = _name(node)
    return node.op == "call_method" and name.endswith("_") and name[:-1] in _POINTWISE


def _back(node: fx.Node, d: int) -> list[tuple[fx.Node, int]]:
    """The operand dims that dim ``d`` of ``node``'s output comes from, one step back; empty where
    the dim is created here (merged, split, or an op the rules do not follow). Several only for a
    pointwise op: its operands of the output's shape first, then those broadcast against it that
    have the dim at full size (a RoPE table ``[1, N, 1, d/2, 2]`` times a query ``[B, N, H, d/2, 1]``)."""
    if node.op not in ("call_function", "call_method"):
        return []
    name = _name(node)
    out = _shape(node) if _is_tensor_node(node) else None
    tensors = [a for a in _a(node) if _is_tensor_node(a)]
    if name in ("stack", "cat") and out is not None and isinstance(_a(node)[0], (list, tuple)):
        items = [a for a in _a(node)[0] if _is_tensor_node(a)]
        dim = _norm(int(_arg(node, 1, "dim", 0)), len(out))
        if not items or dim == d:
            return []
        return [(items[0], (d if name == "cat" or d < dim else d - 1))]
    if not tensors or out is None:
        if node.target is operator.getitem and isinstance(_a(node)[0], fx.Node):
            src = _a(node)[0]
            if isinstance(_val(src), (tuple, list)) and _a(src) and _is_tensor_node(_a(src)[0]):
                dim = _norm(int(_arg(src, 2 if _name(src) != "unbind" else 1, "dim", 0)), len(out or ()))
                if _name(src) in ("chunk", "split") and dim != d:
                    return [(_a(src)[0], d)]
        return []
    x = tensors[0]
    xs = _shape(x)
    if name in _LIKE:
        return [(x, d)]
    if name in _POINTWISE or name in _DTYPE_ONLY or _inplace_pointwise(node):
        kw = [a for a in node.kwargs.values() if _is_tensor_node(a)]
        cands = [x] if name in _DTYPE_ONLY else tensors + kw
        exact = [(t, d) for t in cands if _shape(t) == out]
        broadcast = []
        for t in cands:
            td = d - len(out) + len(_shape(t))  # broadcasting aligns the trailing dims
            if _shape(t) != out and td >= 0 and _shape(t)[td] == out[d] != 1:
                broadcast.append((t, td))
        return exact + broadcast
    if name in ("linear", "layer_norm", "rms_norm", "group_norm") and d < len(out) - 1:
        return [(x, d)]
    if name in _REDUCE and node.kwargs.get("keepdim", False):
        return [(x, d)]
    if name in ("transpose", "swapaxes"):
        a, b = (_norm(int(v), len(out)) for v in _a(node)[1:3])
        return [(x, (b if d == a else a if d == b else d))]
    if name == "permute":
        dims = _a(node)[1:] if not isinstance(_a(node)[1], (tuple, list)) else _a(node)[1]
        return [(x, _norm(int(dims[d]), len(out)))]
    if name == "unflatten":
        dim = _norm(int(_arg(node, 1, "dim")), len(xs))
        k = len(_arg(node, 2, "sizes"))
        if d < dim:
            return [(x, d)]
        if d >= dim + k:
            return [(x, d - k + 1)]
        return []
    if name == "flatten":
        s = _norm(int(_arg(node, 1, "start_dim", 0)), len(xs))
        e = _norm(int(_arg(node, 2, "end_dim", -1)), len(xs))
        if d < s:
            return [(x, d)]
        if d > s:
            return [(x, d + (e - s))]
        return [(x, d)] if e == s else []
    if name in ("reshape", "view"):
        back = _reshape_dim(out, xs, d)
        return [(x, back)] if back is not None else []
    if name == "getitem" and node.target is operator.getitem:
        mapping = _getitem_map(_a(node)[1], len(xs))
        if mapping is not None and d in mapping:
            return [(x, mapping.index(d))]
        return []
    if name in _SDPA:
        return [(x, d)]
    return []


def _origins(node: fx.Node, d: int) -> list[tuple[fx.Node, int]]:
    """Every (node, dim) where dim ``d`` of ``node`` may be born, following :func:`_back` depth
    first: the origin through the operands of the output's shape comes first."""
    found: list[tuple[fx.Node, int]] = []
    seen: set[tuple[fx.Node, int]] = set()
    stack = [(node, d)]
    while stack:
        at = stack.pop()
        if at in seen:
            continue
        seen.add(at)
        steps = _back(*at)
        if not steps:
            found.append(at)
        stack.extend(reversed(steps))
    return found


# --------------------------------------------------------------------------------------------------
# Forward: the rewrite
# --------------------------------------------------------------------------------------------------


class _Sharder:
    def __init__(self, gm: fx.GraphModule, sp: SequenceParallel) -> None:
        self.gm = gm
        self.g = gm.graph
        self.sp = sp
        self.dim: dict[fx.Node, int] = {}  # sharded node -> its token dim (tuples: every element's)
        self.sliced: dict[tuple[fx.Node, int], fx.Node] = {}
        self.gathered: dict[fx.Node, fx.Node] = {}
        self.report_sliced: list[str] = []
        self.report_gathered: list[tuple[str, str]] = []
        self.self_attn: list[str] = []
        self.cross_attn: list[str] = []
        self.tokens = 0

    # -- node builders -------------------------------------------------------------------------
    def _call(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> fx.Node:
        return self.g.call_function(target, args, kwargs or {})

    def _method(self, name: str, args: tuple[Any, ...]) -> fx.Node:
        return self.g.call_method(name, args)

    def _local(self) -> int:
        return self.tokens // self.sp.degree

    def narrow(self, node: fx.Node, d: int) -> fx.Node:
        key = (node, d)
        if key not in self.sliced:
            at = node
            if node.op == "placeholder":  # placeholders stay first: after the last one
                at = [n for n in self.g.nodes if n.op == "placeholder"][-1]
            with self.g.inserting_after(at):
                self.sliced[key] = self._call(
                    torch.narrow, (node, d, self.sp.rank * self._local(), self._local())
                )
            # Rules read the logical (unsharded) shapes; refresh_example_values sets the real ones.
            self.sliced[key].meta["example_value"] = _val(node)
            self.report_sliced.append(node.name)
        return self.sliced[key]

    def gather(self, node: fx.Node, why: fx.Node) -> fx.Node:
        if node not in self.gathered:
            d = self.dim[node]
            with self.g.inserting_before(why):
                # all_to_all of the shard repeated once per rank, not all_gather_into_tensor: the
                # same bytes on the wire, but gloo's all_gather fills a hidden temporary of the
                # output's size that its work object frees at no fixed time (measured: the
                # allocator peak of a call varied by that much from call to call), where the
                # repeated input here is a graph buffer the plan counts.
                front = self._method("movedim", (node, d, 0))
                reps = self._method(
                    "expand",
                    (self._method("unsqueeze", (front, 0)), self.sp.degree, *([-1] * len(_shape(node)))),
                )
                got = self.all_to_all(self._method("contiguous", (reps,)))
                flat = self._method("flatten", (got, 0, 1))
                self.gathered[node] = self._method("movedim", (flat, 0, d))
                self.gathered[node].meta["example_value"] = _val(node)
        self.report_gathered.append((node.name, why.name))
        return self.gathered[node]

    def all_to_all(self, x: fx.Node) -> fx.Node:
        return self._call(
            WAIT,
            (self._call(ALL_TO_ALL, (x, [1] * self.sp.degree, [1] * self.sp.degree, self.sp.group_name)),),
        )

    # -- rules ---------------------------------------------------------------------------------
    def gather_inputs(self, node: fx.Node) -> None:
        def fix(a: fx.Node) -> fx.Node:
            return self.gather(a, node) if a in self.dim else a

        node.args = fx.node.map_arg(_a(node), fix)
        node.kwargs = fx.node.map_arg(node.kwargs, fix)

    def pointwise(self, node: fx.Node, operands: list[fx.Node]) -> int | None:
        out_rank = len(_shape(node))
        dims = {self.dim[a] + out_rank - len(_shape(a)) for a in operands if a in self.dim}
        if len(dims) != 1:
            return None
        od = dims.pop()
        narrow: list[tuple[fx.Node, int]] = []
        for a in operands:
            if a in self.dim:
                continue
            ad = od - (out_rank - len(_shape(a)))
            if ad >= 0 and _shape(a)[ad] != 1:
                if _shape(a)[ad] != self.tokens:
                    return None  # before any edit: the caller gathers the unchanged node
                narrow.append((a, ad))
        for a, ad in narrow:
            node.replace_input_with(a, self.narrow(a, ad))
        return od

    def stack(self, node: fx.Node, name: str, rank: int) -> int | None:
        items = list(_a(node)[0])
        dim = _norm(int(_arg(node, 1, "dim", 0)), rank)
        sharded = [self.dim[a] for a in items if a in self.dim]
        if not sharded or len(set(sharded)) != 1:
            return None
        d = sharded[0]
        od = d if (name == "cat" or dim > d) else d + 1
        if name == "cat" and dim == d:
            return None
        new = []
        for a in items:
            if a in self.dim:
                new.append(a)
            elif _shape(a)[d] == self.tokens:
                new.append(self.narrow(a, d))
            else:
                return None
        node.update_arg(0, new)
        return od

    def rule(self, node: fx.Node) -> int | None:
        """This node's output token dim after making its operands agree; None: gather instead."""
        name = _name(node)
        out = _val(node)
        x = _a(node)[0] if _a(node) else None
        if node.target is operator.getitem and isinstance(_val(x), (tuple, list)):
            return self.dim.get(x)  # type: ignore[arg-type]
        if name in _POINTWISE and isinstance(out, torch.Tensor):
            operands = [a for a in (*_a(node), *node.kwargs.values()) if _is_tensor_node(a)]
            return self.pointwise(node, operands)
        if _inplace_pointwise(node) and isinstance(out, torch.Tensor):
            # Row-local when the tensor written is sharded (ComfyUI's RoPE: x_out.addcmul_(table, x)):
            # the other operands follow its rows. Into a replicated tensor: None, so the operands are
            # gathered and the whole value is written, as in one process.
            if x not in self.dim:
                return None
            operands = [a for a in (*_a(node), *node.kwargs.values()) if _is_tensor_node(a)]
            return self.pointwise(node, operands)
        if not isinstance(x, fx.Node) or x not in self.dim:
            if name in ("stack", "cat") and isinstance(out, torch.Tensor):
                return self.stack(node, name, out.dim())
            return None
        if name in _SPLIT and isinstance(x, fx.Node) and x in self.dim:
            default = 1 if name == "unbind" else 0
            dim = _norm(int(_arg(node, 1 if name == "unbind" else 2, "dim", default)), len(_shape(x)))
            d = self.dim[x]
            if dim == d:
                return None
            return d - 1 if name == "unbind" and dim < d else d
        if not isinstance(out, torch.Tensor):
            return None
        rank = out.dim()
        if name in _DTYPE_ONLY or name in _LIKE:  # x is sharded here (checked above)
            return self.dim[x]
        assert isinstance(x, fx.Node)
        d = self.dim[x]
        xs = _shape(x)
        others_sharded = any(a in self.dim for a in node.all_input_nodes if a is not x)
        if name in _SDPA:
            return self.attention(node)
        if others_sharded:
            return None
        if name in ("linear", "layer_norm", "rms_norm"):
            nd = 1 if name == "linear" else len(_arg(node, 1, "normalized_shape"))
            return d if d < len(xs) - nd else None
        if name == "group_norm":
            return None
        if name in _REDUCE or name in _SOFTMAX:
            dim = _arg(node, 1, "dim")
            if dim is None:
                return None
            dims = [_norm(int(v), len(xs)) for v in (dim if isinstance(dim, (tuple, list)) else (dim,))]
            if d in dims:
                return None
            if (
                name in _SOFTMAX
                or node.kwargs.get("keepdim", False)
                or (len(_a(node)) > 2 and _a(node)[2] is True)
            ):
                return d
            return d - sum(1 for v in dims if v < d)
        if name in ("transpose", "swapaxes"):
            a, b = (_norm(int(v), len(xs)) for v in _a(node)[1:3])
            return b if d == a else a if d == b else d
        if name == "permute":
            order_: Any = _a(node)[1:] if not isinstance(_a(node)[1], (tuple, list)) else _a(node)[1]
            return [_norm(int(v), len(xs)) for v in order_].index(d)
        if name == "movedim":
            order = list(range(len(xs)))
            src, dst = _norm(int(_a(node)[1]), len(xs)), _norm(int(_a(node)[2]), len(xs))
            order.insert(dst, order.pop(src))
            return order.index(d)
        if name == "unflatten":
            dim = _norm(int(_arg(node, 1, "dim")), len(xs))
            k = len(_arg(node, 2, "sizes"))
            if dim == d:
                return None
            return d if d < dim else d + k - 1
        if name == "flatten":
            s = _norm(int(_arg(node, 1, "start_dim", 0)), len(xs))
            e = _norm(int(_arg(node, 2, "end_dim", -1)), len(xs))
            if s <= d <= e and s != e:
                return None
            return d if d < s else d - (e - s) if d > e else d
        if name in ("unsqueeze", "squeeze"):
            dim = _arg(node, 1, "dim")
            if dim is None:
                return None
            dim = _norm(int(dim), rank if name == "unsqueeze" else len(xs))
            if name == "unsqueeze":
                return d + 1 if dim <= d else d
            return None if dim == d else (d - 1 if dim < d and xs[dim] == 1 else d)
        if name in ("reshape", "view") and node.op == "call_method":
            od = _reshape_dim(xs, _shape(node), d)
            if od is None:
                return None
            sizes = list(
                _a(node)[1] if len(_a(node)) == 2 and isinstance(_a(node)[1], (tuple, list)) else _a(node)[1:]
            )
            sizes[od] = -1 if -1 not in sizes else self._local()
            node.args = (x, *sizes)
            return od
        if name == "expand" and node.op == "call_method":
            sizes = list(
                _a(node)[1] if len(_a(node)) == 2 and isinstance(_a(node)[1], (tuple, list)) else _a(node)[1:]
            )
            od = d + (rank - len(xs))
            sizes[od] = -1
            node.args = (x, *sizes)
            return od
        if node.target is operator.getitem:
            mapping = _getitem_map(_a(node)[1], len(xs))
            if mapping is None or mapping[d] is None or mapping[d] == -1:
                return None
            return mapping[d]
        return None

    def refuse(self, node: fx.Node, why: str) -> SequenceParallelError:
        # A gather before an in-place op would write into the gathered copy: refused, never wrong.
        return SequenceParallelError(
            f"sequence parallelism cannot shard {node.name} ({_name(node)}): it {why}. Fix: compile "
            "without ulysses_degree, or write the op out of place"
        )

    def setitem(self, node: fx.Node) -> None:
        """``target[index] = value`` (diffusers' RoPE fills an ``empty_like`` by strided slices)."""
        target, index, value = _a(node)[:3]
        if target not in self.dim:
            self.gather_inputs(node)  # the write goes to the real (replicated) target, whole value
            return
        d = self.dim[target]
        rank = len(_shape(target))
        mapping = _getitem_map(index, rank)
        if mapping is None or mapping[d] is None or mapping[d] == -1:
            raise self.refuse(node, "writes into a sharded tensor through an index on the token dim")
        idx = index if isinstance(index, tuple) else (index,)
        out_rank = rank - sum(isinstance(i, int) for i in idx) + sum(i is None for i in idx)
        od = mapping[d]
        assert od is not None
        if _is_tensor_node(value):
            vrank = len(_shape(value))
            at = od - (out_rank - vrank)
            if value in self.dim:
                if self.dim[value] != at:
                    raise self.refuse(node, "writes a value sharded on another dim")
            elif at >= 0 and _shape(value)[at] != 1:
                if _shape(value)[at] != self.tokens:
                    raise self.refuse(node, "writes a value whose token dim does not match")
                node.replace_input_with(value, self.narrow(value, at))

    def attention(self, node: fx.Node) -> int | None:
        q, k, v = _qkv(node)
        extra: dict[Any, Any] = {
            **dict(enumerate(_a(node)[3:])),
            **{key: val for key, val in node.kwargs.items() if key not in ("query", "key", "value")},
        }
        if any(isinstance(val, fx.Node) for val in extra.values()) or extra.get("is_causal"):
            return None  # masks and causal attention are not split by heads here
        if not all(isinstance(t, fx.Node) for t in (q, k, v)):
            return None
        assert isinstance(q, fx.Node) and isinstance(k, fx.Node) and isinstance(v, fx.Node)
        qs = _shape(q)
        if len(qs) != 4 or self.dim.get(q) != 2:
            return None
        if k not in self.dim and v not in self.dim:
            self.cross_attn.append(node.name)
            return 2
        if self.dim.get(k) != 2 or self.dim.get(v) != 2:
            return None
        heads = qs[1]
        if heads % self.sp.degree or _shape(k)[1] != heads or _shape(v)[1] != heads:
            raise SequenceParallelError(
                f"ulysses_degree={self.sp.degree} does not divide the {heads} attention heads of "
                f"{node.name} (key/value heads {_shape(k)[1]}/{_shape(v)[1]}): Ulysses gives each rank "
                f"heads/degree heads. Fix: use a degree that divides {heads}"
            )
        b, p, hp = qs[0], self.sp.degree, heads // self.sp.degree
        with self.g.inserting_before(node):
            swapped = []
            for t in (q, k, v):
                ls, dh = self._local(), _shape(t)[3]
                r = self._method("reshape", (t, b, p, hp, ls, dh))
                a2a = self.all_to_all(
                    self._method("contiguous", (self._method("permute", (r, 1, 0, 2, 3, 4)),))
                )
                full = self._method(
                    "reshape", (self._method("permute", (a2a, 1, 2, 0, 3, 4)), b, hp, p * ls, dh)
                )
                swapped.append(full)
            node.args = (*swapped, *_a(node)[3:])
            node.kwargs = {
                key: val for key, val in node.kwargs.items() if key not in ("query", "key", "value")
            }
        users = list(node.users)
        with self.g.inserting_before(node.next):  # inserting_after would reverse their order
            ls, dh = self._local(), _shape(v)[3]
            r = self._method("reshape", (node, b, hp, p, ls, dh))
            a2a = self.all_to_all(self._method("contiguous", (self._method("permute", (r, 2, 0, 1, 3, 4)),)))
            back = self._method("reshape", (self._method("permute", (a2a, 1, 0, 2, 3, 4)), b, heads, ls, dh))
            back.meta["example_value"] = _val(node)
        for u in users:
            u.replace_input_with(node, back)
        self.self_attn.append(node.name)
        self.dim[back] = 2
        return None  # the SDPA node itself is unsharded in tokens; `back` carries the tokens

    # -- driver --------------------------------------------------------------------------------
    def run(self, origin: fx.Node, d: int) -> ShardReport:
        self.tokens = _shape(origin)[d]
        if self.tokens % self.sp.degree:
            raise SequenceParallelError(
                f"ulysses_degree={self.sp.degree} does not divide the {self.tokens} tokens of the "
                f"sequence (dim {d} of {origin.name}, shape {list(_shape(origin))}). Fix: pick a "
                f"video size whose token count is a multiple of {self.sp.degree}, or another degree"
            )
        users = list(origin.users)
        local = self.narrow(origin, d)
        for u in users:
            u.replace_input_with(origin, local)
        self.dim[local] = d
        nodes = list(self.g.nodes)
        start = nodes.index(local) + 1
        for node in nodes[start:]:
            if node.op == "output":
                self.gather_inputs(node)
                continue
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            if node in self.dim or node.target in COLLECTIVES:
                continue
            if not any(a in self.dim for a in node.all_input_nodes):
                continue
            if node.target is operator.setitem:
                self.setitem(node)
                continue
            if _name(node) in _SDPA:
                od = self.attention(node)
                if od is None and node.name in self.self_attn:
                    continue
            else:
                od = self.rule(node)
            if od is None:
                x = _a(node)[0] if _a(node) else None
                if _mutates(node) and x in self.dim:
                    raise self.refuse(node, "writes in place into a sharded tensor in a way not split here")
                self.gather_inputs(node)
            else:
                self.dim[node] = od
        return ShardReport(
            origin=origin.name,
            origin_dim=d,
            tokens=self.tokens,
            self_attention=tuple(self.self_attn),
            cross_attention=tuple(self.cross_attn),
            sliced=tuple(self.report_sliced),
            gathered=tuple(self.report_gathered),
        )


def lingering_bytes(gm: fx.GraphModule, device: torch.device) -> int:
    """Bytes a CPU (gloo) run may hold beyond what the graph says, for the plan's reserve.

    NOTE: gloo runs a collective on its own worker threads, which allocate and free some of the
    collective's buffers there, at times that race the graph's own thread. Measured with the
    allocator's events (tiny ViT, 2 ranks, 6 calls each): the peak of a call varied between calls
    by up to 3 times the input and output bytes of its largest all-to-all; keeping the buffers
    alive longer in the graph did not remove it. ``LINGER_FACTOR`` times that size is reserved on
    the CPU. NCCL (CUDA) buffers are the caching allocator's, freed in stream order: 0.
    """
    if device.type != "cpu":
        return 0
    largest = max(
        (collective_workspace(n, device) for n in gm.graph.nodes if n.target is ALL_TO_ALL), default=0
    )
    return LINGER_FACTOR * largest


#: See :func:`lingering_bytes`: the measured worst case (3) plus one.
LINGER_FACTOR = 4


def collective_workspace(node: fx.Node, device: torch.device) -> int:
    """Bytes a collective of this pass allocates beside its output while it runs, on ``device``.

    Measured with torch's CPU allocator events (gloo, torch 2.13, 2 processes): gloo's
    ``all_gather_into_tensor`` fills a temporary of the output's size and copies it into the
    output, after a transient copy of the input; ``all_to_all_single`` allocated nothing beside its
    output, but the input's size is counted too so that a copy in another gloo version stays within
    the plan. NCCL (CUDA) writes into the output and keeps its scratch outside the caching
    allocator: 0.
    """
    if device.type != "cpu" or node.target not in (ALL_GATHER, ALL_TO_ALL):
        return 0
    out = _val(node)
    inp = _val(_a(node)[0]) if _a(node) else None
    nbytes = sum(t.untyped_storage().nbytes() for t in (out, inp) if isinstance(t, torch.Tensor))
    return int(nbytes)


def find_token_origin(gm: fx.GraphModule) -> tuple[fx.Node, int]:
    """The node and dim where the first self-attention's query tokens are born.

    A self-attention is an SDPA whose query, key and value follow back (:func:`_back`) to a shared
    origin along their token dim (dim 2 of ``[B, H, L, d]``); cross-attention's keys lead to the
    text instead.

    Raises:
        SequenceParallelError: the graph has no self-attention.
    """
    for node in gm.graph.nodes:
        if node.op == "call_function" and _name(node) in _SDPA:
            q, k, v = _qkv(node)
            if not all(_is_tensor_node(t) and len(_shape(t)) == 4 for t in (q, k, v)):
                continue
            # q's origins in order; the first that k and v share (a RoPE table's origin is q's
            # and k's only, the text is k's and v's of a cross-attention: never all three)
            of_k, of_v = set(_origins(k, 2)), set(_origins(v, 2))
            shared = [o for o in _origins(q, 2) if o in of_k and o in of_v]
            if shared:
                return shared[0]
    raise SequenceParallelError(
        "sequence parallelism found no self-attention (scaled_dot_product_attention whose query, key "
        "and value come from one token sequence) in the captured graph, so there is no token dim to "
        "shard. Fix: compile without ulysses_degree, or use F.scaled_dot_product_attention"
    )


def shard_sequence(gm: fx.GraphModule, sp: SequenceParallel) -> ShardReport:
    """Rewrite ``gm`` in place into rank ``sp.rank``'s program of ``sp.degree``-way sequence
    parallelism (module docstring: the before/after example), and refresh every node's
    ``meta['example_value']`` to the rank's shapes.

    Raises:
        SequenceParallelError: no self-attention; ``sp.degree`` does not divide the heads of a
            self-attention or the token count (both named).
    """
    origin, d = find_token_origin(gm)
    report = _Sharder(gm, sp).run(origin, d)
    # An in-place method whose result is unused (ComfyUI's RoPE: x_out.addcmul_(...), then x_out
    # read) looks dead to FX's default test, which knows only side-effectful functions.
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or _mutates(n))
    gm.graph.lint()
    gm.recompile()
    refresh_example_values(gm)
    # each all-to-all's input is [degree, ...]: chunk r goes to rank r, this rank's own stays
    sent = tuple(
        int(_val(n.args[0]).untyped_storage().nbytes()) * (sp.degree - 1) // sp.degree
        for n in gm.graph.nodes
        if n.target is ALL_TO_ALL and isinstance(n.args[0], fx.Node)
    )
    return dataclasses.replace(report, alltoall_sent=sent)


def refresh_example_values(gm: fx.GraphModule) -> None:
    """Re-run ``gm`` on fake tensors (its placeholders' recorded values) and store every node's
    result as ``meta['example_value']``: the shapes the analyse pass reads after a rewrite."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # One device for all: the block capture records its inlined weights on meta whatever the
    # inputs' device (the graph's device constants follow the inputs).
    devices = [v.device for n in placeholders if isinstance(v := _val(n), torch.Tensor)]
    device = next((d for d in devices if d.type != "meta"), torch.device("meta"))

    def fake(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            with mode:  # fresh fakes of the recorded shapes (Dynamo's fakes belong to its own mode)
                return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device)
        return v

    inputs = [fake(_val(n)) for n in placeholders]

    class _Record(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n.op != "output":
                n.meta["example_value"] = result
            return result

    with mode:
        _Record(gm).run(*inputs)
