"""fxswap's ComfyUI nodes.

- **fxswap Block Swap** (``FxswapBlockSwap``): the MODEL from ComfyUI's ``UNETLoader`` (or
  ``LoraLoaderModelOnly`` after it) -> a MODEL whose diffusion model runs fxswap's compiled swap
  schedule under ``max_vram_gb``. ComfyUI's own ``WanModel`` is captured (see ``swap.py`` for how
  its ``get_free_memory()`` call is handled); LoRAs are merged on the device.
- **fxswap WAN Loader** (``FxswapWanLoader``): a WAN checkpoint in any layout fxswap reads
  (original, ComfyUI, diffusers folder, TurboWan, fp8) -> a MODEL that runs fxswap's own WAN module
  (``attention_type``, ``sla_topk``) with block swap; ComfyUI's model is only an empty (meta) shell
  for its sampling settings.
- **fxswap Plan** (``FxswapPlan``): the plan for a latent and a conditioning before sampling:
  units, predicted peak and step time, the smallest budget that works.
- **fxswap Monitor** (``FxswapMonitor``): after a sampler, the VRAM monitor's per-step rows.

The first sampler call for new input shapes captures, plans and compiles; ComfyUI's progress bar on
the Block Swap / WAN Loader node shows it (blocks compiled of blocks to compile) and the log gets a
line per phase (capture, plan, compile, first call).

Every widget value is checked by fxswap itself (``VALIDATE_INPUTS``), so a bad value comes back as a
ComfyUI validation error carrying fxswap's message: the argument, the value and the fix.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from typing import Any

import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch
from torch import Tensor

from fxswap.api import make_options
from fxswap.comfyui.swap import (
    COMFY_PREFIX,
    ComfyIntegrationError,
    FxswapModelPatcher,
    NodeProgress,
    SwapState,
    make_patcher,
    own_base_model,
)
from fxswap.errors import BudgetInfeasibleError, FxswapError
from fxswap.models import wan
from fxswap.progress import listen
from fxswap.stored import stored_weights

__all__ = [
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "FxswapBlockSwap",
    "FxswapMonitor",
    "FxswapPlan",
    "FxswapWanLoader",
]

logger = logging.getLogger("fxswap.comfyui")

MODES = ["adaptive", "layerwise", "chunkwise"]
BACKENDS = ["inductor", "eager"]
DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CATEGORY = "fxswap"
# The node's own id, so that the build in the sampler's first call shows on this node's bar. It also
# keys ComfyUI's cache of the node's output by id, as for every node that asks for it.
_HIDDEN: dict[str, Any] = {"unique_id": "UNIQUE_ID"}

_BUDGET_INPUTS: dict[str, Any] = {
    # min 0 / no max: out-of-range values reach fxswap's check, whose message says what to pass.
    "max_vram_gb": (
        "FLOAT",
        {
            "default": 16.0,
            "min": 0.0,
            "max": 4096.0,
            "step": 0.01,
            "tooltip": "Device budget (GiB) for weights, activations and the reserve.",
        },
    ),
    "block_size_mb": (
        "FLOAT",
        {
            "default": 300.0,
            "min": 0.0,
            "max": 1e6,
            "step": 1.0,
            "tooltip": "Swap unit size (MiB) for chunkwise; one candidate for adaptive.",
        },
    ),
    "swap_mode": (
        MODES,
        {
            "default": "adaptive",
            "tooltip": "layerwise: one block per unit; chunkwise: runs of block_size_mb; "
            "adaptive: the planner picks the unit size.",
        },
    ),
}
_OPTIONAL_INPUTS: dict[str, Any] = {
    "empty_cache_freq": (
        "INT",
        {
            "default": 0,
            "min": 0,
            "max": 1_000_000,
            "tooltip": "torch.cuda.empty_cache() every N model calls; 0 never.",
        },
    ),
    "reserve_mb": (
        "FLOAT",
        {
            "default": 256.0,
            "min": 0.0,
            "max": 1e6,
            "step": 1.0,
            "tooltip": "Workspace and allocator slack (MiB) the plan keeps free at every op.",
        },
    ),
    "backend": (
        BACKENDS,
        {
            "default": "inductor",
            "tooltip": "inductor: compile the swapped graph; eager: run it as FX "
            "(bitwise equal to ComfyUI's own model).",
        },
    ),
}


def _check_common(
    max_vram_gb: Any,
    block_size_mb: Any,
    swap_mode: Any,
    empty_cache_freq: Any = 0,
    reserve_mb: Any = 256.0,
    backend: Any = "inductor",
) -> str | bool:
    """True, or fxswap's message for the first bad value (ComfyUI shows it as a validation error)."""
    try:
        make_options(
            mode=swap_mode, max_vram_gb=max_vram_gb, block_size_mb=block_size_mb, reserve_mb=reserve_mb
        )
    except (ValueError, TypeError) as e:
        return f"fxswap: {e}"
    if isinstance(empty_cache_freq, bool) or not isinstance(empty_cache_freq, int) or empty_cache_freq < 0:
        return f"fxswap: `empty_cache_freq`={empty_cache_freq!r} is invalid: pass an int >= 0 (0 = never)"
    if backend not in BACKENDS:
        return f"fxswap: `backend`={backend!r} is invalid: use one of {BACKENDS}"
    return True


