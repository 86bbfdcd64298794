"""The machinery behind fxswap's ComfyUI nodes: a ModelPatcher that ComfyUI's memory manager drives
but that never moves weights itself, and the compiled, swapped diffusion model it runs instead.

How a sampler reaches fxswap (nothing of ComfyUI is monkey-patched for sampling)::

    KSampler -> load_models_gpu([FxswapModelPatcher])      ComfyUI's memory manager
        model_size() = loaded_size() = the fxswap budget     it frees other models for it, and
        partially_load(): object patches only; the other     counts it as occupied while loaded
                          fxswap model on the device lets go
    -> BaseModel._apply_model (ComfyUI's own pre/post-processing, model_sampling, CFG)
        -> diffusion_model(...)  ->  DIFFUSION_MODEL wrapper "fxswap"  ->  SwapState.__call__
                                       -> fxswap SwapModule: the captured graph with load/wait/release
    unload / detach / partially_unload: fxswap drops its device copies (host copies stay)

The first call for new input shapes captures, plans and compiles (minutes under Inductor, inside the
sampler's first step). Meanwhile fxswap's progress events drive ComfyUI's progress bar on the node
that made the MODEL (Block Swap / WAN Loader), and each phase is logged (``fxswap.progress``).

The BaseModel is a shallow copy of the incoming one (same diffusion-model module, same weights):
object patches and ``memory_required`` apply to fxswap's model only, so the MODEL that ComfyUI's
loader cached (and any other branch of the workflow using it) is untouched.

LoRA: ComfyUI keeps LoRA patches beside the weights and merges them when it loads a model
(``ModelPatcher.patch_weight_to_device``). fxswap keeps the ORIGINAL weights on the host (the very
tensors ComfyUI loaded: no second host copy) and merges each LoRA'd weight on the device right after
its copy lands, with ComfyUI's own ``comfy.lora.calculate_weight`` and the same float32 staging and
seeded stochastic rounding, so the merged weights are the ones ComfyUI would have made. The merge's
temporaries are planned: they are added to the plan's reserve. A GGUF weight arrives packed and is
decoded in the graph, so its merge is in the graph too (``fxswap::patch`` after ``fxswap::dequant``,
``_LoraRuntime.decoded_patch``), with ComfyUI-GGUF's arithmetic, within the same reserve.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import logging
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import comfy.float
import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import torch
from torch import Tensor

import fxswap
import fxswap.ops
from fxswap.api import make_options
from fxswap.compiler import SwapModule
from fxswap.errors import BudgetInfeasibleError, ComfyIntegrationError
from fxswap.progress import ProgressEvent, listen
from fxswap.runtime import PendingTransfer, SwapRuntime, TransferBackend, default_backend
from fxswap.swapplan import PlanOptions, SwapPlan

__all__ = ["FxswapModelPatcher", "NodeProgress", "SwapState", "free_memory_is_budget", "lora_reserve_bytes"]

logger = logging.getLogger("fxswap.comfyui")

GiB = 2**30
MiB = 2**20
WRAPPER_KEY = "fxswap"
COMFY_PREFIX = "diffusion_model."

# One fxswap model holds device memory per device at a time (WAN 2.2 A14B: the second expert's load
# releases the first). Weak values: a model ComfyUI has dropped does not stay registered.
_ACTIVE: weakref.WeakValueDictionary[str, SwapState] = weakref.WeakValueDictionary()
_ACTIVE_LOCK = threading.RLock()  # activate() releases the other model under it


@contextlib.contextmanager
def free_memory_is_budget(budget_bytes: int) -> Iterator[None]:
    """While the block runs, ``comfy.model_management.get_free_memory`` answers ``budget_bytes``.

    NOTE (why): ComfyUI's attention (``attention_split`` / ``attention_sub_quad``, the non-PyTorch
    attention paths) asks the driver for free memory in the middle of the forward to size its chunks,
    and a ``torch.cuda.memory_stats`` call cannot be captured into a graph. During fxswap's capture
    the question gets a constant answer, the budget, so the chunking becomes part of the graph and its
    activations are planned within that budget. Outside the block the function is ComfyUI's again.
    """
    original = mm.get_free_memory

    def budget_free_memory(dev: Any = None, torch_free_too: bool = False) -> Any:
        return (budget_bytes, budget_bytes) if torch_free_too else budget_bytes

    mm.get_free_memory = budget_free_memory
    try:
        yield
    finally:
        mm.get_free_memory = original


# ------------------------------------------------------------------------------------------- LoRA
def lora_reserve_bytes(patched: Sequence[Tensor]) -> int:
    """Device bytes the on-device LoRA merge of the largest patched weight needs beside its unit.

    ``calculate_weight`` on a float32 staging copy: the staging copy, the low-rank product and its
    scaled copy (float32 each), then the result in the weight's dtype while the staging copy lives:
    at most 4 float32 copies of the weight. A GGUF weight merged after its decode (``fxswap::patch``,
    ``_LoraRuntime.decoded_patch``): the copy it merges into (compute dtype), the low-rank product,
    its scaled copy and their cast, beside the decoded input the plan already holds: within the same
    bound (``patched`` holds the weight's decoded shape and dtype either way).
    """
    return max((4 * 4 * t.numel() for t in patched), default=0)


class _MergingPending(PendingTransfer):
    def __init__(self, inner: PendingTransfer, names: list[str | None], runtime: _LoraRuntime) -> None:
        super().__init__(inner.tensors)
        self.inner = inner
        self.names = names
        self.runtime = runtime

    def wait(self) -> None:
        self.inner.wait()
        for i, name in enumerate(self.names):
            if name is not None:
                self.tensors[i] = self.runtime.merge(name, self.tensors[i])

    def wait_host(self) -> None:
        self.inner.wait_host()


class _MergingBackend(TransferBackend):
    """The default transfer, then the LoRA merge of the unit's patched weights (on the compute stream,
    after the copy landed)."""

    def __init__(self, inner: TransferBackend) -> None:
        self.inner = inner
        self.runtime: weakref.ReferenceType[_LoraRuntime] | None = None
        self._by_ptr: dict[int, str] = {}
        self._stored = -1

    def _name(self, rt: _LoraRuntime, t: Tensor) -> str | None:
        if self._stored != len(rt.store):
            # a stored (GGUF) weight arrives packed: the graph merges it after its decode (decoded_patch)
            merged_here = [n for n in rt.lora if n in rt.store and n not in rt.stored]
            self._by_ptr = {rt.store[n].data_ptr(): n for n in merged_here}
            self._stored = len(rt.store)
        return self._by_ptr.get(t.data_ptr())

    def start(self, host: Sequence[Tensor], device: torch.device) -> PendingTransfer:
        pending = self.inner.start(host, device)
        rt = self.runtime() if self.runtime is not None else None
        if rt is None or not rt.lora:
            return pending
        names = [self._name(rt, h) for h in host]
        if all(n is None for n in names):
            return pending
        return _MergingPending(pending, names, rt)


class _LoraRuntime(SwapRuntime):
    """A SwapRuntime whose device copies of LoRA'd weights are merged with their patches."""

    def __init__(self, device: torch.device, lora: dict[str, list[Any]], key_prefix: str) -> None:
        backend = _MergingBackend(default_backend(device))
        super().__init__(device, backend=backend)
        backend.runtime = weakref.ref(self)
        self.lora = lora
        self.key_prefix = key_prefix
        self._patch_fns: list[Callable[[Tensor], Tensor]] = []
        self._patch_handles: dict[str, int] = {}

    def merge(self, name: str, weight: Tensor) -> Tensor:
        # Exactly ModelPatcher.patch_weight_to_device's arithmetic (float32 staging, ComfyUI's
        # calculate_weight, stochastic rounding seeded by the key), on the device copy.
        key = self.key_prefix + name
        staging = weight.to(torch.float32, copy=True)
        out = comfy.lora.calculate_weight(self.lora[name], staging, key)
        out = comfy.float.stochastic_rounding(out, weight.dtype, seed=comfy.model_patcher.string_to_seed(key))
        return self.ledger.track(out) if self.track else out

    def decoded_patch(self, fqn: str) -> int | None:
        # A LoRA'd weight kept as stored (GGUF) is merged in the graph, right after fxswap::dequant
        # decodes it, with ComfyUI-GGUF's arithmetic: calculate_weight on the decoded weight, in its
        # compute dtype (no float32 staging, no stochastic rounding: ComfyUI-GGUF's GGMLLayer).
        if fqn not in self.lora or fqn not in self.stored:
            return None
        if fqn not in self._patch_handles:
            patches, key = self.lora[fqn], self.key_prefix + fqn

            def merge(decoded: Tensor) -> Tensor:
                out: Tensor = comfy.lora.calculate_weight(patches, decoded.clone(), key)
                return out

            self._patch_fns.append(merge)  # ops keeps a weak reference only
            self._patch_handles[fqn] = fxswap.ops.register_patch(merge)
        return self._patch_handles[fqn]

    def resident(self, fqn: str, tensor: Tensor, decoded: bool = False) -> Tensor:
        if fqn not in self.lora or fqn in self.stored or fqn in self._residents:
            return super().resident(fqn, tensor, decoded)
        merged = self.merge(fqn, super().resident(fqn, tensor))
        self._residents[fqn] = merged
        return merged


