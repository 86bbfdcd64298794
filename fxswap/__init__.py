"""fxswap: compile-time weight swapping for large diffusion transformers.

The pipeline runs one way: trace -> analyse -> plan -> rewrite -> run.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
