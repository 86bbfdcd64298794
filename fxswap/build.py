"""Build time of ``fxswap.compile``: capture, plan (or check the given plan), register the units,
rewrite the graph and compile it, for one input signature.

Per input signature (shapes, dtypes, devices and non-tensor values of the call's arguments)::

    capture (Dynamo, fullgraph, on meta: no weight touches the device)
      -> GraphIR -> plan (or the given plan, checked against the graph)
      -> SwapRuntime.add_unit(...) per swapped unit (host copies)
      -> passes.rewrite.insert_swaps (on a copy of the graph)
      -> eager: run the rewritten FX graph | inductor: each distinct region compiled once
         (fxswap.regional: the prologue, the repeated blocks, the epilogue)

NOTE (why the capture runs on meta): Dynamo would pass the model's own parameters as graph inputs,
so the model would have to live on the device for tracing and guards. fxswap keeps the model
untouched on the host; the graph's inputs are the user's tensors plus the runtime's resident device
copies. The capture runs on ``meta`` copies of the weights and inputs, swapped into the module for
the duration of the trace (torch's ``_reparametrize_module``, what ``functional_call`` uses); device
constants the graph baked in (``device='meta'``) are retargeted.

The rewritten graph is the same for the same model and plan, in every build and process: its units
carry build-local ids (negative, from their position and shapes: :func:`graph_unit_id`), resolved
through the table :func:`fxswap.ops.bound_units` binds around each run, not the process-wide
registry's. Inductor's FX graph cache then hits across processes.

Call time (binding arguments, guards, residents, out-of-memory recovery) is in
:mod:`fxswap.compiled`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxswap import ops
from fxswap.capture import dynamo_graph, input_names
from fxswap.errors import CaptureError, DeviceError, PlanError
from fxswap.fit import Built, account, fit
from fxswap.ir import GraphIR
from fxswap.options import MiB, PlanOptions
from fxswap.passes.analyse import graph_ir, placeholder_roles, stored_storage
from fxswap.passes.dequant import DequantSpec, insert_dequant, placeholder_weights
from fxswap.passes.device_rules import apply_rules
from fxswap.passes.sequence_parallel import SequenceParallel
from fxswap.regional import (
    compile_inductor,
    compile_regional,
    input_layout,
    regions_enabled,
    significant_strides,
)
from fxswap.runtime import SwapRuntime, default_device
from fxswap.stored import attach, stored_weights
from fxswap.swapplan import SwapPlan, fingerprint_parts
from fxswap.workspace import device_rules_for, probe_workspace, with_workspace

__all__ = [
    "BACKENDS",
    "Builder",
    "Capture",
    "Entry",
    "capture_call",
    "clear_capture_cache",
    "compile_inductor",
    "graph_unit_id",
    "host_line",
    "input_buffer_names",
    "measured_ir",
    "resolve_device",
    "retarget",
    "signature",
    "tensor_signature",
]

logger = logging.getLogger("fxswap.compiler")

BACKENDS = ("inductor", "eager")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The device to compile for: the given one checked (:class:`fxswap.DeviceError` naming it), or
    the current CUDA device, else the CPU."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(
            f"`device`={device!r} is not a device: {e}. Fix: pass e.g. 'cuda', 'cuda:0' or 'cpu'"
        ) from e
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        idx = dev.index if dev.index is not None else 0
        if idx >= n:
            raise DeviceError(
                f"`device`={device!r} does not exist: this process sees {n} CUDA device(s). "
                "Fix: pass device='cpu', or an index below the device count."
            )
        return torch.device("cuda", idx)
    raise DeviceError(
        f"`device`={device!r}: fxswap supports 'cuda' and 'cpu' devices. Fix: pass one of those"
    )


def signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    """A call's input signature: its structure, each tensor's shape, layout, dtype and device type,
    and every other value (by hash, else by repr). One capture and plan per signature.

    The layout is the strides of the dimensions longer than 1 (those of the others address nothing,
    and Inductor's own asserts ignore them): the capture is traced with the call's strides, and the
    compiled regions assume the layouts they were built for (they run without per-input asserts,
    see ``fxswap.regional.REGION_CONFIG``), so a transposed or sliced input of the same shape is a
    new signature, as it is a recompile for ``torch.compile``."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    key: list[Hashable] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append(("T", *tensor_signature(leaf)))
        else:
            try:
                hash(leaf)
                key.append(("V", type(leaf).__name__, leaf))
            except TypeError:
                key.append(("V", type(leaf).__name__, repr(leaf)))
    return tuple(key)


def tensor_signature(t: torch.Tensor) -> tuple[Hashable, ...]:
    """One tensor's part of a call's signature (:func:`signature`): shape, layout (the strides of
    the dimensions longer than 1; a sparse or other non-strided tensor's layout kind), dtype and
    device type."""
    if t.layout == torch.strided:
        layout: Hashable = significant_strides(t.shape, t.stride())
    else:
        layout = str(t.layout)
    return (tuple(t.shape), layout, t.dtype, t.device.type)


def _entry(model: torch.nn.Module, args: Any, kwargs: Any) -> Any:
    return model(*args, **kwargs)


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    return x


def retarget(gm: fx.GraphModule, device: torch.device, source: torch.device | None = None) -> None:
    """Point the device constants the graph baked in (``torch.arange(..., device=...)``) from
    ``source`` (default ``meta``, where fxswap.compile captures) to ``device``."""
    src = source if source is not None else torch.device("meta")

    def fix(a: Any) -> Any:
        if isinstance(a, torch.device) and a == src:
            return device
        if isinstance(a, str) and a == str(src):
            return str(device)
        return a

    for n in gm.graph.nodes:
        n.args = fx.node.map_aggregate(n.args, fix)
        n.kwargs = fx.node.map_aggregate(n.kwargs, fix)


@dataclass
class Capture:
    """One capture of a call (see :func:`capture_call`): the graph, what each placeholder is, how
    to read the user's inputs from a call and rebuild its outputs, and the graph's IR."""

    gm: fx.GraphModule
    placeholder_params: tuple[str | None, ...]
    input_getters: tuple[Callable[[dict[str, Any]], Any] | None, ...]  # per placeholder; None: weight
    out_spec: pytree.TreeSpec
    out_slots: tuple[int | None, ...]  # per output leaf: graph output index, or None (constant)
    out_consts: tuple[Any, ...]
    ir: GraphIR
    # Measured op workspace on the capture's device (fxswap.workspace), probed on the first build.
    workspace: dict[str, int] | None = None


def measured_ir(cap: Capture, device: torch.device) -> GraphIR:
    """The capture's IR with each op's workspace measured on ``device`` (probed once per capture),
    and sized as ``device``'s allocator and libraries hold it (``passes.device_rules``; the CPU's
    rules change nothing)."""
    if cap.workspace is None:
        cap.workspace = probe_workspace(cap.gm, device)
    return apply_rules(with_workspace(cap.ir, cap.workspace), device_rules_for(device))


def input_buffer_names(cap: Capture) -> set[str]:
    """The IR buffers of the caller's inputs (named after their placeholders by
    ``passes.analyse.graph_ir``): held for the whole call."""
    placeholders = [n for n in cap.gm.graph.nodes if n.op == "placeholder"]
    return {n.name for n, fqn in zip(placeholders, cap.placeholder_params, strict=True) if fqn is None}


def _getter(path: list[Any]) -> Callable[[dict[str, Any]], Any]:
    def get(root: dict[str, Any]) -> Any:
        v: Any = root
        for k in path:
            v = v[k]
        return v

    return get


# NOTE: a capture depends only on the model's code, its weights' names/shapes/dtypes and the call
# signature, so compiling one model several times (other budgets, modes, experts benchmarks) reuses
# it: Dynamo tracing is by far the slowest step of planning (seconds for WAN; planning takes ms).
# Weak keys: the cache dies with the model. clear_capture_cache() drops it (e.g. after editing code).
_CAPTURES: weakref.WeakKeyDictionary[torch.nn.Module, dict[Hashable, Capture]] = weakref.WeakKeyDictionary()


def clear_capture_cache() -> None:
    """Forget every cached capture (they are re-traced on the next first call)."""
    _CAPTURES.clear()


def capture_call(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    device: torch.device,
    param_names: Sequence[str] | None = None,
    parallel: SequenceParallel | None = None,
) -> tuple[Capture, bool]:
    """The capture of ``model(*args, **kwargs)`` for ``device``, and whether it was traced now
    (False: served from the per-model cache, see ``_CAPTURES``). With ``parallel``, the graph is
    this rank's sequence-parallel program (:mod:`fxswap.passes.sequence_parallel`)."""
    weights = tuple(
        (k, tuple(v.shape), v.dtype)
        for k, v in itertools.chain(model.named_parameters(), model.named_buffers())
    )
    key = (signature(args, kwargs), weights, str(device), model.training, param_names is None, parallel)
    per_model = _CAPTURES.setdefault(model, {})
    hit = per_model.get(key)
    if hit is not None:
        return hit, False
    cap = _trace_on_meta(model, args, kwargs, device, param_names, parallel)
    per_model[key] = cap
    return cap, True


def _trace_on_meta(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    device: torch.device,
    param_names: Sequence[str] | None,
    parallel: SequenceParallel | None = None,
) -> Capture:
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    meta_state = {k: _to_meta(v) for k, v in named.items()}
    meta_args, meta_kwargs = pytree.tree_map(_to_meta, (args, kwargs))
    # NOTE: the meta weights are swapped into the module here, outside the compiled function.
    # Called through torch.func.functional_call inside it, Dynamo traced the swap of every tensor
    # (1,100 for a 40-block WAN): a third of the capture's time, for nothing in the graph.
    with torch.nn.utils.stateless._reparametrize_module(model, meta_state, tie_weights=True):
        graph = dynamo_graph(
            _entry, (model, meta_args, meta_kwargs), model, "fxswap.compile", run=True, blocks=True
        )
    gm, flat = graph.gm, graph.inputs
    fqn_of = {id(t): k for k, t in meta_state.items()}
    # Where each user-input tensor sits in (args, kwargs): Dynamo's flat inputs are those objects.
    path_of: dict[int, list[Any]] = {}
    for path, leaf in pytree.tree_flatten_with_path({"args": meta_args, "kwargs": meta_kwargs})[0]:
        if isinstance(leaf, torch.Tensor):
            path_of.setdefault(id(leaf), [getattr(k, "key", getattr(k, "idx", None)) for k in path])
    # getters read the canonical, all-keyword form of a call (see SwapModule._canonical)
    if param_names is not None:
        path_of = {
            k: (["kwargs", param_names[p[1]], *p[2:]] if p[0] == "args" else p) for k, p in path_of.items()
        }
    # Same readable input names as fxswap.trace, so a plan made by fxswap.plan fingerprints equal.
    names = input_names(model, meta_args, meta_kwargs)
    name_of = {k: names.get(k, ".".join(str(x) for x in p)) for k, p in path_of.items()}

    def unknown(i: int, ph: fx.Node) -> str:
        raise CaptureError(
            f"graph input {i} of {type(model).__name__} is neither a registered parameter/buffer nor a "
            "call argument (a plain tensor attribute or a global?). Fix: register it with "
            "`register_buffer(..., persistent=False)` so fxswap can place it."
        )

    roles = placeholder_roles(gm, flat, fqn_of, name_of, unknown)
    if parallel is not None:
        # After the outputs were matched by identity above (the pass keeps the output structure,
        # gathered to full shape), before analyse reads the shapes: the IR is this rank's.
        from fxswap.passes.sequence_parallel import shard_sequence

        report = shard_sequence(gm, parallel)
        logger.info("fxswap: sequence parallel rank %d/%d: %s", parallel.rank, parallel.degree, report)
    getters = [
        None if r.weight is not None else _getter(path_of[id(v)]) for r, v in zip(roles, flat, strict=True)
    ]
    leaves, spec = pytree.tree_flatten(graph.result)
    index = {id(t): j for j, t in enumerate(graph.outputs)}
    slots: list[int | None] = []
    consts: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if id(leaf) not in index:
                raise CaptureError(
                    f"an output tensor of {type(model).__name__} is not a graph output (an input or weight "
                    "returned as is?); fxswap cannot reconstruct it. Fix: return computed tensors only."
                )
            slots.append(index[id(leaf)])
            consts.append(None)
        elif leaf is None or isinstance(leaf, (int, float, bool, str, torch.dtype, torch.device)):
            slots.append(None)
            consts.append(leaf)
        else:
            raise CaptureError(
                f"{type(model).__name__} returns a {type(leaf).__name__}, which fxswap cannot look into "
                "(not a tensor, a constant, or a pytree container). Fix: return tensors / tuples / "
                "dicts, or register the output class with torch.utils._pytree."
            )
    ir = graph_ir(gm, roles)
    retarget(gm, device)
    return Capture(gm, tuple(r.weight for r in roles), tuple(getters), spec, tuple(slots), tuple(consts), ir)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """The objects that exist when a build starts (the model, torch's and Dynamo's own state) left
    out of the garbage collector's scans until it ends (``gc.freeze``, then ``gc.unfreeze``).

    A build creates millions of short-lived objects (Dynamo's trace, the IR, Inductor's lowering),
    so Python runs full collections, and each one walks the whole heap: measured on the 40-block
    model's first build, 1.1 s of 16 s in full collections. Frozen objects are still freed when
    their last reference goes; only cycles among them wait for the unfreeze. Left as it is where
    the process already froze objects or turned the collector off (its owner's choice).
    """
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass
class Entry:
    """One built signature: its plan, the rewritten graph, its compiled program, and what a call
    passes to it."""

    plan: SwapPlan
    fn: Callable[..., Any] | None  # None until the first call compiles it
    gm: fx.GraphModule
    inputs: tuple[tuple[str, Any], ...]  # ("user", getter) | ("resident", fqn) | ("decoded", fqn)
    resident: frozenset[str]
    cap: Capture
    ir: GraphIR  # what the plan was made from (workspace included)
    unit_ids: dict[str, int]  # unit name -> its id in the graph (build-local, see graph_unit_id)
    units: dict[int, ops.UnitHandle]  # graph id -> the runtime's unit (bound around each run)


def host_line(runtime: SwapRuntime) -> str:
    """One line on the host copies: pinned and pageable bytes (and why pinning stopped, if it did)."""
    st = runtime.store
    return (
        f"  host copies: {len(st)} tensors, pinned {st.pinned_bytes / MiB:.2f} MiB, pageable "
        f"{st.pageable_bytes / MiB:.2f} MiB" + (f" (pinning failed: {st.pin_error})" if st.pin_error else "")
    )


def graph_unit_id(position: int, meta: ops.UnitMeta) -> int:
    """The build-local id of the swapped unit at ``position`` (plan order): negative, and a digest
    of the position and the unit's shapes and dtypes.

    NOTE: the shapes are folded in because Inductor's FX graph cache is keyed on the graph's code
    and its inputs. Two models whose swapped weights differ only in shape (an MLP's hidden width)
    can have the same code and inputs; with ids -1, -2, ... a cached program compiled for the other
    shapes would be served. The same model and plan still give the same ids in every process.
    """
    from fxswap.passes.regions import unit_id

    return unit_id(position, meta.shapes, meta.dtypes)


class Builder:
    """Builds one :class:`Entry` per input signature for a compiled model (``SwapModule``).

    Args:
        model: the user's module; its swapped weights are pointed at the runtime's host copies.
        runtime: the compiled model's runtime (host store, units, residents).
        device: where the graph runs.
        backend: "inductor" or "eager".
        param_names: ``forward``'s parameter names when every one can be passed by keyword (the
            call's canonical form), else None.
        activate: makes an entry's resident weights the runtime's (the compiled model's own, so it
            knows which entry is active).
        stats: the compiled model's counters; ``captures`` and ``compiles`` are counted here.
        parallel: this rank's sequence parallelism (``ulysses_degree``), or None.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        runtime: SwapRuntime,
        device: torch.device,
        backend: str,
        param_names: list[str] | None,
        activate: Callable[[Entry], None],
        stats: dict[str, int],
        parallel: SequenceParallel | None = None,
    ) -> None:
        self.model = model
        self.parallel = parallel
        self.runtime = runtime
        self.device = device
        self.backend = backend
        self.param_names = param_names
        self.activate = activate
        self.stats = stats
        self.named = dict(model.named_parameters()) | dict(model.named_buffers())
        self._builds = itertools.count()
        runtime.stored.update(stored_weights(model))

    def stored_ir(self, ir: GraphIR) -> GraphIR:
        """``ir`` with the weights kept as stored at their stored size and their decoding counted
        (:func:`fxswap.passes.analyse.stored_storage`); ``ir`` itself for a plain model."""
        if not self.runtime.stored:
            return ir
        from fxswap.quant import dequant_workspace_bytes

        return stored_storage(
            ir,
            {
                k: (w.nbytes, w.dequantized_nbytes, dequant_workspace_bytes(w.qtype, w.shape, self.device))
                for k, w in self.runtime.stored.items()
            },
            # a weight the runtime patches after its decode (a LoRA) is decoded in the graph only
            in_graph={k for k in self.runtime.stored if self.runtime.decoded_patch(k) is not None},
        )

    def build(
        self,
        options: PlanOptions,
        given_plan: SwapPlan | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        root: dict[str, Any],
    ) -> Entry:
        """Capture, plan and rewrite for one signature (``root``: the call in canonical form);
        under Inductor also compile, against what Inductor really generates (``fxswap.fit``)."""
        from fxswap.monitoring import keep_peaks

        # The workspace probe and Inductor's replay reset the device's peak statistics to measure
        # themselves; an active fxswap.monitor keeps the peak it had (monitoring.keep_peaks).
        from fxswap.parallel import check_ranks_agree, stamp_plan

        with keep_peaks(self.device), frozen_heap():
            entry = self._build(options, given_plan, args, kwargs, root)
        entry = self._price_pageable(entry)
        plan = stamp_plan(entry.plan, self.parallel, given=given_plan is not None)
        check_ranks_agree(plan, self.parallel)
        return dataclasses.replace(entry, plan=plan)

    def _price_pageable(self, entry: Entry) -> Entry:
        """The entry with its plan's times predicted for the units whose host copies stayed
        pageable (pin cap or pinning failed): their copies are staged by the host and overlap
        nothing (``passes.planner.price_blocking_units``)."""
        from fxswap.passes.planner import price_blocking_units

        store = self.runtime.store
        if not store.pin:
            return entry
        units = [u for u in entry.plan.units if not u.resident]
        blocking = {u.name for u in units if not all(store.in_arena(p) for p in u.params)}
        if not blocking:
            return entry
        return dataclasses.replace(entry, plan=price_blocking_units(entry.ir, entry.plan, blocking))

    def _build(
        self,
        options: PlanOptions,
        given_plan: SwapPlan | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        root: dict[str, Any],
    ) -> Entry:
        from fxswap.passes.planner import build_plan
        from fxswap.passes.validate import validate_plan
        from fxswap.progress import phase, plan_line

        t0 = time.perf_counter()
        if self.backend == "inductor":
            from fxswap.regional import warm_inductor

            warm_inductor(self.device)
        with phase("capture"):
            cap, fresh = capture_call(self.model, args, kwargs, self.device, self.param_names, self.parallel)
        self.stats["captures"] += int(fresh)
        # as the device's allocator hands it out (a 67.5 MiB staging tensor takes a 68 MiB block)
        staging = device_rules_for(self.device).alloc_bytes(
            self.runtime.staging_bytes(list(self.named.values()))
        )
        with phase("plan"):
            ir = self.stored_ir(measured_ir(cap, self.device))
        opts = options
        if given_plan is not None:
            # The IR as the device holds it (its allocator's rules) with weights kept as stored at
            # their stored sizes: what `fxswap plan` planned for this device.
            given_plan.check_compatible(fingerprint_parts(ir, options))
            # A matching fingerprint says the plan was made for this graph, not that it is sound:
            # a plan edited in memory and saved again has a valid checksum. Its windows and spans
            # decide which copy each reader holds, so they are checked before the rewrite.
            validate_plan(ir, given_plan, memory=False)
            plan = given_plan
            if plan.reserve_bytes < staging:
                raise PlanError(
                    f"`plan` reserves {plan.reserve_bytes} bytes but storage_dtype="
                    f"{self.runtime.storage_dtype} needs {staging} bytes of device staging beside the "
                    "units (the largest narrowed weight as stored); the budget could be exceeded. Fix: "
                    f"re-plan with reserve_mb >= {(staging + MiB - 1) // MiB}, or compile without `plan`."
                )
        else:
            # The staging tensor a storage-dtype cast holds beside the units (SwapRuntime docstring)
            # is planned as part of the reserve, counted at every op.
            if staging:
                opts = dataclasses.replace(opts, reserve_bytes=opts.reserve_bytes + staging)
            if self.parallel is not None:
                # gloo's worker threads free collective buffers at no fixed op (the pass's note)
                from fxswap.passes.sequence_parallel import lingering_bytes

                linger = lingering_bytes(cap.gm, self.device)
                opts = dataclasses.replace(opts, reserve_bytes=opts.reserve_bytes + linger)
            if self.backend == "inductor":
                # fxswap.fit plans and compiles in rounds: one phase for both
                with phase("compile"):
                    entry = self._fit_inductor(cap, ir, opts, root)
                elapsed = time.perf_counter() - t0
                logger.info(
                    "fxswap: %s planned and compiled in %.2f s: %s",
                    type(self.model).__name__,
                    elapsed,
                    plan_line(entry.plan) + "; " + host_line(self.runtime),
                )
                return entry
            with phase("plan"):
                plan = build_plan(ir, opts)
        entry = self.make_entry(cap, plan, ir)
        if self.backend == "inductor":
            with phase("compile"):
                entry = self._measured(entry, root)
            if entry.plan.peak_bytes > plan.max_vram_bytes:
                raise PlanError(
                    f"`plan`: Inductor's program for it peaks at {entry.plan.peak_bytes} bytes, above the "
                    f"plan's budget of {plan.max_vram_bytes} bytes (its memory model was the FX graph's). "
                    "Fix: compile without `plan` so fxswap plans against Inductor's real buffers, or use "
                    "backend='eager' with this plan."
                )
        elapsed = time.perf_counter() - t0
        logger.info(
            "fxswap: %s planned in %.2f s: %s",
            type(self.model).__name__,
            elapsed,
            plan_line(entry.plan) + "; " + host_line(self.runtime),
        )
        return entry

    def make_entry(self, cap: Capture, plan: SwapPlan, ir: GraphIR) -> Entry:
        """Register the plan's swapped units with the runtime and rewrite the graph for them."""
        from fxswap.passes.rewrite import insert_swaps
        from fxswap.progress import progress

        # A fresh registry prefix per build: a failed first run leaves its units behind under the
        # old one. The graph never sees it: its ids are build-local (graph_unit_id).
        prefix = f"s{next(self._builds)}/"
        swapping = [u for u in plan.units if not u.resident]
        # one exact-size pinned arena for every weight this plan swaps (HostStore.reserve)
        self.runtime.reserve_host([(p, self.named[p]) for u in swapping for p in u.params])
        registered = {
            u.name: self.runtime.add_unit(prefix + u.name, [(p, self.named[p]) for p in u.params])
            for u in progress(swapping, desc="fxswap: host copies (pinned on CUDA)", unit="unit")
        }
        handles = {name: ops.lookup(uid) for name, uid in registered.items()}
        unit_ids = {u.name: graph_unit_id(k, handles[u.name].meta) for k, u in enumerate(swapping)}
        units = {unit_ids[name]: h for name, h in handles.items()}
        if len(units) != len(handles):  # 48-bit digests: never seen, but never silently shared
            raise PlanError("two units of this plan got the same graph id; re-plan with another block size")
        gm = insert_swaps(cap.gm, plan, cap.placeholder_params, unit_ids=unit_ids)
        if self.runtime.stored:
            # A resident the plan keeps decoded reaches the graph decoded (SwapRuntime.resident):
            # no fxswap::dequant for it.
            once = set(plan.decoded_residents)
            specs = {
                k: DequantSpec(
                    w.qtype,
                    w.shape,
                    w.dtype,
                    w.scale,
                    tuple(w.data.shape),
                    w.data.dtype,
                    self.runtime.decoded_patch(k),
                )
                for k, w in self.runtime.stored.items()
                if k not in once
            }
            insert_dequant(gm, placeholder_weights(cap.gm, cap.placeholder_params), specs)
        swapped = {p for u in swapping for p in u.params}
        self._share_host_copies(swapped)
        inputs: list[tuple[str, Any]] = []
        for fqn, get in zip(cap.placeholder_params, cap.input_getters, strict=True):
            if fqn is None:
                inputs.append(("user", get))
            elif fqn not in swapped:
                inputs.append(("decoded" if fqn in plan.decoded_residents else "resident", fqn))
        resident = frozenset(f for k, f in inputs if k != "user")
        return Entry(plan, None, gm, tuple(inputs), resident, cap, ir, unit_ids, units)

    def flat(self, entry: Entry, root: dict[str, Any]) -> list[Any]:
        """The graph's inputs for a call: the user's tensors and the resident device copies."""
        return [
            get(root) if kind == "user" else self.runtime.resident(get, self.named[get], kind == "decoded")
            for kind, get in entry.inputs
        ]

    def compile(self, entry: Entry, flat: list[Any]) -> Callable[..., Any]:
        """The program that runs ``entry``: its FX graph (eager) or Inductor's code for it."""
        self.stats["compiles"] += 1
        if self.backend == "eager":
            return entry.gm.forward
        # Region by region: each distinct block program is compiled once (fxswap.regional).
        return compile_regional(entry.gm, flat, entry.units, self.device)

    def _built(self, entry: Entry, root: dict[str, Any]) -> Built[Entry]:
        """Compile ``entry`` with Inductor: what :mod:`fxswap.fit` replays.

        The resident weights' device copies are made in a thread while Inductor compiles with
        stand-ins of their layouts (``SwapRuntime.resident_like``): a new signature gave its
        residents back before its build (``SwapModule``: the build's probes run within the budget),
        and making them again took 1.4 s of WAN 1.3B's second resolution on the CPU, most of it
        the first touch of fresh pages, while the compile mostly waits on the C++ compiler. The
        copies exist from here on, as they did when they were made before the compile; a stand-in
        whose layout differs from its copy's (never seen) compiles again with the copies."""
        self.activate(entry)
        made: dict[str, Any] = {}
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

        def make() -> None:
            try:
                # the copies are made readable by this call's stream, as on the calling thread
                ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
                with ctx, torch.no_grad():
                    made["flat"] = self.flat(entry, root)
            except BaseException as e:  # re-raised on the calling thread
                made["error"] = e

        worker = threading.Thread(target=make, name="fxswap-residents", daemon=True)
        worker.start()
        try:
            like = self.runtime.resident_like
            standins = [
                get(root) if kind == "user" else like(get, self.named[get], kind == "decoded")
                for kind, get in entry.inputs
            ]
            fn = self.compile(entry, standins)
        finally:
            worker.join()
        if "error" in made:
            raise made["error"]
        flat: list[Any] = made["flat"]
        laid_out = functools.partial(input_layout, device=self.device)
        if any(laid_out(a) != laid_out(b) for a, b in zip(standins, flat, strict=True)):
            logger.warning("fxswap: a resident's copy is laid out unlike its stand-in; compiling again")
            fn = self.compile(entry, flat)
        return Built(entry, fn, flat, entry.unit_ids, entry.units)

    def _measured(self, entry: Entry, root: dict[str, Any]) -> Entry:
        """``entry`` compiled, its plan accounted by Inductor's generated program (fxswap.fit)."""
        built = self._built(entry, root)
        plan, ir = account(entry.plan, entry.ir, built, input_buffer_names(entry.cap), self.device)
        return dataclasses.replace(entry, plan=plan, fn=built.fn, ir=ir)

    def _fit_inductor(self, cap: Capture, ir: GraphIR, opts: PlanOptions, root: dict[str, Any]) -> Entry:
        """Plan, compile and replay until Inductor's real peak fits the budget (:func:`fxswap.fit.fit`)."""
        built, plan = fit(
            ir,
            opts,
            lambda p: self._built(self.make_entry(cap, p, ir), root),
            input_buffer_names(cap),
            self.device,
            align_blocks=regions_enabled(),
        )
        return dataclasses.replace(built.handle, plan=plan, fn=built.fn)

    def _share_host_copies(self, names: set[str]) -> None:
        # NOTE: on CUDA the store pins a copy of each swapped weight. Pointing the model's tensor at
        # that copy keeps ONE host copy in the process instead of two (the pageable original is
        # freed when nothing else holds it). Values, dtype, shape and device (cpu) are unchanged.
        for name in names:
            t = self.named[name]
            host = self.runtime.store[name]
            w = self.runtime.stored.get(name)
            if w is not None:
                # The same for a weight kept as stored: the record points at the store's (pinned)
                # copy, so the file's pages it was read from are no longer held through it.
                if host.data_ptr() != w.data.data_ptr():
                    w = self.runtime.stored[name] = dataclasses.replace(w, data=host)
                    attach(self.model, {name: w})
                continue
            if (
                host.data_ptr() != t.data_ptr()
                and host.dtype == t.dtype
                and host.shape == t.shape
                and host.device == t.device
            ):
                t.data = host