# --------------------------------------------------------------------------------------- progress
class NodeProgress:
    """fxswap's progress events during a first call -> ComfyUI's progress bar on one node.

    ``node_id``: the node that made the MODEL (its bar shows the build although the sampler is the
    node running); None: the running node. The bar appears with the first phase (0 of 1, the node is
    busy), then follows every bar fxswap reports with a total (blocks compiled of blocks to compile,
    host copies), and is marked finished when the call returns.
    """

    def __init__(self, node_id: str | None) -> None:
        self.node_id = node_id
        self.bar: Any = None
        self.phases: list[tuple[str, float]] = []
        self.interrupted = False
        self._shown: tuple[str, int] | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "phase_end" and event.seconds is not None:
            self.phases.append((event.name, event.seconds))
        elif event.kind == "phase_start" and self.bar is None:
            self._show(event.name, 0, 1)
        elif event.kind == "step" and event.total:
            self._show(event.name, event.done, event.total)

    def _show(self, name: str, done: int, total: int) -> None:
        # One update per percent: every update is a websocket message to each client, and a bar
        # may count thousands of tensors.
        key = (name, 100 * done // total)
        if key == self._shown:
            return
        self._shown = key
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        try:
            self.bar.update_absolute(done, total)
        except mm.InterruptProcessingException:
            # ComfyUI's hook raises the user's Cancel here and clears the flag. A build stopped
            # half-way would be thrown away, so it runs to the end and the caller raises then.
            self.interrupted = True

    def finish(self) -> None:
        """The node's bar is done: without this the node would stay 'running' while the sampler
        runs, because ComfyUI finishes a node's progress only when that node itself executed."""
        if self.bar is None or self.node_id is None:
            return
        if self.bar.current < self.bar.total:  # phases but no bar (nothing swapped or compiled)
            self._show("finished", self.bar.total, self.bar.total)
        try:
            # By name: older ComfyUIs have no per-node progress registry (comfy_execution.progress),
            # and pyproject's list of untyped ComfyUI modules for mypy does not name it.
            state = importlib.import_module("comfy_execution.progress").get_progress_state()
            state.finish_progress(self.node_id)
        except Exception:
            logger.debug("fxswap: could not mark node %s's progress finished", self.node_id, exc_info=True)

    def summary(self) -> str:
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.phases) or "no phases reported"


