"""``fxswap.compile``: run a model under a VRAM budget with the weight swaps compiled into its graph.

Per input signature (shapes, dtypes, devices and non-tensor values of the call's arguments)::

    capture (Dynamo, fullgraph, on meta: no weight touches the device)
      -> GraphIR -> plan (or the given plan, checked against the graph)
      -> SwapRuntime.add_unit(...) per swapped unit (host copies)
      -> passes.rewrite.insert_swaps (on a copy of the graph)
      -> eager: run the rewritten FX graph | inductor: compile_fx(rewritten graph)

Later calls with the same signature bind the arguments to the graph's inputs and call the compiled
graph directly: no Dynamo guard evaluation, no recompilation, no graph break.

NOTE (why the call does not go through Dynamo): Dynamo would pass the model's own parameters as
graph inputs, so the model would have to live on the device for tracing and guards. fxswap keeps
the model untouched on the host; the graph's inputs are the user's tensors plus the runtime's
resident device copies. The capture runs on ``meta`` copies of the weights and inputs via
``torch.func.functional_call``; device constants the graph baked in (``device='meta'``) are retargeted.

Dtypes: a call whose inputs have another dtype is another signature. It gets its own capture and
plan (``strict=True`` refuses it instead with :class:`SignatureError`). If the model cannot run in
that dtype, the capture fails with :class:`fxswap.CaptureError` naming the line, or (meta tensors do
not check every dtype rule) the first real call fails with :class:`SignatureError` naming the inputs'
and the weights' dtypes; nothing of that signature is kept.

Positional and keyword calls of the same inputs are one signature (arguments are bound to
``forward``'s parameters first).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import itertools
import logging
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxswap.capture import dynamo_graph, input_names
from fxswap.errors import BudgetInfeasibleError, CaptureError, FxswapError, PlanError
from fxswap.fit import Built, account, fit
from fxswap.ir import GraphIR
from fxswap.monitoring import _ACTIVE as _ACTIVE_MONITORS
from fxswap.monitoring import notify_step
from fxswap.passes.analyse import PlaceholderRole, graph_ir
from fxswap.runtime import SwapRuntime, TransferBackend, default_device
from fxswap.swapplan import PlanOptions, SwapPlan, fingerprint_parts, load_plan
from fxswap.workspace import probe_workspace, with_workspace

__all__ = [
    "ClosedError",
    "DeviceError",
    "DeviceOutOfMemoryError",
    "OomRecovery",
    "ReentrantCallError",
    "Experts",
    "SignatureError",
    "SwapModule",
    "TrainingModeError",
    "clear_capture_cache",
    "compile",
    "compile_experts",
]

logger = logging.getLogger("fxswap.compiler")

BACKENDS = ("inductor", "eager")
MiB = 2**20
# fxswap's scoped Inductor settings (names checked on torch 2.11 to 2.14; see _compile).
_INDUCTOR_CONFIG: dict[str, Any] = {"reorder_for_locality": False, "triton.cudagraphs": False}
GiB = 2**30


def compile_inductor(gm: fx.GraphModule, flat: Sequence[Any]) -> Callable[..., Any]:
    """Inductor on a rewritten graph, with the settings the fxswap ops need (one place for both
    ``fxswap.compile`` and the ``torch.compile`` backend)."""
    from torch._inductor.compile_fx import compile_fx

    from fxswap.progress import stage

    # NOTE: reorder_for_locality=False keeps Inductor's schedule in FX order for the fxswap ops.
    # With it on, Inductor sank each load past the matmul it should overlap (observed: load k+1
    # after release k), which serialises transfer and compute. Fusion is unaffected.
    # CUDA graphs stay off whatever the global config says: a replay skips the Python load / wait
    # ops, so every replay would compute with the weights (and addresses) of the recorded call.
    with (
        stage("fxswap: compiling with Inductor"),
        torch._inductor.config.patch(_INDUCTOR_CONFIG),
        torch.no_grad(),
    ):
        return compile_fx(gm, list(flat))  # type: ignore[return-value]


def measured_ir(cap: _Capture, device: torch.device) -> GraphIR:
    """The capture's IR with each op's workspace measured on ``device`` (probed once per capture)."""
    if cap.workspace is None:
        cap.workspace = probe_workspace(cap.gm, device)
    return with_workspace(cap.ir, cap.workspace)


def _input_buffer_names(cap: _Capture) -> set[str]:
    # The IR names a graph input's buffer after its placeholder (passes.analyse.graph_ir).
    return {
        n.name for n, fqn in zip(_placeholders(cap.gm), cap.placeholder_params, strict=True) if fqn is None
    }


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


class DeviceError(FxswapError, ValueError):
    """The requested device does not exist or is not usable."""


class TrainingModeError(FxswapError, ValueError):
    """The model (or one of its submodules) is in training mode; fxswap runs inference only."""


class SignatureError(FxswapError, ValueError):
    """A call's inputs do not match the compiled signature and ``strict=True`` forbids a new plan."""


class DeviceOutOfMemoryError(FxswapError, torch.OutOfMemoryError):
    """The device ran out of memory during a call and fxswap could not recover (``layerwise`` /
    ``chunkwise`` never re-plan; ``adaptive`` re-plans once). Nothing of the failed call is held.

    Attributes: ``free_bytes`` (measured after fxswap released its own memory), ``margin_bytes``
    (kept free for others), ``fits_bytes`` (the budget that would fit now: free - margin + the
    call's own inputs, which the plan counts and which are allocated already) and ``needed_bytes``
    (what the plan in use needs; for adaptive after re-planning, the smallest budget that works).
    """

    def __init__(
        self, message: str, *, free_bytes: int, margin_bytes: int, fits_bytes: int, needed_bytes: int
    ) -> None:
        super().__init__(message)
        self.free_bytes = free_bytes
        self.margin_bytes = margin_bytes
        self.fits_bytes = fits_bytes
        self.needed_bytes = needed_bytes


