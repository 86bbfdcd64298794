"""``torch.compile(model, backend="fxswap", options={...})``: fxswap as a torch.compile backend.

Registered through torch's ``torch_dynamo_backends`` entry point (see pyproject), so
``backend="fxswap"`` works once fxswap is installed, with no import. ``options`` takes the
arguments of :func:`fxswap.compile`: ``mode``, ``max_vram_gb``, ``block_size_mb``, ``backend``
("inductor" or "eager": what runs the rewritten graph), ``device``, ``storage_dtype``,
``pin_share`` and the planner's ``reserve_mb``, ``h2d_gbps``, ``compute_tflops``,
``max_prefetch_depth``, ``device_mem_gbps`` and ``warm_start``, which is False here unless given
(every call cold): Dynamo may run other graphs between two calls of one graph, and units carried
across calls would sit beside them. Pass it True with ``fullgraph=True`` and one input shape.

The graph Dynamo hands over is planned and rewritten by the same passes as ``fxswap.compile``
(analyse -> plan -> insert_swaps -> Inductor or eager), so for the same model, input and options
the plan and the output are the same (tested with ``warm_start=False`` on both sides). The
differences come from Dynamo owning the call:

- Dynamo traces on the real tensors, so the model and its inputs must be on one device for
  tracing: keep both on the CPU (the host) and pass ``options={"device": "cuda"}``; fxswap copies
  the inputs to the device, and the outputs come back on the device. (``fxswap.compile`` traces on
  meta copies instead, which is why it takes inputs already on the device.)
- Dynamo's guards decide when to re-trace (a new shape is a new graph and a new plan), and the
  graph may break into several graphs where ``fullgraph=True`` is not passed: each graph is planned
  on its own against the whole budget, so pass ``fullgraph=True`` for one budget per call.

The plans made are kept in :func:`plans` (most recent last), each logged once.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from fxswap.fit import Built, fit
from fxswap.options import DEFAULT_BLOCK_SIZE_MB, DEFAULT_MAX_VRAM_GB, DEFAULT_MODE, OPTIONAL_OPTIONS
from fxswap.swapplan import SwapPlan

__all__ = ["OPTIONS", "fxswap_backend", "plans"]

logger = logging.getLogger("fxswap.dynamo")

# fxswap.compile's arguments that torch.compile's `options` may carry, and their defaults
_COMPILE_OPTIONS: dict[str, Any] = {
    "mode": DEFAULT_MODE,
    "max_vram_gb": DEFAULT_MAX_VRAM_GB,
    "block_size_mb": DEFAULT_BLOCK_SIZE_MB,
    "backend": "inductor",
    "device": None,
    "storage_dtype": None,
    "pin_share": 0.5,
}
_PLAN_OPTIONS = OPTIONAL_OPTIONS
OPTIONS = (*_COMPILE_OPTIONS, *_PLAN_OPTIONS)

_PLANS: collections.deque[SwapPlan] = collections.deque(maxlen=64)


def plans() -> list[SwapPlan]:
    """The plans the ``fxswap`` torch.compile backend made in this process (the last 64)."""
    return list(_PLANS)


def _weight_name(node: fx.Node, value: Any) -> str | None:
    """The FQN of a placeholder that is a parameter or buffer of the compiled module, else None."""
    from fxswap.passes.analyse import module_path

    source = getattr(node, "_dynamo_source", None)
    if source is None:
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
    name = source.name if source is not None else ""
    name = name() if callable(name) else str(name)
    if isinstance(value, torch.nn.Parameter) or "._parameters[" in name or "._buffers[" in name:
        return module_path(name) or node.name
    return None


def _input_to_device(a: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A call's input on ``device``.

    NOTE: copied with ``non_blocking=False``. From pinned memory a non-blocking copy returns before
    it has read the input, so a caller who overwrites the (pinned) input after the call returns
    would race the copy. Inputs are small (latents, timesteps, text embeddings); the weights, the
    large copies, go through the transfer stream.
    """
    return a.to(device, non_blocking=False) if a.device != device else a


def _split(options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"torch.compile(backend='fxswap') got unknown option {unknown[0]!r}. Fix: use only "
            f"{', '.join(OPTIONS)}"
        )
    compile_opts = {k: opts.get(k, d) for k, d in _COMPILE_OPTIONS.items()}
    plan_opts = {k: opts[k] for k in _PLAN_OPTIONS if k in opts}
    return compile_opts, plan_opts


