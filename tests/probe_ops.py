"""A test-only op, ``torch.ops.fxswap_test.probe(pid, x)``: calls a registered Python callback and
returns a fresh copy of ``x``. Inserted into a rewritten graph, it observes the ledger at a precise
point of a compiled program. It lives in its own namespace, outside the library."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["probe", "register_probe", "unregister_probe"]

_lib = torch.library.Library("fxswap_test", "DEF")  # noqa: TOR901 (module-lifetime library)
_lib.define("probe(int pid, Tensor x) -> Tensor")

_PROBES: dict[int, Callable[[], None]] = {}
_NEXT_PROBE = itertools.count(1)


def _probe_impl(pid: int, x: Tensor) -> Tensor:
    cb = _PROBES.get(pid)
    if cb is not None:
        cb()
    # A fresh tensor: returning the input itself from a non-aliasing schema is illegal.
    return x.clone()


def _probe_fake(pid: int, x: Tensor) -> Tensor:
    return torch.empty_like(x)


_lib.impl("probe", _probe_impl, "CompositeExplicitAutograd")
torch.library.register_fake("fxswap_test::probe", _probe_fake, lib=_lib)
probe = torch.ops.fxswap_test.probe.default
torch.fx.has_side_effect(probe)


def register_probe(callback: Callable[[], None]) -> int:
    """Register ``callback`` for ``probe(pid, x)`` and return ``pid``."""
    pid = next(_NEXT_PROBE)
    _PROBES[pid] = callback
    return pid


def unregister_probe(pid: int) -> None:
    _PROBES.pop(pid, None)
