"""Reading and writing WAN 2.1 / 2.2 transformer checkpoints in every layout users arrive with.

Layouts (``detect_layout`` tells them apart from key names, and from shapes where it is given them):

``"original"``
    The Wan-Video repositories' key names (``blocks.0.self_attn.q.weight``, ``head.modulation``...).
    fxswap's model (:mod:`fxswap.models.wan`) uses exactly these names, so every other layout is
    converted *to* this one.
``"comfyui"``
    The original names, optionally behind the ``model.diffusion_model.`` prefix of full ComfyUI
    checkpoints, with weights in ``float8_e4m3fn`` and, for ``*_fp8_scaled`` files, a ``scaled_fp8``
    marker plus a per-tensor ``<module>.scale_weight`` (and ``scale_input``, which only matters for
    fp8 activations and is ignored with a note). A ComfyUI file with neither prefix nor scale keys
    has the original key names and is reported as ``"original"``: it loads identically.
``"diffusers"``
    ``WanTransformer3DModel`` names (``attn1.to_q``, ``scale_shift_table``, ``condition_embedder.*``,
    ``proj_out``, ``ffn.net.0.proj``, ``add_k_proj``...), including the norm2/norm3 swap.
``"turbowan"``
    TurboDiffusion ``.pth`` files: original names, a Linear-shaped patch embedding ``[D, in_dim*4]``
    and, with SLA, ``blocks.{i}.self_attn.attn_op.local_attn.proj_l.*``.

Storage and compute dtypes. :func:`load_state_dict` never converts anything: it returns a lazy,
read-only mapping in the original layout whose tensors are memory-mapped views of the file, in the
dtype they are stored in (fp32, bf16, fp16 or fp8), plus a :class:`CheckpointInfo` with the
per-weight ``scale_weight`` factors of ``scaled_fp8`` files. So a 28 GB file is never read twice
and never copied into anonymous memory by the loader. ``fxswap.models.wan.load`` materialises a
runnable module (:func:`materialise_into`): each tensor is moved to ``device`` in its storage dtype
and only then cast to the dtype the model wants for that parameter (the compute dtype, or fp32 where
the model keeps a parameter in fp32), dequantising fp8 as ``W = W_fp8.float() * scale_weight`` on the
way. A parameter that needs no cast
on the CPU stays a view of the mapped file (copy-on-write), which is how the weights avoid being
held twice. fp8 parameters are never handed to the model: CPU matmuls cannot take them.

Every failure is a :class:`fxswap.errors.CheckpointError` raised before anything is assigned.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fxswap.errors import CheckpointError
from fxswap.models import wan_config
from fxswap.models.wan_config import WanConfig

__all__ = [
    "COMFYUI_PREFIX",
    "LAYOUTS",
    "CheckpointInfo",
    "LazyStateDict",
    "convert_state_dict",
    "detect_config",
    "detect_layout",
    "load_into",
    "load_state_dict",
    "materialise_into",
    "resolve_load_args",
    "save",
]

LAYOUTS = ("original", "comfyui", "diffusers", "turbowan")
COMFYUI_PREFIX = "model.diffusion_model."
CONFIG_METADATA_KEY = "fxswap_config"
SHARD_STEM = "diffusion_pytorch_model"

# Compute dtypes a loaded module may run in. fp8 is a storage format here, never a compute dtype.
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FP8_DTYPES = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SLA_PATTERN = re.compile(r"^blocks\.\d+\.self_attn\.attn_op\.local_attn\.proj_l\.")
_BLOCK_PATTERN = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Some diffusers-layout WAN i2v files carry a query norm for the image branch that no WAN model has;
# diffusers lists it in _keys_to_ignore_on_load_unexpected, and so does fxswap's loader.
_NORM_ADDED_Q = re.compile(r"^blocks\.\d+\.attn2\.norm_added_q\.(weight|bias)$")
# ComfyUI's newer quantisation format: per-layer formats in this safetensors metadata entry, and
# per-layer ``<layer>.comfy_quant`` / ``<layer>.weight_scale`` tensors.
_COMFY_QUANT_METADATA = "_quantization_metadata"
_COMFY_QUANT_SUFFIXES = (".comfy_quant", ".weight_scale", ".weight_scale_2", ".input_scale")

# ---------------------------------------------------------------------------------------------
# Key mapping original <-> diffusers. Module renames apply to ``<module>.weight|bias``; parameter
# renames apply to the whole key tail (bare parameters such as ``modulation``).
# ---------------------------------------------------------------------------------------------
_BLOCK_MODULES = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    # diffusers numbers the norms in execution order; the original runs norm1, norm3, norm2.
    "norm1": "norm1",
    "norm3": "norm2",
    "norm2": "norm3",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_BLOCK_PARAMS = {"modulation": "scale_shift_table"}
_TOP_MODULES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_TOP_PARAMS = {
    "head.modulation": "scale_shift_table",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}
_LEAVES = ("weight", "bias")


def _invert(d: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in d.items()}


_MAPS: dict[str, tuple[dict[str, str], dict[str, str], dict[str, str], dict[str, str]]] = {
    "original": (_BLOCK_MODULES, _BLOCK_PARAMS, _TOP_MODULES, _TOP_PARAMS),
    "diffusers": (
        _invert(_BLOCK_MODULES),
        _invert(_BLOCK_PARAMS),
        _invert(_TOP_MODULES),
        _invert(_TOP_PARAMS),
    ),
}


def _rename(key: str, src: str) -> str | None:
    """The key in the other layout, or None when ``key`` is not a known ``src`` key."""
    block_modules, block_params, top_modules, top_params = _MAPS[src]
    m = _BLOCK_PATTERN.match(key)
    if m:
        prefix, tail = f"blocks.{m.group(1)}.", m.group(2)
        modules, params = block_modules, block_params
    else:
        prefix, tail = "", key
        modules, params = top_modules, top_params
    if tail in params:
        return prefix + params[tail]
    module, _, leaf = tail.rpartition(".")
    if leaf in _LEAVES and module in modules:
        return f"{prefix}{modules[module]}.{leaf}"
    return None


def _fmt_keys(keys: Iterable[str], limit: int = 8) -> str:
    ks = sorted(keys, key=_natural_key)
    shown = ", ".join(ks[:limit])
    return shown + (f" ... and {len(ks) - limit} more" if len(ks) > limit else "")


def _natural_key(key: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key))


def convert_state_dict(
    state_dict: Mapping[str, Any],
    src: Literal["original", "diffusers"] = "original",
    dst: Literal["original", "diffusers"] = "diffusers",
) -> dict[str, Any]:
    """Rename the keys of a WAN state dict between the original and diffusers layouts.

    Pure key mapping: values (tensors, shapes, anything) are passed through untouched and the
    mapping is a bijection, so ``convert(convert(sd, "original", "diffusers"), "diffusers",
    "original") == sd``. Key order is kept. Raises CheckpointError listing every key that has no
    counterpart (for example TurboWan SLA keys or ComfyUI scale keys, which diffusers cannot hold).
    """
    for name, value in (("src", src), ("dst", dst)):
        if value not in _MAPS:
            raise CheckpointError(
                f"convert_state_dict: {name}={value!r} is not a layout it converts; "
                f"use 'original' or 'diffusers' (load ComfyUI/TurboWan files with "
                f"load_state_dict, which returns the original layout)"
            )
    if src == dst:
        return dict(state_dict)
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        new = _rename(key, src)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise CheckpointError(
            f"convert_state_dict: {len(unknown)} key(s) are not {src}-layout WAN keys "
            f"and have no {dst} name: {_fmt_keys(unknown)}; remove them or pass "
            f"src= matching the dict's layout"
            + (
                " ('attn2.norm_added_q' keys belong to no WAN model and diffusers ignores them: drop them)"
                if any(_NORM_ADDED_Q.match(k) for k in unknown)
                else ""
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Layout detection
# ---------------------------------------------------------------------------------------------
def _shape_of(value: Any) -> tuple[int, ...]:
    """Shape of a tensor, or a shape given directly (torch.Size, tuple, list)."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return tuple(int(x) for x in value)


