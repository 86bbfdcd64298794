"""fxswap: compile-time weight swapping for large diffusion transformers.

The pipeline runs one way: trace -> analyse -> plan -> rewrite -> run.

Public names are imported lazily so that ``import fxswap`` (and the CLI's ``--help``) stays fast
and the planner can be used without pulling in the runtime. No submodule shares a name with a
public function (``fxswap.plan`` is a function; the plan records live in ``fxswap.swapplan``), so
importing a submodule never shadows an export.
"""

from __future__ import annotations

import importlib
from typing import Any

from fxswap._version import __version__
from fxswap.errors import (
    BudgetInfeasibleError,
    CaptureError,
    CheckpointError,
    ClosedError,
    ComfyIntegrationError,
    CudaGraphCaptureError,
    DeviceError,
    FxswapError,
    LayoutError,
    NoCudaError,
    ParallelCallError,
    PlanError,
    PlanFingerprintMismatch,
    PlanMismatchError,
    ReentrantCallError,
    ReplayError,
    SequenceParallelError,
    SignatureError,
    TrainingModeError,
)

# public name -> module that defines it
_LAZY = {
    "trace": "fxswap.capture",
    "Traced": "fxswap.capture",
    "plan": "fxswap.api",
    "SwapPlan": "fxswap.swapplan",
    "SwapUnit": "fxswap.swapplan",
    "PlanOptions": "fxswap.options",
    "load_plan": "fxswap.swapplan",
    "compile": "fxswap.compiler",
    "compile_experts": "fxswap.experts",
    "Experts": "fxswap.experts",
    "SwapModule": "fxswap.compiled",
    # defined on first access: it subclasses torch.OutOfMemoryError (see fxswap.errors)
    "DeviceOutOfMemoryError": "fxswap.errors",
    "monitor": "fxswap.monitoring",
    "recommend": "fxswap.bench.recommendations",
}

__all__ = [
    "BudgetInfeasibleError",
    "CaptureError",
    "CheckpointError",
    "ClosedError",
    "ComfyIntegrationError",
    "DeviceError",
    "FxswapError",
    "NoCudaError",
    "CudaGraphCaptureError",
    "ParallelCallError",
    "SequenceParallelError",
    "PlanError",
    "PlanFingerprintMismatch",
    "PlanMismatchError",
    "LayoutError",
    "ReentrantCallError",
    "ReplayError",
    "SignatureError",
    "TrainingModeError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fxswap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
