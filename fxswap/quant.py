"""Dequantisation of stored weights in PyTorch: the reference every device runs and the Triton
kernel (:mod:`fxswap.kernels.dequant_triton`) is checked against.

Each GGUF type is decoded from the ggml block layouts (``ggml-common.h`` in llama.cpp; the formats,
not their code) into float32, with the same float32 operations in the same order as ggml's own
dequantisers (scale times quant, then minus the scaled minimum), so the result is bitwise equal to
``gguf.quants.dequantize``; a weight then takes the model's dtype in one rounding. fp8 files keep
``W = W_fp8.float() * scale_weight`` (per-tensor scale), rounded once to the model's dtype, the
same as the bf16 loader computes it on the host.

Block layouts (bytes in order; ``d``/``dmin``/``m`` are float16; K types hold 256 values):

==== ===== ==========================================================================================
type bytes layout
==== ===== ==========================================================================================
Q4_0 18    d, 16 bytes of nibbles: value j = low nibble of byte j, value j+16 = high nibble; (q-8)*d
Q4_1 20    d, m, nibbles as Q4_0; q*d + m
Q5_0 22    d, u32 of fifth bits (bit j for value j), nibbles as Q4_0; (q-16)*d
Q5_1 24    d, m, u32 fifth bits, nibbles; q*d + m
Q8_0 34    d, 32 int8; q*d
Q2_K 84    16 scale bytes (low nibble scale, high nibble min, per 16 values), 64 bytes of 2-bit quants
           (4 per byte, shift 2k for the k-th run of 32 in each 128), d, dmin; (d*sc)*q - dmin*min
Q3_K 110   32 bytes of high bits (bit k: values 32k..32k+31), 64 bytes of 2-bit quants as Q2_K,
           12 bytes of sixteen 6-bit scales, d; (d*(sc-32)) * (q - 4 if its high bit is clear)
Q4_K 144   d, dmin, 12 bytes of eight 6-bit scales and mins, 128 bytes of nibbles (each 32 bytes:
           low nibbles one run of 32 values, high nibbles the next); (d*sc)*q - dmin*min
Q5_K 176   as Q4_K plus 32 bytes of fifth bits (bit k: run k of 32 values) before the nibbles
Q6_K 210   128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (per 16 values), d;
           (d*sc)*(q-32)
==== ===== ==========================================================================================

Work space: a tensor is decoded :data:`CHUNK_BLOCKS` blocks at a time into its output, so the
scratch beside the output stays under :func:`workspace_bytes` whatever the weight's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fxswap.gguf import QK_K, TYPES, quant_type

__all__ = [
    "CHUNK_BLOCKS",
    "FP8_DTYPES",
    "dequantize",
    "dequantize_any",
    "dequantize_blocks",
    "dequant_workspace_bytes",
    "dequantize_fp8",
    "workspace_bytes",
]

#: Blocks decoded per step; bounds the reference's float32 temporaries (see workspace_bytes).
CHUNK_BLOCKS = 4096
_SCRATCH_PER_VALUE = 36

FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)


def _f16(b: Tensor, at: int) -> Tensor:
    """The float16 at byte ``at`` of every block, as float32 of shape (n, 1)."""
    return b[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """(n, k) bytes -> (n, 2k) values: all low nibbles, then all high nibbles (Q4_0/Q4_1/Q5_x)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _bits(words: Tensor, count: int) -> Tensor:
    """(n, 4) little-endian bytes of a u32 -> (n, count) of its bits, bit j at column j."""
    w = words.to(torch.int64)
    u32 = w[:, 0] | (w[:, 1] << 8) | (w[:, 2] << 16) | (w[:, 3] << 24)
    return (u32[:, None] >> torch.arange(count, device=words.device)) & 1