def detect_layout(keys: Iterable[str] | Mapping[str, Any]) -> str:
    """Name the layout of a WAN checkpoint from its keys (and shapes, when given a key->shape map).

    ``keys``: key names, or a mapping from keys to shapes or tensors (a state dict).

    Returns one of :data:`LAYOUTS`. A TurboWan file is recognised by its SLA keys, or (shapes
    needed) by its 2-D patch embedding. Raises CheckpointError naming the known layouts and a
    sample of the keys seen when nothing matches.
    """
    shapes = keys if isinstance(keys, Mapping) else None
    names = list(keys)
    keyset = set(names)
    if (
        any(k.startswith(COMFYUI_PREFIX) for k in names)
        or "scaled_fp8" in keyset
        or any(k.endswith((".scale_weight", ".scale_input")) for k in names)
    ):
        return "comfyui"
    if any(_SLA_PATTERN.match(k) for k in names):
        return "turbowan"
    if (
        shapes is not None
        and "patch_embedding.weight" in shapes
        and len(_shape_of(shapes["patch_embedding.weight"])) == 2
    ):
        return "turbowan"
    diffusers_markers = ("scale_shift_table", "proj_out.weight", "condition_embedder.time_proj.weight")
    if any(k in keyset for k in diffusers_markers) or any(".attn1.to_q." in k for k in names):
        return "diffusers"
    original_markers = ("head.modulation", "head.head.weight", "time_projection.1.weight")
    if any(k in keyset for k in original_markers) or any(".self_attn.q." in k for k in names):
        return "original"
    raise CheckpointError(
        f"detect_layout: these {len(names)} keys are not a WAN transformer in any known layout "
        f"({', '.join(LAYOUTS)}); keys seen: {_fmt_keys(names) or '(none)'}. A WAN checkpoint has "
        f"'head.modulation' (original/ComfyUI/TurboWan) or 'scale_shift_table' (diffusers); pass the "
        f"transformer's own file, not the VAE or a text encoder"
    )


# ---------------------------------------------------------------------------------------------
# Sources: files -> (raw key -> entry)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    """Where one tensor lives and what it looks like once in the original layout."""

    reader: _Reader
    raw_key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    # Shape the stored tensor is viewed as (TurboWan's Linear patch embedding -> Conv3d), or None.
    view_as: tuple[int, ...] | None = None


class _Reader:
    """One open file; tensors come out memory-mapped."""

    path: Path

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _SafetensorsReader(_Reader):
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # safe_open maps the file; get_tensor returns views of the mapping (pages load on use).
            self._handle: Any = safe_open(str(path), framework="pt")
            self.metadata: dict[str, str] = self._handle.metadata() or {}
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.dtypes: dict[str, torch.dtype] = {}
            for key in self._handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = self._handle.get_slice(key)
                self.shapes[key] = tuple(int(s) for s in sl.get_shape())
                dt = sl.get_dtype()
                if dt not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(
                        f"{path}: tensor {key!r} has storage dtype {dt}, which fxswap "
                        f"does not read; store it as F32, BF16, F16 or F8_E4M3"
                    )
                self.dtypes[key] = _SAFETENSORS_DTYPES[dt]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({e}); it is probably truncated "
                f"or corrupt: check its size against the source and download it again"
            ) from e

    def get(self, key: str) -> torch.Tensor:
        try:
            out: torch.Tensor = self._handle.get_tensor(key)
            return out
        except Exception as e:
            raise CheckpointError(
                f"{self.path}: reading tensor {key!r} failed ({e}); the file may have been "
                f"modified or truncated after it was opened"
            ) from e

    def close(self) -> None:
        self._handle = None


