"""``fxswap.compile``: run a model under a VRAM budget with the weight swaps compiled into its graph.

This module is the public entry point: it checks the arguments and returns a
:class:`fxswap.compiled.SwapModule`. The work is split by when it happens:

- :mod:`fxswap.build`: build time, once per input signature (capture on meta, plan or check the
  given plan, register the units, rewrite, Inductor, point the user's weights at the pinned store);
- :mod:`fxswap.compiled`: call time, every call (binding, guards, residents, monitors,
  ``empty_cache``, outputs, out-of-memory recovery);
- :mod:`fxswap.experts`: several experts under one budget (:func:`fxswap.compile_experts`).

The names other modules imported from here before that split are re-exported below.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import torch

from fxswap.build import BACKENDS, clear_capture_cache, compile_inductor, resolve_device
from fxswap.compiled import OomRecovery, SwapModule
from fxswap.errors import (
    ClosedError,
    DeviceError,
    DeviceOutOfMemoryError,
    ReentrantCallError,
    SignatureError,
    TrainingModeError,
)
from fxswap.options import (
    DEFAULT_BLOCK_SIZE_MB,
    DEFAULT_MAX_VRAM_GB,
    DEFAULT_MODE,
    PlanOptions,
    make_options,
)
from fxswap.parallel import resolve_parallel
from fxswap.runtime import SwapRuntime, TransferBackend
from fxswap.swapplan import SwapPlan, load_plan

__all__ = [
    "BACKENDS",
    "ClosedError",
    "DeviceError",
    "DeviceOutOfMemoryError",
    "OomRecovery",
    "ReentrantCallError",
    "SignatureError",
    "SwapModule",
    "TrainingModeError",
    "clear_capture_cache",
    "compile",
    "compile_inductor",
    "resolve_device",
]


def compile(  # noqa: A001 (fxswap.compile mirrors torch.compile; the builtin is not used here)
    model: torch.nn.Module,
    *,
    mode: str = DEFAULT_MODE,
    max_vram_gb: float = DEFAULT_MAX_VRAM_GB,
    block_size_mb: float = DEFAULT_BLOCK_SIZE_MB,
    reserve_mb: float | None = None,
    max_prefetch_depth: int | None = None,
    h2d_gbps: float | None = None,
    compute_tflops: float | None = None,
    device_mem_gbps: float | None = None,
    warm_start: bool = True,
    p2p_gbps: float | None = None,
    nvlink: bool | None = None,
    plan: SwapPlan | str | Path | None = None,
    backend: str = "inductor",
    empty_cache_freq: int = 0,
    device: torch.device | str | None = None,
    strict: bool = False,
    transfer_backend: TransferBackend | None = None,
    pin_share: float = 0.5,
    storage_dtype: torch.dtype | None = None,
    ulysses_degree: int | None = None,
    **unknown: Any,
) -> SwapModule:
    """Compile ``model`` so that it runs within ``max_vram_gb`` with weights swapped from the host.

    The model's weights stay on the host with their values; on CUDA the tensors of swapped weights
    are pointed at fxswap's pinned copy so that the process holds one host copy. The first call with
    a new input signature captures, plans and compiles; later calls only run. Every argument after
    ``model`` is keyword-only; the planner's (``mode`` to ``device_mem_gbps``) are those of
    :func:`fxswap.plan`. Several experts under one budget: :func:`fxswap.compile_experts`.

    Args:
        model: the module (inference only; its weight values are never modified).
        mode: "layerwise", "chunkwise" or "adaptive" (see :class:`fxswap.PlanOptions`). Out of
            device memory during a call (another process took memory), "adaptive" re-plans for
            the free memory minus a margin (``SwapModule.oom_margin_*``), recompiles once, re-runs
            the call from its inputs and logs a warning (``SwapModule.recoveries``); the other
            modes raise :class:`fxswap.DeviceOutOfMemoryError` naming the budget that would fit now.
        max_vram_gb: device budget in GiB for weights, activations and the planner's reserve.
        block_size_mb: unit size for chunkwise (and one candidate for adaptive), MiB.
        reserve_mb, max_prefetch_depth, h2d_gbps, compute_tflops, device_mem_gbps: the planner's
            reserve (MiB), prefetch depth cap and cost-model rates; None keeps
            :class:`fxswap.PlanOptions`' documented default.
        warm_start: plan the sampling loop as a cycle, each call's tail loading the next call's
            first units within the budget (:class:`fxswap.PlanOptions`); False: every call cold.
        p2p_gbps, nvlink: with ``ulysses_degree``, the all-to-alls' rate per direction and whether
            they have NVLink (else they share the PCIe host-to-device direction with the copies);
            None keeps the default (PCIe without NVLink).
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
        ulysses_degree: run each call sequence-parallel over the ranks of the initialised
            ``torch.distributed`` default group (its world size must be this number): tokens are
            sharded after the patch embedding, all-to-alls put around each self-attention, the
            output gathered (``docs/sequence_parallel.md``). Every rank calls with the same inputs
            and gets the whole output; each plans its own shard against ``max_vram_gb``
            (``plan.ulysses_degree`` / ``plan.ulysses_rank``). None (default): one process.
            The ranks of one machine share one host copy of the weights
            (:func:`fxswap.hostshare.share_weights`; the model's CPU tensors become views of it).

        **unknown: refused with a TypeError that lists the options (a misspelt option must not pass
            silently).

    Raises:
        TypeError / ValueError / DeviceError: a bad argument, named, before anything changes.
        TrainingModeError (when called): a module of the model has ``training=True``; fxswap is
            inference only (dropout would make results random). Call ``model.eval()`` first.
    """
    if unknown:
        known = [p for p in inspect.signature(compile).parameters if p not in ("model", "unknown")]
        raise TypeError(
            f"fxswap.compile got unknown option {sorted(unknown)[0]!r}. Fix: use only the options "
            f"{', '.join(known)}"
        )
    if isinstance(model, (list, tuple)):
        raise TypeError(
            f"`model` is a {type(model).__name__} of {len(model)} models; fxswap.compile takes one module. "
            "Fix: compile experts that share one budget with fxswap.compile_experts(high, low, "
            "boundary=..., **options)"
        )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module, got {type(model).__name__}. Fix: pass the module itself "
            "(several experts: fxswap.compile_experts)"
        )
    if backend not in BACKENDS:
        raise ValueError(f"`backend`={backend!r} is invalid: use 'inductor' or 'eager'")
    if isinstance(empty_cache_freq, bool) or not isinstance(empty_cache_freq, int) or empty_cache_freq < 0:
        raise ValueError(f"`empty_cache_freq`={empty_cache_freq!r} is invalid: pass an int >= 0 (0 = never)")
    dev = resolve_device(device)
    parallel = resolve_parallel(ulysses_degree)
    options = make_options(
        mode=mode,
        max_vram_gb=max_vram_gb,
        block_size_mb=block_size_mb,
        reserve_mb=reserve_mb,
        max_prefetch_depth=max_prefetch_depth,
        h2d_gbps=h2d_gbps,
        compute_tflops=compute_tflops,
        device_mem_gbps=device_mem_gbps,
        warm_start=warm_start,
        p2p_gbps=p2p_gbps,
        nvlink=nvlink,
    )
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
    if parallel is not None:
        # one host copy of the weights per machine, not one per rank (docs/sequence_parallel.md)
        from fxswap.hostshare import share_weights, unlink_when_mapped

        try:
            region = share_weights(model, pin=dev.type == "cuda")
        except (OSError, ValueError) as e:  # no /dev/shm, or too small: each rank keeps its copy
            warnings.warn(
                f"fxswap: ulysses_degree={parallel.degree}: rank {parallel.rank} keeps its own host copy "
                f"of the weights ({e})",
                stacklevel=2,
            )
            region = None
        unlink_when_mapped(region)  # a barrier: every rank takes part
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
        parallel=parallel,
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
        h2d_gbps=plan.h2d_gbps,
        compute_tflops=plan.compute_tflops,
        device_mem_gbps=plan.device_mem_gbps,
        warm_start=plan.warm_start,
        p2p_gbps=plan.p2p_gbps,
        nvlink=plan.nvlink,
    )
