"""Exceptions raised by fxswap. Every message names the argument or field, the value and the fix."""

from __future__ import annotations

__all__ = [
    "BudgetInfeasibleError",
    "CaptureError",
    "CheckpointError",
    "FxswapError",
    "PlanError",
    "PlanMismatchError",
]


class FxswapError(Exception):
    """Base class of every error fxswap raises on purpose."""


class CaptureError(FxswapError):
    """The model could not be captured as one graph (names the break and its source line)."""


class PlanError(FxswapError):
    """A plan violates its own contract (a use before its wait, a use after release, over budget)."""


class PlanMismatchError(FxswapError, ValueError):
    """A saved plan does not belong to this model, input or options (names the field that differs)."""


class BudgetInfeasibleError(FxswapError, ValueError):
    """No schedule of the requested mode fits ``max_vram_gb``.

    ``min_vram_bytes`` is the smallest budget that works for that mode and input.
    """

    def __init__(self, message: str, *, min_vram_bytes: int, mode: str) -> None:
        super().__init__(message)
        self.min_vram_bytes = min_vram_bytes
        self.mode = mode


class CheckpointError(FxswapError, ValueError):
    """A checkpoint cannot be loaded: unknown layout, missing/unexpected keys, bad shapes, truncation."""
