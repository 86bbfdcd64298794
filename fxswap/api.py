"""``fxswap.plan``: capture a model and plan its weight swapping under a VRAM budget, in one call."""

from __future__ import annotations

from typing import Any

import torch

from fxswap.capture import Traced, trace
from fxswap.options import (
    DEFAULT_BLOCK_SIZE_MB,
    DEFAULT_MAX_VRAM_GB,
    DEFAULT_MODE,
    OPTIONAL_OPTIONS,
    PlanOptions,
    make_options,
)
from fxswap.swapplan import SwapPlan

__all__ = ["OPTIONAL_OPTIONS", "make_options", "plan", "plan_traced"]


def plan_traced(traced: Traced, options: PlanOptions) -> SwapPlan:
    """Plan an already captured graph (what :func:`plan` does after :func:`fxswap.trace`)."""
    from fxswap.passes.planner import build_plan

    return build_plan(traced.ir, options)


def plan(
    model: torch.nn.Module,
    *example_inputs: Any,
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
    **example_kwargs: Any,
) -> SwapPlan:
    """Capture ``model(*example_inputs, **example_kwargs)`` and plan it under ``max_vram_gb``.

    The planner's options are those of :func:`fxswap.compile`, with the same defaults:
    ``max_vram_gb`` is GiB (2**30 bytes) and ``block_size_mb`` MiB; ``reserve_mb`` (workspace and
    allocator slack counted at every op), ``max_prefetch_depth``, ``h2d_gbps``, ``compute_tflops``
    ``device_mem_gbps``, ``p2p_gbps`` and ``nvlink`` default to :class:`fxswap.PlanOptions`'
    documented values when None.
    The inputs may be ``meta`` tensors: nothing runs. Keyword arguments other than these options
    are passed to the model, so a model keyword named like an option (``mode``...) must be passed
    positionally.

    Raises:
        ValueError: an invalid option (named, with its value and the fix); checked before capture.
        fxswap.CaptureError: the model does not capture as one graph.
        fxswap.BudgetInfeasibleError: the budget is below the smallest that works for this mode and
            input (``.min_vram_bytes``).
    """
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
    from fxswap.stored import stored_weights

    if stored_weights(model):
        # Its stored weights are meta parameters beside real ones: fxswap.trace cannot run it, and
        # the plan must count their stored sizes, which fxswap.compile does (fxswap.build.stored_ir).
        raise ValueError(
            f"`model` ({type(model).__name__}) keeps weights as stored (a GGUF or fp8 file, "
            "fxswap.stored); fxswap.plan cannot trace it. Fix: compile it with fxswap.compile(...) and read "
            "`.plan` after the first call (save it with .plan.save), or price a file with "
            "`fxswap plan --dtype Q4_K`"
        )
    return plan_traced(trace(model, *example_inputs, **example_kwargs), options)
