"""The three fxswap custom ops and the process-wide unit registry they dispatch through.

The rewrite pass (``fxswap.passes.rewrite.insert_swaps``) inserts, per swapped unit ``u`` with
literal integer id ``7``::

    tok   = torch.ops.fxswap.load.default(7, anchor)       # before op load_at: start the H2D copy
    ws    = torch.ops.fxswap.wait.default(7, tok)          # before op wait_at: fresh device tensors
    w0    = ws[0]; w1 = ws[1]                              # replace the unit's parameter placeholders
    ...   = linear(x, w0, w1)                              # the unit's uses
    rtok  = torch.ops.fxswap.release.default(7, ws, last)  # after op release_after: the release point

Contract (why these ops survive Inductor; the reasoning and the pitfalls behind each rule are in
``docs/ops_and_inductor.md``):

- ``load`` returns a 0-size token and ``wait`` consumes it, so the load -> wait -> consumer order is
  data flow, not an effect chain (effect tokens were observed misordered by Inductor's reordering).
- ``wait`` pops the device tensors from the registry and returns them: from then on the GRAPH owns
  them. The registry keeps no reference, so Inductor may free or reuse those buffers after their last
  use without corrupting anything (a registry-kept tensor was observed overwritten via buffer reuse).
- ``release`` takes the unit's tensors and the output of the last use as arguments. It is the last
  reader of the tensors, so the graph drops its references right after it: that is where the memory
  returns (to the caching allocator on CUDA; the CPU ledger observes it through tensor finalizers).
  It returns a token nobody reads; ``torch.fx.has_side_effect`` keeps FX, AOT and Inductor dead-code
  elimination from removing it (Inductor's ``FallbackKernel.has_side_effects`` consults the same set).
- ``carry`` is ``load`` for the *next* call (warm start, ``fxswap.passes.warmstart``): issued in
  this call's tail for a unit the next call loads at its start. Its transfer waits in the unit's
  queue across the boundary, and the next call's ``load`` of that unit then starts nothing: its
  ``wait`` takes the carried transfer. Nobody reads its token; ``has_side_effect`` keeps it.
- No op declares a mutation: functionalization would clone and copy back the buffers.
- Unit ids are literal ints in the graph: a SymInt id would make the fake impls unhashable.
- Ids come in two kinds. A positive id is the process-wide registry's (:func:`register_unit`), unique
  for the process. A negative id is a slot of the unit table the caller binds around the run
  (:func:`bound_units`): ``fxswap.compile`` derives a build's ids from each unit's position and
  shapes (``fxswap.build.graph_unit_id``), so the same model and plan give the same graph code in
  every build and process (Inductor's FX graph cache then hits), while two compiled models in one
  process still reach their own units.

Two pure ops decode weights kept as stored (``fxswap.passes.dequant``): ``dequant`` and ``patch``,
a function the runtime registered applied to the decoded weight (:func:`register_patch`; a LoRA on
a GGUF weight in ComfyUI). A patch handle is process-wide, so a graph holding one differs from
process to process (Inductor's FX graph cache misses for those graphs).

The ops are defined with ``torch.library.Library`` rather than ``@torch.library.custom_op``:
custom_op's Python dispatch wrapper costs ~10 us per call, Library-defined ops ~2.5 us
(``benchmarks/bench_ops.py`` measures ours).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "FXSWAP_OPS",
    "UnitHandle",
    "UnitMeta",
    "bound_units",
    "carry",
    "carry_on",
    "dequant",
    "load",
    "load_on",
    "lookup",
    "patch",
    "register_patch",
    "register_unit",
    "token_for",
    "release",
    "release_on",
    "swap_table",
    "unregister_unit",
    "wait",
    "wait_on",
]


@dataclass(frozen=True, slots=True)
class UnitMeta:
    """Shapes and dtypes (as the graph sees them, i.e. after any on-device cast) of one unit."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]


class UnitHandle(Protocol):
    """What the ops need from whoever owns a unit (``fxswap.runtime.SwapRuntime``)."""

    meta: UnitMeta

    def start_load(self) -> Tensor:
        """Start the copy (unless the previous call carried it in); return the token (a 0-element
        tensor on the unit's device)."""
        ...

    def start_carry(self) -> Tensor:
        """Start the copy for the next call's first load of this unit; return the token."""
        ...

    def finish_wait(self) -> list[Tensor]:
        """Wait for the copy; return the device tensors and keep no reference to them."""
        ...

    def on_release(self) -> Tensor:
        """Note the release; return the token."""
        ...


