"""fxswap for diffusers' WAN pipelines: ``enable(pipe, max_vram_gb=...)``.

Works with ``WanPipeline``, ``WanImageToVideoPipeline`` and WAN 2.2 A14B (``transformer`` and
``transformer_2`` with the pipeline's ``boundary_ratio``). The pipeline's own ``__call__`` runs
unchanged; fxswap takes over how each component reaches the device:

- each transformer is compiled with :func:`fxswap.compile` (swapped under ``max_vram_gb``); the
  pipeline keeps calling ``pipe.transformer(...)``, which now runs the swapped graph. Calling one
  expert drops the other's resident device weights first, so the A14B pair shares one budget (the
  pipeline itself picks the expert by ``boundary_ratio``);
- the text encoder, the image encoder (i2v) and the VAE are on the device only while they run:
  their weights are copied in before the call and the device copies dropped after it. Before any of
  them runs, the transformers' resident weights are dropped, so every phase of the pipeline has the
  whole budget to itself. A text or image encoder whose weights (plus the planner's reserve) do not
  fit the budget is swapped with :func:`fxswap.compile` like the transformers. What is planned for
  an on-loaded component is its weights plus the planner's reserve, not its activations (the VAE's
  decode activations can be large): on CUDA each phase's allocator peak is recorded
  (:attr:`FxswapPipelineState.phase_peaks`) and a phase above the budget is logged as a warning
  with the fix;
- diffusers finds the execution device through the ``_hf_hook.execution_device`` attribute it reads
  for its own offloading (``DiffusionPipeline._execution_device``), so latents and embeddings are
  made on the device while every weight stays on the host.

Classifier-free guidance: WAN pipelines call the transformer twice per step (prompt, then negative
prompt), so every swapped byte crosses the link twice per step. ``cfg="batched"`` runs both in one
call of batch 2 (each swapped byte moves once per step; the activations double); ``cfg="auto"``
prices both schedules with fxswap's planner and simulator on the first guided step and picks the
faster (:attr:`FxswapPipelineState.cfg_prices`; the figures are predictions). The default,
``cfg="separate"``, keeps diffusers' two calls and is bitwise equal to the unswapped pipeline in
eager execution; batching changes the GEMM shapes, so its results can differ in the last bits.

NOTE (how the pipeline's calls reach fxswap): the component's class is swapped for a subclass whose
``__call__`` routes to fxswap (the object, its config, ``dtype`` and every method stay as they
were, and ``isinstance`` checks still pass). While fxswap itself runs the model (capture, first
call) the original class is put back, so the capture sees diffusers' model exactly. :func:`disable`
restores everything.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from fxswap.errors import BudgetInfeasibleError, FxswapError
from fxswap.options import OPTIONAL_OPTIONS, make_options

__all__ = ["CFG_MODES", "CfgPrices", "FxswapPipelineState", "disable", "enable", "state"]

logger = logging.getLogger("fxswap.diffusers")

TRANSFORMERS = ("transformer", "transformer_2")
ENCODERS = ("text_encoder", "image_encoder")
CFG_MODES = ("separate", "batched", "auto")
ENCODER_MODES = ("auto", "onload", "swap")
GiB = 2**30
_ATTR = "_fxswap_state"


@dataclass(frozen=True)
class CfgPrices:
    """Predicted cost of one guided denoising step of one transformer (simulator, not measured).

    ``separate``: two calls of batch B (diffusers' schedule); ``batched``: one call of batch 2B.
    ``batched_step_ms`` / ``batched_moved_bytes`` are None where batch 2B does not fit the budget
    (``batched_min_vram_bytes`` is then the smallest budget it needs).
    """

    transformer: str
    separate_step_ms: float
    separate_moved_bytes: int
    batched_step_ms: float | None
    batched_moved_bytes: int | None
    batched_min_vram_bytes: int
    chosen: str

    def describe(self) -> str:
        sep = f"separate {self.separate_step_ms:.1f} ms/step, {self.separate_moved_bytes / GiB:.2f} GiB moved"
        if self.batched_step_ms is None or self.batched_moved_bytes is None:
            bat = f"batched infeasible (needs {self.batched_min_vram_bytes / GiB:.2f} GiB)"
        else:
            moved = self.batched_moved_bytes / GiB
            bat = f"batched {self.batched_step_ms:.1f} ms/step, {moved:.2f} GiB moved"
        return f"{self.transformer}: CFG predicted {sep}; {bat}; using {self.chosen}"


class _ExecutionDevice:
    """What diffusers reads from ``module._hf_hook`` to learn where a component's inputs go."""

    def __init__(self, device: torch.device) -> None:
        self.execution_device = device


@dataclass
class _Stash:
    hidden: torch.Tensor
    timestep: Any
    negative: torch.Tensor
    image: Any
    attention_kwargs: Any
    output: torch.Tensor


def _group_offloaded(module: torch.nn.Module) -> bool:
    try:
        from diffusers.hooks.group_offloading import _get_group_onload_device
    except ImportError:
        return False
    try:
        _get_group_onload_device(module)
    except ValueError:
        return False
    return True


def _module_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _route_class(cls: type, name: str) -> type:
    """A subclass of ``cls`` whose ``__call__`` routes to the pipeline's fxswap state."""

    def __call__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        st: FxswapPipelineState = self.__dict__["_fxswap_route"]
        return st._call(name, self, args, kwargs)

    body = {"__call__": __call__, "__module__": cls.__module__, "_fxswap_cls": cls}
    return type(cls.__name__, (cls,), body)


@contextmanager
def _original_class(module: torch.nn.Module) -> Iterator[None]:
    routed = type(module)
    module.__class__ = routed._fxswap_cls  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.__class__ = routed


class _Onload:
    """Puts one component's weights on the device for the duration of a call.

    The host tensors are kept (pinned on CUDA, so the copy-in is fast) and the parameters are
    pointed at device copies only inside the call; afterwards they point at the host tensors again
    and the device copies die. Re-entrant (VAE ``forward`` calls ``encode``/``decode``).
    """

    def __init__(self, name: str, module: torch.nn.Module, state: FxswapPipelineState) -> None:
        self.name, self.module, self.state = name, module, state
        self.depth = 0
        self.tensors = list({id(t): t for t in [*module.parameters(), *module.buffers()]}.values())
        self.host = [t.data for t in self.tensors]

    def pin(self) -> None:
        from fxswap.progress import progress

        for i, t in enumerate(progress(self.tensors, desc=f"pinning {self.name}", unit="tensor")):
            if not self.host[i].is_pinned():
                self.host[i] = self.host[i].pin_memory()
                t.data = self.host[i]

    def restore(self) -> None:
        for t, h in zip(self.tensors, self.host, strict=True):
            t.data = h

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if self.depth:
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
            return
        dev = self.state.device
        self.state._begin_phase(self.name)
        self.depth = 1
        try:
            if dev.type != "cpu":
                for t, h in zip(self.tensors, self.host, strict=True):
                    t.data = h.to(dev, non_blocking=True)
            yield
        finally:
            self.restore()
            self.depth = 0
            self.state._end_phase(self.name)


class FxswapPipelineState:
    """What :func:`enable` installed on a pipeline (``state(pipe)`` returns it).

    Attributes:
        swapped: component name -> its :class:`fxswap.compiler.SwapModule` (transformers, and
            encoders too large for the budget).
        onloaded: names of the components that are copied to the device only while they run.
        cfg_prices: per transformer and input shape, the priced CFG schedules (``cfg="auto"``).
        phase_peaks: CUDA only: the allocator's peak bytes during each phase (``text_encoder``,
            ``transformer``, ``vae``...), measured with ``torch.cuda.max_memory_allocated``.
    """

    def __init__(
        self,
        pipe: Any,
        *,
        max_vram_gb: float,
        mode: str,
        block_size_mb: float,
        cfg: str,
        encoders: str,
        device: torch.device,
        compile_kwargs: dict[str, Any],
    ) -> None:
        self.pipe = pipe
        self.max_vram_gb = max_vram_gb
        self.mode = mode
        self.block_size_mb = block_size_mb
        self.cfg = cfg
        self.encoders = encoders
        self.device = device
        self.compile_kwargs = compile_kwargs
        self.swapped: dict[str, Any] = {}
        self.onloaded: dict[str, _Onload] = {}
        self.cfg_prices: dict[tuple[str, Any], CfgPrices] = {}
        self.phase_peaks: dict[str, int] = {}
        self._modules: dict[str, torch.nn.Module] = {}
        self._hooks: list[Any] = []
        self._wrapped: list[tuple[Any, str]] = []
        self._active: str | None = None
        self._phase: str | None = None
        self._negative: torch.Tensor | None = None
        self._stash: _Stash | None = None
        self._sigs: dict[str, inspect.Signature] = {}

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:

        pipe = self.pipe
        options = make_options(
            mode=self.mode,
            max_vram_gb=self.max_vram_gb,
            block_size_mb=self.block_size_mb,
            **{k: v for k, v in self.compile_kwargs.items() if k in _PLAN_OPTION_NAMES},
        )
        budget, reserve = options.max_vram_bytes, options.reserve_bytes
        components = {
            n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module) and m is not None
        }
        if not any(n in components for n in TRANSFORMERS):
            raise ValueError(
                f"`pipe` ({type(pipe).__name__}) has no `transformer` or `transformer_2`: "
                "fxswap.integrations.diffusers.enable handles WanPipeline, WanImageToVideoPipeline and "
                "WAN 2.2 A14B pipelines. "
                "Fix: pass a pipeline with a WAN transformer."
            )
        for name, module in components.items():
            if any(p.device.type not in ("cpu", "meta") for p in module.parameters()):
                logger.info("fxswap: moving %s to the CPU (fxswap keeps weights on the host)", name)
                module.to("cpu")
            if any(p.device.type == "meta" for p in module.parameters()):
                raise ValueError(
                    f"`pipe.{name}` has weights on the meta device (not loaded). Fix: load the pipeline's "
                    "weights (e.g. from_pretrained without device_map='meta') before enable()."
                )
        for name, module in components.items():
            hooked = [n for n, m in module.named_modules() if hasattr(m, "_hf_hook")]
            if _group_offloaded(module):
                hooked.append("group offloading")
            if hooked:
                raise FxswapError(
                    f"`pipe.{name}` already has offloading hooks (accelerate or diffusers: "
                    f"{hooked[0] or '<root>'}), e.g. from enable_model_cpu_offload or enable_group_offload. "
                    "Fix: create the pipeline without them (or call pipe.remove_all_hooks()) before enable()."
                )
        for name, module in components.items():
            self._modules[name] = module
            module.eval()
            if name in TRANSFORMERS:
                self._swap(name, module)
            elif name in ENCODERS:
                size = _module_bytes(module)
                fits = size + reserve <= budget
                if self.encoders == "swap" or (self.encoders == "auto" and not fits):
                    self._swap(name, module)
                elif not fits:
                    raise BudgetInfeasibleError(
                        f"`pipe.{name}` holds {size / GiB:.2f} GiB of weights; with the planner's reserve "
                        f"({reserve / GiB:.2f} GiB) it does not fit max_vram_gb={self.max_vram_gb:g} and "
                        "encoders='onload' copies it in whole. Fix: pass encoders='auto' (swap it), or "
                        f"max_vram_gb >= {math.ceil((size + reserve) / GiB * 100) / 100:g}.",
                        min_vram_bytes=size + reserve,
                        mode=self.mode,
                    )
                else:
                    self._onload_forward(name, module)
            else:  # the VAE and anything else with weights: on the device while it runs
                self._onload_methods(name, module)
            # diffusers asks this attribute where a component's inputs must go
            module._hf_hook = _ExecutionDevice(self.device)  # type: ignore[assignment]
        self._wrap(pipe, "encode_prompt", self._encode_prompt)
        swapped = ", ".join(self.swapped) or "none"
        onloaded = ", ".join(self.onloaded) or "none"
        logger.info(
            "fxswap: enabled on %s: max_vram_gb=%g mode=%s cfg=%s device=%s; swapped: %s; on the device "
            "only while they run: %s",
            type(pipe).__name__,
            self.max_vram_gb,
            self.mode,
            self.cfg,
            self.device,
            swapped,
            onloaded,
        )

    def _swap(self, name: str, module: torch.nn.Module) -> None:
        import fxswap

        kwargs = dict(self.compile_kwargs)
        if name not in TRANSFORMERS:
            # An encoder runs once per phase, and each phase begins by releasing the others: units
            # carried for a next call would be thrown away. Warm starts are for the sampling loop.
            kwargs.setdefault("warm_start", False)
            # Sequence parallelism shards the transformers' video tokens; an encoder runs whole on
            # every rank (its sequence is the prompt, and T5's attention is not an SDPA).
            kwargs.pop("ulysses_degree", None)
        self.swapped[name] = fxswap.compile(
            module,
            mode=self.mode,
            max_vram_gb=self.max_vram_gb,
            block_size_mb=self.block_size_mb,
            device=self.device,
            **kwargs,
        )
        self._sigs[name] = inspect.signature(type(module).forward)
        module.__dict__["_fxswap_route"] = self
        module.__class__ = _route_class(type(module), name)

    def _onload_forward(self, name: str, module: torch.nn.Module) -> None:
        on = self._make_onload(name, module)
        active: list[Any] = []

        def pre(mod: torch.nn.Module, args: Any) -> None:
            cm = on()
            cm.__enter__()
            active.append(cm)

        def post(mod: torch.nn.Module, args: Any, out: Any) -> None:
            active.pop().__exit__(None, None, None)

        # always_call: the weights go back to the host even when forward raises
        self._hooks.append(module.register_forward_pre_hook(pre))
        self._hooks.append(module.register_forward_hook(post, always_call=True))

    def _onload_methods(self, name: str, module: torch.nn.Module) -> None:
        on = self._make_onload(name, module)
        for method in ("encode", "decode", "forward"):
            fn = getattr(module, method, None)
            if fn is None or not callable(fn):
                continue

            def run(*args: Any, __fn: Callable[..., Any] = fn, **kwargs: Any) -> Any:
                with on():
                    return __fn(*args, **kwargs)

            self._wrap(module, method, functools.wraps(fn)(run))

    def _make_onload(self, name: str, module: torch.nn.Module) -> _Onload:
        on = _Onload(name, module, self)
        if self.device.type == "cuda":
            on.pin()
        self.onloaded[name] = on
        return on

    def _wrap(self, obj: Any, attr: str, fn: Callable[..., Any]) -> None:
        self._wrapped.append((obj, attr))
        object.__setattr__(obj, attr, fn)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for obj, attr in reversed(self._wrapped):
            obj.__dict__.pop(attr, None)
        for on in self.onloaded.values():
            on.restore()
        for name, sm in self.swapped.items():
            module = self._modules[name]
            sm.release()
            sm.runtime.close()
            module.__class__ = type(module)._fxswap_cls  # type: ignore[attr-defined]
            module.__dict__.pop("_fxswap_route", None)
        for module in self._modules.values():
            if isinstance(module.__dict__.get("_hf_hook"), _ExecutionDevice):
                del module.__dict__["_hf_hook"]
        self._hooks.clear()
        self._wrapped.clear()
        self.swapped.clear()
        self.onloaded.clear()

    # ------------------------------------------------------------------ phases
    def release_all(self) -> None:
        """Drop every swapped model's resident device weights (host copies stay)."""
        for sm in self.swapped.values():
            sm.release()
        self._active = None

    def _begin_phase(self, name: str) -> None:
        # Each phase gets the whole budget: nothing of another phase stays on the device.
        self.release_all()
        self._stash = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._phase = name

    def _end_phase(self, name: str) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), peak)
            if peak > self.max_vram_gb * GiB:
                logger.warning(
                    "fxswap: %s peaked at %.2f GiB on %s, above max_vram_gb=%g (its activations, or "
                    "tensors held outside fxswap). Fix: for the VAE, pipe.vae.enable_tiling(); else a "
                    "larger budget or a smaller video.",
                    name,
                    peak / GiB,
                    self.device,
                    self.max_vram_gb,
                )
        self._phase = None

    # ------------------------------------------------------------------ calls
    def _encode_prompt(self, *args: Any, **kwargs: Any) -> Any:
        out = type(self.pipe).encode_prompt(self.pipe, *args, **kwargs)
        self._negative = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        return out

    def _call(self, name: str, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        sm = self.swapped[name]
        if name not in TRANSFORMERS:
            # a swapped encoder is a phase of its own, like an on-loaded one
            self._begin_phase(name)
            try:
                with _original_class(module), _named_errors(name, self.max_vram_gb):
                    return sm(*args, **kwargs)
            finally:
                self._end_phase(name)
        if self._phase != "transformer":
            self._begin_phase("transformer")
            self._phase = "transformer"
        if self._active != name:
            # one expert on the device at a time: the other's resident weights go first
            for other, osm in self.swapped.items():
                if other != name:
                    osm.release()
            self._active = name
        bound = self._sigs[name].bind(module, *args, **kwargs)
        bound.apply_defaults()
        call: dict[str, Any] = {}
        for i, (k, v) in enumerate(bound.arguments.items()):
            kind = bound.signature.parameters[k].kind
            if i == 0:
                continue  # self
            if kind is inspect.Parameter.VAR_KEYWORD:
                call.update(v)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if not v:
                    continue
                raise TypeError(
                    f"pipe.{name}.forward takes *{k}; fxswap passes the transformer's arguments by name. "
                    "Fix: call it with keyword arguments only"
                )  # pragma: no cover (WAN transformers have no *args)
            else:
                call[k] = v
        want_dict = bool(call.get("return_dict", True))
        call["return_dict"] = False
        try:
            out = self._guided(name, sm, module, call)
        finally:
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device)
                self.phase_peaks["transformer"] = max(self.phase_peaks.get("transformer", 0), peak)
        if want_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out[0])
        return out

    def _run(self, sm: Any, module: torch.nn.Module, call: dict[str, Any]) -> Any:
        with _original_class(module), _named_errors(self._name_of(module), self.max_vram_gb):
            return sm(**call)

    def _name_of(self, module: torch.nn.Module) -> str:
        return next(n for n, m in self._modules.items() if m is module)

    def _guided(self, name: str, sm: Any, module: torch.nn.Module, call: dict[str, Any]) -> Any:
        stash, self._stash = self._stash, None
        if stash is not None and self._is_uncond(stash, call):
            return (stash.output,)
        if self.cfg == "separate" or not self._batchable(call):
            return self._run(sm, module, call)
        assert self._negative is not None
        ehs = call["encoder_hidden_states"]
        neg = self._negative.to(device=ehs.device, dtype=ehs.dtype)
        batched = _batched(call, neg)
        if self.cfg == "auto":
            key = (name, _shape_key(call))
            price = self.cfg_prices.get(key)
            if price is None:
                price = self._price(name, sm, module, call, batched)
                self.cfg_prices[key] = price
                logger.info("fxswap: %s (predictions)", price.describe())
            if price.chosen == "separate":
                return self._run(sm, module, call)
        out = self._run(sm, module, batched)[0]
        b = call["hidden_states"].shape[0]
        self._stash = _Stash(
            call["hidden_states"],
            call["timestep"],
            neg,
            call.get("encoder_hidden_states_image"),
            call.get("attention_kwargs"),
            out[b:],
        )
        return (out[:b],)

    def _batchable(self, call: dict[str, Any]) -> bool:
        if self._negative is None or not getattr(self.pipe, "do_classifier_free_guidance", False):
            return False
        h, ehs = call.get("hidden_states"), call.get("encoder_hidden_states")
        if not isinstance(h, torch.Tensor) or not isinstance(ehs, torch.Tensor):
            return False
        if self._negative.shape != ehs.shape:
            return False
        b = h.shape[0]
        return all(
            v.shape[0] == b
            for k, v in call.items()
            if isinstance(v, torch.Tensor) and v.dim() > 0 and k != "timestep"
        ) and (not isinstance(call.get("timestep"), torch.Tensor) or call["timestep"].shape[:1] in ((b,), ()))

    @staticmethod
    def _is_uncond(stash: _Stash, call: dict[str, Any]) -> bool:
        ehs = call.get("encoder_hidden_states")
        return (
            call.get("hidden_states") is stash.hidden
            and call.get("timestep") is stash.timestep
            and call.get("encoder_hidden_states_image") is stash.image
            and call.get("attention_kwargs") == stash.attention_kwargs
            and isinstance(ehs, torch.Tensor)
            and ehs.shape == stash.negative.shape
            and ehs.dtype == stash.negative.dtype
            and torch.equal(ehs, stash.negative)
        )

    def _price(
        self, name: str, sm: Any, module: torch.nn.Module, call: dict[str, Any], batched: dict[str, Any]
    ) -> CfgPrices:
        plans = []
        for c in (call, batched):
            try:
                plans.append(_plan_call(sm, module, c))
            except BudgetInfeasibleError as e:
                plans.append(e)
        single, double = plans
        if isinstance(single, BudgetInfeasibleError):
            raise single
        if isinstance(double, BudgetInfeasibleError):
            return CfgPrices(
                name, 2 * single.predicted_step_ms, 2 * single.moved_bytes_per_call, None, None,
                double.min_vram_bytes, "separate",
            )  # fmt: skip
        sep_ms, bat_ms = 2 * single.predicted_step_ms, double.predicted_step_ms
        return CfgPrices(
            name,
            sep_ms,
            2 * single.moved_bytes_per_call,
            bat_ms,
            double.moved_bytes_per_call,
            double.min_vram_bytes,
            "batched" if bat_ms < sep_ms else "separate",
        )