# ------------------------------------------------------------------------------------------ state
CallAdapter = Callable[[tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]


@dataclasses.dataclass
class SwapState:
    """One swapped diffusion model, shared by every clone of its ModelPatcher.

    ``adapt`` turns the arguments ComfyUI passes to its diffusion model into the call of ``module``.
    """

    name: str
    module: torch.nn.Module
    swap: SwapModule
    options: PlanOptions
    device: torch.device
    adapt: CallAdapter
    lora_ids: dict[str, tuple[int, ...]]
    loaded: bool = False
    node_id: str | None = None  # the ComfyUI node that made this model: its bar shows the build
    monitor_rows: list[Any] = dataclasses.field(default_factory=list)
    _split: set[tuple[int, ...]] = dataclasses.field(default_factory=set)
    _seen: set[tuple[Any, ...]] = dataclasses.field(default_factory=set)

    @staticmethod
    def lora_fingerprint(patches: dict[str, list[Any]], prefix: str = "") -> dict[str, tuple[int, ...]]:
        """Which patch objects each weight carries (ComfyUI clones share them; a new LoRA adds some)."""
        return {k.removeprefix(prefix): tuple(id(p) for p in v) for k, v in patches.items() if v}

    @property
    def budget_bytes(self) -> int:
        return self.options.max_vram_bytes

    @classmethod
    def create(
        cls,
        name: str,
        module: torch.nn.Module,
        *,
        mode: str,
        max_vram_gb: float,
        block_size_mb: float,
        reserve_mb: float,
        empty_cache_freq: int,
        backend: str,
        device: torch.device,
        adapt: CallAdapter,
        lora: dict[str, list[Any]],
        key_prefix: str,
        node_id: str | None = None,
        host_merged: dict[str, list[Any]] | None = None,
    ) -> SwapState:
        """``lora``: the patches fxswap merges on the device; ``host_merged``: patches already merged
        into ``module``'s weights (GGUF F16/F32 tensors, see the Block Swap node). Both count as the
        MODEL's patches when a later load checks that they did not change."""
        named = dict(module.named_parameters())
        unknown = sorted(set(lora) - set(named))
        if unknown:
            raise ComfyIntegrationError(
                f"{len(unknown)} patched weight(s) of the MODEL are not parameters of its diffusion model "
                f"(e.g. {unknown[0]!r}); fxswap merges LoRAs into diffusion-model weights only. Fix: "
                "apply only diffusion-model LoRAs (LoraLoaderModelOnly) before the fxswap node."
            )
        options = make_options(
            mode=mode, max_vram_gb=max_vram_gb, block_size_mb=block_size_mb, reserve_mb=reserve_mb
        )
        extra = lora_reserve_bytes([named[k] for k in lora])
        if extra:
            options = dataclasses.replace(options, reserve_bytes=options.reserve_bytes + extra)
        runtime = _LoraRuntime(device, lora, key_prefix)
        swap = SwapModule(
            module,
            options=options,
            plan=None,
            backend=backend,
            empty_cache_freq=empty_cache_freq,
            device=device,
            strict=False,
            runtime=runtime,
        )
        ids = cls.lora_fingerprint({**lora, **(host_merged or {})})
        return cls(name, module, swap, options, device, adapt, ids, node_id=node_id)

    # -- device memory
    def activate(self) -> None:
        """This model is about to run: every other fxswap model on its device lets go first."""
        with _ACTIVE_LOCK:
            other = _ACTIVE.get(str(self.device))
            if other is not None and other is not self:
                freed = other.release()
                logger.info(
                    "fxswap: %s releases %d bytes of device memory before %s runs (one budget per device)",
                    other.name,
                    freed,
                    self.name,
                )
            _ACTIVE[str(self.device)] = self
        self.loaded = True

    def release(self) -> int:
        """Drop every device copy this model holds; return the bytes that were held."""
        held = self.swap.runtime.resident_bytes + self.swap.runtime.carried_bytes
        self.swap.release()
        self.loaded = False
        with _ACTIVE_LOCK:
            if _ACTIVE.get(str(self.device)) is self:
                del _ACTIVE[str(self.device)]
        return held

    # -- running
    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        if not self.loaded:
            self.activate()
        args, kwargs = self.adapt(args, kwargs)
        return self._run(args, kwargs)

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        x = args[0]
        key = tuple(x.shape)
        if key not in self._split:
            # Only a call with new input shapes captures (and so asks get_free_memory); later calls
            # run the compiled graph and leave ComfyUI's function alone for its other threads.
            sig = _shapes(args, kwargs)
            first = sig not in self._seen
            try:
                with (
                    free_memory_is_budget(self.budget_bytes) if first else _nothing(),
                    self._watch(tuple(x.shape)) if first else _nothing() as watch,
                ):
                    out: Tensor = self.swap(*args, **kwargs)
                self._seen.add(sig)
                if watch is not None and watch.interrupted:
                    raise mm.InterruptProcessingException()
                return out
            except BudgetInfeasibleError as e:
                if x.shape[0] < 2:
                    raise
                # ComfyUI batched cond and uncond (its own estimate said they fit); fxswap's plan
                # says this batch does not fit the budget: run it in halves instead.
                logger.info(
                    "fxswap: %s: batch %d does not fit the budget (%s); running halves",
                    self.name,
                    x.shape[0],
                    str(e).splitlines()[0],
                )
                self._split.add(key)
        half = x.shape[0] // 2
        outs = [
            self._run(*_batch_slice(args, kwargs, s, x.shape[0])) for s in (slice(0, half), slice(half, None))
        ]
        return torch.cat(outs, dim=0)

    @contextlib.contextmanager
    def _watch(self, shape: tuple[int, ...]) -> Iterator[NodeProgress]:
        """The first call for new inputs, shown on the node's progress bar and logged."""
        watch = NodeProgress(self.node_id)
        t0 = time.perf_counter()
        try:
            with listen(watch):
                yield watch
        finally:
            watch.finish()
        logger.info(
            "fxswap: %s: first call for input %s done in %.2f s (%s)",
            self.name,
            shape,
            time.perf_counter() - t0,
            watch.summary(),
        )

    # -- planning without running
    def preview(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> SwapPlan:
        """The plan a call with these (meta) inputs would get. Raises BudgetInfeasibleError."""
        from fxswap.build import capture_call, measured_ir
        from fxswap.passes.planner import build_plan

        args, kwargs = self.adapt(args, kwargs)
        # The compiled model's own capture path (weights as meta copies; the host weights stay put),
        # so the preview is the plan the first sampling call makes for the same input shapes.
        sig = self.swap._forward_sig
        with free_memory_is_budget(self.budget_bytes):
            cap, _ = capture_call(
                self.module, args, kwargs, self.device, None if sig is None else list(sig.parameters)
            )
        # The op workspace the compiled model measures on its device, so that the eager preview is
        # exactly the plan the sampler runs (under Inductor fxswap.fit then accounts Inductor's buffers).
        # Weights kept as stored (GGUF) at their stored size, as the build plans them.
        return build_plan(self.swap._builder.stored_ir(measured_ir(cap, self.device)), self.options)


def _shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    # a tensor as the compiled model's signature sees it (its layout too: other strides are a new
    # build, which must run under this node's budget like any first call)
    from fxswap.build import tensor_signature

    def one(v: Any) -> Any:
        return tensor_signature(v) if isinstance(v, Tensor) else ("V", repr(v))

    return tuple(one(a) for a in args) + tuple((k, one(v)) for k, v in sorted(kwargs.items()))


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def _batch_slice(
    args: tuple[Any, ...], kwargs: dict[str, Any], s: slice, batch: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    def cut(v: Any) -> Any:
        return v[s] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == batch else v

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


# ------------------------------------------------------------------------------------- the patcher
def own_base_model(base: Any, device: torch.device) -> Any:
    """A new BaseModel object sharing ``base``'s submodules (no weight is copied): attributes,
    object patches and method overrides set on it do not reach ``base``."""
    m = copy.copy(base)
    for registry in ("_modules", "_parameters", "_buffers"):
        setattr(m, registry, dict(getattr(base, registry)))
    m.device = device
    m.model_loaded_weight_memory = 0
    m.model_lowvram = False
    m.lowvram_patch_counter = 0
    m.current_weight_patches_uuid = None
    m.memory_required = types.MethodType(_memory_required, m)
    return m


def _memory_required(self: Any, input_shape: Any, cond_shapes: Any = None) -> int:
    # ComfyUI asks this for the activation memory of a call beside the loaded weights (to batch cond
    # and uncond, and to free other models). fxswap's activations are inside its budget, which
    # ComfyUI already counts as this model's size; a batch that does not fit the plan runs in halves.
    return 0


class FxswapModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher whose weights fxswap places: ComfyUI sees the budget as the model's size and
    loaded size, and its load / unload calls make fxswap take or drop device memory."""

    fxswap: SwapState

    # -- what ComfyUI's memory manager sees
    def model_size(self) -> int:
        state = getattr(self, "fxswap", None)
        return 0 if state is None else state.budget_bytes

    def loaded_size(self) -> int:
        state = getattr(self, "fxswap", None)
        return state.budget_bytes if state is not None and state.loaded else 0

    def lowvram_patch_counter(self) -> int:
        return 0

    def clone(self, *args: Any, **kwargs: Any) -> FxswapModelPatcher:
        n = super().clone(*args, **kwargs)
        n.fxswap = self.fxswap
        return n

    # -- loading: object patches only, weights stay with fxswap
    def _check_lora(self) -> None:
        state = self.fxswap
        if state.lora_fingerprint(self.patches, COMFY_PREFIX) != state.lora_ids:
            raise ComfyIntegrationError(
                f"the MODEL's weight patches changed after the fxswap node ({len(self.patches)} patched "
                f"weights now, {len(state.lora_ids)} when fxswap compiled it): fxswap merges the LoRAs "
                "it was given. Fix: connect LoraLoaderModelOnly (and other weight patches) BEFORE the "
                "fxswap node, not after it."
            )

    def patch_model(
        self,
        device_to: Any = None,
        lowvram_model_memory: int = 0,
        load_weights: bool = True,
        force_patch_weights: bool = False,
    ) -> Any:
        return super().patch_model(None, 0, load_weights=False, force_patch_weights=False)

    def partially_load(
        self, device_to: Any, extra_memory: float = 0, force_patch_weights: bool = False
    ) -> int:
        self._check_lora()
        self.patch_model(load_weights=False)
        self.fxswap.activate()
        self.model.device = device_to
        return 0

    def load(self, device_to: Any = None, *args: Any, **kwargs: Any) -> None:
        self.partially_load(device_to)

    def partially_unload(self, device_to: Any, memory_to_free: float = 0) -> int:
        return self.fxswap.release()

    def unpatch_model(self, device_to: Any = None, unpatch_weights: bool = True) -> None:
        # Weights never moved, so nothing moves back (device_to=None): a model fxswap loaded on
        # meta (the WAN loader's ComfyUI shell) cannot be moved anyway.
        self.fxswap.release()
        super().unpatch_model(None, unpatch_weights=unpatch_weights)
        self.model.device = self.offload_device

    def detach(self, unpatch_all: bool = True) -> Any:
        self.fxswap.release()
        return super().detach(unpatch_all)


def make_patcher(
    base_model: torch.nn.Module,
    state: SwapState,
    *,
    load_device: torch.device,
    offload_device: torch.device,
    template: comfy.model_patcher.ModelPatcher | None = None,
) -> FxswapModelPatcher:
    """An FxswapModelPatcher on ``base_model``, carrying ``template``'s patches and options."""
    p = FxswapModelPatcher(base_model, load_device, offload_device)
    p.fxswap = state
    if template is not None:
        p.patches = {k: v[:] for k, v in template.patches.items()}
        p.patches_uuid = template.patches_uuid
        p.object_patches = template.object_patches.copy()
        p.model_options = copy.deepcopy(template.model_options)
        for wtype, by_key in template.wrappers.items():
            for key, fns in by_key.items():
                p.wrappers.setdefault(wtype, {}).setdefault(key, []).extend(fns)

    def run(executor: Any, *args: Any, **kwargs: Any) -> Tensor:
        return state(args, kwargs)

    def outer_sample(executor: Any, *args: Any, **kwargs: Any) -> Any:
        with fxswap.monitor(state.device, log=logger.info) as mon:
            out = executor(*args, **kwargs)
        state.monitor_rows = list(mon.rows)
        if mon.rows:
            logger.info(
                "fxswap: %s sampled %d model calls; device peak %d bytes of a %d-byte budget",
                state.name,
                len(mon.rows),
                mon.peak_bytes,
                state.budget_bytes,
            )
        return out

    p.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    p.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    p.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, run)
    p.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)
    return p
