"""Weights kept as their file stores them: GGUF blocks, fp8 with a per-tensor scale.

A model loaded from a GGUF or fp8-scaled file (``fxswap.models.wan.load``) has its quantised weights
as :class:`StoredWeight` records beside it (:func:`attach`), and those parameters themselves on
``meta``: shape and dtype of the computation, no memory. So the host holds each weight once, at its
stored size, and never dequantised (the whole point of a 9 GB Q4_K file in 32 GB of RAM).

``fxswap.compile`` reads them (:func:`stored_weights`):

- the runtime keeps ``data`` in its host store and copies it to the device as stored, for swapped
  and resident weights alike;
- the rewrite (:func:`fxswap.passes.dequant.insert_dequant`) decodes each weight on the device
  right before its first reader in the unit that brings it (``fxswap::dequant``); the decoded
  tensor lives until its last reader, the stored bytes until the unit's release;
- the planner sees each weight at its stored size (link, host, the unit's window) and the decoded
  tensor as an activation over its readers (:func:`fxswap.passes.analyse.stored_storage`).

Such a model does not run on its own (its parameters are on meta): :func:`materialise` decodes
every weight into a plain module, e.g. to compare against.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fxswap.gguf import quant_type
from fxswap.quant import FP8_DTYPES, dequantize_any

__all__ = ["StoredWeight", "attach", "materialise", "stored_sizes", "stored_weights"]


@dataclass(frozen=True, eq=False)
class StoredWeight:
    """One weight as stored: ``data`` (uint8 GGUF blocks, or an fp8 tensor of ``shape``), its
    ``qtype`` (a GGUF type name, or ``"fp8"``), the ``shape`` and ``dtype`` the model computes in,
    and the fp8 per-tensor ``scale`` (None: a plain cast)."""

    data: Tensor
    qtype: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    scale: float | None = None

    def __post_init__(self) -> None:
        numel = math.prod(self.shape)
        if self.qtype == "fp8":
            if self.data.dtype not in FP8_DTYPES or tuple(self.data.shape) != self.shape:
                raise ValueError(
                    f"StoredWeight: fp8 data must be {' or '.join(map(str, FP8_DTYPES))} of shape "
                    f"{list(self.shape)}; got {self.data.dtype} {list(self.data.shape)}"
                )
        else:
            t = quant_type(self.qtype)
            if self.scale is not None:
                raise ValueError(f"StoredWeight: a {t.name} weight takes no `scale` (its blocks hold theirs)")
            if self.data.dtype != torch.uint8 or self.data.dim() != 1 or numel % t.block_elems:
                raise ValueError(
                    f"StoredWeight: {t.name} data must be 1-D uint8 with the shape's last dimension a "
                    f"multiple of {t.block_elems}; got {self.data.dtype} {list(self.data.shape)} for "
                    f"shape {list(self.shape)}"
                )
            if self.data.numel() != t.nbytes(numel):
                raise ValueError(
                    f"StoredWeight: {t.name} of shape {list(self.shape)} takes {t.nbytes(numel)} bytes; "
                    f"got {self.data.numel()}"
                )
        if not self.dtype.is_floating_point:
            raise ValueError(f"StoredWeight: compute dtype {self.dtype} is not a floating-point dtype")

    @property
    def nbytes(self) -> int:
        """Bytes as stored: in host memory and over the link."""
        return self.data.numel() * self.data.element_size()

    @property
    def dequantized_nbytes(self) -> int:
        """Bytes of the decoded tensor on the device."""
        return math.prod(self.shape) * self.dtype.itemsize

    def dequantize(self) -> Tensor:
        """The weight in its compute dtype, decoded where ``data`` lives (what ``fxswap::dequant``
        computes)."""
        return dequantize_any(self.data, self.qtype, self.shape, self.dtype, self.scale)


_STORED: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, StoredWeight]] = weakref.WeakKeyDictionary()


def attach(model: torch.nn.Module, weights: Mapping[str, StoredWeight]) -> None:
    """Record ``weights`` (by parameter or buffer name) as ``model``'s stored weights. Each must
    name a tensor of ``model`` with the record's shape and dtype (the one the graph computes in)."""
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, w in weights.items():
        t = named.get(name)
        if t is None:
            raise KeyError(f"stored weight `{name}` is not a parameter or buffer of {type(model).__name__}")
        if tuple(t.shape) != w.shape or t.dtype != w.dtype:
            raise ValueError(
                f"stored weight `{name}`: shape {list(w.shape)} {w.dtype}, but the model's tensor is "
                f"{list(t.shape)} {t.dtype}"
            )
    _STORED.setdefault(model, {}).update(weights)


def stored_weights(model: torch.nn.Module) -> dict[str, StoredWeight]:
    """``model``'s stored weights by name (empty for a model loaded in its compute dtype)."""
    return dict(_STORED.get(model, {}))


def stored_sizes(weights: Mapping[str, StoredWeight]) -> dict[str, tuple[int, int]]:
    """Per weight, (bytes as stored, bytes decoded): what the planner needs, as plain data."""
    return {k: (w.nbytes, w.dequantized_nbytes) for k, w in weights.items()}


def materialise(model: torch.nn.Module) -> torch.nn.Module:
    """Decode every stored weight into ``model`` (in place, on the CPU) and forget the records:
    a plain module again, holding each weight dequantised."""
    weights = _STORED.pop(model, {})
    for name, w in weights.items():
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        value = w.dequantize().to("cpu")
        if attr in mod._parameters:
            mod._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        else:
            mod._buffers[attr] = value
    return model
