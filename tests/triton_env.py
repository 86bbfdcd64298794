"""Whether the Triton kernel tests can run here: triton installed (its CPU interpreter runs them
without a GPU). Missing, they skip, except under ``FXSWAP_REQUIRE_TRITON`` (CI), where they fail."""

from __future__ import annotations

import os

import pytest


def triton_installed() -> bool:
    from fxswap.kernels import triton_available

    if triton_available():
        return True
    if os.environ.get("FXSWAP_REQUIRE_TRITON"):
        pytest.fail("FXSWAP_REQUIRE_TRITON is set but triton is not installed (pip install triton numpy)")
    return False