def fxswap_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict[str, Any] | None = None, **_: Any
) -> Callable[..., Any]:
    """The ``fxswap`` backend for ``torch.compile`` (see the module docstring for ``options``)."""
    from fxswap.build import BACKENDS, resolve_device, retarget
    from fxswap.monitoring import keep_peaks
    from fxswap.options import make_options
    from fxswap.passes.analyse import PlaceholderRole, graph_ir
    from fxswap.passes.device_rules import apply_rules
    from fxswap.passes.planner import build_plan
    from fxswap.passes.rewrite import insert_swaps
    from fxswap.progress import plan_line
    from fxswap.regional import compile_regional, regions_enabled
    from fxswap.runtime import SwapRuntime, check_not_capturing
    from fxswap.workspace import device_rules_for, probe_workspace, with_workspace

    t0 = time.perf_counter()
    copts, popts = _split(options)
    # Every call of this graph starts cold unless asked: Dynamo may run other graphs (graph breaks,
    # other shapes) between two calls of this one, and units carried for it would sit in memory
    # beside them, outside their budgets.
    popts.setdefault("warm_start", False)
    if copts["backend"] not in BACKENDS:
        raise ValueError(
            f"torch.compile(backend='fxswap', options={{'backend': {copts['backend']!r}}}) is invalid: "
            "use 'inductor' or 'eager'"
        )
    device = resolve_device(copts["device"])
    plan_options = make_options(
        mode=copts["mode"], max_vram_gb=copts["max_vram_gb"], block_size_mb=copts["block_size_mb"], **popts
    )

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(
            f"the graph has {len(placeholders)} inputs but Dynamo passed {len(example_inputs)} examples "
            "(dynamic shapes?). Fix: torch.compile(..., dynamic=False)"
        )
    roles: list[PlaceholderRole] = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"graph input {i} ({node.name}) is a {type(value).__name__}, not a tensor (a symbolic "
                "size?). Fix: torch.compile(..., dynamic=False)"
            )
        w = _weight_name(node, value)
        roles.append(PlaceholderRole(weight=w, name=w if w is not None else node.name))
    # Op workspace measured on the device, as fxswap.compile does (fxswap.workspace).
    with keep_peaks(device):  # the probe resets CUDA's peak statistics: monitors keep theirs
        # sized as the device's allocator counts (passes.device_rules), as fxswap.compile does
        ir = apply_rules(
            with_workspace(graph_ir(gm, roles), probe_workspace(gm, device)), device_rules_for(device)
        )
    runtime = SwapRuntime(device, pin_share=copts["pin_share"], storage_dtype=copts["storage_dtype"])
    weights = {r.weight: v for r, v in zip(roles, example_inputs, strict=True) if r.weight is not None}
    staging = device_rules_for(device).alloc_bytes(runtime.staging_bytes(list(weights.values())))
    if staging:
        plan_options = dataclasses.replace(plan_options, reserve_bytes=plan_options.reserve_bytes + staging)
    builds = itertools.count()

    def build(plan: SwapPlan) -> Built[list[tuple[int, str | None]]]:
        prefix = f"d{next(builds)}/"
        runtime.reserve_host([(p, weights[p]) for u in plan.units if not u.resident for p in u.params])
        unit_ids = {
            u.name: runtime.add_unit(prefix + u.name, [(p, weights[p]) for p in u.params])
            for u in plan.units
            if not u.resident
        }
        swapped = {p for u in plan.units if not u.resident for p in u.params}
        for name in swapped:
            # one host copy, as fxswap.compile keeps: the parameter points at the store's (pinned) copy
            t, host = weights[name], runtime.store[name]
            if host.data_ptr() != t.data_ptr() and (host.dtype, host.shape, host.device) == (
                t.dtype,
                t.shape,
                t.device,
            ):
                t.data = host
        new = insert_swaps(gm, plan, [r.weight for r in roles], unit_ids=unit_ids)
        if device.type != "cpu":
            # Dynamo traced on the host: device constants follow the inputs to the device.
            retarget(new, device, torch.device("cpu"))
            new.recompile()
        # per remaining placeholder: the index of its example input, and the resident weight's name
        kept = [(i, r.weight) for i, r in enumerate(roles) if r.weight is None or r.weight not in swapped]
        runtime.retain_residents({w for _, w in kept if w is not None})
        flat = _inputs(kept, example_inputs)
        if copts["backend"] == "eager":
            return Built(kept, new.forward, flat, unit_ids)
        return Built(kept, compile_regional(new, flat, {}, device), flat, unit_ids)

    def _inputs(kept: list[tuple[int, str | None]], args: Sequence[Any]) -> list[Any]:
        flat = []
        for i, w in kept:
            a = args[i]
            if w is None:
                flat.append(_input_to_device(a, device))
            else:
                flat.append(runtime.resident(w, a))
        return flat

    if copts["backend"] == "eager":
        plan = build_plan(ir, plan_options)
        built = build(plan)
    else:
        # Planned against the program Inductor generates (fxswap.fit), as fxswap.compile does.
        inputs_held = {node.name for node, r in zip(placeholders, roles, strict=True) if r.weight is None}
        with keep_peaks(device):
            built, plan = fit(ir, plan_options, build, inputs_held, device, align_blocks=regions_enabled())
    kept, fn = built.handle, built.fn
    _PLANS.append(plan)
    logger.info(
        "fxswap (torch.compile backend): planned in %.2f s: %s", time.perf_counter() - t0, plan_line(plan)
    )

    def run(*args: Any) -> Any:
        check_not_capturing("a torch.compile(backend='fxswap') graph")
        try:
            with torch.no_grad():
                return fn(*_inputs(kept, args))
        except BaseException:
            runtime.discard_pending()
            raise

    run.fxswap_plan = plan  # type: ignore[attr-defined]
    run.fxswap_runtime = runtime  # type: ignore[attr-defined]
    # When Dynamo drops this graph (torch._dynamo.reset(), the model gone): unpin the host arenas
    # and the staging ring, as SwapModule's own finalizer does (CUDA forbids freeing them pinned).
    weakref.finalize(run, runtime.close)
    return run