def _shifted(b: Tensor, rows: int, width: int, shifts: Sequence[int], mask: int) -> Tensor:
    """(n, rows*width) bytes -> (n, rows, len(shifts), width): each row of ``width`` bytes read at
    every shift in turn (the K types' packing: one byte feeds values ``width`` apart)."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=b.device).view(1, 1, -1, 1)
    return (b.reshape(b.shape[0], rows, 1, width) >> s) & mask


def _q4_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 2:18]).to(torch.int16) - 8
    return _f16(b, 0) * q.float()


def _q4_1(b: Tensor) -> Tensor:
    return (_f16(b, 0) * _nibbles(b[:, 4:20]).float()) + _f16(b, 2)


def _q5_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 6:22]).to(torch.int64) | (_bits(b[:, 2:6], 32) << 4)
    return _f16(b, 0) * (q - 16).float()


def _q5_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 8:24]).to(torch.int64) | (_bits(b[:, 4:8], 32) << 4)
    return (_f16(b, 0) * q.float()) + _f16(b, 2)


def _q8_0(b: Tensor) -> Tensor:
    return b[:, 2:34].contiguous().view(torch.int8).float() * _f16(b, 0)


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc = b[:, 0:16]
    dl = (_f16(b, 80) * (sc & 0x0F).float()).view(n, 16, 1)
    ml = (_f16(b, 82) * (sc >> 4).float()).view(n, 16, 1)
    q = _shifted(b[:, 16:80], 2, 32, (0, 2, 4, 6), 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    packed = b[:, 96:108]
    low = _shifted(packed[:, :8], 1, 8, (0, 4), 0x0F).reshape(n, 16)
    high = _shifted(packed[:, 8:], 1, 4, (0, 2, 4, 6), 0x03).reshape(n, 16)
    sc = (low | (high << 4)).to(torch.int16) - 32
    dl = (_f16(b, 108) * sc.float()).view(n, 16, 1)
    q = _shifted(b[:, 32:96], 2, 32, (0, 2, 4, 6), 3).reshape(n, 16, 16).to(torch.int16)
    hbit = _shifted(b[:, 0:32], 1, 32, tuple(range(8)), 1).reshape(n, 16, 16).to(torch.int16)
    return (dl * (q - 4 * (1 - hbit)).float()).reshape(n, QK_K)


def _k_scales(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, (n, 8) each.

    Bytes 0-3: scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for
    the mins; bytes 8-11: low nibble the low 4 bits of scale 4+j, high nibble those of min 4+j.
    """
    s = packed.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    dl = (_f16(b, 0) * sc.float()).view(n, 8, 1)
    ml = (_f16(b, 2) * mn.float()).view(n, 8, 1)
    q = _shifted(b[:, 16:144], 4, 32, (0, 4), 0x0F).reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    dl = (_f16(b, 0) * sc.float()).view(n, 8, 1)
    ml = (_f16(b, 2) * mn.float()).view(n, 8, 1)
    low = _shifted(b[:, 48:176], 4, 32, (0, 4), 0x0F).reshape(n, 8, 32)
    high = _shifted(b[:, 16:48], 1, 32, tuple(range(8)), 1).reshape(n, 8, 32)
    q = (low | (high << 4)).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    dl = (_f16(b, 208) * sc).view(n, 16, 1)
    low = _shifted(b[:, 0:128], 2, 64, (0, 4), 0x0F).reshape(n, 8, 32)
    high = _shifted(b[:, 128:192], 2, 32, (0, 2, 4, 6), 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int16) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, QK_K)


def _f32(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float32)


def _f16_t(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float16).float()


def _bf16(b: Tensor) -> Tensor:
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


