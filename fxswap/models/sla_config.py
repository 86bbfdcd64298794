"""SLA's block sizes and ``sla_topk`` check, kept apart from :mod:`fxswap.models.sla` so that
:mod:`fxswap.models.wan_config` (and through it ``fxswap plan``'s cached path) imports no torch.
:mod:`fxswap.models.sla` re-exports all of them."""

from __future__ import annotations

__all__ = ["BLOCK_K", "BLOCK_Q", "check_topk"]

#: TurboDiffusion's block sizes (``SLA(head_dim, topk, BLKQ=128, BLKK=64)`` in ``modify_model.py``).
BLOCK_Q = 128
BLOCK_K = 64


def check_topk(topk: float) -> None:
    if isinstance(topk, bool) or not isinstance(topk, (int, float)) or not 0.0 < topk <= 1.0:
        raise ValueError(
            f"sla_topk={topk!r} must be a number in (0, 1]: the fraction of key blocks each query block "
            f"attends to exactly (TurboDiffusion uses 0.1 to 0.2; 1.0 is dense attention)"
        )
