"""Several compiled experts under one VRAM budget: WAN 2.2 A14B's high-noise and low-noise models.

:func:`compile_experts` compiles each expert with :func:`fxswap.compile` against the full budget and
returns an :class:`Experts`, which makes sure only one expert holds device memory at a time and can
pick the expert by timestep.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fxswap import compiler
from fxswap.build import resolve_device
from fxswap.compiled import SwapModule
from fxswap.swapplan import SwapPlan

__all__ = ["Experts", "compile_experts"]


class Experts:
    """Several compiled experts (WAN 2.2 A14B: high-noise and low-noise) under one VRAM budget.

    Only one expert holds device memory at a time: calling an expert releases the resident weights
    of the one that ran before. ``experts(x, t, ...)`` picks by timestep when ``boundary`` is set
    (``t >= boundary`` -> expert 0, the high-noise one, as WAN 2.2 does); ``experts[i](...)`` or
    ``experts.high`` / ``experts.low`` call one explicitly.
    """

    def __init__(
        self, experts: Sequence[SwapModule], boundary: float | None, timestep_arg: str | int
    ) -> None:
        self.experts = list(experts)
        self.boundary = boundary
        self.timestep_arg = timestep_arg
        self._active: int | None = None
        self._mirror: list[Any] = []  # see _host_value: [weakref to the base, version, host copy]

    def _switch(self, i: int) -> None:
        if self._active is not None and self._active != i:
            self.experts[self._active].release()
        self._active = i

    def __getitem__(self, i: int) -> SwapModule:
        return _ExpertView(self, i)  # type: ignore[return-value]

    @property
    def high(self) -> SwapModule:
        return self[0]

    @property
    def low(self) -> SwapModule:
        return self[1]

    @property
    def plans(self) -> list[SwapPlan]:
        return [p for e in self.experts for p in e.plans]

    @functools.cached_property
    def _forward_signature(self) -> inspect.Signature:
        # per call otherwise: taken once, on the first call that needs it
        return inspect.signature(self.experts[0].model.forward)

    def _timestep(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        ta = self.timestep_arg
        if isinstance(ta, int):
            t = args[ta]
        elif ta in kwargs:
            t = kwargs[ta]
        else:
            t = self._forward_signature.bind_partial(*args, **kwargs).arguments[ta]
        return _host_value(t, self._mirror)

    def __call__(self, *args: Any, host_timestep: float | None = None, **kwargs: Any) -> Any:
        """Run the expert the timestep picks. ``host_timestep``: the step's timestep as a Python
        number, when the caller has it (the sampling loop does): the device tensor passed to the
        model is then never read, so picking the expert costs no device sync."""
        if self.boundary is None:
            raise ValueError(
                "`boundary` was not set: call experts.high(...) / experts.low(...) or experts[i](...)"
            )
        t = float(host_timestep) if host_timestep is not None else self._timestep(args, kwargs)
        return self[0 if t >= self.boundary else 1](*args, **kwargs)


def _host_value(t: Any, mirror: list[Any]) -> float:
    """The first element of the timestep ``t`` as a float, without a host sync where avoidable.

    Reading a device tensor (``.item()``) waits for all queued GPU work, so the host could not run
    ahead of the previous step. Pipelines pass each step's timestep as a view of one device tensor
    (diffusers: ``t`` of ``scheduler.timesteps``, then ``t.expand(batch)``): that tensor is copied to the
    host once (one sync per schedule) and later views are read from the host copy while the storage's
    version counter says it is unchanged. Numbers and CPU tensors never sync; a fresh device tensor
    per step (or an inference-mode tensor, which has no version counter) is read directly.
    """
    if not isinstance(t, torch.Tensor):
        return float(t)
    if t.device.type in ("cpu", "meta"):
        return float(t.flatten()[0])
    return _mirrored_value(t, mirror, on_device_read=_warn_device_read)


def _warn_device_read() -> None:
    warnings.warn(
        "fxswap.Experts: the timestep is a device tensor fxswap cannot mirror on the host (a fresh "
        "tensor per step, or one made under inference_mode); reading it waits for the device every "
        "step. Fix: pass the step's timestep as a number, experts(..., host_timestep=float(t)), or "
        "call experts.high / experts.low yourself.",
        stacklevel=4,
    )


def _mirrored_value(
    t: torch.Tensor, mirror: list[Any], on_device_read: Callable[[], None] | None = None
) -> float:
    """``t``'s first element read from ``mirror``, a host copy of ``t``'s storage kept in place
    (one at a time: the schedule being sampled), refreshed when ``t`` belongs to another tensor or
    its version counter moved. ``on_device_read`` is called before a read that cannot use the
    mirror (a device sync when ``t`` is on a device)."""
    base = t._base if t._base is not None else t
    try:
        version = t._version
    except RuntimeError:  # inference tensors track no version: nothing tells a stale copy apart
        if on_device_read is not None:
            on_device_read()
        return float(t.flatten()[0])
    if not mirror or mirror[0]() is not base or mirror[1] != version or mirror[2].dtype != t.dtype:
        storage = t.untyped_storage().cpu()  # the one sync per schedule
        mirror[:] = [weakref.ref(base), version, torch.empty(0, dtype=t.dtype).set_(storage)]
    host = mirror[2].as_strided(t.shape, t.stride(), t.storage_offset())
    return float(host.flatten()[0])


class _ExpertView:
    def __init__(self, group: Experts, i: int) -> None:
        self.group, self.i = group, i

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.group._switch(self.i)
        return self.group.experts[self.i](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group.experts[self.i], name)


def compile_experts(
    *models: torch.nn.Module,
    boundary: float | None = None,
    timestep_arg: str | int = "timestep",
    **compile_kwargs: Any,
) -> Experts:
    """Compile several experts that share one device and one ``max_vram_gb`` budget.

    Each expert is planned against the full budget because only one is ever on the device: switching
    experts releases the resident weights of the previous one (the host copies stay) BEFORE the new
    expert makes its own, so the two never hold device memory together (tested with one shared
    ledger). Call experts through the returned :class:`Experts` (``experts(...)``, ``experts[i]``,
    ``.high`` / ``.low``); calling the SwapModules in ``experts.experts`` directly skips the switch.

    Args:
        models: the experts, high-noise first for WAN 2.2.
        boundary: timestep at or above which expert 0 runs, in the units the model is called with
            (WAN 2.2 A14B t2v: ``0.875 * 1000 = 875``).
        timestep_arg: the timestep's parameter name (found in kwargs or bound by the forward's
            signature) or its positional index.
        **compile_kwargs: the keyword arguments of :func:`fxswap.compile`.
    """
    if len(models) < 2:
        raise ValueError(f"compile_experts needs at least two models, got {len(models)}")
    resolve_device(compile_kwargs.get("device"))  # one device for all: a bad one fails first
    return Experts([compiler.compile(m, **compile_kwargs) for m in models], boundary, timestep_arg)
