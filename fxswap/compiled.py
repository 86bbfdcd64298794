"""Call time of a compiled model: :class:`SwapModule`, what :func:`fxswap.compile` returns.

A call binds its arguments to ``forward``'s parameters (positional and keyword calls of the same
inputs are one signature), checks the guards (closed, training mode, re-entry, devices, ``strict``),
builds the signature's program on its first call (:mod:`fxswap.build`), keeps the signature's
resident weights on the device, runs the program with its units bound, notifies the monitors,
empties the CUDA cache every ``empty_cache_freq`` calls and rebuilds the outputs. Out of device
memory, it gives back what the call held and, in ``adaptive`` mode, re-plans once for the memory
that is free (:meth:`SwapModule._recover`).

Later calls with the same signature call the compiled graph directly: no Dynamo guard evaluation,
no recompilation, no graph break.

Dtypes: a call whose inputs have another dtype is another signature. It gets its own capture and
plan (``strict=True`` refuses it instead with :class:`fxswap.SignatureError`). If the model cannot
run in that dtype, the capture fails with :class:`fxswap.CaptureError` naming the line, or (meta
tensors do not check every dtype rule) the first real call fails with :class:`fxswap.SignatureError`
naming the inputs' and the weights' dtypes; nothing of that signature is kept.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import logging
import threading
import traceback
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxswap import ops
from fxswap.build import Builder, Entry, host_line, signature
from fxswap.errors import (
    BudgetInfeasibleError,
    ClosedError,
    DeviceError,
    DeviceOutOfMemoryError,
    FxswapError,
    ReentrantCallError,
    SignatureError,
    TrainingModeError,
)
from fxswap.monitoring import any_active, notify_step
from fxswap.options import GiB, MiB, PlanOptions
from fxswap.passes.sequence_parallel import SequenceParallel
from fxswap.runtime import SwapRuntime, check_not_capturing
from fxswap.swapplan import SwapPlan

__all__ = ["OomRecovery", "SwapModule"]

logger = logging.getLogger("fxswap.compiler")


@dataclass(frozen=True, slots=True)
class OomRecovery:
    """One out-of-memory recovery of an adaptive compiled model (``SwapModule.recoveries``)."""

    where: str  # the failing step: "first call" or "call <n>"
    error: str  # the original error, shortened
    free_bytes: int
    margin_bytes: int
    old_budget_bytes: int
    new_budget_bytes: int
    replanned: bool  # False: the budget still fitted, the same plan was run again
    peak_bytes: int  # the new plan's peak


def _describe(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    def one(v: Any) -> Any:
        return f"{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}" if isinstance(v, torch.Tensor) else v

    return str(pytree.tree_map(one, (args, kwargs)))


def _training_modules(modules: Sequence[torch.nn.Module], root: torch.nn.Module) -> list[str]:
    names = {id(m): n for n, m in root.named_modules()}
    return [names.get(id(m), "?") or "<root>" for m in modules if m.training]


def _plain_signature(model: torch.nn.Module) -> inspect.Signature | None:
    """forward's signature if every parameter can be passed by keyword (no *args / **kwargs)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    kinds = {p.kind for p in sig.parameters.values()}
    if kinds & {
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
        inspect.Parameter.POSITIONAL_ONLY,
    }:
        return None
    return sig


