"""Attention backends of the WAN model by name (``WanConfig.attention_type``).

Kept out of :mod:`fxswap.models.wan_config`, which lists the same names in ``ATTENTION_NAMES``
without importing torch (``fxswap plan`` reads configs on its cached path without torch); this
module checks at import that both lists agree. Public through :mod:`fxswap.models.wan`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch.nn.functional as F
from torch import Tensor

from fxswap.models import sla as _sla
from fxswap.models.wan_config import ATTENTION_NAMES

__all__ = ["ATTENTION_TYPES", "AttentionFn", "attention", "get_attention"]

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _sla_untrained(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _sla.sla_attention(q, k, v)


#: Attention implementations by ``WanConfig.attention_type``. Each takes q, k, v as ``[B, H, L, d]``
#: (same dtype) and returns ``[B, H, Lq, d]`` with the default ``1/sqrt(d)`` scale and no mask.
#: ``"sla"`` here is sparse-linear attention with the default ``sla_topk`` and a zero ``proj_l``; a
#: model built with ``attention_type="sla"`` instead gives every self-attention its own
#: :class:`fxswap.models.sla.SparseLinearAttention` (learned ``proj_l``, the config's ``sla_topk``)
#: and keeps SDPA for cross-attention, as TurboDiffusion does.
#: Read-only: a new backend is added here in code (and its name to ``wan_config.ATTENTION_NAMES``),
#: not registered at runtime.
ATTENTION_TYPES: Mapping[str, AttentionFn] = MappingProxyType({"sdpa": _sdpa, "sla": _sla_untrained})

if tuple(ATTENTION_TYPES) != ATTENTION_NAMES:
    raise AssertionError(
        f"wan_config.ATTENTION_NAMES {ATTENTION_NAMES} does not list the backends {tuple(ATTENTION_TYPES)}"
    )


def get_attention(attention_type: str) -> AttentionFn:
    """Return the attention function for ``attention_type`` or raise a ValueError naming the choices."""
    try:
        return ATTENTION_TYPES[attention_type]
    except KeyError:
        raise ValueError(
            f"attention_type={attention_type!r} is not supported; choose one of {sorted(ATTENTION_TYPES)}"
        ) from None


def attention(q: Tensor, k: Tensor, v: Tensor, attention_type: str = "sdpa") -> Tensor:
    """Multi-head attention on ``[B, H, L, d]`` tensors through the backend named by ``attention_type``."""
    return get_attention(attention_type)(q, k, v)
