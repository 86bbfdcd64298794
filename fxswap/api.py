"""``fxswap.plan``: capture a model and plan its weight swapping under a VRAM budget, in one call."""

from __future__ import annotations

from typing import Any

import torch

from fxswap.capture import Traced, trace
from fxswap.swapplan import PlanOptions, SwapPlan

__all__ = ["OPTIONAL_OPTIONS", "make_options", "plan", "plan_traced"]


# The PlanOptions.from_user arguments that take their documented default when left out (or None).
OPTIONAL_OPTIONS = ("reserve_mb", "h2d_gbps", "compute_tflops", "max_prefetch_depth", "device_mem_gbps")


def make_options(
    *, mode: str, max_vram_gb: float, block_size_mb: float = 300, **optional: float | None
) -> PlanOptions:
    """Validated :class:`PlanOptions` from user units; an optional option that is ``None`` (or left
    out) keeps PlanOptions' documented default. ``optional`` takes the names in
    :data:`OPTIONAL_OPTIONS` (``reserve_mb``, ``h2d_gbps``, ...).

    Raises:
        TypeError: an option name that is not one of :data:`OPTIONAL_OPTIONS`.
        ValueError: naming the argument, its value and the fix (:meth:`PlanOptions.from_user`).
    """
    unknown = sorted(set(optional) - set(OPTIONAL_OPTIONS))
    if unknown:
        raise TypeError(
            f"unknown planner option {unknown[0]!r}; the options are mode, max_vram_gb, block_size_mb, "
            f"{', '.join(OPTIONAL_OPTIONS)}"
        )
    given: dict[str, Any] = {k: v for k, v in optional.items() if v is not None}
    return PlanOptions.from_user(mode=mode, max_vram_gb=max_vram_gb, block_size_mb=block_size_mb, **given)


def plan_traced(traced: Traced, options: PlanOptions) -> SwapPlan:
    """Plan an already captured graph (what :func:`plan` does after :func:`fxswap.trace`)."""
    from fxswap.passes.planner import build_plan

    return build_plan(traced.ir, options)


def plan(
    model: torch.nn.Module,
    *example_inputs: Any,
    mode: str = "adaptive",
    max_vram_gb: float = 16,
    block_size_mb: float = 300,
    reserve_mb: float | None = None,
    h2d_gbps: float | None = None,
    compute_tflops: float | None = None,
    **example_kwargs: Any,
) -> SwapPlan:
    """Capture ``model(*example_inputs, **example_kwargs)`` and plan it under ``max_vram_gb``.

    ``max_vram_gb`` is GiB (2**30 bytes) and ``block_size_mb`` MiB; ``reserve_mb`` (workspace and
    allocator slack counted at every op), ``h2d_gbps`` and ``compute_tflops`` default to
    :class:`fxswap.PlanOptions`' documented values when None. The inputs may be ``meta`` tensors:
    nothing runs. Keyword arguments other than these options are passed to the model, so a model
    keyword named like an option (``mode``...) must be passed positionally.

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
        h2d_gbps=h2d_gbps,
        compute_tflops=compute_tflops,
    )
    return plan_traced(trace(model, *example_inputs, **example_kwargs), options)
