"""fxswap: compile-time weight swapping for large diffusion transformers.

The pipeline runs one way: trace -> analyse -> plan -> rewrite -> run.

Public names are imported lazily so that ``import fxswap`` (and the CLI's ``--help``) stays fast
and the planner can be used without pulling in the runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

from fxswap.errors import (
    BudgetInfeasibleError,
    CaptureError,
    CheckpointError,
    FxswapError,
    PlanError,
    PlanMismatchError,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "trace": "fxswap.trace",
    "Traced": "fxswap.trace",
    "plan": "fxswap.api",
    "SwapPlan": "fxswap.plan",
    "SwapUnit": "fxswap.plan",
    "PlanOptions": "fxswap.plan",
    "load_plan": "fxswap.plan",
    "compile": "fxswap.compiler",
    "monitor": "fxswap.monitor",
}

__all__ = [
    "BudgetInfeasibleError",
    "CaptureError",
    "CheckpointError",
    "FxswapError",
    "PlanError",
    "PlanMismatchError",
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