_DECODERS: dict[str, Callable[[Tensor], Tensor]] = {
    "F32": _f32, "F16": _f16_t, "BF16": _bf16, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0,
    "Q5_1": _q5_1, "Q8_0": _q8_0, "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}  # fmt: skip
assert set(_DECODERS) == set(TYPES), "every readable type has a decoder"


_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def dequantize_blocks(blocks: Tensor, qtype: str) -> Tensor:
    """(n, block_bytes) uint8 -> (n, block_elems) float32, in the oracle's arithmetic."""
    return _DECODERS[quant_type(qtype).name](blocks).reshape(blocks.shape[0], -1)


def workspace_bytes(qtype: str) -> int:
    """An upper bound on the scratch :func:`dequantize` holds beside its output: per chunk, 36 bytes
    per value (the float32 result and the int64 / float32 temporaries of bits, nibbles and scales:
    29.3 bytes measured for Q5_0 / Q5_1, the most, by the CPU allocator in tests/test_quant.py),
    plus the chunk's copy of its bytes."""
    t = quant_type(qtype)
    if t.block_elems == 1:
        return 0  # a plain cast (see dequantize)
    elems = CHUNK_BLOCKS * t.block_elems
    return elems * _SCRATCH_PER_VALUE + CHUNK_BLOCKS * t.block_bytes


def dequantize(raw: Tensor, qtype: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode ``raw`` (the stored bytes, uint8, any shape) of GGUF type ``qtype`` into a fresh tensor
    of ``shape`` and ``dtype`` on ``raw``'s device: float32 as ``gguf.quants.dequantize`` gives it,
    then one rounding to ``dtype``."""
    t = quant_type(qtype)
    numel = 1
    for s in shape:
        numel *= int(s)
    if raw.dtype != torch.uint8 or raw.numel() != t.nbytes(numel) or numel % t.block_elems:
        raise ValueError(
            f"dequantize: {raw.numel()} {raw.dtype} bytes for a {t.name} tensor of shape {list(shape)} "
            f"(needs {t.nbytes(numel)} uint8 bytes, rows a multiple of {t.block_elems})"
        )
    if t.block_elems == 1:
        # A plain float: one cast (exact to float32, so rounding once to `dtype` is what going
        # through float32 would give), no scratch.
        return raw.view(_PLAIN[t.name]).view(tuple(int(s) for s in shape)).to(dtype, copy=True)
    blocks = raw.reshape(-1, t.block_bytes)
    out = torch.empty(numel, dtype=dtype, device=raw.device)
    decode = _DECODERS[t.name]
    step = CHUNK_BLOCKS * t.block_elems
    for i in range(0, blocks.shape[0], CHUNK_BLOCKS):
        vals = decode(blocks[i : i + CHUNK_BLOCKS]).reshape(-1)
        out[i * t.block_elems : i * t.block_elems + step].copy_(vals)
    return out.view(tuple(int(s) for s in shape))


def dequantize_fp8(data: Tensor, scale: Tensor | float | None, dtype: torch.dtype) -> Tensor:
    """An fp8 weight to ``dtype``: ``(data.float() * scale).to(dtype)``, or a plain cast without a
    scale (``*_fp8_e4m3fn`` files). Always a fresh tensor."""
    if data.dtype not in FP8_DTYPES:
        raise ValueError(f"dequantize_fp8: data is {data.dtype}; expected one of {FP8_DTYPES}")
    if scale is None:
        return data.to(dtype, copy=True)
    s = scale if isinstance(scale, Tensor) else torch.tensor(float(scale), dtype=torch.float32)
    return (data.float() * s.to(device=data.device, dtype=torch.float32)).to(dtype)


def dequantize_any(
    data: Tensor, qtype: str, shape: Sequence[int], dtype: torch.dtype, scale: float | None = None
) -> Tensor:
    """What ``fxswap::dequant`` runs: fp8 (``qtype="fp8"``, with its per-tensor ``scale``) by
    :func:`dequantize_fp8`; a GGUF block type by the Triton kernel on CUDA when Triton is installed,
    else by :func:`dequantize`. Always a fresh tensor of ``shape`` and ``dtype`` on ``data``'s device."""
    if qtype == "fp8":
        return dequantize_fp8(data, scale, dtype).reshape(tuple(shape))
    if data.device.type == "cuda" and quant_type(qtype).block_elems > 1 and _kernel_available():
        from fxswap.kernels import dequant_triton

        return dequant_triton.dequantize(data, qtype, tuple(int(s) for s in shape), dtype)
    return dequantize(data, qtype, shape, dtype)


_KERNEL: list[bool] = []


def _kernel_available() -> bool:
    if not _KERNEL:
        from fxswap.kernels import triton_available

        _KERNEL.append(triton_available())
    return _KERNEL[0]


def dequant_workspace_bytes(qtype: str, shape: Sequence[int], device: torch.device) -> int:
    """Scratch ``fxswap::dequant`` holds beside its output on ``device``: none for the Triton
    kernel; the reference's chunk bound (:func:`workspace_bytes`); for fp8, the float32 copy and
    the float32 product (``data.float() * scale``) before the rounding."""
    numel = math.prod(int(s) for s in shape)
    if qtype == "fp8":
        return 8 * numel
    if device.type == "cuda" and quant_type(qtype).block_elems > 1 and _kernel_available():
        return 0
    return min(workspace_bytes(qtype), _SCRATCH_PER_VALUE * numel + quant_type(qtype).nbytes(numel))