class ReentrantCallError(FxswapError, RuntimeError):
    """A compiled model was called from inside its own call (same thread)."""


class ClosedError(FxswapError, RuntimeError):
    """The compiled model was closed; its units and device copies are gone."""


@dataclass(frozen=True, slots=True)
class OomRecovery:
    """One out-of-memory recovery of an adaptive compiled model (``SwapModule.recoveries``)."""

    where: str  # the failing step: "first call" or "call <n>"
    error: str  # the original error, shortened
    free_bytes: int
    margin_bytes: int
    old_budget_bytes: int
    new_budget_bytes: int
    replanned: bool  # False: the budget still fitted, the same plan was run again
    peak_bytes: int  # the new plan's peak


# ---------------------------------------------------------------------------------------- helpers
def _resolve_device(device: torch.device | str | None) -> torch.device:
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


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    key: list[Hashable] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device.type))
        else:
            try:
                hash(leaf)
                key.append(("V", type(leaf).__name__, leaf))
            except TypeError:
                key.append(("V", type(leaf).__name__, repr(leaf)))
    return tuple(key)


def _describe(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    def one(v: Any) -> Any:
        return f"{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}" if isinstance(v, torch.Tensor) else v

    return str(pytree.tree_map(one, (args, kwargs)))


def _entry(model: torch.nn.Module, state: dict[str, torch.Tensor], args: Any, kwargs: Any) -> Any:
    return torch.func.functional_call(model, state, tuple(args), dict(kwargs), strict=False)


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    return x


def _retarget(gm: fx.GraphModule, device: torch.device, source: torch.device | None = None) -> None:
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
class _Capture:
    gm: fx.GraphModule
    placeholder_params: tuple[str | None, ...]
    input_getters: tuple[Callable[[dict[str, Any]], Any] | None, ...]  # per placeholder; None: weight
    out_spec: pytree.TreeSpec
    out_slots: tuple[int | None, ...]  # per output leaf: graph output index, or None (constant)
    out_consts: tuple[Any, ...]
    ir: Any
    # Measured op workspace on the capture's device (fxswap.workspace), probed on the first build.
    workspace: dict[str, int] | None = None


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
_CAPTURES: weakref.WeakKeyDictionary[torch.nn.Module, dict[Hashable, _Capture]] = weakref.WeakKeyDictionary()


def clear_capture_cache() -> None:
    """Forget every cached capture (they are re-traced on the next first call)."""
    _CAPTURES.clear()


def _capture(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    device: torch.device,
    param_names: Sequence[str] | None = None,
) -> tuple[_Capture, bool]:
    """The capture of ``model(*args, **kwargs)`` for ``device``, and whether it was traced now
    (False: served from the per-model cache, see ``_CAPTURES``)."""
    weights = tuple(
        (k, tuple(v.shape), v.dtype)
        for k, v in itertools.chain(model.named_parameters(), model.named_buffers())
    )
    key = (_signature(args, kwargs), weights, str(device), model.training, param_names is None)
    per_model = _CAPTURES.setdefault(model, {})
    hit = per_model.get(key)
    if hit is not None:
        return hit, False
    cap = _trace(model, args, kwargs, device, param_names)
    per_model[key] = cap
    return cap, True


def _trace(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    device: torch.device,
    param_names: Sequence[str] | None,
) -> _Capture:
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    meta_state = {k: _to_meta(v) for k, v in named.items()}
    meta_args, meta_kwargs = pytree.tree_map(_to_meta, (args, kwargs))
    graph = dynamo_graph(
        _entry, (model, meta_state, meta_args, meta_kwargs), model, "fxswap.compile", run=True
    )
    gm, flat = graph.gm, graph.inputs
    fqn_of = {id(t): k for k, t in meta_state.items()}
    # Where each user-input tensor sits in (args, kwargs): Dynamo's flat inputs are those objects.
    path_of: dict[int, list[Any]] = {}
    for path, leaf in pytree.tree_flatten_with_path({"args": meta_args, "kwargs": meta_kwargs})[0]:
        if isinstance(leaf, torch.Tensor):
            path_of.setdefault(id(leaf), [getattr(k, "key", getattr(k, "idx", None)) for k in path])
    # Same readable input names as fxswap.trace, so a plan made by fxswap.plan fingerprints equal.
    names = input_names(model, meta_args, meta_kwargs)
    roles: list[PlaceholderRole] = []
    getters: list[Callable[[dict[str, Any]], Any] | None] = []
    for i, v in enumerate(flat):
        if id(v) in fqn_of:
            roles.append(PlaceholderRole(weight=fqn_of[id(v)], name=fqn_of[id(v)]))
            getters.append(None)
        elif id(v) in path_of:
            p = path_of[id(v)]
            if param_names is not None and p[0] == "args":
                # getters read the canonical, all-keyword form of a call (see SwapModule._canonical)
                p = ["kwargs", param_names[p[1]], *p[2:]]
            roles.append(PlaceholderRole(weight=None, name=names.get(id(v), ".".join(str(k) for k in p))))
            getters.append(_getter(p))
        else:
            raise CaptureError(
                f"graph input {i} of {type(model).__name__} is neither a registered parameter/buffer nor a "
                "call argument (a plain tensor attribute or a global?). Fix: register it with "
                "`register_buffer(..., persistent=False)` so fxswap can place it."
            )
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
    _retarget(gm, device)
    return _Capture(gm, tuple(r.weight for r in roles), tuple(getters), spec, tuple(slots), tuple(consts), ir)


def _training_modules(modules: Sequence[torch.nn.Module], root: torch.nn.Module) -> list[str]:
    names = {id(m): n for n, m in root.named_modules()}
    return [names.get(id(m), "?") or "<root>" for m in modules if m.training]


def _plain_signature(model: torch.nn.Module) -> inspect.Signature | None:
    """forward's signature if every parameter can be passed by keyword (no *args / **kwargs)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    kinds = {p.kind for p in sig.parameters.values()}
    if kinds & {
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
        inspect.Parameter.POSITIONAL_ONLY,
    }:
        return None
    return sig


@dataclass
class _Entry:
    plan: SwapPlan
    fn: Callable[..., Any] | None  # None until the first call compiles it
    gm: fx.GraphModule
    inputs: tuple[tuple[str, Any], ...]  # ("user", getter) | ("resident", fqn)
    resident: frozenset[str]
    cap: _Capture
    ir: GraphIR | None = None  # what the plan was made from (workspace included)
    unit_ids: dict[str, int] | None = None


class SwapModule:
    """The callable :func:`compile` returns. ``plan`` is the current signature's plan, ``plans`` all.

    Attributes:
        runtime: the :class:`fxswap.runtime.SwapRuntime` (host store, ledger, stats).
        stats: ``{"captures", "compiles", "calls", "empty_cache"}`` counters.
        recoveries: one :class:`OomRecovery` per out-of-memory error an adaptive model survived.

    Calls are serialised: a second thread waits for the running call (the units' transfers pair
    up through per-unit queues); a call from inside a call raises :class:`ReentrantCallError`.
    :meth:`close` (or garbage collection) returns all device and pinned memory.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        options: PlanOptions,
        plan: SwapPlan | None,
        backend: str,
        empty_cache_freq: int,
        device: torch.device,
        strict: bool,
        runtime: SwapRuntime,
    ) -> None:
        self.model = model
        self.options = options
        self.backend = backend
        self.empty_cache_freq = empty_cache_freq
        self.device = device
        self.strict = strict
        self.runtime = runtime
        self._given_plan = plan
        self._entries: dict[Hashable, _Entry] = {}
        self._active: _Entry | None = None
        self._current: _Entry | None = None
        self.stats = {"captures": 0, "compiles": 0, "calls": 0, "empty_cache": 0}
        self._named = dict(model.named_parameters()) | dict(model.named_buffers())
        self._modules = tuple(model.modules())
        self._forward_sig = _plain_signature(model)
        self._builds = itertools.count()
        # One call at a time: a call's loads and waits pair up through per-unit queues, so two
        # interleaved calls would take each other's transfers. Other threads wait their turn.
        self._call_lock = threading.Lock()
        self._call_owner: int | None = None
        self.recoveries: list[OomRecovery] = []
        #: Kept free for other processes when re-planning after an out-of-memory error:
        #: max(oom_margin_min_bytes, oom_margin_share x free memory).
        self.oom_margin_min_bytes = 256 * MiB if device.type == "cuda" else 0
        self.oom_margin_share = 0.05
        self._finalizer = weakref.finalize(self, runtime.close)

    # -- introspection
    @property
    def plan(self) -> SwapPlan | None:
        """The plan of the most recent call's signature (or the given plan before the first call)."""
        return self._current.plan if self._current is not None else self._given_plan

    @property
    def plans(self) -> list[SwapPlan]:
        return [e.plan for e in self._entries.values()]

    @property
    def graph_module(self) -> fx.GraphModule | None:
        """The rewritten FX graph of the most recent call's signature."""
        return self._current.gm if self._current is not None else None

    @property
    def code(self) -> str:
        """The Python code of the rewritten graph of the most recent call's signature: every unit's
        ``fxswap_load_<unit>``, ``fxswap_wait_<unit>`` and ``fxswap_release_<unit>`` node in place
        (the release node is where the unit's device memory returns). Empty before the first call."""
        gm = self.graph_module
        return "" if gm is None else gm.code

    # -- building
    def _build(self, args: tuple[Any, ...], kwargs: dict[str, Any], root: dict[str, Any]) -> _Entry:
        """Capture, plan and rewrite for one signature (``root``: the call in canonical form);
        under Inductor also compile, against what Inductor really generates (_fit_inductor)."""
        from fxswap.passes.planner import build_plan
        from fxswap.progress import plan_line

        t0 = time.perf_counter()
        names = None if self._forward_sig is None else list(self._forward_sig.parameters)
        cap, fresh = _capture(self.model, args, kwargs, self.device, names)
        self.stats["captures"] += int(fresh)
        staging = self.runtime.staging_bytes(list(self._named.values()))
        ir = measured_ir(cap, self.device)
        opts = self.options
        if self._given_plan is not None:
            self._given_plan.check_compatible(fingerprint_parts(cap.ir, self.options))
            plan = self._given_plan
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
            if self.backend == "inductor":
                entry = self._fit_inductor(cap, ir, opts, root)
                elapsed = time.perf_counter() - t0
                logger.info(
                    "fxswap: %s planned and compiled in %.2f s: %s",
                    type(self.model).__name__,
                    elapsed,
                    plan_line(entry.plan) + "; " + self._host_line(),
                )
                return entry
            plan = build_plan(ir, opts)
        entry = self._make_entry(cap, plan, ir)
        if self.backend == "inductor":
            entry = self._measured(entry, root)
            if entry.plan.peak_bytes > plan.max_vram_bytes:
                raise PlanError(
                    f"`plan`: Inductor's program for it peaks at {entry.plan.peak_bytes} bytes, above the "
                    f"plan's budget of {plan.max_vram_bytes} bytes (its memory model was the FX graph's). "
                    "Fix: compile without `plan` so fxswap plans against Inductor's real buffers, or use "
                    "backend='eager' with this plan."
                )
        elapsed = time.perf_counter() - t0
        name = type(self.model).__name__
        logger.info(
            "fxswap: %s planned in %.2f s: %s",
            name,
            elapsed,
            plan_line(entry.plan) + "; " + self._host_line(),
        )
        return entry

    def _make_entry(self, cap: _Capture, plan: SwapPlan, ir: GraphIR) -> _Entry:
        from fxswap.passes.rewrite import insert_swaps

        # a fresh prefix per build: a failed first run leaves its units behind under the old one
        prefix = f"s{next(self._builds)}/"
        from fxswap.progress import progress

        swapping = [u for u in plan.units if not u.resident]
        unit_ids = {
            u.name: self.runtime.add_unit(prefix + u.name, [(p, self._named[p]) for p in u.params])
            for u in progress(swapping, desc="fxswap: host copies (pinned on CUDA)", unit="unit")
        }
        gm = insert_swaps(cap.gm, plan, cap.placeholder_params, unit_ids=unit_ids)
        swapped = {p for u in plan.units if not u.resident for p in u.params}
        self._share_host_copies(swapped)
        inputs: list[tuple[str, Any]] = []
        for fqn, get in zip(cap.placeholder_params, cap.input_getters, strict=True):
            if fqn is None:
                inputs.append(("user", get))
            elif fqn not in swapped:
                inputs.append(("resident", fqn))
        resident = frozenset(f for k, f in inputs if k == "resident")
        return _Entry(plan, None, gm, tuple(inputs), resident, cap, ir=ir, unit_ids=unit_ids)

    def _flat(self, entry: _Entry, root: dict[str, Any]) -> list[Any]:
        return [
            get(root) if kind == "user" else self.runtime.resident(get, self._named[get])
            for kind, get in entry.inputs
        ]

    def _built(self, entry: _Entry, root: dict[str, Any]) -> Built[_Entry]:
        """Compile ``entry`` with Inductor: what :mod:`fxswap.fit` replays."""
        assert entry.unit_ids is not None
        self._activate(entry)
        flat = self._flat(entry, root)
        return Built(entry, self._compile(entry, flat), flat, entry.unit_ids)

    def _measured(self, entry: _Entry, root: dict[str, Any]) -> _Entry:
        """``entry`` compiled, its plan accounted by Inductor's generated program (fxswap.fit)."""
        assert entry.ir is not None
        built = self._built(entry, root)
        plan, ir = account(entry.plan, entry.ir, built, _input_buffer_names(entry.cap), self.device)
        return dataclasses.replace(entry, plan=plan, fn=built.fn, ir=ir)

    def _fit_inductor(self, cap: _Capture, ir: GraphIR, opts: PlanOptions, root: dict[str, Any]) -> _Entry:
        """Plan, compile and replay until Inductor's real peak fits the budget (:func:`fxswap.fit.fit`)."""
        built, plan = fit(
            ir,
            opts,
            lambda p: self._built(self._make_entry(cap, p, ir), root),
            _input_buffer_names(cap),
            self.device,
        )
        return dataclasses.replace(built.handle, plan=plan, fn=built.fn)

    def _share_host_copies(self, names: set[str]) -> None:
        # NOTE: on CUDA the store pins a copy of each swapped weight. Pointing the model's tensor at
        # that copy keeps ONE host copy in the process instead of two (the pageable original is
        # freed when nothing else holds it). Values, dtype, shape and device (cpu) are unchanged.
        for name in names:
            t = self._named[name]
            host = self.runtime.store[name]
            if (
                host.data_ptr() != t.data_ptr()
                and host.dtype == t.dtype
                and host.shape == t.shape
                and host.device == t.device
            ):
                t.data = host

    def _compile(self, entry: _Entry, flat: list[Any]) -> Callable[..., Any]:
        self.stats["compiles"] += 1
        if self.backend == "eager":
            return entry.gm.forward
        return compile_inductor(entry.gm, flat)

    # -- calling
    def _activate(self, entry: _Entry) -> None:
        if self._active is entry:
            return
        # Another signature's plan may keep other weights resident: never hold both sets.
        self.runtime.retain_residents(entry.resident)
        self._active = entry

    def release(self) -> None:
        """Drop every resident device copy (they are re-made on the next call)."""
        self.runtime.drop_residents()
        self._active = None

    def close(self) -> None:
        """Return every byte of device and pinned host memory this model holds and unregister its
        units; later calls raise :class:`ClosedError`. Weights the store shared with the model (see
        ``_share_host_copies``) are given back as pageable copies, so the model stays usable on its
        own. Garbage collection of the compiled model does the same minus that hand-back."""
        with self._call_lock:
            if self.runtime.closed:
                return
            for name, host in self.runtime.store.items():
                t = self._named.get(name)
                if t is not None and t.data_ptr() == host.data_ptr() and host.is_pinned():
                    t.data = torch.empty(host.shape, dtype=host.dtype).copy_(host)
            self._entries.clear()
            self._active = self._current = None
            self._finalizer()  # runtime.close(), once

    def summary(self) -> str:
        """The current plan's summary plus the host copies: pinned and pageable bytes (and why
        pinning stopped, if it failed)."""
        plan = self.plan
        return self._host_line() if plan is None else plan.summary() + "\n" + self._host_line()

    def _host_line(self) -> str:
        st = self.runtime.store
        return (
            f"  host copies: {len(st)} tensors, pinned {st.pinned_bytes / MiB:.2f} MiB, pageable "
            f"{st.pageable_bytes / MiB:.2f} MiB"
            + (f" (pinning failed: {st.pin_error})" if st.pin_error else "")
        )

    def _canonical(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # Positional or keyword, the same call is the same signature (one plan, not two).
        if self._forward_sig is None:
            return args, kwargs
        try:
            bound = self._forward_sig.bind(*args, **kwargs)
        except TypeError:
            return args, kwargs  # let the model report its own argument error
        return (), dict(bound.arguments)

    def __call__(self, *orig_args: Any, **orig_kwargs: Any) -> Any:
        me = threading.get_ident()
        if self._call_owner == me:
            raise ReentrantCallError(
                f"{type(self.model).__name__} compiled by fxswap was called from inside its own call "
                "(a hook or callback calling the model?). Fix: call it after the running call returns."
            )
        with self._call_lock:
            self._call_owner = me
            try:
                return self._call(orig_args, orig_kwargs)
            finally:
                self._call_owner = None

    def _call(self, orig_args: tuple[Any, ...], orig_kwargs: dict[str, Any]) -> Any:
        if self.runtime.closed:
            raise ClosedError(
                f"this compiled {type(self.model).__name__} was closed (close()): its device copies and "
                "units are gone. Fix: compile the model again with fxswap.compile."
            )
        if any(m.training for m in self._modules):
            train = _training_modules(self._modules, self.model)
            raise TrainingModeError(
                f"{type(self.model).__name__} is in training mode ({len(train)} module(s) with "
                f"training=True, e.g. {', '.join(train[:3])}): dropout and batch-norm statistics would "
                "make the output random and differ from inference. fxswap runs inference only. "
                "Fix: call model.eval() before calling the compiled model."
            )
        # NOTE: the cache key and the graph inputs use the canonical form, so positional and keyword
        # calls share a plan; the capture uses the call as given, so that its graph (placeholder names
        # included) fingerprints equal to an offline plan made with fxswap.plan(model, <same call>).
        args, kwargs = self._canonical(orig_args, orig_kwargs)
        sig = _signature(args, kwargs)
        found = self._entries.get(sig)
        root = {"args": args, "kwargs": kwargs}
        if found is None:
            if self.strict and self._entries:
                raise SignatureError(
                    f"strict=True: inputs {_describe(args, kwargs)} differ from the compiled signature "
                    "(shape, "
                    "dtype, device or a non-tensor argument). Fix: call with the compiled shapes, or "
                    "compile with strict=False to plan each new signature."
                )
            self._check_devices(args, kwargs)
            try:
                built: _Entry | None = self._build(orig_args, orig_kwargs, root)
            except torch.OutOfMemoryError as e:  # Inductor's build runs on the device too
                if isinstance(e, FxswapError):
                    raise
                built = None
                entry, outs = self._recover(e, sig, None, orig_args, orig_kwargs, root)
            if built is not None:
                entry, outs = self._first_run(built, sig, args, kwargs, orig_args, orig_kwargs, root)
            self._entries[sig] = entry
        else:
            entry = found
            try:
                outs = self._run(entry, args, kwargs)
            except torch.OutOfMemoryError as e:
                if isinstance(e, FxswapError):
                    raise
                entry, outs = self._recover(e, sig, entry, orig_args, orig_kwargs, root)
        self.stats["calls"] += 1
        if _ACTIVE_MONITORS:
            notify_step(type(self.model).__name__)
        if (
            self.empty_cache_freq
            and self.stats["calls"] % self.empty_cache_freq == 0
            and self.device.type == "cuda"
        ):
            torch.cuda.empty_cache()
            self.stats["empty_cache"] += 1
        cap = entry.cap
        leaves = [outs[s] if s is not None else c for s, c in zip(cap.out_slots, cap.out_consts, strict=True)]
        return pytree.tree_unflatten(leaves, cap.out_spec)

    def _first_run(
        self,
        entry: _Entry,
        sig: Hashable,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        orig_args: tuple[Any, ...],
        orig_kwargs: dict[str, Any],
        root: dict[str, Any],
    ) -> tuple[_Entry, Any]:
        try:
            return entry, self._run(entry, args, kwargs)
        except torch.OutOfMemoryError as e:
            if isinstance(e, FxswapError):
                raise
            return self._recover(e, sig, None, orig_args, orig_kwargs, root)
        except Exception as e:
            # The capture ran on meta tensors, which do not check everything (e.g. mixed dtypes
            # in a matmul). The first real run does: report it against the new signature and
            # keep nothing of it.
            self._forget_failed_call()
            dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in self._named.values()})
            raise SignatureError(
                f"{type(self.model).__name__} failed on its first call with inputs "
                f"{_describe(args, kwargs)}: {type(e).__name__}: {e}. The model's weights are "
                f"{'/'.join(dtypes)}. Fix: pass inputs in the dtypes (and shapes) the model computes in."
            ) from e

    def _forget_failed_call(self) -> None:
        self._active = self._current = None
        self.runtime.drop_residents()

    def _release_after_oom(self) -> None:
        """Give back everything a failed call held, so the free memory measured next is real."""
        self._active = None
        self.runtime.drop_residents()
        self.runtime.discard_pending()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _recover(
        self,
        err: torch.OutOfMemoryError,
        sig: Hashable,
        entry: _Entry | None,
        orig_args: tuple[Any, ...],
        orig_kwargs: dict[str, Any],
        root: dict[str, Any],
    ) -> tuple[_Entry, Any]:
        """Out of memory during a call (another process took device memory). Free what the call
        held, measure the free memory; ``adaptive``: re-plan for it (unless the plan still fits),
        recompile once and re-run the call from its inputs (they are never written); the other
        modes: raise :class:`DeviceOutOfMemoryError` naming the budget that would fit now."""
        where = "first call" if entry is None else f"call {self.stats['calls'] + 1}"
        if err.__traceback__ is not None:  # its frames' locals (a build's inputs) would stay allocated
            traceback.clear_frames(err.__traceback__)
        self._release_after_oom()
        free = self.runtime.free_bytes()
        margin = max(self.oom_margin_min_bytes, int(free * self.oom_margin_share))
        from fxswap.oracle import live_bytes

        on_device = pytree.tree_leaves(root)
        held = live_bytes([t for t in on_device if isinstance(t, torch.Tensor) and t.device == self.device])
        fits = max(0, free - margin + held)
        old = entry.plan.max_vram_bytes if entry is not None else self.options.max_vram_bytes
        needed = entry.plan.peak_bytes if entry is not None else old
        short = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        what = (
            f"{type(self.model).__name__} ran out of device memory during its {where} ({short}). "
            f"Free now: {free} bytes ({free / GiB:.3f} GiB); margin kept for others: {margin} bytes; "
            f"the call's inputs already hold {held} bytes"
        )
        if self.options.mode != "adaptive":
            if entry is None:
                self._current = None  # nothing of a first call is kept
            raise DeviceOutOfMemoryError(
                f"{what}. The budget that would fit now is max_vram_gb={fits / GiB:.4f} ({fits} bytes); "
                f"mode {self.options.mode!r} does not re-plan by itself (the plan needs up to {needed} "
                f"bytes). Fix: compile with max_vram_gb={fits / GiB:.4f} or less, or mode='adaptive' "
                "to re-plan on out-of-memory, or free device memory.",
                free_bytes=free,
                margin_bytes=margin,
                fits_bytes=fits,
                needed_bytes=needed,
            ) from err
        budget = min(old, fits)
        replan = entry is None or budget < old
        # What to put back if the recovery fails: the memory may be free again by the next call.
        before = (self.options, self._given_plan, entry)

        def restore() -> None:
            self.options, self._given_plan = before[0], before[1]
            self._entries.pop(sig, None)
            if before[2] is not None:
                self._entries[sig] = before[2]
            self._forget_failed_call()

        if replan:
            self._entries.pop(sig, None)
            self._given_plan = None  # a given plan was made for the old budget
            self.options = dataclasses.replace(self.options, max_vram_bytes=budget)
            try:
                entry = self._build(orig_args, orig_kwargs, root)
            except BudgetInfeasibleError as e:
                restore()
                raise DeviceOutOfMemoryError(
                    f"{what}. The budget that would fit now is {budget} bytes ({budget / GiB:.4f} GiB), "
                    f"below the smallest that works for this input: {e.min_vram_bytes} bytes "
                    f"({e.min_vram_bytes / GiB:.4f} GiB). Fix: free at least "
                    f"{e.min_vram_bytes - budget} bytes of device memory, or use a smaller input.",
                    free_bytes=free,
                    margin_bytes=margin,
                    fits_bytes=fits,
                    needed_bytes=e.min_vram_bytes,
                ) from err
        assert entry is not None
        rec = OomRecovery(where, short, free, margin, old, budget, replan, entry.plan.peak_bytes)
        logger.warning(
            "fxswap: %s; %s (budget %d -> %d bytes, peak %d bytes); running the call again from its inputs",
            what,
            "re-planned and recompiled" if replan else "the plan still fits, running it again",
            old,
            budget,
            entry.plan.peak_bytes,
        )
        try:
            outs = self._run(entry, root["args"], root["kwargs"])
        except torch.OutOfMemoryError as e:
            self._release_after_oom()
            restore()
            raise DeviceOutOfMemoryError(
                f"{what}. fxswap re-planned for {budget} bytes and ran the call again; it ran out of "
                f"memory again ({type(e).__name__}: {str(e)[:200]}). Fix: free device memory, or compile "
                f"with a smaller max_vram_gb than {budget / GiB:.4f}.",
                free_bytes=free,
                margin_bytes=margin,
                fits_bytes=fits,
                needed_bytes=entry.plan.peak_bytes,
            ) from e
        self._entries[sig] = entry
        self.recoveries.append(rec)
        return entry, outs

    forward = __call__

    def _run(self, entry: _Entry, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._current = entry
        self._activate(entry)
        flat: list[Any] | None = None
        try:
            flat = self._flat(entry, {"args": args, "kwargs": kwargs})
            with torch.no_grad():
                if entry.fn is None:
                    entry.fn = self._compile(entry, flat)
                return entry.fn(*flat)
        except BaseException as e:
            flat = None  # this frame stays in the traceback: it must not keep the resident copies
            # Loads issued before the failure were never waited for: drop them (after their copies
            # land), or the next call would pair its waits with them and keep their memory forever.
            self.runtime.discard_pending()
            # The traceback holds the graph's frames, and their locals the unit copies and
            # activations: whoever keeps the exception (a notebook's sys.last_exc) would keep that
            # device memory. Clear the finished frames below this one.
            if e.__traceback__ is not None and e.__traceback__.tb_next is not None:
                traceback.clear_frames(e.__traceback__.tb_next)
            raise

    def _check_devices(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
            if isinstance(leaf, torch.Tensor) and leaf.device != self.device:
                raise DeviceError(
                    f"input {pytree.keystr(path)} is on {leaf.device} but the model is compiled for "
                    f"{self.device}. Fix: move the inputs to {self.device} (weights stay with fxswap)."
                )


# ------------------------------------------------------------------------------------------ public
def _options(
    mode: str, max_vram_gb: float, block_size_mb: float, plan_options: dict[str, Any]
) -> PlanOptions:
    from fxswap.api import make_options

    return make_options(mode=mode, max_vram_gb=max_vram_gb, block_size_mb=block_size_mb, **plan_options)


def compile(  # noqa: A001 (the public name the brief asks for)
    model: torch.nn.Module,
    mode: str = "adaptive",
    max_vram_gb: float = 16,
    block_size_mb: float = 300,
    plan: SwapPlan | str | Path | None = None,
    backend: str = "inductor",
    empty_cache_freq: int = 0,
    device: torch.device | str | None = None,
    strict: bool = False,
    *,
    transfer_backend: TransferBackend | None = None,
    pin_share: float = 0.5,
    storage_dtype: torch.dtype | None = None,
    **plan_options: Any,
) -> SwapModule:
    """Compile ``model`` so that it runs within ``max_vram_gb`` with weights swapped from the host.

    The model's weights stay on the host with their values; on CUDA the tensors of swapped weights
    are pointed at fxswap's pinned copy so that the process holds one host copy. The first call with
    a new input signature captures, plans and compiles; later calls only run.

    Args:
        model: the module (inference only; its weight values are never modified).
        mode: "layerwise", "chunkwise" or "adaptive" (see :class:`fxswap.PlanOptions`). Out of
            device memory during a call (another process took memory), "adaptive" re-plans for
            the free memory minus a margin (``SwapModule.oom_margin_*``), recompiles once, re-runs
            the call from its inputs and logs a warning (``SwapModule.recoveries``); the other
            modes raise :class:`DeviceOutOfMemoryError` naming the budget that would fit now.
        max_vram_gb: device budget in GiB for weights, activations and the planner's reserve.
        block_size_mb: unit size for chunkwise (and one candidate for adaptive), MiB.
        plan: a :class:`fxswap.SwapPlan` or a path to its JSON; checked against the graph on the
            first call (:class:`fxswap.PlanMismatchError` names the field that differs).
        backend: "inductor" (compile the rewritten graph) or "eager" (run it as FX; exact, debuggable).
        empty_cache_freq: call ``torch.cuda.empty_cache()`` every N calls; 0 never (no-op on CPU).
        device: where to run; default the current CUDA device, else the CPU.
        strict: refuse (SignatureError) a call whose inputs differ from the first call's signature
            instead of planning it anew.
        transfer_backend: overrides the copy mechanism (tests inject a late backend).
        pin_share: cap on pinned host memory as a share of RAM (CUDA).
        storage_dtype: keep and copy swapped weights in this dtype (e.g. ``torch.float8_e4m3fn``),
            cast back on the device by the wait. Every floating-point weight wider than it is
            rounded through it, resident ones too, so the output does not depend on the budget;
            integer/complex tensors are never narrowed. The device staging copy is planned: the
            largest one is added to the plan's ``reserve_bytes`` (a given ``plan`` must reserve
            it). The model's own tensors keep their dtype, so with a narrower storage dtype the
            host holds the model's copy and the narrow one.
        **plan_options: reserve_mb, h2d_gbps, compute_tflops, max_prefetch_depth.

    Raises:
        ValueError / DeviceError: a bad argument, named, before anything changes.
        TrainingModeError (when called): a module of the model has ``training=True``; fxswap is
            inference only (dropout would make results random). Call ``model.eval()`` first.
    """
    if isinstance(model, (list, tuple)):
        return compile_experts(  # type: ignore[return-value]
            *model,
            mode=mode,
            max_vram_gb=max_vram_gb,
            block_size_mb=block_size_mb,
            backend=backend,
            empty_cache_freq=empty_cache_freq,
            device=device,
            strict=strict,
            transfer_backend=transfer_backend,
            pin_share=pin_share,
            storage_dtype=storage_dtype,
            **plan_options,
        )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module (or a list of two experts), got {type(model).__name__}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"`backend`={backend!r} is invalid: use 'inductor' or 'eager'")
    if isinstance(empty_cache_freq, bool) or not isinstance(empty_cache_freq, int) or empty_cache_freq < 0:
        raise ValueError(f"`empty_cache_freq`={empty_cache_freq!r} is invalid: pass an int >= 0 (0 = never)")
    dev = _resolve_device(device)
    options = _options(mode, max_vram_gb, block_size_mb, plan_options)
    given: SwapPlan | None
    if plan is None or isinstance(plan, SwapPlan):
        given = plan
    elif isinstance(plan, (str, Path)):
        given = load_plan(plan)
    else:
        raise TypeError(
            f"`plan` must be a SwapPlan, a path to a plan JSON, or None; got {type(plan).__name__}"
        )
    if given is not None:
        options = _options_of_plan(given, options)
    runtime = SwapRuntime(dev, backend=transfer_backend, pin_share=pin_share, storage_dtype=storage_dtype)
    return SwapModule(
        model,
        options=options,
        plan=given,
        backend=backend,
        empty_cache_freq=empty_cache_freq,
        device=dev,
        strict=strict,
        runtime=runtime,
    )


def _options_of_plan(plan: SwapPlan, user: PlanOptions) -> PlanOptions:
    """The options a loaded plan was made with (so its fingerprint can match), from its own fields;
    ``max_prefetch_depth`` is not stored in a plan and comes from the caller."""
    return PlanOptions(
        mode=plan.mode,
        max_vram_bytes=plan.max_vram_bytes,
        block_size_bytes=plan.block_size_bytes,
        reserve_bytes=plan.reserve_bytes,
        max_prefetch_depth=user.max_prefetch_depth,
        h2d_gbps=getattr(plan, "h2d_gbps", user.h2d_gbps),
        compute_tflops=plan.compute_tflops,
        device_mem_gbps=plan.device_mem_gbps,
    )


class Experts:
    """Several compiled experts (WAN 2.2 A14B: high-noise and low-noise) under one VRAM budget.

    Only one expert holds device memory at a time: calling an expert releases the resident weights
    of the one that ran before. ``experts(x, t, ...)`` picks by timestep when ``boundary`` is set
    (``t >= boundary`` -> expert 0, the high-noise one, as WAN 2.2 does); ``experts[i](...)`` or
    ``experts.high`` / ``experts.low`` call one explicitly.
    """

    def __init__(
        self, experts: Sequence[SwapModule], boundary: float | None, timestep_arg: str | int
    ) -> None:
        self.experts = list(experts)
        self.boundary = boundary
        self.timestep_arg = timestep_arg
        self._active: int | None = None
        self._mirror: list[Any] = []  # see _host_value: [weakref to the base, version, host copy]

    def _switch(self, i: int) -> None:
        if self._active is not None and self._active != i:
            self.experts[self._active].release()
        self._active = i

    def __getitem__(self, i: int) -> SwapModule:
        return _ExpertView(self, i)  # type: ignore[return-value]

    @property
    def high(self) -> SwapModule:
        return self[0]

    @property
    def low(self) -> SwapModule:
        return self[1]

    @property
    def plans(self) -> list[SwapPlan]:
        return [p for e in self.experts for p in e.plans]

    @functools.cached_property
    def _forward_signature(self) -> inspect.Signature:
        # per call otherwise: taken once, on the first call that needs it
        return inspect.signature(self.experts[0].model.forward)

    def _timestep(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        ta = self.timestep_arg
        if isinstance(ta, int):
            t = args[ta]
        elif ta in kwargs:
            t = kwargs[ta]
        else:
            t = self._forward_signature.bind_partial(*args, **kwargs).arguments[ta]
        return _host_value(t, self._mirror)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.boundary is None:
            raise ValueError(
                "`boundary` was not set: call experts.high(...) / experts.low(...) or experts[i](...)"
            )
        return self[0 if self._timestep(args, kwargs) >= self.boundary else 1](*args, **kwargs)


def _host_value(t: Any, mirror: list[Any]) -> float:
    """The first element of the timestep ``t`` as a float, without a host sync where avoidable.

    Reading a device tensor (``.item()``) waits for all queued GPU work, so the host could not run
    ahead of the previous step. Pipelines pass each step's timestep as a view of one device tensor
    (diffusers: ``t`` of ``scheduler.timesteps``, then ``t.expand(batch)``): that tensor is copied to the
    host once (one sync per schedule) and later views are read from the host copy while the storage's
    version counter says it is unchanged. Numbers and CPU tensors never sync; a fresh device tensor
    per step (or an inference-mode tensor, which has no version counter) is read directly.
    """
    if not isinstance(t, torch.Tensor):
        return float(t)
    if t.device.type in ("cpu", "meta"):
        return float(t.flatten()[0])
    return _mirrored_value(t, mirror)


def _mirrored_value(t: torch.Tensor, mirror: list[Any]) -> float:
    """``t``'s first element read from ``mirror``, a host copy of ``t``'s storage kept in place
    (one at a time: the schedule being sampled), refreshed when ``t`` belongs to another tensor or
    its version counter moved."""
    base = t._base if t._base is not None else t
    try:
        version = t._version
    except RuntimeError:  # inference tensors track no version: nothing tells a stale copy apart
        return float(t.flatten()[0])
    if not mirror or mirror[0]() is not base or mirror[1] != version or mirror[2].dtype != t.dtype:
        storage = t.untyped_storage().cpu()  # the one sync per schedule
        mirror[:] = [weakref.ref(base), version, torch.empty(0, dtype=t.dtype).set_(storage)]
    host = mirror[2].as_strided(t.shape, t.stride(), t.storage_offset())
    return float(host.flatten()[0])


class _ExpertView:
    def __init__(self, group: Experts, i: int) -> None:
        self.group, self.i = group, i

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.group._switch(self.i)
        return self.group.experts[self.i](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group.experts[self.i], name)


def compile_experts(
    *models: torch.nn.Module,
    boundary: float | None = None,
    timestep_arg: str | int = "timestep",
    **compile_kwargs: Any,
) -> Experts:
    """Compile several experts that share one device and one ``max_vram_gb`` budget.

    Each expert is planned against the full budget because only one is ever on the device: switching
    experts releases the resident weights of the previous one (the host copies stay) BEFORE the new
    expert makes its own, so the two never hold device memory together (tested with one shared
    ledger). Call experts through the returned :class:`Experts` (``experts(...)``, ``experts[i]``,
    ``.high`` / ``.low``); calling the SwapModules in ``experts.experts`` directly skips the switch.

    Args:
        models: the experts, high-noise first for WAN 2.2.
        boundary: timestep at or above which expert 0 runs, in the units the model is called with
            (WAN 2.2 A14B t2v: ``0.875 * 1000 = 875``).
        timestep_arg: the timestep's parameter name (found in kwargs or bound by the forward's
            signature) or its positional index.
        **compile_kwargs: as for :func:`compile`.
    """
    if len(models) < 2:
        raise ValueError(f"compile_experts needs at least two models, got {len(models)}")
    _resolve_device(compile_kwargs.get("device"))  # one device for all: a bad one fails first
    return Experts([compile(m, **compile_kwargs) for m in models], boundary, timestep_arg)