class _PthReader(_Reader):
    def __init__(self, path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
        self.path = path
        self.tensors = tensors

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def _read_pth(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """torch.load with weights_only (no code runs) and mmap (nothing is copied)."""
    notes: list[str] = []
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: refused: not a torch.save zip archive (a bare pickle, a legacy torch.save file or a "
            f"truncated file). fxswap only reads .pth files through "
            f"torch.load(weights_only=True, mmap=True); "
            f"re-save it with a current torch.save or convert it to safetensors with a tool you trust"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: the pickle holds objects other than tensors and plain containers, and fxswap "
            f"never runs pickled code (torch.load(weights_only=True) said: {first}). Only state dicts of "
            f"tensors are accepted; convert the file to safetensors with a tool you trust"
        ) from e
    except Exception as e:
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True, mmap=True) failed ({e}); the file is "
            f"probably truncated or corrupt: download it again"
        ) from e
    # Training checkpoints sometimes wrap the state dict one level down.
    if isinstance(obj, dict) and len(obj) >= 1 and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model", "net", "ema"):
            if isinstance(obj.get(wrapper), dict):
                notes.append(f"state dict taken from the {wrapper!r} entry of the .pth file")
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors); "
            f"save model.state_dict() instead"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: entries that are not tensors keyed by strings: {_fmt_keys(bad)}; "
            f"save model.state_dict() only"
        )
    return obj, notes


def _find_files(path: Path) -> tuple[list[Path], dict[str, Path] | None, str]:
    """(files, weight_map or None, format) for a file, an index file or a folder."""
    if not path.exists():
        raise CheckpointError(
            f"load: path {str(path)!r} does not exist; pass a .safetensors file, a "
            f"*.safetensors.index.json, a folder holding them, or a TurboWan .pth file"
        )
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(
                f"load: folder {str(path)!r} has several shard indexes "
                f"({', '.join(p.name for p in indexes)}); pass the index file you mean"
            )
        if indexes:
            return _find_files(indexes[0])
        files = sorted(path.glob("*.safetensors"))
        if not files:
            subs = [p.name for p in sorted(path.iterdir()) if p.is_dir() and any(p.glob("*.safetensors*"))]
            hint = f"; checkpoints were found in the subfolders {subs}, pass one of them" if subs else ""
            raise CheckpointError(
                f"load: folder {str(path)!r} contains no *.safetensors file and no "
                f"*.safetensors.index.json{hint}"
            )
        # Without an index, shards are merged in name order (as diffusers does); key clashes are errors.
        return files, None, "safetensors"
    name = path.name
    if name.endswith(".index.json"):
        try:
            index = json.loads(path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except Exception as e:
            raise CheckpointError(
                f"{path}: not a valid shard index ({e}); it needs a 'weight_map' object "
                f"mapping tensor names to shard files"
            ) from e
        resolved = {str(k): path.parent / str(v) for k, v in weight_map.items()}
        files = sorted(set(resolved.values()))
        missing = [p.name for p in files if not p.exists()]
        if missing:
            raise CheckpointError(
                f"{path}: the index lists shard files that are not in {str(path.parent)!r}: "
                f"{_fmt_keys(missing)}; download the missing shards"
            )
        return files, resolved, "safetensors"
    if name.endswith((".pth", ".pt", ".ckpt", ".bin")):
        return [path], None, "pth"
    if name.endswith(".safetensors") or not zipfile.is_zipfile(path):
        return [path], None, "safetensors"
    return [path], None, "pth"


def _open_raw(path: Path) -> tuple[dict[str, _Entry], list[_Reader], str, dict[str, str], list[str]]:
    files, weight_map, fmt = _find_files(path)
    entries: dict[str, _Entry] = {}
    readers: list[_Reader] = []
    notes: list[str] = []
    metadata: dict[str, str] = {}
    if fmt == "pth":
        tensors, notes = _read_pth(files[0])
        reader = _PthReader(files[0], tensors)
        readers.append(reader)
        for k, t in tensors.items():
            entries[k] = _Entry(reader, k, tuple(t.shape), t.dtype)
        return entries, readers, fmt, metadata, notes
    for f in files:
        sreader = _SafetensorsReader(f)
        readers.append(sreader)
        metadata.update(sreader.metadata)
        for k in sreader.shapes:
            if weight_map is not None and weight_map.get(k) != f:
                continue  # the index is authoritative; a stray copy elsewhere is not used
            if k in entries:
                raise CheckpointError(
                    f"load: tensor {k!r} is in both {entries[k].reader.path.name} and "
                    f"{f.name}; remove the duplicate shard or pass an index file"
                )
            entries[k] = _Entry(sreader, k, sreader.shapes[k], sreader.dtypes[k])
    if weight_map is not None:
        absent = [k for k in weight_map if k not in entries]
        if absent:
            raise CheckpointError(
                f"{path}: the index maps {len(absent)} tensor(s) to shards that do not "
                f"contain them: {_fmt_keys(absent)}; the shards and the index do not "
                f"belong together, download them again"
            )
    return entries, readers, fmt, metadata, notes


# ---------------------------------------------------------------------------------------------
# Lazy state dict and info
# ---------------------------------------------------------------------------------------------
class LazyStateDict(Mapping[str, torch.Tensor]):
    """Read-only mapping from original-layout keys to tensors, read from the file on access.

    Tensors come back in their storage dtype as views of the memory-mapped file (copy-on-write:
    writing to one never changes the file). ``shape(k)`` / ``dtype(k)`` answer without reading.
    """

    def __init__(self, entries: Mapping[str, _Entry], readers: Sequence[_Reader]) -> None:
        self._entries = dict(entries)
        self._readers = list(readers)

    def __getitem__(self, key: str) -> torch.Tensor:
        e = self._entries[key]
        t = e.reader.get(e.raw_key)
        return t.view(e.view_as) if e.view_as is not None else t

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key].dtype

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self._entries.items()}

    def source(self, key: str) -> tuple[Path, str]:
        """(file, key in that file) of one tensor."""
        e = self._entries[key]
        return e.reader.path, e.raw_key

    def close(self) -> None:
        """Drop the file handles. Tensors already handed out keep their own mapping."""
        for r in self._readers:
            r.close()


