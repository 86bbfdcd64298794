"""Optional GPU kernels. Each kernel module imports Triton at its top, so import one only after
:func:`triton_available` says Triton is installed (the ``triton`` extra); fxswap itself never needs it."""

from __future__ import annotations

import importlib.util

__all__ = ["triton_available"]


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None