_PLAN_OPTION_NAMES = OPTIONAL_OPTIONS


@contextmanager
def _named_errors(name: str, max_vram_gb: float) -> Iterator[None]:
    """Say which pipeline component a budget error is about (the whole pipeline shares one budget)."""
    try:
        yield
    except BudgetInfeasibleError as e:
        need = math.ceil(e.min_vram_bytes / GiB * 100) / 100
        raise BudgetInfeasibleError(
            f"pipe.{name} does not fit max_vram_gb={max_vram_gb:g} in mode {e.mode!r}: it needs at least "
            f"{need:.2f} GiB ({e.min_vram_bytes} bytes) for this input. Fix: enable(pipe, max_vram_gb="
            f"{need:.2f} or more), a smaller video, or `fxswap recommend` for this card. Planner: {e}",
            min_vram_bytes=e.min_vram_bytes,
            mode=e.mode,
        ) from e


def _plan_call(sm: Any, module: torch.nn.Module, call: dict[str, Any]) -> Any:
    """The plan ``sm`` would make for ``module(**call)`` (capture cached for the real build)."""
    from fxswap.build import capture_call, measured_ir
    from fxswap.passes.planner import build_plan

    names = None if sm._forward_sig is None else list(sm._forward_sig.parameters)
    with _original_class(module):
        cap, _ = capture_call(module, (), call, sm.device, names)
    opts = sm.options
    staging = sm.runtime.staging_bytes(list(sm._named.values()))
    if staging:
        opts = dataclasses.replace(opts, reserve_bytes=opts.reserve_bytes + staging)
    return build_plan(measured_ir(cap, sm.device), opts)