@dataclass
class CheckpointInfo:
    """What :func:`load_state_dict` found out about a checkpoint."""

    path: Path
    files: list[Path]
    format: str  # "safetensors" or "pth"
    layout: str  # one of LAYOUTS
    config: WanConfig | None  # detected (or given) config; None if detection failed (see notes)
    storage_dtypes: dict[str, int]  # dtype name -> number of tensors
    quantization: str | None = None  # None, "fp8_e4m3fn" (plain cast) or "scaled_fp8"
    # Original-layout weight key -> fp32 0-d scale; dequantised weight = stored.float() * scale.
    weight_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    ignored_keys: list[str] = field(default_factory=list)  # in the file, not part of the transformer
    sla_keys: list[str] = field(default_factory=list)
    needs_attention_type: str | None = None  # "sla" for TurboWan files trained with SLA
    config_error: str | None = None  # why detection failed, when config is None
    num_heads_source: str = ""  # "config argument", "fxswap_config metadata", "config.json", "dim//128"
    notes: list[str] = field(default_factory=list)


def _to_original(
    entries: dict[str, _Entry], layout: str
) -> tuple[dict[str, _Entry], dict[str, _Entry], list[str], list[str], bool]:
    """(original-layout entries, scale entries by weight key, ignored keys, notes, scaled_fp8 marker)."""
    notes: list[str] = []
    ignored: list[str] = []
    scales: dict[str, _Entry] = {}
    marker = False
    if layout == "diffusers":
        out: dict[str, _Entry] = {}
        for k, e in entries.items():
            if _NORM_ADDED_Q.match(k):
                ignored.append(k)
                continue
            new = _rename(k, "diffusers")
            out[new if new is not None else k] = e  # unknown keys surface later as unexpected
        if ignored:
            notes.append(
                f"{len(ignored)} 'attn2.norm_added_q' key(s) ignored: the WAN image branch has no "
                f"query norm of its own, and diffusers ignores these keys on load too"
            )
        return out, scales, ignored, notes, marker
    if layout == "comfyui":
        if any(k.startswith(COMFYUI_PREFIX) for k in entries):
            ignored = [k for k in entries if not k.startswith(COMFYUI_PREFIX)]
            if ignored:
                notes.append(
                    f"{len(ignored)} key(s) without the {COMFYUI_PREFIX!r} prefix (VAE, text encoder "
                    f"...) are not part of the transformer and were ignored"
                )
            entries = {
                k[len(COMFYUI_PREFIX) :]: e for k, e in entries.items() if k.startswith(COMFYUI_PREFIX)
            }
        out = {}
        scale_inputs = 0
        for k, e in entries.items():
            if k == "scaled_fp8":
                marker = True
            elif k.endswith(".scale_weight"):
                scales[k[: -len(".scale_weight")] + ".weight"] = e
            elif k.endswith(".scale_input"):
                scale_inputs += 1
            else:
                out[k] = e
        if scale_inputs:
            notes.append(
                f"{scale_inputs} 'scale_input' tensor(s) ignored: they scale fp8 activations, and "
                f"fxswap computes in the compute dtype"
            )
        return out, scales, ignored, notes, marker
    if layout == "turbowan":
        pe = entries.get("patch_embedding.weight")
        if pe is not None and len(pe.shape) == 2:
            d, flat = pe.shape
            if flat % 4:
                raise CheckpointError(
                    f"{pe.reader.path}: TurboWan patch_embedding.weight has shape "
                    f"{list(pe.shape)}; its second dimension must be in_dim*4 (patch 1x2x2)"
                )
            conv = (d, flat // 4, 1, 2, 2)
            entries = dict(entries)
            # Linear over (c, kt, kh, kw)-flattened patches is the Conv3d weight flattened in that order.
            entries["patch_embedding.weight"] = dataclasses.replace(pe, shape=conv, view_as=conv)
            notes.append(f"Linear patch embedding {list(pe.shape)} viewed as Conv3d weight {list(conv)}")
    return dict(entries), scales, ignored, notes, marker


def _named_config(name: str) -> WanConfig:
    try:
        return wan_config.named_config(name)
    except ValueError:
        known = sorted([*wan_config.CONFIGS, *wan_config.TURBOWAN_CONFIGS])
        raise CheckpointError(
            f"config={name!r} is not a named WAN config; use one of {known}, a "
            f"WanConfig, or None to detect it from the tensors"
        ) from None


def _refuse_comfy_quant_metadata(path: Path, raw: Mapping[str, _Entry], metadata: Mapping[str, str]) -> None:
    """Refuse ComfyUI's newer ``_quantization_metadata`` files instead of misreading them.

    Their quantised layers hold packed or scaled data (fp8, int8, nvfp4...) whose dequantisation
    fxswap does not implement; read as plain weights they would load without an error and give
    wrong outputs, which is worse than refusing.
    """
    markers = [k for k in raw if k.endswith(_COMFY_QUANT_SUFFIXES)]
    if _COMFY_QUANT_METADATA not in metadata and not markers:
        return
    formats: set[str] = set()
    try:
        layers = json.loads(metadata.get(_COMFY_QUANT_METADATA, "{}")).get("layers", {})
        formats = {str(v.get("format")) for v in layers.values() if isinstance(v, dict)}
    except (ValueError, AttributeError):
        pass  # the refusal below does not depend on parsing the entry
    found = f"safetensors metadata {_COMFY_QUANT_METADATA!r}" if _COMFY_QUANT_METADATA in metadata else ""
    if markers:
        found += (" and " if found else "") + f"per-layer quantisation tensors such as {markers[0]!r}"
    fmts = f" (layer formats: {', '.join(sorted(formats))})" if formats else ""
    raise CheckpointError(
        f"{path}: this is a ComfyUI checkpoint in the newer quantised format ({found}){fmts}, which "
        f"fxswap does not read yet: its layers would load as wrong weights. Use the same model's "
        f"bf16/fp16 file, or a '*_fp8_scaled' / '*_fp8_e4m3fn' file (per-tensor scale_weight), "
        f"which fxswap reads"
    )


def load_state_dict(
    path: str | os.PathLike[str], *, config: WanConfig | str | None = None
) -> tuple[LazyStateDict, CheckpointInfo]:
    """Open a WAN checkpoint in any known layout and return it in the original layout, lazily.

    ``path``: a ``.safetensors`` file, a ``*.safetensors.index.json``, a folder holding either, or a
    TurboWan ``.pth``. Returns ``(state_dict, info)``: ``state_dict`` is a :class:`LazyStateDict`
    whose tensors are memory-mapped, in their storage dtype (fp8 stays fp8; ``scaled_fp8`` scales
    are in ``info.weight_scales``, not applied). ``config`` overrides detection (and supplies the
    head count where the file carries no hint); a ``CONFIGS`` name is accepted. Keys are not
    checked against a model here; SLA keys are kept and flagged in ``info.needs_attention_type``.
    ComfyUI's newer ``_quantization_metadata`` format is refused (CheckpointError), not misread.
    """
    p = Path(path)
    if isinstance(config, str):
        config = _named_config(config)
    raw, readers, fmt, metadata, notes = _open_raw(p)
    _refuse_comfy_quant_metadata(p, raw, metadata)
    if fmt == "pth":
        layout = detect_layout({k: e.shape for k, e in raw.items()})
        if layout not in ("turbowan", "original"):
            raise CheckpointError(
                f"{p}: a .pth file in the {layout} layout; fxswap reads .pth files only "
                f"as TurboWan/original state dicts, save other layouts as safetensors"
            )
        layout = "turbowan"
    else:
        layout = detect_layout({k: e.shape for k, e in raw.items()})
    entries, scale_entries, ignored, more_notes, marker = _to_original(raw, layout)
    notes += more_notes

    weight_scales: dict[str, torch.Tensor] = {}
    for wkey, se in scale_entries.items():
        if math.prod(se.shape) != 1:
            raise CheckpointError(
                f"{se.reader.path}: {se.raw_key} has shape {list(se.shape)}; a ComfyUI "
                f"scale_weight must be a single number (per-tensor scaling)"
            )
        if wkey not in entries:
            raise CheckpointError(
                f"{se.reader.path}: {se.raw_key} scales a weight that is not in the file "
                f"({wkey}); the file is incomplete"
            )
        weight_scales[wkey] = se.reader.get(se.raw_key).reshape(()).to(torch.float32)
    fp8_keys = [k for k, e in entries.items() if e.dtype in _FP8_DTYPES]
    quantization = "scaled_fp8" if (marker or weight_scales) else ("fp8_e4m3fn" if fp8_keys else None)
    if marker and not weight_scales:
        notes.append("'scaled_fp8' marker present but no scale_weight tensors: weights used as stored")

    sla = [k for k in entries if _SLA_PATTERN.match(k)]
    dtypes: dict[str, int] = {}
    for e in entries.values():
        name = str(e.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + 1

    state_dict = LazyStateDict(entries, readers)
    info = CheckpointInfo(
        path=p,
        files=[r.path for r in readers],
        format=fmt,
        layout=layout,
        config=None,
        storage_dtypes=dtypes,
        quantization=quantization,
        weight_scales=weight_scales,
        ignored_keys=ignored,
        sla_keys=sla,
        needs_attention_type="sla" if sla else None,
        notes=notes,
    )
    if config is not None:
        info.config, info.num_heads_source = config, "config argument"
    else:
        hints = _config_hints(p, metadata, info)
        try:
            info.config = detect_config(state_dict.shapes(), hints=hints)
            info.num_heads_source = str(hints.get("_source", "dim//128"))
            if info.config.name == "wan2.1-t2v-14b":
                info.notes.append(
                    "detected as wan2.1-t2v-14b; a Wan2.2 T2V-A14B expert has exactly these tensors: "
                    "if this is one, pass config='wan2.2-t2v-a14b' (expert boundary 0.875)"
                )
        except CheckpointError as e:
            info.config_error = str(e)
    return state_dict, info


def _config_hints(path: Path, metadata: Mapping[str, str], info: CheckpointInfo) -> dict[str, Any]:
    """Fields the tensors cannot tell (heads, text_len, eps, name...) from files that can."""
    if CONFIG_METADATA_KEY in metadata:
        try:
            hints = dict(json.loads(metadata[CONFIG_METADATA_KEY]))
        except Exception as e:
            raise CheckpointError(
                f"{info.files[0]}: safetensors metadata {CONFIG_METADATA_KEY!r} is not valid "
                f"JSON ({e}); rewrite the file with fxswap.models.wan_checkpoint.save"
            ) from e
        hints["_source"] = "fxswap_config metadata"
        return hints
    folder = path if path.is_dir() else path.parent
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        return {}
    try:
        cfg = json.loads(cfg_file.read_text())
    except Exception:
        info.notes.append(f"{cfg_file} is not valid JSON; ignored")
        return {}
    hints = {}
    cls = cfg.get("_class_name")
    if cls == "WanModel":
        for k in ("num_heads", "text_len", "eps", "model_type", "freq_dim"):
            if k in cfg:
                hints[k] = cfg[k]
    elif cls == "WanTransformer3DModel":
        if "num_attention_heads" in cfg:
            hints["num_heads"] = cfg["num_attention_heads"]
        if "eps" in cfg:
            hints["eps"] = cfg["eps"]
    if hints:
        hints["_source"] = "config.json"
    return hints


# ---------------------------------------------------------------------------------------------
# Config detection
# ---------------------------------------------------------------------------------------------
def detect_config(shapes: Mapping[str, Any], *, hints: Mapping[str, Any] | None = None) -> WanConfig:
    """Derive the WanConfig of an original-layout state dict from its tensor shapes.

    ``shapes``: key -> shape (or key -> tensor: a state dict, possibly on ``meta``).

    dim from ``head.modulation``, in_dim and patch size from the patch embedding (Conv3d or
    TurboWan Linear), out_dim from ``head.head.weight`` / prod(patch), ffn_dim from
    ``blocks.0.ffn.0.weight``, layers from the block indices, text_dim and freq_dim from the
    embeddings; i2v iff ``img_emb.proj.0.bias`` (Wan2.1 CLIP) or in_dim > out_dim (Wan2.2 I2V),
    ti2v iff in_dim == out_dim == 48. Heads cannot be seen in the shapes: they come from ``hints``
    (``num_heads``; fxswap writes the whole config into safetensors metadata) or default to
    dim // 128, the head size of every released WAN. A config equal to a named one in
    :data:`fxswap.models.wan_config.CONFIGS` gets that name (and its boundary / expert count).
    """
    hints = dict(hints or {})
    hints.pop("_source", None)

    def need(key: str, ndim: int | None = None) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(
                f"detect_config: key {key!r} is missing, so the config cannot be derived; "
                f"pass config= explicitly or check that the file is a complete WAN transformer"
            )
        s = _shape_of(shapes[key])
        if ndim is not None and len(s) != ndim:
            raise CheckpointError(f"detect_config: {key!r} has shape {list(s)}, expected {ndim} dimensions")
        return s

    dim = need("head.modulation", 3)[-1]
    pe = need("patch_embedding.weight")
    if len(pe) == 5:
        in_dim, patch = pe[1], (pe[2], pe[3], pe[4])
    elif len(pe) == 2:
        in_dim, patch = pe[1] // 4, (1, 2, 2)
    else:
        raise CheckpointError(
            f"detect_config: patch_embedding.weight has shape {list(pe)}; expected a Conv3d "
            f"weight [dim, in_dim, 1, 2, 2] or a TurboWan Linear weight [dim, in_dim*4]"
        )
    head_out = need("head.head.weight", 2)[0]
    out_dim = head_out // math.prod(patch)
    ffn_dim = need("blocks.0.ffn.0.weight", 2)[0]
    text_dim = need("text_embedding.0.weight", 2)[1]
    freq_dim = need("time_embedding.0.weight", 2)[1]
    idx = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK_PATTERN.match(k))})
    if idx != list(range(len(idx))):
        gaps = sorted(set(range(idx[-1] + 1)) - set(idx)) if idx else []
        raise CheckpointError(
            f"detect_config: block indices are not contiguous; blocks {gaps} are missing. "
            f"The checkpoint is incomplete (a shard is missing?)"
        )
    image_dim = _shape_of(shapes["img_emb.proj.0.bias"])[0] if "img_emb.proj.0.bias" in shapes else None
    if in_dim == 48 and out_dim == 48:
        model_type = "ti2v"
    elif image_dim is not None or in_dim > out_dim:
        model_type = "i2v"
    else:
        model_type = "t2v"
    model_type = str(hints.get("model_type", model_type))

    num_heads = hints.get("num_heads")
    if num_heads is None:
        if dim % 128:
            raise CheckpointError(
                f"detect_config: dim={dim} is not a multiple of 128, so the head count cannot "
                f"be inferred (released WAN models use 128-wide heads); pass config= "
                f"(e.g. fxswap.models.wan.tiny_config(...)) to load this checkpoint"
            )
        num_heads = dim // 128
    derived: dict[str, Any] = {
        "dim": dim,
        "ffn_dim": ffn_dim,
        "num_heads": int(num_heads),
        "num_layers": len(idx),
        "in_dim": in_dim,
        "out_dim": out_dim,
        "model_type": model_type,
        "freq_dim": freq_dim,
        "text_dim": text_dim,
        "patch_size": patch,
        "image_dim": image_dim,
    }
    # A named config matches when every field the tensors (or the head-count hint) determine agrees.
    arch = tuple(derived)
    fields_ = {f.name for f in dataclasses.fields(wan_config.WanConfig)}
    # Hints written by fxswap carry every field; check they agree with the tensors before trusting them.
    for k, v in hints.items():
        if k not in fields_:
            continue
        if k in derived and k not in ("num_heads", "model_type"):
            dv = derived[k]
            hv = tuple(v) if isinstance(v, list) else v
            if hv != dv:
                raise CheckpointError(
                    f"detect_config: the checkpoint's stored config says {k}={hv!r} but its "
                    f"tensors say {k}={dv!r}; the metadata is stale, pass config= explicitly"
                )
        elif k not in derived:
            derived[k] = tuple(v) if isinstance(v, list) else v
    if "per_token_timesteps" not in derived:
        derived["per_token_timesteps"] = model_type == "ti2v"
    if "name" not in derived:
        for cfg in wan_config.CONFIGS.values():
            if all(getattr(cfg, k) == derived[k] for k in arch):
                return dataclasses.replace(cfg, **{k: v for k, v in derived.items() if k in fields_})
    try:
        return wan_config.WanConfig(**{k: v for k, v in derived.items() if k in fields_})
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"detect_config: derived config {derived} is not a valid WanConfig ({e}); pass config= explicitly"
        ) from e