# NOTE: the ops are called with a bare int, so a process-wide table is the only way to reach the
# owning runtime. Ids are never reused, so a stale graph calling a freed unit fails loudly instead of
# loading some other model's weights.
_UNITS: dict[int, UnitHandle] = {}
_UNITS_LOCK = threading.Lock()
_NEXT_ID = itertools.count(1)


def register_unit(handle: UnitHandle) -> int:
    """Register ``handle`` and return the fresh integer id the rewrite bakes into the graph."""
    with _UNITS_LOCK:
        uid = next(_NEXT_ID)
        _UNITS[uid] = handle
    return uid


def unregister_unit(uid: int) -> None:
    """Forget unit ``uid`` (a compiled graph that still references it will then raise)."""
    with _UNITS_LOCK:
        _UNITS.pop(uid, None)


# The unit table bound by the thread running a graph whose ids are build-local (negative).
_BOUND = threading.local()


@contextlib.contextmanager
def bound_units(table: Mapping[int, UnitHandle]) -> Iterator[None]:
    """Resolve the negative unit ids of the graphs run (or compiled) in this block, on this
    thread, through ``table`` (``fxswap.compile`` binds each build's table around its calls)."""
    before = getattr(_BOUND, "table", None)
    _BOUND.table = table
    try:
        yield
    finally:
        _BOUND.table = before


def swap_table(table: Mapping[int, UnitHandle] | None) -> Mapping[int, UnitHandle] | None:
    """Bind ``table`` on this thread and return the table bound before (``bound_units`` without a
    context manager, for the regional program's per-region switch on the hot path)."""
    before: Mapping[int, UnitHandle] | None = getattr(_BOUND, "table", None)
    _BOUND.table = table
    return before


def lookup(uid: int) -> UnitHandle:
    """Return the handle of unit ``uid``; raise a KeyError stating the contract if it is unknown."""
    try:
        if uid < 0:
            return _BOUND.table[uid]
        return _UNITS[uid]
    except (KeyError, AttributeError, TypeError):
        where = (
            "is not in the unit table bound for this call: a graph built by fxswap.compile runs through "
            "its compiled model (SwapModule), which binds its units"
            if uid < 0
            else "is not registered. Every fxswap op in a graph must belong to a live fxswap.compile(...) "
            "object; the graph outlived its runtime or was built for another process"
        )
        raise KeyError(f"fxswap: unit id {uid} {where}.") from None


_lib = torch.library.Library("fxswap", "DEF")  # noqa: TOR901 (module-lifetime library)
_lib.define("load(int uid, Tensor anchor) -> Tensor")
_lib.define("wait(int uid, Tensor token) -> Tensor[]")
_lib.define("release(int uid, Tensor[] weights, Tensor after) -> Tensor")
# Warm start: the next call's load of a head unit, issued in this call's tail (see start_carry).
_lib.define("carry(int uid, Tensor anchor) -> Tensor")
# A weight kept as its file stores it (GGUF blocks as uint8, or fp8 with a per-tensor scale), decoded
# on the device right before its first reader (fxswap.passes.dequant). A pure function of its
# arguments: no side effect, so an unused one may be removed like any op.
_lib.define("dequant(Tensor data, str qtype, int[] shape, ScalarType dtype, float? scale) -> Tensor")
# A decoded stored weight changed by a function registered under ``handle`` (register_patch): the
# ComfyUI nodes merge a LoRA into a GGUF weight with it, right after its decode. Its output is a new
# tensor (the input is not written), so, like dequant, it has no side effect.
_lib.define("patch(Tensor weight, int handle) -> Tensor")

# handle -> function; weak: the runtime that registered a function owns it (and its LoRA tensors)
_PATCHES: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_PATCH_IDS = itertools.count(1)


def register_patch(fn: Any) -> int:
    """Register ``fn`` (Tensor -> new Tensor of the same shape and dtype) for ``fxswap::patch``; the
    caller keeps ``fn`` alive as long as a graph may call it."""
    handle = next(_PATCH_IDS)
    _PATCHES[handle] = fn
    return handle


def token_for(device: torch.device) -> Tensor:
    """A 0-element token on ``device``.

    NOTE: runtimes hand out one shared token per device. A token carries no data (nothing can be
    written into 0 bytes), only the data dependency; allocating a fresh one cost ~1 us per op. An op
    whose input is that very token returns a fresh one instead (outputs must not alias inputs).
    """
    return torch.empty(0, dtype=torch.uint8, device=device)