def _shape_key(call: dict[str, Any]) -> Any:
    return tuple(
        (k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, repr(v)) for k, v in call.items()
    )


def _batched(call: dict[str, Any], negative: torch.Tensor) -> dict[str, Any]:
    out = dict(call)
    for k, v in call.items():
        if k == "encoder_hidden_states":
            out[k] = torch.cat([v, negative])
        elif k == "timestep" and isinstance(v, torch.Tensor) and v.dim() == 0:
            out[k] = v
        elif isinstance(v, torch.Tensor) and v.dim() > 0:
            out[k] = torch.cat([v, v])
    return out


def state(pipe: Any) -> FxswapPipelineState | None:
    """The :class:`FxswapPipelineState` :func:`enable` installed on ``pipe``, or None."""
    return pipe.__dict__.get(_ATTR)


def disable(pipe: Any) -> Any:
    """Undo :func:`enable`: every component runs as diffusers made it again (weights on the host).
    Returns the pipeline; a pipeline without fxswap is returned as is."""
    st = state(pipe)
    if st is not None:
        st.remove()
        del pipe.__dict__[_ATTR]
    return pipe


def enable(
    pipe: Any,
    max_vram_gb: float,
    mode: str = "adaptive",
    block_size_mb: float = 300,
    *,
    cfg: str = "separate",
    encoders: str = "auto",
    device: torch.device | str | None = None,
    **compile_kwargs: Any,
) -> Any:
    """Run a diffusers WAN pipeline within ``max_vram_gb`` of device memory, weights on the host.

    Args:
        pipe: a ``WanPipeline``, ``WanImageToVideoPipeline`` or WAN 2.2 A14B pipeline (with
            ``transformer_2`` and ``boundary_ratio``), weights loaded (on the CPU or the device:
            they are moved to the host).
        max_vram_gb: GiB of device memory for the whole pipeline; each phase (text encoder, image
            encoder, denoising, VAE) has all of it, since nothing of another phase stays.
        mode: "layerwise", "chunkwise" or "adaptive" (see :func:`fxswap.compile`).
        block_size_mb: unit size for chunkwise (and a candidate for adaptive), MiB.
        cfg: "separate" (diffusers' two calls per guided step; bitwise equal to the pipeline without
            fxswap in eager execution), "batched" (one call of batch 2: each swapped byte moves once
            per step) or "auto" (the cheaper of the two by the planner's predicted step time).
        encoders: "auto" (text/image encoder copied to the device while it runs if it fits the
            budget, swapped otherwise), "onload" or "swap".
        device: where to run; default the current CUDA device, else the CPU.
        **compile_kwargs: passed to :func:`fxswap.compile` (``backend``, ``empty_cache_freq``,
            ``ulysses_degree`` (the transformers only; under torchrun every rank runs the pipeline
            with the same arguments and seed),
            ``storage_dtype``, ``pin_share``, ``reserve_mb``, ``h2d_gbps``, ...).

    Returns:
        ``pipe`` itself; call it as usual. A second ``enable`` replaces the first's settings;
        :func:`disable` removes fxswap. :func:`state` returns what was installed.

    Raises:
        ValueError: a bad argument (named, with the fix), or a pipeline without a WAN transformer.
        fxswap.BudgetInfeasibleError: an encoder does not fit with ``encoders="onload"``; the
            transformers' minimum budget is checked on the first call (the error names it).
    """
    from fxswap.build import resolve_device

    for arg, value, choices in (("cfg", cfg, CFG_MODES), ("encoders", encoders, ENCODER_MODES)):
        if value not in choices:
            options = ", ".join(map(repr, choices))
            raise ValueError(f"`{arg}`={value!r} is invalid. Fix: pass one of {options}")
    if not hasattr(pipe, "components") or not isinstance(getattr(pipe, "components", None), dict):
        raise TypeError(
            f"`pipe` must be a diffusers pipeline (with .components), got {type(pipe).__name__}. "
            "Fix: pass e.g. a WanPipeline."
        )
    # every option is checked before anything changes (a bad one leaves the old settings in place)
    make_options(
        mode=mode,
        max_vram_gb=max_vram_gb,
        block_size_mb=block_size_mb,
        **{k: v for k, v in compile_kwargs.items() if k in _PLAN_OPTION_NAMES},
    )
    dev = resolve_device(device)
    from fxswap.parallel import resolve_parallel

    resolve_parallel(compile_kwargs.get("ulysses_degree"))  # refused before anything changes
    disable(pipe)
    st = FxswapPipelineState(
        pipe,
        max_vram_gb=max_vram_gb,
        mode=mode,
        block_size_mb=block_size_mb,
        cfg=cfg,
        encoders=encoders,
        device=dev,
        compile_kwargs=compile_kwargs,
    )
    try:
        st.install()
    except BaseException:
        st.remove()
        raise
    pipe.__dict__[_ATTR] = st
    return pipe