# ---------------------------------------------------------------------------------------------
# Materialising
# ---------------------------------------------------------------------------------------------
def _check_compute_dtype(dtype: torch.dtype) -> None:
    if dtype not in _COMPUTE_DTYPES:
        raise CheckpointError(
            f"load: dtype={dtype} cannot be a compute dtype; use one of "
            f"{', '.join(str(d) for d in _COMPUTE_DTYPES)} (fp8 and integer dtypes are "
            f"storage formats: keep them on the host with load_state_dict)"
        )


def _default_compute_dtype(sd: LazyStateDict) -> torch.dtype:
    """The dtype most weight bytes are stored in; bfloat16 for fp8 files."""
    by_bytes: dict[torch.dtype, int] = {}
    for k in sd:
        dt = sd.dtype(k)
        by_bytes[dt] = by_bytes.get(dt, 0) + math.prod(sd.shape(k))
    if not by_bytes:
        return torch.float32
    top = max(by_bytes, key=lambda d: by_bytes[d])
    if top in _FP8_DTYPES:
        return torch.bfloat16
    return top if top in _COMPUTE_DTYPES else torch.float32


def _check_keys(
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]], sd: LazyStateDict, strict: bool, where: str
) -> None:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_fmt_keys(missing)}")
    if unexpected and strict:
        problems.append(f"{len(unexpected)} unexpected key(s): {_fmt_keys(unexpected)}")
    mism = [
        f"{k}: checkpoint {list(sd.shape(k))} vs model {list(expected[k][0])}"
        for k in expected
        if k in sd and tuple(sd.shape(k)) != tuple(expected[k][0])
    ]
    if mism:
        more = f" ... and {len(mism) - 8} more" if len(mism) > 8 else ""
        problems.append(f"{len(mism)} shape mismatch(es): " + "; ".join(mism[:8]) + more)
    if problems:
        fix = (
            "the checkpoint does not match the config; pass the config it was trained with, or "
            "strict=False to ignore unexpected keys (missing keys and shape mismatches are always errors)"
        )
        raise CheckpointError(f"{where}: " + " | ".join(problems) + f". Fix: {fix}")
    bad = [
        f"{k} ({sd.dtype(k)})"
        for k in expected
        if k in sd and not (sd.dtype(k).is_floating_point or sd.dtype(k) in _FP8_DTYPES)
    ]
    if bad:
        raise CheckpointError(
            f"{where}: storage dtype cannot be cast to a floating compute dtype for "
            f"{_fmt_keys(bad)}; integer-quantised checkpoints (TurboWan -quant, int8) are "
            f"not supported, use the unquantised file"
        )