def _evict_comfy_copies(diffusion_model: torch.nn.Module) -> None:
    """Unload every ComfyUI-loaded model that shares ``diffusion_model`` (e.g. the same UNETLoader
    output sampled without fxswap earlier): its weights must be back on the host before fxswap
    takes them, and ComfyUI must not hold a device copy beside fxswap's."""
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        lm = mm.current_loaded_models[i]
        m = lm.model
        if m is None or isinstance(m, FxswapModelPatcher):
            continue
        if getattr(m.model, "diffusion_model", None) is diffusion_model:
            logger.info("fxswap: unloading ComfyUI's own copy of %s first", type(diffusion_model).__name__)
            lm.model_unload()
            mm.current_loaded_models.pop(i)


def _on_host(module: torch.nn.Module, what: str) -> None:
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.device.type != "cpu":
            raise ComfyIntegrationError(
                f"{what}: weight {name!r} is on {t.device}, fxswap takes host weights. Fix: load the "
                "model with UNETLoader (weights on the CPU until sampling) and connect it to fxswap "
                "directly, without nodes that move it to the GPU in between."
            )


def _gguf_twin(
    module: torch.nn.Module, dtype: torch.dtype, lora: dict[str, list[Any]]
) -> tuple[torch.nn.Module, dict[str, Tensor]]:
    """A copy of ComfyUI-GGUF's ``module`` (same tensors, no weight copied) whose GGML layers are
    ComfyUI's plain layers of the same name, its packed weights kept as stored (``StoredWeight``,
    the parameter on meta in ``dtype``) and its plain GGML tensors as ordinary tensors.

    A weight of ``lora`` (by name in ``module``) that ComfyUI-GGUF keeps in F16 or F32 but fxswap
    would store (a large one, in another dtype than ``dtype``) is merged on the host instead, as
    ComfyUI-GGUF patches such a tensor (like a plain weight: float32 staging, rounded to the stored
    type), then cast to ``dtype``; the twin holds it decoded (also returned, by name). The packed
    (quantised) ones stay stored: the graph merges them after their decode (``fxswap::patch``).
    """
    import comfy.float
    import comfy.lora
    import comfy.ops

    from fxswap.gguf import quant_type
    from fxswap.stored import StoredWeight, attach

    stored: dict[str, StoredWeight] = {}
    merged: dict[str, Tensor] = {}

    def merge(name: str, w: StoredWeight) -> Tensor:
        key = COMFY_PREFIX + name
        plain = {"F16": torch.float16, "F32": torch.float32}[w.qtype]
        staging = w.data.view(plain).reshape(w.shape).to(torch.float32, copy=True)
        out = comfy.lora.calculate_weight(lora[name], staging, key)
        return comfy.float.stochastic_rounding(out, plain).to(dtype)

    def twin(m: torch.nn.Module, prefix: str) -> torch.nn.Module:
        c = copy.copy(m)  # shares the tensors; the dicts below are its own
        c._parameters = dict(m._parameters)
        c._buffers = dict(m._buffers)
        c._modules = {k: twin(v, f"{prefix}{k}.") if v is not None else None for k, v in m._modules.items()}
        if hasattr(m, "is_ggml_quantized"):  # a GGMLOps layer: ComfyUI's own plain layer instead
            plain = getattr(comfy.ops.disable_weight_init, type(m).__name__, None)
            if plain is None:
                raise ComfyIntegrationError(
                    f"GGUF layer {prefix.rstrip('.')} ({type(m).__name__}) has no plain ComfyUI counterpart"
                )
            c.__class__ = plain
        for k, p in m._parameters.items():
            qt = getattr(p, "tensor_type", None)
            if p is None or qt is None and not hasattr(p, "tensor_shape"):
                continue
            raw = p.as_subclass(torch.Tensor).detach()
            shape = tuple(int(x) for x in getattr(p, "tensor_shape", raw.shape))
            name = getattr(qt, "name", "F32")
            if (
                name in ("F32", "F16")
                and raw.dtype.is_floating_point
                and (raw.dtype == dtype or raw.numel() < 2**16)
            ):
                c._parameters[k] = torch.nn.Parameter(raw.reshape(shape).to(dtype), requires_grad=False)
                continue
            data = raw.contiguous().view(torch.uint8).reshape(-1)
            quant_type(name)  # refuses a type fxswap cannot decode, naming it
            w = StoredWeight(data, name, shape, dtype)
            if prefix + k in lora and name in ("F32", "F16"):
                merged[prefix + k] = merge(prefix + k, w)
                c._parameters[k] = torch.nn.Parameter(merged[prefix + k], requires_grad=False)
                continue
            stored[prefix + k] = w
            c._parameters[k] = torch.nn.Parameter(
                torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False
            )
        return c

    out = twin(module, "")
    attach(out, stored)
    return out, merged