class SwapModule:
    """The callable :func:`compile` returns. ``plan`` is the current signature's plan, ``plans`` all.

    Attributes:
        runtime: the :class:`fxswap.runtime.SwapRuntime` (host store, ledger, stats).
        stats: ``{"captures", "compiles", "calls", "empty_cache"}`` counters.
        recoveries: one :class:`OomRecovery` per out-of-memory error an adaptive model survived.

    Calls are serialised: a second thread waits for the running call (the units' transfers pair
    up through per-unit queues); a call from inside a call raises :class:`ReentrantCallError`.
    :meth:`close` (or garbage collection) returns all device and pinned memory.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        options: PlanOptions,
        plan: SwapPlan | None,
        backend: str,
        empty_cache_freq: int,
        device: torch.device,
        strict: bool,
        runtime: SwapRuntime,
        parallel: SequenceParallel | None = None,
    ) -> None:
        self.model = model
        self.parallel = parallel
        self.options = options
        self.backend = backend
        self.empty_cache_freq = empty_cache_freq
        self.device = device
        self.strict = strict
        self.runtime = runtime
        self._given_plan = plan
        self._entries: dict[Hashable, Entry] = {}
        self._active: Entry | None = None
        self._current: Entry | None = None
        self.stats = {"captures": 0, "compiles": 0, "calls": 0, "empty_cache": 0}
        self._modules = tuple(model.modules())
        self._forward_sig = _plain_signature(model)
        # A weak reference: the builder must not keep this object alive (a cycle would delay the
        # finalizer that returns the device and pinned memory until the next garbage collection).
        me = weakref.ref(self)

        def activate(entry: Entry) -> None:
            sm = me()
            if sm is not None:
                sm._activate(entry)

        self._builder = Builder(
            model,
            runtime,
            device,
            backend,
            None if self._forward_sig is None else list(self._forward_sig.parameters),
            activate,
            self.stats,
            parallel,
        )
        self._named = self._builder.named
        # One call at a time: a call's loads and waits pair up through per-unit queues, so two
        # interleaved calls would take each other's transfers. Other threads wait their turn.
        self._call_lock = threading.Lock()
        self._call_owner: int | None = None
        self.recoveries: list[OomRecovery] = []
        #: Kept free for other processes when re-planning after an out-of-memory error:
        #: max(oom_margin_min_bytes, oom_margin_share x free memory).
        self.oom_margin_min_bytes = 256 * MiB if device.type == "cuda" else 0
        self.oom_margin_share = 0.05
        self._finalizer = weakref.finalize(self, runtime.close)

    # -- introspection
    @property
    def plan(self) -> SwapPlan | None:
        """The plan of the most recent call's signature (or the given plan before the first call)."""
        return self._current.plan if self._current is not None else self._given_plan

    @property
    def plans(self) -> list[SwapPlan]:
        return [e.plan for e in self._entries.values()]

    @property
    def graph_module(self) -> fx.GraphModule | None:
        """The rewritten FX graph of the most recent call's signature."""
        return self._current.gm if self._current is not None else None

    @property
    def code(self) -> str:
        """The Python code of the rewritten graph of the most recent call's signature: every unit's
        ``fxswap_load_<unit>``, ``fxswap_wait_<unit>`` and ``fxswap_release_<unit>`` node in place
        (the release node is where the unit's device memory returns). Empty before the first call."""
        gm = self.graph_module
        return "" if gm is None else gm.code

    def _build(self, args: tuple[Any, ...], kwargs: dict[str, Any], root: dict[str, Any]) -> Entry:
        # the options and the given plan are the compiled model's own: _recover changes them
        return self._builder.build(self.options, self._given_plan, args, kwargs, root)

    # -- calling
    def _activate(self, entry: Entry) -> None:
        if self._active is entry:
            return
        # Another signature's plan may keep other weights resident: never hold both sets. Units
        # the last call carried for its own graph's next call (warm start) are not this graph's.
        self.runtime.discard_pending()
        self.runtime.retain_residents(entry.resident)
        self._active = entry

    def release(self) -> None:
        """Drop every resident device copy and every unit prefetched for a next call (they are
        made again by the next call). Safe while a call runs in another thread: that call keeps the
        transfers it issued, and the next call drops what it carried."""
        self.runtime.drop_residents()
        self._active = None
        self._discard_when_idle()

    def discard_prefetch(self) -> bool:
        """Free the units a warm start loaded for the next call (``plan.carried_bytes``), e.g. when
        the sampling loop is over or the weights are about to change; the next call then starts
        cold. Resident weights stay. Returns False (and frees nothing) while a call is running."""
        return self._discard_when_idle()

    def _discard_when_idle(self) -> bool:
        # A running call's queues pair its own loads with its waits: never empty them under it (from
        # another thread, or from a hook inside the call, which must not wait for the call either).
        if not self._call_lock.acquire(blocking=False):
            return False
        try:
            self.runtime.discard_pending()
        finally:
            self._call_lock.release()
        return True

    def close(self) -> None:
        """Return every byte of device and pinned host memory this model holds and unregister its
        units; later calls raise :class:`ClosedError`. Weights the store shared with the model (see
        ``_share_host_copies``) are given back as pageable copies, so the model stays usable on its
        own. Garbage collection of the compiled model does the same minus that hand-back."""
        with self._call_lock:
            if self.runtime.closed:
                return
            store = self.runtime.store
            for name, host in store.items():
                t = self._named.get(name)
                if t is not None and t.data_ptr() == host.data_ptr() and store.in_arena(name):
                    t.data = torch.empty(host.shape, dtype=host.dtype).copy_(host)
            self._entries.clear()
            self._active = self._current = None
            self._finalizer()  # runtime.close(), once

    def summary(self) -> str:
        """The current plan's summary plus the host copies: pinned and pageable bytes (and why
        pinning stopped, if it failed)."""
        plan = self.plan
        return host_line(self.runtime) if plan is None else plan.summary() + "\n" + host_line(self.runtime)

    def _canonical(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # Positional or keyword, the same call is the same signature (one plan, not two).
        if self._forward_sig is None:
            return args, kwargs
        try:
            bound = self._forward_sig.bind(*args, **kwargs)
        except TypeError:
            return args, kwargs  # let the model report its own argument error
        return (), dict(bound.arguments)

    def __call__(self, *orig_args: Any, **orig_kwargs: Any) -> Any:
        me = threading.get_ident()
        if self._call_owner == me:
            raise ReentrantCallError(
                f"{type(self.model).__name__} compiled by fxswap was called from inside its own call "
                "(a hook or callback calling the model?). Fix: call it after the running call returns."
            )
        with self._call_lock:
            self._call_owner = me
            try:
                return self._call(orig_args, orig_kwargs)
            except RuntimeError as e:
                if self.parallel is None:
                    raise
                from fxswap.parallel import collective_failed

                raise collective_failed(e, self.parallel, type(self.model).__name__) from e
            finally:
                self._call_owner = None

    def _call(self, orig_args: tuple[Any, ...], orig_kwargs: dict[str, Any]) -> Any:
        check_not_capturing(f"{type(self.model).__name__} compiled by fxswap")
        if self.runtime.closed:
            raise ClosedError(
                f"this compiled {type(self.model).__name__} was closed (close()): its device copies and "
                "units are gone. Fix: compile the model again with fxswap.compile."
            )
        if any(m.training for m in self._modules):
            train = _training_modules(self._modules, self.model)
            raise TrainingModeError(
                f"{type(self.model).__name__} is in training mode ({len(train)} module(s) with "
                f"training=True, e.g. {', '.join(train[:3])}): dropout and batch-norm statistics would "
                "make the output random and differ from inference. fxswap runs inference only. "
                "Fix: call model.eval() before calling the compiled model."
            )
        # NOTE: the cache key and the graph inputs use the canonical form, so positional and keyword
        # calls share a plan; the capture uses the call as given, so that its graph (placeholder names
        # included) fingerprints equal to an offline plan made with fxswap.plan(model, <same call>).
        args, kwargs = self._canonical(orig_args, orig_kwargs)
        sig = signature(args, kwargs)
        found = self._entries.get(sig)
        root = {"args": args, "kwargs": kwargs}
        if found is None:
            if self.strict and self._entries:
                raise SignatureError(
                    f"strict=True: inputs {_describe(args, kwargs)} differ from the compiled signature "
                    "(shape, strides, "
                    "dtype, device or a non-tensor argument). Fix: call with the compiled shapes and "
                    "layouts (e.g. .contiguous()), or "
                    "compile with strict=False to plan each new signature."
                )
            self._check_devices(args, kwargs)
            # The build probes op workspace and (Inductor) replays programs on the device: give back
            # the last signature's residents and carried units first, so it runs within the budget.
            self._drop_device_copies()
            try:
                built: Entry | None = self._build(orig_args, orig_kwargs, root)
            except torch.OutOfMemoryError as e:  # Inductor's build runs on the device too
                if isinstance(e, FxswapError):
                    raise
                built = None
                entry, outs = self._recover(e, sig, None, orig_args, orig_kwargs, root)
            if built is not None:
                entry, outs = self._first_run(built, sig, args, kwargs, orig_args, orig_kwargs, root)
            self._entries[sig] = entry
        else:
            entry = found
            try:
                outs = self._run(entry, args, kwargs)
            except torch.OutOfMemoryError as e:
                if isinstance(e, FxswapError):
                    raise
                entry, outs = self._recover(e, sig, entry, orig_args, orig_kwargs, root)
        self.stats["calls"] += 1
        if any_active():
            notify_step(type(self.model).__name__)
        if (
            self.empty_cache_freq
            and self.stats["calls"] % self.empty_cache_freq == 0
            and self.device.type == "cuda"
        ):
            torch.cuda.empty_cache()
            self.stats["empty_cache"] += 1
        cap = entry.cap
        leaves = [outs[s] if s is not None else c for s, c in zip(cap.out_slots, cap.out_consts, strict=True)]
        return pytree.tree_unflatten(leaves, cap.out_spec)

    def _first_run(
        self,
        entry: Entry,
        sig: Hashable,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        orig_args: tuple[Any, ...],
        orig_kwargs: dict[str, Any],
        root: dict[str, Any],
    ) -> tuple[Entry, Any]:
        from fxswap.progress import phase

        try:
            with phase("first call"):
                return entry, self._run(entry, args, kwargs)
        except torch.OutOfMemoryError as e:
            if isinstance(e, FxswapError):
                raise
            return self._recover(e, sig, None, orig_args, orig_kwargs, root)
        except Exception as e:
            # The capture ran on meta tensors, which do not check everything (e.g. mixed dtypes
            # in a matmul). The first real run does: report it against the new signature and
            # keep nothing of it.
            self._forget_failed_call()
            dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in self._named.values()})
            raise SignatureError(
                f"{type(self.model).__name__} failed on its first call with inputs "
                f"{_describe(args, kwargs)}: {type(e).__name__}: {e}. The model's weights are "
                f"{'/'.join(dtypes)}. Fix: pass inputs in the dtypes (and shapes) the model computes in."
            ) from e

    def _drop_device_copies(self) -> None:
        self._active = None
        self.runtime.discard_pending()
        self.runtime.drop_residents()

    def _forget_failed_call(self) -> None:
        self._active = self._current = None
        self.runtime.drop_residents()

    def _release_after_oom(self) -> None:
        """Give back everything a failed call held, so the free memory measured next is real."""
        self._active = None
        self.runtime.drop_residents()
        self.runtime.discard_pending()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _recover(
        self,
        err: torch.OutOfMemoryError,
        sig: Hashable,
        entry: Entry | None,
        orig_args: tuple[Any, ...],
        orig_kwargs: dict[str, Any],
        root: dict[str, Any],
    ) -> tuple[Entry, Any]:
        """Out of memory during a call (another process took device memory). Free what the call
        held, measure the free memory; ``adaptive``: re-plan for it (unless the plan still fits),
        recompile once and re-run the call from its inputs (they are never written); the other
        modes: raise :class:`DeviceOutOfMemoryError` naming the budget that would fit now."""
        where = "first call" if entry is None else f"call {self.stats['calls'] + 1}"
        if err.__traceback__ is not None:  # its frames' locals (a build's inputs) would stay allocated
            traceback.clear_frames(err.__traceback__)
        self._release_after_oom()
        free = self.runtime.free_bytes()
        margin = max(self.oom_margin_min_bytes, int(free * self.oom_margin_share))
        from fxswap.alloc_probe import held_bytes

        on_device = pytree.tree_leaves(root)
        held = held_bytes([t for t in on_device if isinstance(t, torch.Tensor) and t.device == self.device])
        fits = max(0, free - margin + held)
        old = entry.plan.max_vram_bytes if entry is not None else self.options.max_vram_bytes
        needed = entry.plan.peak_bytes if entry is not None else old
        short = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        what = (
            f"{type(self.model).__name__} ran out of device memory during its {where} ({short}). "
            f"Free now: {free} bytes ({free / GiB:.3f} GiB); margin kept for others: {margin} bytes; "
            f"the call's inputs already hold {held} bytes"
        )
        if self.options.mode != "adaptive":
            if entry is None:
                self._current = None  # nothing of a first call is kept
            raise DeviceOutOfMemoryError(
                f"{what}. The budget that would fit now is max_vram_gb={fits / GiB:.4f} ({fits} bytes); "
                f"mode {self.options.mode!r} does not re-plan by itself (the plan needs up to {needed} "
                f"bytes). Fix: compile with max_vram_gb={fits / GiB:.4f} or less, or mode='adaptive' "
                "to re-plan on out-of-memory, or free device memory.",
                free_bytes=free,
                margin_bytes=margin,
                fits_bytes=fits,
                needed_bytes=needed,
            ) from err
        budget = min(old, fits)
        replan = entry is None or budget < old
        # What to put back if the recovery fails: the memory may be free again by the next call.
        before = (self.options, self._given_plan, entry)

        def restore() -> None:
            self.options, self._given_plan = before[0], before[1]
            self._entries.pop(sig, None)
            if before[2] is not None:
                self._entries[sig] = before[2]
            self._forget_failed_call()

        if replan:
            self._entries.pop(sig, None)
            self._given_plan = None  # a given plan was made for the old budget
            self.options = dataclasses.replace(self.options, max_vram_bytes=budget)
            try:
                entry = self._build(orig_args, orig_kwargs, root)
            except BudgetInfeasibleError as e:
                restore()
                raise DeviceOutOfMemoryError(
                    f"{what}. The budget that would fit now is {budget} bytes ({budget / GiB:.4f} GiB), "
                    f"below the smallest that works for this input: {e.min_vram_bytes} bytes "
                    f"({e.min_vram_bytes / GiB:.4f} GiB). Fix: free at least "
                    f"{e.min_vram_bytes - budget} bytes of device memory, or use a smaller input.",
                    free_bytes=free,
                    margin_bytes=margin,
                    fits_bytes=fits,
                    needed_bytes=e.min_vram_bytes,
                ) from err
        assert entry is not None
        rec = OomRecovery(where, short, free, margin, old, budget, replan, entry.plan.peak_bytes)
        logger.warning(
            "fxswap: %s; %s (budget %d -> %d bytes, peak %d bytes); running the call again from its inputs",
            what,
            "re-planned and recompiled" if replan else "the plan still fits, running it again",
            old,
            budget,
            entry.plan.peak_bytes,
        )
        try:
            outs = self._run(entry, root["args"], root["kwargs"])
        except torch.OutOfMemoryError as e:
            self._release_after_oom()
            restore()
            raise DeviceOutOfMemoryError(
                f"{what}. fxswap re-planned for {budget} bytes and ran the call again; it ran out of "
                f"memory again ({type(e).__name__}: {str(e)[:200]}). Fix: free device memory, or compile "
                f"with a smaller max_vram_gb than {budget / GiB:.4f}.",
                free_bytes=free,
                margin_bytes=margin,
                fits_bytes=fits,
                needed_bytes=entry.plan.peak_bytes,
            ) from e
        self._entries[sig] = entry
        self.recoveries.append(rec)
        return entry, outs

    forward = __call__

    def _run(self, entry: Entry, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._current = entry
        self._activate(entry)
        flat: list[Any] | None = None
        try:
            flat = self._builder.flat(entry, {"args": args, "kwargs": kwargs})
            with torch.no_grad():
                if entry.fn is None:
                    entry.fn = self._builder.compile(entry, flat)
                with ops.bound_units(entry.units):
                    return entry.fn(*flat)
        except BaseException as e:
            flat = None  # this frame stays in the traceback: it must not keep the resident copies
            # Loads issued before the failure were never waited for: drop them (after their copies
            # land), or the next call would pair its waits with them and keep their memory forever.
            self.runtime.discard_pending()
            # The traceback holds the graph's frames, and their locals the unit copies and
            # activations: whoever keeps the exception (a notebook's sys.last_exc) would keep that
            # device memory. Clear the finished frames below this one.
            if e.__traceback__ is not None and e.__traceback__.tb_next is not None:
                traceback.clear_frames(e.__traceback__.tb_next)
            raise

    def _check_devices(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
            if isinstance(leaf, torch.Tensor) and leaf.device != self.device:
                raise DeviceError(
                    f"input {pytree.keystr(path)} is on {leaf.device} but the model is compiled for "
                    f"{self.device}. Fix: move the inputs to {self.device} (weights stay with fxswap)."
                )