def _materialise(
    sd: LazyStateDict, info: CheckpointInfo, key: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    t = sd[key]
    scale = info.weight_scales.get(key)
    if scale is not None:
        # Dequantise in fp32 so the product is exact before the single rounding to the compute dtype.
        t = t.to(device=device).to(torch.float32) * scale.to(device)
        return t.to(dtype)
    if t.element_size() <= torch.empty((), dtype=dtype).element_size():
        return t.to(device=device).to(dtype)  # move the smaller representation, cast on arrival
    return t.to(dtype).to(device=device)


def resolve_load_args(
    path: str | os.PathLike[str],
    config: WanConfig | str | None,
    dtype: torch.dtype | None,
    attention_type: str | None,
    sla_topk: float | None = None,
) -> tuple[LazyStateDict, CheckpointInfo, WanConfig, torch.dtype]:
    """The checkpoint at ``path`` opened for ``fxswap.models.wan.load``, every argument checked.

    Returns the lazy state dict, its info, the config to build (given or detected, with the
    attention type and ``sla_topk`` the file and the arguments agree on) and the compute dtype.
    Raises :class:`CheckpointError` naming the argument that disagrees with the file.
    """
    sd, info = load_state_dict(path, config=config)
    cfg = info.config
    if cfg is None:
        raise CheckpointError(f"{info.path}: the config could not be detected: {info.config_error}")
    if attention_type is not None and attention_type not in wan_config.ATTENTION_NAMES:
        raise CheckpointError(
            f"load: attention_type={attention_type!r} is not available; use one of "
            f"{sorted(wan_config.ATTENTION_NAMES)} or None (picked from the checkpoint's keys)"
        )
    has_sla = info.needs_attention_type == "sla"
    if has_sla and attention_type not in (None, "sla"):
        raise CheckpointError(
            f"{info.path}: attention_type={attention_type!r} disagrees with the checkpoint: it was trained "
            f"with sparse-linear attention (SLA) and has {len(info.sla_keys)} SLA key(s) such as "
            f"{info.sla_keys[0]!r}. Running it with {attention_type!r} would silently change its "
            f"output; pass attention_type='sla' or None (picked from the keys)"
        )
    if not has_sla and (attention_type or cfg.attention_type) == "sla":
        arg = "attention_type='sla'" if attention_type else f"config={cfg.name!r} (attention_type='sla')"
        raise CheckpointError(
            f"{info.path}: {arg} disagrees with the checkpoint: it has no SLA key "
            f"('blocks.<i>.self_attn.attn_op.local_attn.proj_l.weight'), so it was not trained with "
            f"SLA; pass attention_type=None or 'sdpa', or build the model with wan.build(..., "
            f"attention_type='sla') to try SLA with an untrained (zero) proj_l"
        )
    if has_sla:
        cfg = wan_config.turbowan_config(cfg)
    elif attention_type is not None and cfg.attention_type != attention_type:
        cfg = dataclasses.replace(cfg, attention_type=attention_type)
    if sla_topk is not None:
        if cfg.attention_type != "sla":
            raise CheckpointError(
                f"load: sla_topk={sla_topk!r} only applies to SLA attention, but {info.path} loads with "
                f"attention_type={cfg.attention_type!r}; drop sla_topk"
            )
        try:
            cfg = dataclasses.replace(cfg, sla_topk=sla_topk)
        except ValueError as e:
            raise CheckpointError(f"load: {e}") from e
    compute = dtype if dtype is not None else _default_compute_dtype(sd)
    _check_compute_dtype(compute)
    return sd, info, cfg, compute


def materialise_into(
    skeleton: torch.nn.Module, sd: LazyStateDict, info: CheckpointInfo, device: torch.device, *, strict: bool
) -> None:
    """Fill ``skeleton``, a model built on ``meta`` in the compute dtype, with the checkpoint's tensors.

    Keys and shapes are checked first (:class:`CheckpointError` before any tensor is assigned); each
    tensor is then moved to ``device`` in its storage dtype and cast there to the dtype the skeleton
    has for it. ``fxswap.models.wan.load`` builds the skeleton from :func:`resolve_load_args`'s config.
    """
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    _check_keys(expected, sd, strict, str(info.path))
    from fxswap.progress import progress

    loading = progress(expected, desc=f"loading {info.path.name}", unit="tensor", total=len(expected))
    tensors = {k: _materialise(sd, info, k, expected[k][1], device) for k in loading}
    skeleton.load_state_dict(tensors, strict=True, assign=True)
    if device.type != "meta":
        _check_materialised(skeleton, str(info.path))


def _check_materialised(model: torch.nn.Module, where: str) -> None:
    """A tensor the state dict did not cover would still be on meta: refuse to return such a model."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(
            f"{where}: the model has tensors that no checkpoint key filled: {_fmt_keys(left)}; "
            f"this is a bug in fxswap's model/loader pairing, please report it"
        )


def load_into(model: torch.nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> CheckpointInfo:
    """Copy a checkpoint into an existing model in place, keeping each parameter's dtype and device.

    Every check runs and every tensor is read and converted before the first parameter is written,
    so a failure leaves ``model`` untouched. Returns the checkpoint's info.
    """
    sd, info = load_state_dict(path, config=getattr(model, "config", None))
    if (
        info.needs_attention_type == "sla"
        and getattr(getattr(model, "config", None), "attention_type", "") != "sla"
    ):
        raise CheckpointError(
            f"{info.path}: SLA checkpoint ({info.sla_keys[0]!r} ...) needs a model built with "
            f"attention_type='sla': build it with wan.build(config, attention_type='sla') or use wan.load"
        )
    targets = model.state_dict(keep_vars=True)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in targets.items()}
    _check_keys(expected, sd, strict, str(info.path))
    for k, (_, dt) in expected.items():
        if dt not in _COMPUTE_DTYPES:
            raise CheckpointError(
                f"load_into: model tensor {k} has dtype {dt}; only floating models are filled"
            )
    staged = {k: _materialise(sd, info, k, expected[k][1], targets[k].device) for k in expected}
    with torch.no_grad():
        for k, t in staged.items():
            targets[k].copy_(t)
    return info


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _config_json(config: Any) -> str:
    d = dataclasses.asdict(config)
    return json.dumps(d, sort_keys=True)


def save(
    state_dict_or_model: Mapping[str, torch.Tensor] | torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    layout: Literal["original", "diffusers", "comfyui", "turbowan"] = "original",
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
    quantize: Literal["fp8_e4m3fn", "scaled_fp8"] | None = None,
    comfyui_prefix: str = COMFYUI_PREFIX,
    config: WanConfig | None = None,
) -> list[Path]:
    """Write an original-layout state dict (or a WanModel's) as a checkpoint in ``layout``.

    ``path``: the file for a single safetensors (or TurboWan ``.pth``); a folder when
    ``max_shard_bytes`` is given, which receives ``diffusion_pytorch_model-0000i-of-0000n.safetensors``
    shards (filled in key order, so a block may straddle two shards) and the
    ``diffusion_pytorch_model.safetensors.index.json``. ``dtype`` casts floating tensors first.
    ``quantize`` (comfyui only) stores 2-D Linear weights as float8_e4m3fn; ``"scaled_fp8"`` also
    writes per-tensor ``scale_weight = amax/448`` and the ``scaled_fp8`` marker. The config (from
    ``config`` or ``model.config``) is stored as JSON under the ``fxswap_config`` metadata key so
    that :func:`detect_config` recovers fields the shapes cannot show. Returns the written files.
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"save: layout={layout!r} is not one of {LAYOUTS}")
    if quantize is not None and layout != "comfyui":
        raise CheckpointError(f"save: quantize={quantize!r} is a ComfyUI format; pass layout='comfyui'")
    if quantize not in (None, "fp8_e4m3fn", "scaled_fp8"):
        raise CheckpointError(f"save: quantize={quantize!r}; use None, 'fp8_e4m3fn' or 'scaled_fp8'")
    if isinstance(state_dict_or_model, torch.nn.Module):
        config = config if config is not None else getattr(state_dict_or_model, "config", None)
        src: Mapping[str, torch.Tensor] = state_dict_or_model.state_dict()
    else:
        src = state_dict_or_model
    out: dict[str, torch.Tensor] = {}
    for k, t in src.items():
        if t.is_meta:
            raise CheckpointError(
                f"save: tensor {k} is on the meta device and has no data; materialise the model"
            )
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t
    if layout == "diffusers":
        out = convert_state_dict(out, "original", "diffusers")
    elif layout == "turbowan":
        pe = out.get("patch_embedding.weight")
        if pe is not None and pe.dim() == 5:
            out["patch_embedding.weight"] = pe.reshape(pe.shape[0], -1)
    elif layout == "comfyui":
        quantised: dict[str, torch.Tensor] = {}
        for k, t in out.items():
            if quantize is not None and k.endswith(".weight") and t.dim() == 2 and t.is_floating_point():
                if quantize == "scaled_fp8":
                    amax = t.abs().max().to(torch.float32)
                    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
                    quantised[k] = (t.to(torch.float32) / scale).to(torch.float8_e4m3fn)
                    quantised[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
                else:
                    quantised[k] = t.to(torch.float8_e4m3fn)
            else:
                quantised[k] = t
        if quantize == "scaled_fp8":
            quantised["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
        out = {comfyui_prefix + k: v for k, v in quantised.items()}
    out = {k: v.contiguous() for k, v in out.items()}

    p = Path(path)
    metadata = {"format": "pt"}
    if config is not None:
        metadata[CONFIG_METADATA_KEY] = _config_json(config)
    if layout == "turbowan":
        if max_shard_bytes is not None:
            raise CheckpointError("save: TurboWan .pth files are single files; drop max_shard_bytes")
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, p)
        return [p]
    if max_shard_bytes is None:
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file(_unshare(out), str(p), metadata=metadata)
        return [p]
    if max_shard_bytes <= 0:
        raise CheckpointError(f"save: max_shard_bytes={max_shard_bytes} must be positive")
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in out.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][k] = t
        size += nbytes
    p.mkdir(parents=True, exist_ok=True)
    n = len(groups)
    weight_map: dict[str, str] = {}
    files = []
    for i, g in enumerate(groups, 1):
        name = f"{SHARD_STEM}-{i:05d}-of-{n:05d}.safetensors"
        save_file(_unshare(g), str(p / name), metadata=metadata)
        files.append(p / name)
        weight_map.update(dict.fromkeys(g, name))
    total = sum(t.numel() * t.element_size() for t in out.values())
    index = p / f"{SHARD_STEM}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [*files, index]


def _unshare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied or mmap-backed views); copy those."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out
