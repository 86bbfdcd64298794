"""WAN checkpoints loaded with their weights kept as stored: GGUF files (ComfyUI-GGUF's layout) and
fp8 safetensors (``*_fp8_scaled`` / ``*_fp8_e4m3fn``).

The GGUF files people run WAN from are written by ComfyUI-GGUF's ``tools/convert.py`` (then
quantised by its patched ``llama-quantize``): ``general.architecture = "wan"``, the original WAN key
names (ComfyUI's, without the ``model.diffusion_model.`` prefix), 1-D and small tensors in F32, the
large ones in F16/BF16 or a quantised type, and the 5-D ``patch_embedding.weight`` added back in F32
by its ``tools/fix_5d_tensors.py``. A ``comfy.gguf.orig_shape.<name>`` entry gives a tensor's shape
where the converter flattened it to rows of 256.

What stays stored (a :class:`fxswap.stored.StoredWeight`, the parameter left on ``meta``):

- every GGUF tensor of a block type (Q4_0 ... Q6_K), and F16/BF16/F32 ones of at least
  :data:`KEEP_PLAIN_MIN` values whose dtype is not the parameter's;
- every fp8 tensor of an fp8 safetensors file, with its per-tensor ``scale_weight``.

Everything else (norms, biases, modulation tables, the patch embedding) is small and becomes an
ordinary parameter on the host: a view of the mapped file where the dtype already matches, else
cast. So the host never holds a weight both stored and decoded, and a 9 GB Q4_K file takes
9 GB of RAM, not 28.6.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fxswap.errors import CheckpointError
from fxswap.gguf import GGUFFile, read_gguf
from fxswap.models import wan_checkpoint, wan_config
from fxswap.models.wan_config import WanConfig
from fxswap.quant import FP8_DTYPES, dequantize
from fxswap.stored import StoredWeight, attach

__all__ = [
    "KEEP_PLAIN_MIN",
    "gguf_planned_sizes",
    "gguf_shapes",
    "load_fp8_stored",
    "load_gguf",
    "stored_file_bytes",
]

#: A plain-float GGUF tensor this large, in another dtype than its parameter, stays stored (cast on
#: the device) rather than cast into a second host copy.
KEEP_PLAIN_MIN = 1 << 16

# The model on meta for a config and compute dtype (fxswap.models.wan.build, passed in by wan.load:
# this module sits below wan.py).
Builder = Callable[[WanConfig, torch.dtype], torch.nn.Module]

_PLAIN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_COMFY_PREFIX = "model.diffusion_model."


def gguf_shapes(f: GGUFFile) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape as the model sees it (the converter's ``orig_shape`` where it has one),
    under its original-layout name."""
    return {_name(k): f.orig_shape(k) or t.shape for k, t in f.tensors.items()}


def _name(key: str) -> str:
    return key.removeprefix(_COMFY_PREFIX)


def _check(f: GGUFFile, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]], strict: bool) -> None:
    shapes = gguf_shapes(f)
    missing = [k for k in expected if k not in shapes]
    problems = []
    if missing:
        hint = ""
        if "patch_embedding.weight" in missing:
            hint = (
                " (patch_embedding.weight is 5-D: ComfyUI-GGUF's convert.py leaves it out and its "
                "tools/fix_5d_tensors.py adds it back; run that on the file)"
            )
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:8])}{hint}")
    unexpected = [k for k in shapes if k not in expected]
    if unexpected and strict:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:8])}")
    mism = [
        f"`{k}`: file {list(shapes[k])} vs config {list(expected[k][0])}"
        for k in expected
        if k in shapes and tuple(shapes[k]) != tuple(expected[k][0])
    ]
    if mism:
        problems.append(f"{len(mism)} shape mismatch(es): " + "; ".join(mism[:8]))
    if problems:
        raise CheckpointError(
            f"{f.path}: " + " | ".join(problems) + ". Fix: pass the config the file was made from "
            "(config=...), or strict=False to ignore unexpected tensors"
        )


