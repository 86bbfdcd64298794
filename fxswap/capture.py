"""Capture: one FX graph of a model's forward, with every weight named, as a :class:`GraphIR`.

The graph comes from ``torch.compile(..., backend=<capturing backend>, fullgraph=True,
dynamic=False)``, the path that ends in Inductor, so the runtime can rewrite this very
GraphModule. Parameters and buffers arrive as placeholders (``inline_inbuilt_nn_modules``) and
are named by *object identity* against ``named_parameters()`` / ``named_buffers()``; Dynamo's
mangled placeholder names are never parsed for that.

The capturing backend never runs the graph: it hands Dynamo a stub that raises a private
sentinel, so tracing a real model costs no compute and no activation memory.

Each trace compiles a fresh copy of a small entry function (a new code object), so Dynamo's
per-code cache starts empty, repeated traces of the same model really re-trace, and nothing is
left in the user's compile caches when the copy is dropped.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import time
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxswap import block_capture
from fxswap.errors import CaptureError
from fxswap.ir import GraphIR
from fxswap.passes.analyse import graph_ir, module_path, placeholder_roles
from fxswap.passes.device_rules import apply_rules
from fxswap.workspace import device_rules_for, probe_workspace, rules_for, with_workspace

logger = logging.getLogger("fxswap.capture")

__all__ = ["DynamoGraph", "Traced", "dynamo_graph", "input_names", "one_graph", "trace"]


@dataclass(frozen=True)
class Traced:
    """The result of :func:`trace`.

    ``gm`` is Dynamo's GraphModule (kept as is for the runtime rewrite), ``example_inputs`` the
    flat list Dynamo passed to the backend (parameters are the model's own Parameter objects),
    ``placeholder_params`` the weight FQN per placeholder position (None for user inputs),
    ``placeholder_names`` a readable name per position (the FQN, or e.g. ``context[0]``).
    """

    gm: fx.GraphModule
    example_inputs: list[Any]
    placeholder_params: tuple[str | None, ...]
    placeholder_names: tuple[str, ...]
    ir: GraphIR
    capture_seconds: float


class _CaptureDone(Exception):
    """Raised by the stub the capturing backend returns, to stop before the graph would run."""


def _entry(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return model(*args, **kwargs)


_CAPTURE_IDS = itertools.count()


def _fresh_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    # A new code object per capture: Dynamo's per-code cache (and its recompile limit) starts
    # empty; see the module docstring.
    code = fn.__code__.replace(co_name=f"_fxswap_capture_{next(_CAPTURE_IDS)}")
    return types.FunctionType(code, fn.__globals__, code.co_name)


def input_names(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[int, str]:
    """id(tensor) -> readable name (e.g. ``context[0]``) for every tensor in a call's inputs.

    Shared by :func:`trace` and ``fxswap.compile``, so both name a graph's inputs alike (a plan made
    by ``fxswap.plan`` then fingerprints equal to the compiled call's graph).
    """
    named: dict[str, Any] = {}
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        for pname, value in bound.arguments.items():
            kind = bound.signature.parameters[pname].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                named.update({f"{pname}[{i}]": v for i, v in enumerate(value)})
            else:
                named[pname] = value
    except (TypeError, ValueError):
        named = {f"args[{i}]": a for i, a in enumerate(args)} | dict(kwargs)
    out: dict[int, str] = {}
    for pname, value in named.items():
        leaves, _ = pytree.tree_flatten_with_path(value)
        for path, leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                out.setdefault(id(leaf), pname + pytree.keystr(path))
    return out


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    stack = getattr(exc, "real_stack", None)
    if stack:
        return list(stack)[-1]
    frame = getattr(exc, "innermost_user_frame_summary", None)
    if isinstance(frame, traceback.FrameSummary):
        return frame
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    user = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(torch_dir) and f.filename != __file__
    ]
    return user[-1] if user else None


def _reason(exc: BaseException) -> str:
    msg = str(getattr(exc, "msg", "") or exc)
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    for ln in lines:
        at = ln.find("Could not guard on data-dependent")
        if at >= 0:
            return ln[at:].split(" (unhinted", 1)[0]
        if "data dependent" in ln.lower():
            return ln
    gb_type = getattr(exc, "gb_type", None)
    explanation = next(
        (ln.removeprefix("Explanation:").strip() for ln in lines if ln.startswith("Explanation:")), ""
    )
    if gb_type:
        return f"{gb_type}" + (f" ({explanation})" if explanation else "")
    head = lines[0] if lines else type(exc).__name__
    return head + (f" ({explanation})" if explanation and explanation not in head else "")


def _capture_error(exc: BaseException, model: torch.nn.Module, caller: str) -> CaptureError:
    frame = _user_frame(exc)
    where = "an unknown source line"
    if frame is not None:
        code = (frame.line or "").strip()
        where = f"{frame.filename}:{frame.lineno} in {frame.name}" + (f": `{code}`" if code else "")
    return CaptureError(
        f"{caller} could not capture {type(model).__name__} as one graph: {_reason(exc)} "
        f"[{type(exc).__name__}] at {where}. Fix: make that line traceable (keep shapes as Python ints "
        "instead of calling .tolist()/.item(), drop print/graph_break, avoid data-dependent control "
        "flow) so the whole forward compiles with fullgraph=True."
    )


_T = TypeVar("_T")


def one_graph(captured: Sequence[_T], model: torch.nn.Module, caller: str) -> _T:
    """The one graph a capturing backend collected; :class:`CaptureError` when Dynamo gave 0 or several.

    Used by :func:`dynamo_graph`, the capture behind :func:`trace` and ``fxswap.compile``.

    Args:
        captured: what the backend was handed, one entry per graph Dynamo produced.
        model: the module being captured (named in the message).
        caller: the public function to name in the message, e.g. "fxswap.trace".
    """
    if len(captured) != 1:
        raise CaptureError(
            f"{caller} expected exactly one graph from {type(model).__name__} but Dynamo produced "
            f"{len(captured)}; a forward with no tensor operations, or one Dynamo skips, cannot be planned. "
            f"Fix: call {caller} on the module whose forward does the tensor work."
        )
    return captured[0]


@dataclass(frozen=True)
class DynamoGraph:
    """What :func:`dynamo_graph` captured: the one graph and the call around it."""

    gm: fx.GraphModule
    inputs: list[Any]  # the flat inputs Dynamo passed to the backend, in placeholder order
    result: Any  # what the call returned (None unless the graph ran)
    outputs: list[Any]  # the graph's outputs (empty unless the graph ran)


def dynamo_graph(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    model: torch.nn.Module,
    caller: str,
    *,
    run: bool | str = False,
    blocks: bool = False,
) -> DynamoGraph:
    """Capture ``fn(*args)`` as one Dynamo graph (``fullgraph=True``, ``dynamic=False``, no grad).

    The one capture mechanism of :func:`trace` and ``fxswap.compile``: ``fn`` is compiled as a fresh
    copy (see the module docstring) with a backend that collects the graph.

    Args:
        fn: the entry function that calls ``model``.
        args: its arguments.
        model: the module being captured (named in errors).
        caller: the public function to name in errors, e.g. "fxswap.trace".
        run: run the graph on ``args`` (e.g. meta tensors) to get ``result`` and ``outputs``;
            False stops before the graph would run (no compute, no activation memory); "fake"
            runs it on fake tensors (the outputs' structure, no compute).
        blocks: ``fn`` is called as ``fn(model, args, kwargs)``; trace each repeated block of the
            model once and inline it (:mod:`fxswap.block_capture`), falling back to tracing the
            whole call where that does not apply. The graph is the same either way.

    Raises:
        CaptureError: the call does not compile to exactly one graph (the break and its line named).
    """
    if blocks and block_capture.enabled():
        try:
            return block_capture.capture_with_blocks(
                lambda f, a, m: dynamo_graph(f, a, m, caller, run=run if m is model else "fake"),
                fn,
                args[0],
                args[1],
                args[2],
            )
        except Exception as exc:  # the whole-model capture below is the reference; it reports errors
            logger.debug("fxswap: block capture of %s not used: %s", type(model).__name__, exc)
    captured: list[tuple[fx.GraphModule, list[Any]]] = []
    outputs: list[Any] = []

    def backend(gm: fx.GraphModule, inputs: list[Any]) -> Callable[..., Any]:
        captured.append((gm, list(inputs)))

        def stub(*_args: Any) -> Any:
            raise _CaptureDone

        def run_graph(*a: Any) -> Any:
            if run == "fake":
                from torch._subclasses.fake_tensor import FakeTensorMode

                with FakeTensorMode(allow_non_fake_inputs=True):
                    out = gm(*a)
            else:
                out = gm(*a)
            outputs.extend(out)
            return out

        return run_graph if run else stub

    result = None
    try:
        with torch.no_grad():
            result = torch.compile(_fresh_copy(fn), backend=backend, fullgraph=True, dynamic=False)(*args)
    except _CaptureDone:
        pass
    except Exception as exc:
        raise _capture_error(exc, model, caller) from exc
    gm, inputs = one_graph(captured, model, caller)
    return DynamoGraph(gm, inputs, result, outputs)


def trace(model: torch.nn.Module, *example_inputs: Any, **example_kwargs: Any) -> Traced:
    """Capture ``model(*example_inputs, **example_kwargs)`` as one FX graph, without running it.

    Works on real or ``meta`` tensors. Inference only: runs under ``torch.no_grad()`` with every
    parameter's ``requires_grad`` set to False for the duration and restored afterwards.
    Raises :class:`fxswap.CaptureError` (naming the break and its source line) when the forward
    does not compile to a single graph.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; pass the module itself"
        )

    grad_state = [(p, p.requires_grad) for p in model.parameters()]
    start = time.perf_counter()
    try:
        for p, _ in grad_state:
            p.requires_grad_(False)
        graph = dynamo_graph(
            _entry, (model, example_inputs, example_kwargs), model, "fxswap.trace", blocks=True
        )
    finally:
        for p, req in grad_state:
            p.requires_grad_(req)
    capture_seconds = time.perf_counter() - start
    gm, flat_inputs = graph.gm, graph.inputs

    fqn: dict[int, str] = {}
    for name, b in model.named_buffers():
        fqn.setdefault(id(b), name)
    for name, p in model.named_parameters():
        fqn.setdefault(id(p), name)
    user_names = input_names(model, example_inputs, example_kwargs)

    def unknown(i: int, ph: fx.Node) -> str:
        # A plain tensor attribute of the model (not a registered buffer) or a global.
        source = getattr(ph, "_dynamo_source", None)
        return (module_path(source.name) if source is not None else ph.name) or f"input{i}"

    roles = placeholder_roles(gm, flat_inputs, fqn, user_names, unknown)

    # Op workspace: measured where the inputs live (as fxswap.compile does on its device), or, for
    # meta inputs where nothing can run, from the documented CUDA rules (fxswap.workspace). On a
    # real device the IR is also sized by that device's rules (passes.device_rules), as
    # fxswap.compile sizes it, so that a plan made here is the plan compile makes and accepts.
    devices = {
        t.device for t in pytree.tree_leaves((example_inputs, example_kwargs)) if isinstance(t, torch.Tensor)
    }
    if len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda"):
        dev = next(iter(devices))
        ir = apply_rules(with_workspace(graph_ir(gm, roles), probe_workspace(gm, dev)), device_rules_for(dev))
    else:
        ir = with_workspace(graph_ir(gm, roles), rules_for(gm))
    return Traced(
        gm=gm,
        example_inputs=flat_inputs,
        placeholder_params=tuple(r.weight for r in roles),
        placeholder_names=tuple(r.name for r in roles),
        ir=ir,
        capture_seconds=capture_seconds,
    )
