"""Rewrite pass: decode each weight kept as stored (``fxswap.stored``) right before its first reader.

After :func:`fxswap.passes.rewrite.insert_swaps`, a stored weight reaches the graph as its stored
bytes: from a unit's ``wait`` (swapped) or as a graph input (resident). This pass puts one
``fxswap::dequant`` before the first reader of each such value and hands it every reader::

    ws = torch.ops.fxswap.wait.default(-7, tok)
    w0 = ws[0]                                                   # uint8 blocks, as stored
    d0 = torch.ops.fxswap.dequant.default(w0, 'Q4_K', [5120, 5120], torch.bfloat16, None)
    y = torch._C._nn.linear(x, d0)                               # d0 dies after its last reader

NOTE (why before the first reader, not all at the wait): the unit then holds its stored bytes over its
window (the ``wait`` list keeps them until ``release``) and only the decoded tensors between their
first and last readers: for a block of Linear layers, one decoded weight at a time beside the
stored block, instead of the whole block decoded. That is the memory the planner counts
(:func:`fxswap.passes.analyse.stored_storage`). A weight several units load (reloads) is decoded
once per copy, before that copy's first reader.

A weight whose spec carries a ``patch`` handle (the runtime's ``decoded_patch``: a LoRA on a GGUF
weight in ComfyUI) gets ``fxswap::patch`` right after its decode, and the readers take its output.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxswap import ops

__all__ = ["DequantSpec", "insert_dequant", "placeholder_weights"]


@dataclass(frozen=True, slots=True)
class DequantSpec:
    """How one weight is stored: what ``fxswap::dequant`` takes besides the data, and the data's
    own shape and dtype (what the graph now receives in the weight's place)."""

    qtype: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    scale: float | None
    data_shape: tuple[int, ...]
    data_dtype: torch.dtype
    patch: int | None = None  # an fxswap::patch handle applied to the decoded weight (a LoRA merge)


def insert_dequant(
    gm: fx.GraphModule,
    placeholder_weights: Mapping[str, str],
    stored: Mapping[str, DequantSpec],
) -> int:
    """Insert ``fxswap::dequant`` for every stored weight of ``gm`` (a rewritten graph, edited in
    place and recompiled); return how many were inserted.

    Args:
        gm: the output of ``insert_swaps``.
        placeholder_weights: placeholder name -> weight name, for the graph inputs that are weights.
        stored: weight name -> how it is stored; other weights are left alone.
    """
    graph = gm.graph
    pos = {n: i for i, n in enumerate(graph.nodes)}
    sources: list[tuple[fx.Node, str]] = []
    for n in graph.nodes:
        if n.op == "placeholder":
            w = placeholder_weights.get(n.name)
        elif n.op == "call_function" and n.target is operator.getitem and _from_wait(n):
            w = n.meta.get("fxswap_weight")
        else:
            continue
        if isinstance(w, str) and w in stored and n.users:
            sources.append((n, w))
    for src, w in sources:
        spec = stored[w]
        first = min(src.users, key=pos.__getitem__)
        with graph.inserting_before(first):
            d = graph.call_function(ops.dequant, (src, spec.qtype, list(spec.shape), spec.dtype, spec.scale))
        decoded = src.meta.get("example_value", src.meta.get("val"))
        d.meta["example_value"] = decoded
        # The source now carries the stored data: the region compiler and Inductor read its shape
        # and dtype from here. A fresh dict: a placeholder's meta is shared with Dynamo's graph.
        src.meta = {k: v for k, v in src.meta.items() if k != "val"}
        src.meta["example_value"] = _like(decoded, spec.data_shape, spec.data_dtype)
        d.meta["fxswap"] = {"kind": "dequant", "weight": w}
        # The reader's module: the regions pass puts the decode in its reader's block (unlabelled,
        # a decode at a block's first op would form a region of its own between two blocks).
        if "nn_module_stack" in first.meta:
            d.meta["nn_module_stack"] = first.meta["nn_module_stack"]
        src.replace_all_uses_with(d, delete_user_cb=_not(d))
        if spec.patch is not None:
            # the readers take the patched weight; the decoded one dies at the patch
            with graph.inserting_after(d):
                pt = graph.call_function(ops.patch, (d, spec.patch))
            pt.meta = {**d.meta, "fxswap": {"kind": "patch", "weight": w}}
            d.replace_all_uses_with(pt, delete_user_cb=_not(pt))
    if sources:
        graph.lint()
        gm.recompile()
    return len(sources)


def _like(decoded: Any, shape: tuple[int, ...], dtype: torch.dtype) -> Any:
    """A tensor of ``shape`` and ``dtype`` in the same (fake) mode and on the device of ``decoded``."""
    if not isinstance(decoded, torch.Tensor):
        return None
    mode = getattr(decoded, "fake_mode", None)
    ctx = mode if mode is not None else contextlib.nullcontext()
    with ctx:
        return torch.empty(shape, dtype=dtype, device=decoded.device)


def _not(node: fx.Node) -> Callable[[fx.Node], bool]:
    return lambda user: user is not node


def _from_wait(n: fx.Node) -> bool:
    a: Any = n.args[0] if n.args else None
    return isinstance(a, fx.Node) and a.target is ops.wait


def placeholder_weights(gm: fx.GraphModule, params: Sequence[str | None]) -> dict[str, str]:
    """Placeholder name -> weight name for a capture's graph (whose placeholders ``params`` names in
    order; None for user inputs): the rewritten graph keeps the names of the placeholders it keeps."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {ph.name: p for ph, p in zip(phs, params, strict=True) if p is not None}
