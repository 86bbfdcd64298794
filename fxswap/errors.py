"""Exceptions raised by fxswap. Every message names the argument or field, the value and the fix.

Every exception fxswap raises on purpose is defined here and exported from ``fxswap``.
:class:`DeviceOutOfMemoryError` subclasses ``torch.OutOfMemoryError`` (so a caller's existing
out-of-memory handler still catches it); it is defined on first access, so that ``import fxswap``
does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "BudgetInfeasibleError",
    "CaptureError",
    "CheckpointError",
    "ClosedError",
    "ComfyIntegrationError",
    "CudaGraphCaptureError",
    "DeviceError",
    "DeviceOutOfMemoryError",
    "FxswapError",
    "LayoutError",
    "NoCudaError",
    "ParallelCallError",
    "PlanError",
    "PlanFingerprintMismatch",
    "PlanMismatchError",
    "ReentrantCallError",
    "ReplayError",
    "SequenceParallelError",
    "SignatureError",
    "TrainingModeError",
]


class FxswapError(Exception):
    """Base class of every error fxswap raises on purpose."""


# ------------------------------------------------------------------------------- capture and plan
class CaptureError(FxswapError):
    """The model could not be captured as one graph (names the break and its source line)."""


class SequenceParallelError(FxswapError, ValueError):
    """``ulysses_degree``: the graph cannot be sharded as asked (a degree that does not divide the
    heads or the tokens, both named; no self-attention to find the token dimension by)."""


class ParallelCallError(FxswapError, RuntimeError):
    """A sequence-parallel call failed on this rank, typically in a collective because another
    rank died, was killed or timed out; ``rank`` and ``degree`` say which process this is."""

    def __init__(self, message: str, *, rank: int, degree: int) -> None:
        super().__init__(message)
        self.rank = rank
        self.degree = degree


class PlanError(FxswapError):
    """A plan violates its own contract (a use before its wait, a use after release, over budget)."""


class PlanMismatchError(FxswapError, ValueError):
    """A saved plan does not belong to this model, input or options (names the field that differs)."""


class PlanFingerprintMismatch(PlanMismatchError):
    """A plan's fingerprint differs from the model/input/options it is used with.

    ``fields`` lists the parts that differ, in ``fxswap.swapplan.FINGERPRINT_FIELDS`` order.
    """

    def __init__(self, message: str, *, fields: tuple[str, ...]) -> None:
        super().__init__(message)
        self.fields = fields


class BudgetInfeasibleError(FxswapError, ValueError):
    """No schedule of the requested mode fits ``max_vram_gb``.

    ``min_vram_bytes`` is the smallest budget that works for that mode and input.
    """

    def __init__(self, message: str, *, min_vram_bytes: int, mode: str) -> None:
        super().__init__(message)
        self.min_vram_bytes = min_vram_bytes
        self.mode = mode


class ReplayError(FxswapError, RuntimeError):
    """Inductor's generated code could not be replayed (an unknown wrapper construct)."""


class LayoutError(FxswapError, RuntimeError):
    """A compiled region was handed a tensor laid out unlike the one it was compiled for."""


class CheckpointError(FxswapError, ValueError):
    """A checkpoint cannot be loaded: unknown layout, missing/unexpected keys, bad shapes, truncation."""


# ------------------------------------------------------------------------------- the compiled model
class DeviceError(FxswapError, ValueError):
    """The requested device does not exist or is not usable, or an input is on another device."""


class TrainingModeError(FxswapError, ValueError):
    """The model (or one of its submodules) is in training mode; fxswap runs inference only."""


class SignatureError(FxswapError, ValueError):
    """A call's inputs do not match the compiled signature and ``strict=True`` forbids a new plan,
    or the model failed on the first real call of a new signature (names the inputs' dtypes)."""


class ReentrantCallError(FxswapError, RuntimeError):
    """A compiled model was called from inside its own call (same thread)."""


class ClosedError(FxswapError, RuntimeError):
    """The compiled model was closed; its units and device copies are gone."""


class NoCudaError(FxswapError, RuntimeError):
    """No CUDA device to read the memory of (pass the card's memory instead)."""


class CudaGraphCaptureError(FxswapError, RuntimeError):
    """A compiled model was called while a CUDA graph is being captured (fxswap cannot be captured)."""


class ComfyIntegrationError(FxswapError, ValueError):
    """A ComfyUI model or workflow fxswap cannot run as asked (the message says what to change)."""


def _device_oom_error() -> type:
    import torch

    class DeviceOutOfMemoryError(FxswapError, torch.OutOfMemoryError):
        """The device ran out of memory during a call and fxswap could not recover (``layerwise`` /
        ``chunkwise`` never re-plan; ``adaptive`` re-plans once). Nothing of the failed call is held.

        Attributes: ``free_bytes`` (measured after fxswap released its own memory), ``margin_bytes``
        (kept free for others), ``fits_bytes`` (the budget that would fit now: free - margin + the
        call's own inputs, which the plan counts and which are allocated already) and
        ``needed_bytes`` (what the plan in use needs; for adaptive after re-planning, the smallest
        budget that works).
        """

        def __init__(
            self, message: str, *, free_bytes: int, margin_bytes: int, fits_bytes: int, needed_bytes: int
        ) -> None:
            super().__init__(message)
            self.free_bytes = free_bytes
            self.margin_bytes = margin_bytes
            self.fits_bytes = fits_bytes
            self.needed_bytes = needed_bytes

    DeviceOutOfMemoryError.__module__ = __name__
    DeviceOutOfMemoryError.__qualname__ = "DeviceOutOfMemoryError"
    return DeviceOutOfMemoryError


if TYPE_CHECKING:
    import torch

    class DeviceOutOfMemoryError(FxswapError, torch.OutOfMemoryError):
        free_bytes: int
        margin_bytes: int
        fits_bytes: int
        needed_bytes: int

        def __init__(
            self, message: str, *, free_bytes: int, margin_bytes: int, fits_bytes: int, needed_bytes: int
        ) -> None: ...


def __getattr__(name: str) -> Any:
    if name == "DeviceOutOfMemoryError":
        cls = _device_oom_error()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