# What each swap op does to the unit it names, given the unit's handle: the ops' implementations,
# and what the regional program's generated code calls for its glue steps, with each handle
# resolved once when the code is generated (fxswap.regional._straight_line): the dispatcher's
# 3 to 5 us per op, on two or three ops per block, is what one graph does not pay either.


def load_on(handle: UnitHandle, anchor: Tensor) -> Tensor:
    """``fxswap::load`` on ``handle``'s unit."""
    tok = handle.start_load()
    # An op's output must not alias its input: anchored on another fxswap token (the shared one),
    # hand out a fresh one.
    return tok if anchor is not tok else tok.new_empty(0)


def carry_on(handle: UnitHandle, anchor: Tensor) -> Tensor:
    """``fxswap::carry`` on ``handle``'s unit."""
    tok = handle.start_carry()
    return tok if anchor is not tok else tok.new_empty(0)


def wait_on(handle: UnitHandle, token: Tensor) -> list[Tensor]:
    """``fxswap::wait`` on ``handle``'s unit."""
    return handle.finish_wait()


def release_on(handle: UnitHandle, after: Tensor) -> Tensor:
    """``fxswap::release`` on ``handle``'s unit (the weights it lists are only a dependency)."""
    tok = handle.on_release()
    return tok if after is not tok else tok.new_empty(0)


def _load_impl(uid: int, anchor: Tensor) -> Tensor:
    return load_on(_UNITS.get(uid) or lookup(uid), anchor)


def _carry_impl(uid: int, anchor: Tensor) -> Tensor:
    return carry_on(_UNITS.get(uid) or lookup(uid), anchor)


def _wait_impl(uid: int, token: Tensor) -> list[Tensor]:
    return wait_on(_UNITS.get(uid) or lookup(uid), token)


def _release_impl(uid: int, weights: list[Tensor], after: Tensor) -> Tensor:
    return release_on(_UNITS.get(uid) or lookup(uid), after)


def _dequant_impl(
    data: Tensor, qtype: str, shape: list[int], dtype: torch.dtype, scale: float | None
) -> Tensor:
    from fxswap.quant import dequantize_any

    return dequantize_any(data, qtype, shape, dtype, scale)


def _patch_impl(weight: Tensor, handle: int) -> Tensor:
    fn = _PATCHES.get(handle)
    if fn is None:
        raise RuntimeError(f"fxswap::patch: no function registered under handle {handle} (its owner is gone)")
    out: Tensor = fn(weight)
    return out


for _name, _fn in (
    ("dequant", _dequant_impl),
    ("patch", _patch_impl),
    ("load", _load_impl),
    ("carry", _carry_impl),
    ("wait", _wait_impl),
    ("release", _release_impl),
):
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")


def _load_fake(uid: int, anchor: Tensor) -> Tensor:
    return token_for(anchor.device)


def _wait_fake(uid: int, token: Tensor) -> list[Tensor]:
    meta = lookup(uid).meta
    dev = token.device
    return [torch.empty(s, dtype=d, device=dev) for s, d in zip(meta.shapes, meta.dtypes, strict=True)]


def _release_fake(uid: int, weights: list[Tensor], after: Tensor) -> Tensor:
    return token_for(after.device)


def _dequant_fake(
    data: Tensor, qtype: str, shape: list[int], dtype: torch.dtype, scale: float | None
) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=data.device)


def _patch_fake(weight: Tensor, handle: int) -> Tensor:
    return torch.empty_like(weight)


torch.library.register_fake("fxswap::dequant", _dequant_fake, lib=_lib)
torch.library.register_fake("fxswap::patch", _patch_fake, lib=_lib)
torch.library.register_fake("fxswap::load", _load_fake, lib=_lib)
torch.library.register_fake("fxswap::carry", _load_fake, lib=_lib)
torch.library.register_fake("fxswap::wait", _wait_fake, lib=_lib)
torch.library.register_fake("fxswap::release", _release_fake, lib=_lib)

load = torch.ops.fxswap.load.default
carry = torch.ops.fxswap.carry.default
wait = torch.ops.fxswap.wait.default
release = torch.ops.fxswap.release.default
dequant = torch.ops.fxswap.dequant.default
patch = torch.ops.fxswap.patch.default

for _op in (load, carry, wait, release):
    torch.fx.has_side_effect(_op)

#: Targets of every node the rewrite inserts; passes recognise fxswap nodes by target, never by name.
FXSWAP_OPS: frozenset[Any] = frozenset({load, carry, wait, release})