def load_gguf(
    path: str | os.PathLike[str],
    *,
    config: WanConfig | str | None,
    dtype: torch.dtype | None,
    attention_type: str | None,
    strict: bool,
    build: Builder,
) -> torch.nn.Module:
    """A ``WanModel`` from a WAN GGUF file, quantised weights kept as stored (module docstring).

    ``dtype`` is the compute dtype (default bfloat16). Every check (architecture, types, truncation,
    keys and shapes against the config) runs before any parameter is made; any problem is a
    :class:`CheckpointError` naming the file and the tensor. The model lives on the CPU (its stored
    weights on meta, see :mod:`fxswap.stored`); run it through ``fxswap.compile``.
    """
    f = read_gguf(path, architecture="wan")
    try:
        shapes = gguf_shapes(f)
        if config is None:
            try:
                cfg = wan_checkpoint.detect_config(shapes)
            except CheckpointError as e:
                raise CheckpointError(f"{f.path}: {e}") from None
        else:
            cfg = wan_config.resolve_config(config)
        if attention_type is not None:
            cfg = _with_attention(cfg, attention_type)
        compute = dtype if dtype is not None else torch.bfloat16
        if compute not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise CheckpointError(
                f"load: dtype={compute} is not a compute dtype; use bfloat16, float16 or float32"
            )
        skeleton = build(cfg, compute)
        expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
        _check(f, expected, strict)
        stored: dict[str, StoredWeight] = {}
        plain: dict[str, torch.Tensor] = {}
        by_name = {_name(k): t for k, t in f.tensors.items()}
        for k, (shape, want) in expected.items():
            t = by_name[k]
            raw = torch.frombuffer(f.raw(t.name), dtype=torch.uint8)
            plain_dtype = _PLAIN_DTYPES.get(t.qtype)
            if plain_dtype is None or (plain_dtype != want and t.numel >= KEEP_PLAIN_MIN):
                stored[k] = StoredWeight(raw, t.qtype, shape, want)
            elif plain_dtype == want:
                plain[k] = raw.view(plain_dtype).view(shape)  # a view of the mapped file
            else:
                plain[k] = dequantize(raw, t.qtype, shape, want)
    finally:
        f.close()  # the tensors handed out keep the mapping alive
    return _assemble(skeleton, plain, stored)


def _with_attention(cfg: WanConfig, attention_type: str) -> WanConfig:
    if attention_type not in wan_config.ATTENTION_NAMES or attention_type == "sla":
        raise CheckpointError(
            f"load: attention_type={attention_type!r} is not available for GGUF files; use one of "
            f"{sorted(set(wan_config.ATTENTION_NAMES) - {'sla'})} or None"
        )
    return dataclasses.replace(cfg, attention_type=attention_type)


def _assemble(
    skeleton: torch.nn.Module, plain: Mapping[str, torch.Tensor], stored: Mapping[str, StoredWeight]
) -> torch.nn.Module:
    # Only the plain tensors are assigned; the stored ones stay meta parameters of the right shape
    # and dtype (what the capture reads), their data in the record beside the model.
    skeleton.load_state_dict(dict(plain), strict=False, assign=True)
    for p in skeleton.parameters():
        p.requires_grad_(False)
    attach(skeleton, stored)
    return skeleton


def load_fp8_stored(
    path: str | os.PathLike[str],
    *,
    config: WanConfig | str | None,
    dtype: torch.dtype | None,
    attention_type: str | None,
    strict: bool,
    build: Builder,
) -> torch.nn.Module:
    """A ``WanModel`` from an fp8 safetensors file (``*_fp8_scaled`` or plain ``*_fp8_e4m3fn``), every
    fp8 tensor kept as stored with its ``scale_weight`` (decoded on the device as
    ``W_fp8.float() * scale``, rounded once to ``dtype``); the other tensors as
    ``fxswap.models.wan.load`` makes them."""
    sd, info, cfg, compute = wan_checkpoint.resolve_load_args(path, config, dtype, attention_type)
    skeleton = build(cfg, compute)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    wan_checkpoint._check_keys(expected, sd, strict, str(info.path))
    stored: dict[str, StoredWeight] = {}
    plain: dict[str, torch.Tensor] = {}
    cpu = torch.device("cpu")
    for k, (shape, want) in expected.items():
        if sd.dtype(k) in FP8_DTYPES:
            scale = info.weight_scales.get(k)
            stored[k] = StoredWeight(sd[k], "fp8", shape, want, None if scale is None else float(scale))
        else:
            plain[k] = wan_checkpoint._materialise(sd, info, k, want, cpu)
    return _assemble(skeleton, plain, stored)


def stored_file_bytes(model: torch.nn.Module) -> dict[str, Any]:
    """Bytes of the weights ``model`` keeps as stored and of its ordinary parameters (for reports)."""
    from fxswap.stored import stored_weights

    sw = stored_weights(model)
    other = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if n not in sw and not p.is_meta
    )
    return {"stored": sum(w.nbytes for w in sw.values()), "plain": other, "tensors": len(sw)}


def gguf_planned_sizes(model: torch.nn.Module, qtype: str) -> dict[str, tuple[int, int, int]]:
    """Per weight a GGUF file of ``qtype`` would quantise, (stored bytes, decoded bytes, decoder
    scratch on CUDA: none): what ``fxswap plan --dtype Q4_K`` prices before anything is downloaded.

    The weights ComfyUI-GGUF's converter hands to the quantiser: 2- to 4-D tensors of more than
    1,024 values, not the ``.modulation`` tables it keeps in F32, whose rows are whole blocks of
    ``qtype``. Everything else stays in the model's dtype. ``Q4_K_M``-style names price the file at
    its main type (llama.cpp's mixes put a few tensors one type higher).
    """
    from fxswap.gguf import quant_type

    t = quant_type(qtype)
    out: dict[str, tuple[int, int, int]] = {}
    for name, p in model.named_parameters():
        if (
            2 <= p.dim() <= 4
            and p.numel() > 1024
            and ".modulation" not in name
            and p.shape[-1] % t.block_elems == 0
        ):
            out[name] = (t.nbytes(p.numel()), p.numel() * p.element_size(), 0)
    return out