def _comfy_adapter(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """ComfyUI's diffusion-model call (x, timestep, context, clip_fea, time_dim_concat,
    transformer_options, **extra) -> the tensors-only call fxswap captures."""
    x, timestep, context, *rest = args
    extra = dict(zip(("clip_fea", "time_dim_concat", "transformer_options"), rest, strict=False))
    extra.update(kwargs)
    topts = extra.pop("transformer_options", None) or {}
    replaced = topts.get("patches_replace", {}).get("dit", {})
    if replaced:
        raise ComfyIntegrationError(
            f"a node patched {len(replaced)} transformer block(s) of this model (transformer_options "
            "patches_replace 'dit'); fxswap runs the model as one compiled graph and cannot apply "
            "per-block replacements. Fix: remove that node, or drop fxswap for this workflow."
        )
    call: dict[str, Any] = {}
    for k, v in extra.items():
        if v is None:
            continue
        if not isinstance(v, Tensor):
            raise ComfyIntegrationError(
                f"the diffusion model got `{k}` of type {type(v).__name__} (from a ComfyUI node such as "
                "a ControlNet); fxswap passes tensors only. Fix: remove the node that adds it."
            )
        call[k] = v
    return (x, timestep, context), call


def _wan_adapter(cfg: wan.WanConfig) -> Any:
    def adapt(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        (x, timestep, context), extra = _comfy_adapter(args, kwargs)
        clip_fea = extra.pop("clip_fea", None)
        if extra:
            raise ComfyIntegrationError(
                f"the WAN model got {sorted(extra)} from ComfyUI; fxswap's WAN module takes x, timestep, "
                "context, clip_fea and the concatenated image conditioning only. Fix: use UNETLoader -> "
                "fxswap Block Swap for this model variant."
            )
        call: dict[str, Any] = {}
        if x.shape[1] > cfg.out_dim:  # ComfyUI concatenated the image conditioning to x
            x, call["y"] = x[:, : cfg.out_dim], x[:, cfg.out_dim :]
        if context.shape[1] < cfg.text_len:
            # the WAN pipelines zero-pad the text encoder output to text_len; so does ComfyUI's encoder
            pad = context.new_zeros(context.shape[0], cfg.text_len - context.shape[1], context.shape[2])
            context = torch.cat([context, pad], dim=1)
        if clip_fea is not None and cfg.has_image_input:
            call["clip_fea"] = clip_fea
        return (x, timestep, context), call

    return adapt


class FxswapBlockSwap:
    """Block swap for the MODEL of UNETLoader / LoraLoaderModelOnly (ComfyUI's own WanModel)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    DESCRIPTION = (
        "Run the diffusion model with fxswap's compiled block swap under max_vram_gb. Connect it after "
        "UNETLoader (and LoraLoaderModelOnly, if any), before the samplers."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {"model": ("MODEL",), **_BUDGET_INPUTS},
            "optional": dict(_OPTIONAL_INPUTS),
            "hidden": dict(_HIDDEN),
        }

    @classmethod
    def VALIDATE_INPUTS(  # noqa: N802
        cls,
        max_vram_gb: Any,
        block_size_mb: Any,
        swap_mode: Any,
        empty_cache_freq: Any = 0,
        reserve_mb: Any = 256.0,
        backend: Any = "inductor",
    ) -> str | bool:
        return _check_common(max_vram_gb, block_size_mb, swap_mode, empty_cache_freq, reserve_mb, backend)

    def apply(
        self,
        model: Any,
        max_vram_gb: float,
        block_size_mb: float,
        swap_mode: str,
        empty_cache_freq: int = 0,
        reserve_mb: float = 256.0,
        backend: str = "inductor",
        unique_id: str | None = None,
    ) -> tuple[Any]:
        if isinstance(model, FxswapModelPatcher):
            raise ComfyIntegrationError(
                f"this MODEL already runs through fxswap ({model.fxswap.name}); connect the loader's "
                "MODEL to one fxswap node only."
            )
        base = model.model
        diffusion = getattr(base, "diffusion_model", None)
        if not isinstance(diffusion, torch.nn.Module):
            raise ComfyIntegrationError(
                f"the MODEL ({type(base).__name__}) has no diffusion_model module; connect the MODEL "
                "output of UNETLoader or LoraLoaderModelOnly."
            )
        ggml = any(hasattr(p, "tensor_type") for p in diffusion.parameters())
        lora: dict[str, list[Any]] = {}
        for key, patches in model.patches.items():
            if not key.startswith(COMFY_PREFIX):
                raise ComfyIntegrationError(
                    f"the MODEL carries a patch for {key!r}, outside the diffusion model; fxswap merges "
                    "diffusion-model LoRAs only. Fix: use LoraLoaderModelOnly."
                )
            _, set_func, convert_func = comfy.model_patcher.get_key_weight(base, key)
            if set_func is not None or convert_func is not None:
                raise ComfyIntegrationError(
                    f"the MODEL patches {key!r}, a weight ComfyUI stores quantised (scaled fp8); fxswap "
                    "merges LoRAs into plain weights only. Fix: load the fp16/bf16 checkpoint for LoRAs."
                )
            lora[key.removeprefix(COMFY_PREFIX)] = patches
        _evict_comfy_copies(diffusion)
        _on_host(diffusion, "fxswap Block Swap")
        if ggml:
            # ComfyUI-GGUF's layers decode their packed weights inside their forward (which Dynamo
            # does not trace); fxswap runs a twin of the module whose packed weights are kept as
            # stored and decoded in its graph (fxswap.stored), sharing every other tensor.
            # LoRA'd packed weights stay packed (merged in the graph after their decode); F16/F32
            # ones that fxswap would store are merged on the host (see _gguf_twin).
            diffusion, host_merged = _gguf_twin(diffusion, base.get_dtype(), lora)
        else:
            host_merged = {}
        on_device = {k: v for k, v in lora.items() if k not in host_merged}
        # ComfyUI never calls eval() (it samples under no_grad); fxswap refuses training-mode modules
        # because dropout would differ. ComfyUI's diffusion models hold no dropout or batch norm, so
        # the flag changes nothing for ComfyUI's own use of the same module.
        diffusion.eval()
        name = f"{type(diffusion).__name__}@{id(diffusion):x}"
        state = SwapState.create(
            name,
            diffusion,
            mode=swap_mode,
            max_vram_gb=max_vram_gb,
            block_size_mb=block_size_mb,
            reserve_mb=reserve_mb,
            empty_cache_freq=empty_cache_freq,
            backend=backend,
            device=torch.device(model.load_device),
            adapt=_comfy_adapter,
            lora=on_device,
            key_prefix=COMFY_PREFIX,
            node_id=unique_id,
            host_merged={k: lora[k] for k in host_merged},
        )
        patched = make_patcher(
            own_base_model(base, model.offload_device),
            state,
            load_device=model.load_device,
            offload_device=model.offload_device,
            template=model,
        )
        decoded_then_merged = sum(1 for k in on_device if k in stored_weights(diffusion))
        logger.info(
            "fxswap: block swap for %s: mode %s, budget %g GiB, %d LoRA-patched weights merged on device "
            "(%d of them GGUF weights, merged in the graph after their decode)%s",
            name,
            swap_mode,
            max_vram_gb,
            len(on_device),
            decoded_then_merged,
            f"; {len(host_merged)} LoRA-patched GGUF F16/F32 weights merged on the host in their stored "
            f"type ({sum(t.nbytes for t in host_merged.values())} bytes, kept decoded)"
            if host_merged
            else "",
        )
        return (patched,)


def _checkpoint_names() -> list[str]:
    """Files in ComfyUI's diffusion_models folders, sharded checkpoint folders (diffusers), and GGUF
    files (ComfyUI lists only its own extensions there; ComfyUI-GGUF reads the same folders)."""
    names = list(folder_paths.get_filename_list("diffusion_models"))
    for root in folder_paths.get_folder_paths("diffusion_models"):
        if not os.path.isdir(root):
            continue
        for dirpath, _, files in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            names += [f if rel == "." else os.path.join(rel, f) for f in files if f.lower().endswith(".gguf")]
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            if os.path.isdir(path) and any(
                f.endswith((".safetensors", ".safetensors.index.json", ".pth")) for f in os.listdir(path)
            ):
                names.append(entry + "/")
    return sorted(set(names))


def _checkpoint_path(model_name: str) -> str:
    if model_name.endswith("/"):
        for root in folder_paths.get_folder_paths("diffusion_models"):
            path = os.path.join(root, model_name.rstrip("/"))
            if os.path.isdir(path):
                return path
        raise ComfyIntegrationError(
            f"`model_name`={model_name!r}: no such folder under ComfyUI's diffusion_models folders. "
            "Fix: put the checkpoint folder there, or pick a listed model."
        )
    if model_name.lower().endswith(".gguf"):  # not an extension ComfyUI lists: found here
        for root in folder_paths.get_folder_paths("diffusion_models"):
            path = os.path.join(root, model_name)
            if os.path.isfile(path):
                return path
        raise ComfyIntegrationError(
            f"`model_name`={model_name!r}: no such GGUF file under ComfyUI's diffusion_models folders. "
            "Fix: put the file there, or pick a listed model."
        )
    return str(folder_paths.get_full_path_or_raise("diffusion_models", model_name))


class FxswapWanLoader:
    """A WAN checkpoint (any layout fxswap reads) as a MODEL that runs fxswap's WAN module with block swap."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Load a WAN 2.1 / 2.2 diffusion model with fxswap's loader (original, ComfyUI, diffusers, "
        "TurboWan, fp8 layouts, and GGUF files kept quantised until the GPU) and run it with fxswap's "
        "block swap under max_vram_gb."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {
            "required": {
                "model_name": (_checkpoint_names(),),
                "attention_type": (sorted(wan.ATTENTION_TYPES), {"default": "sdpa"}),
                "sla_topk": (
                    "FLOAT",
                    {
                        "default": 0.1,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Share of key blocks SLA attends to (attention_type sla).",
                    },
                ),
                "offload_mode": (["block_swap"], {"default": "block_swap"}),
                **_BUDGET_INPUTS,
            },
            "optional": {"dtype": (list(DTYPES), {"default": "default"}), **_OPTIONAL_INPUTS},
            "hidden": dict(_HIDDEN),
        }

    @classmethod
    def VALIDATE_INPUTS(  # noqa: N802
        cls,
        attention_type: Any,
        sla_topk: Any,
        offload_mode: Any,
        max_vram_gb: Any,
        block_size_mb: Any,
        swap_mode: Any,
        empty_cache_freq: Any = 0,
        reserve_mb: Any = 256.0,
        backend: Any = "inductor",
        dtype: Any = "default",
    ) -> str | bool:
        try:
            wan.get_attention(attention_type)
        except ValueError as e:
            return f"fxswap: {e}"
        if not isinstance(sla_topk, (int, float)) or not (0.0 < float(sla_topk) <= 1.0):
            return (
                f"fxswap: `sla_topk`={sla_topk!r} is invalid: pass a share of key blocks in (0, 1], e.g. 0.1"
            )
        if offload_mode != "block_swap":
            return f"fxswap: `offload_mode`={offload_mode!r} is invalid: fxswap offers 'block_swap'"
        if dtype not in DTYPES:
            return f"fxswap: `dtype`={dtype!r} is invalid: use one of {list(DTYPES)}"
        return _check_common(max_vram_gb, block_size_mb, swap_mode, empty_cache_freq, reserve_mb, backend)

    def load(
        self,
        model_name: str,
        attention_type: str,
        sla_topk: float,
        offload_mode: str,
        max_vram_gb: float,
        block_size_mb: float,
        swap_mode: str,
        dtype: str = "default",
        empty_cache_freq: int = 0,
        reserve_mb: float = 256.0,
        backend: str = "inductor",
        unique_id: str | None = None,
    ) -> tuple[Any]:
        path = _checkpoint_path(model_name)
        load_kwargs: dict[str, Any] = {"attention_type": attention_type, "dtype": DTYPES[dtype]}
        if attention_type == "sla" and "sla_topk" in inspect.signature(wan.load).parameters:
            # only SLA reads it: wan.load refuses a top-k for dense attention rather than ignore it
            load_kwargs["sla_topk"] = sla_topk
        loading = NodeProgress(None)  # this node runs: its own bar counts the tensors loaded
        with listen(loading):
            module = wan.load(path, **load_kwargs)
        if loading.interrupted:
            raise mm.InterruptProcessingException()
        module.eval()
        cfg = module.config
        compute = module.compute_dtype
        # ComfyUI's side of the MODEL: its WAN BaseModel (sampling schedule, latent format, conds) on
        # meta tensors, detected from the same key names and shapes; it holds no weight.
        shapes = {
            k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in module.state_dict().items()
        }
        model_config = comfy.model_detection.model_config_from_unet(shapes, "")
        if model_config is None:
            raise ComfyIntegrationError(
                f"`model_name`={model_name!r}: ComfyUI does not recognise this WAN variant ({cfg.name}) "
                "for sampling. Fix: use a WAN 2.1 / 2.2 t2v, i2v or ti2v checkpoint."
            )
        model_config.set_inference_dtype(compute, None)
        base = model_config.get_model(shapes, "", device="meta")
        load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
        name = f"{os.path.basename(model_name.rstrip('/'))} ({cfg.name}, {attention_type})"
        state = SwapState.create(
            name,
            module,
            mode=swap_mode,
            max_vram_gb=max_vram_gb,
            block_size_mb=block_size_mb,
            reserve_mb=reserve_mb,
            empty_cache_freq=empty_cache_freq,
            backend=backend,
            device=torch.device(load_device),
            adapt=_wan_adapter(cfg),
            lora={},
            key_prefix=COMFY_PREFIX,
            node_id=unique_id,
        )
        base.device = offload_device
        patcher = make_patcher(base, state, load_device=load_device, offload_device=offload_device)
        logger.info("fxswap: loaded %s from %s: mode %s, budget %g GiB", name, path, swap_mode, max_vram_gb)
        return (patcher,)


def _fxswap_state(model: Any, node: str) -> SwapState:
    if not isinstance(model, FxswapModelPatcher):
        raise ComfyIntegrationError(
            f"{node}: the MODEL does not run through fxswap. Fix: connect the MODEL output of "
            "'fxswap Block Swap' or 'fxswap WAN Loader'."
        )
    return model.fxswap


class FxswapPlan:
    """The plan a sampler would get, before sampling: units, predicted peak and step, smallest budget."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("plan",)
    OUTPUT_NODE = True
    FUNCTION = "plan"
    DESCRIPTION = "Plan the fxswap MODEL for this latent and conditioning on meta tensors (nothing runs)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {
            "required": {"model": ("MODEL",), "latent": ("LATENT",), "positive": ("CONDITIONING",)},
            "optional": {
                "cfg_batch": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Plan cond and uncond in one call (ComfyUI batches them)."},
                )
            },
        }

    def plan(
        self, model: Any, latent: dict[str, Any], positive: Any, cfg_batch: bool = True
    ) -> dict[str, Any]:
        state = _fxswap_state(model, "fxswap Plan")
        samples = latent["samples"]
        batch = samples.shape[0] * (2 if cfg_batch else 1)
        base = model.model
        dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
        first = state.module.get_parameter("patch_embedding.weight")
        x = torch.empty((batch, first.shape[1], *samples.shape[2:]), dtype=dtype, device="meta")
        t = torch.empty((batch,), dtype=torch.float32, device="meta")
        cond = positive[0][0]
        context = torch.empty((batch, *cond.shape[1:]), dtype=dtype, device="meta")
        try:
            plan = state.preview((x, t, context), {})
            text = f"fxswap plan for {state.name}, input {tuple(x.shape)}:\n{plan.summary()}"
        except BudgetInfeasibleError as e:
            text = (
                f"fxswap plan for {state.name}, input {tuple(x.shape)}: DOES NOT FIT.\n{e}\n"
                f"smallest budget: {e.min_vram_bytes / 2**30:.3f} GiB ({e.min_vram_bytes} bytes)"
            )
        except FxswapError as e:
            text = f"fxswap plan for {state.name}: {type(e).__name__}: {e}"
        logger.info("%s", text)
        return {"ui": {"text": [text]}, "result": (text,)}


class FxswapMonitor:
    """After a sampler: the VRAM monitor's rows of the fxswap model's last sampling run, and the plan
    of its last call."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("samples", "report")
    OUTPUT_NODE = True
    FUNCTION = "report"
    DESCRIPTION = "Pass the sampler's LATENT through and report fxswap's per-step device memory."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": {"model": ("MODEL",), "samples": ("LATENT",)}}

    def report(self, model: Any, samples: dict[str, Any]) -> dict[str, Any]:
        state = _fxswap_state(model, "fxswap Monitor")
        rows = state.monitor_rows
        lines = [
            f"fxswap monitor for {state.name}: {len(rows)} model calls, budget {state.budget_bytes} bytes"
        ]
        lines += [str(r) for r in rows]
        peak = max((r.peak_bytes for r in rows), default=0)
        lines.append(f"peak {peak} bytes ({peak / max(state.budget_bytes, 1):.1%} of the budget)")
        text = "\n".join(lines)
        rows_json = [r.as_dict() for r in rows]
        plan = state.swap.plan
        plans = [] if plan is None else [plan.summary()]
        return {
            "ui": {"text": [text], "rows": rows_json, "budget_bytes": [state.budget_bytes], "plan": plans},
            "result": (samples, text),
        }


NODE_CLASS_MAPPINGS = {
    "FxswapBlockSwap": FxswapBlockSwap,
    "FxswapWanLoader": FxswapWanLoader,
    "FxswapPlan": FxswapPlan,
    "FxswapMonitor": FxswapMonitor,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FxswapBlockSwap": "fxswap Block Swap",
    "FxswapWanLoader": "fxswap WAN Loader",
    "FxswapPlan": "fxswap Plan",
    "FxswapMonitor": "fxswap Monitor",
}
