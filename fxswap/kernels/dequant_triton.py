"""Triton kernel for GGUF block dequantisation (``fxswap::dequant`` on CUDA).

One program decodes ``TILE`` consecutive output values. Each value finds its block
(``i // block_elems``) and, inside it, the bytes that hold its quant, scale and minimum, with the
same index arithmetic as the block layouts in :mod:`fxswap.quant` (whose table this follows); so
no shared memory and no block-shaped tiles, just gathers from bytes the block's neighbours read too
(they stay in L1/L2). The float32 arithmetic is the reference's, in its order, and fp contraction
is off (``enable_fp_fusion=False``): ``(d*sc)*q - dmin*m`` fused into an FMA would round once
where the reference rounds twice, and the result would not be bitwise the oracle's.

Semantics are those of :func:`fxswap.quant.dequantize`, which the tests compare against through
Triton's CPU interpreter (``TRITON_INTERPRET=1``) and on CUDA in the ``gpu`` tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxswap.gguf import quant_type

__all__ = ["KERNEL_TYPES", "dequantize"]

# ggml type ids the kernel decodes (the plain float types are a cast, left to torch).
KERNEL_TYPES: dict[str, int] = {
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14,
}  # fmt: skip

TILE = 1024


@triton.jit
def _byte(base, off, mask):
    return tl.load(base + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _half(base, off, mask):
    lo = tl.load(base + off, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(base + off + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequant(RAW, OUT, numel, QT: tl.constexpr, BE: tl.constexpr, BB: tl.constexpr, TILE: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = i < numel
    blk = i // BE
    e = (i % BE).to(tl.int32)
    base = RAW + blk * BB
    if QT == 8:  # Q8_0: d, 32 x int8
        q = tl.load(base + 2 + e, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        y = q * _half(base, 0, mask)
    elif QT == 2 or QT == 3 or QT == 6 or QT == 7:  # Q4_0, Q4_1, Q5_0, Q5_1
        # the nibbles follow d (Q4_0), d and m (Q4_1), d and the fifth bits (Q5_0), all three (Q5_1)
        q = (
            _byte(base, 2 + 2 * (QT == 3) + 4 * (QT >= 6) + 2 * (QT == 7) + e % 16, mask) >> (4 * (e // 16))
        ) & 0x0F
        if QT == 6 or QT == 7:
            q = q | (((_byte(base, 2 + 2 * (QT == 7) + e // 8, mask) >> (e % 8)) & 1) << 4)
        d = _half(base, 0, mask)
        if QT == 2:
            y = d * (q - 8).to(tl.float32)
        elif QT == 6:
            y = d * (q - 16).to(tl.float32)
        else:
            y = (d * q.to(tl.float32)) + _half(base, 2, mask)
    elif QT == 10:  # Q2_K
        sc = _byte(base, e // 16, mask)
        q = (_byte(base, 16 + 32 * (e // 128) + e % 32, mask) >> (2 * ((e % 128) // 32))) & 3
        dl = _half(base, 80, mask) * (sc & 0x0F).to(tl.float32)
        ml = _half(base, 82, mask) * (sc >> 4).to(tl.float32)
        y = dl * q.to(tl.float32) - ml
    elif QT == 11:  # Q3_K
        s = e // 16
        low = (_byte(base, 96 + s % 8, mask) >> (4 * (s // 8))) & 0x0F
        high = (_byte(base, 104 + s % 4, mask) >> (2 * (s // 4))) & 3
        dl = _half(base, 108, mask) * ((low | (high << 4)) - 32).to(tl.float32)
        q = (_byte(base, 32 + 32 * (e // 128) + e % 32, mask) >> (2 * ((e % 128) // 32))) & 3
        hbit = (_byte(base, e % 32, mask) >> (e // 32)) & 1
        y = dl * (q - 4 * (1 - hbit)).to(tl.float32)
    elif QT == 12 or QT == 13:  # Q4_K, Q5_K: 6-bit scales and mins packed in bytes 4..15
        j = e // 32
        a = _byte(base, 4 + j % 4, mask)
        b = _byte(base, 8 + j % 4, mask)
        c = _byte(base, 12 + j % 4, mask)
        sc = tl.where(j < 4, a & 0x3F, (c & 0x0F) | ((a >> 6) << 4))
        mn = tl.where(j < 4, b & 0x3F, (c >> 4) | ((b >> 6) << 4))
        q = (_byte(base, 16 + 32 * (QT == 13) + 32 * (e // 64) + e % 32, mask) >> (4 * (j % 2))) & 0x0F
        if QT == 13:
            q = q | (((_byte(base, 16 + e % 32, mask) >> j) & 1) << 4)
        dl = _half(base, 0, mask) * sc.to(tl.float32)
        ml = _half(base, 2, mask) * mn.to(tl.float32)
        y = dl * q.to(tl.float32) - ml
    else:  # Q6_K
        r = e % 128
        low = (_byte(base, 64 * (e // 128) + e % 64, mask) >> (4 * (r // 64))) & 0x0F
        high = (_byte(base, 128 + 32 * (e // 128) + e % 32, mask) >> (2 * (r // 32))) & 3
        sc = tl.load(base + 192 + e // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        dl = _half(base, 208, mask) * sc
        y = dl * ((low | (high << 4)) - 32).to(tl.float32)
    tl.store(OUT + i, y.to(OUT.dtype.element_ty), mask=mask)


def dequantize(raw: Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """:func:`fxswap.quant.dequantize` by the kernel: ``raw`` (uint8, on CUDA, or on the CPU under
    ``TRITON_INTERPRET=1``) into a fresh tensor of ``shape`` and ``dtype``. No work space."""
    t = quant_type(qtype)
    if t.name not in KERNEL_TYPES:
        raise ValueError(f"the dequant kernel decodes {', '.join(KERNEL_TYPES)}; got {qtype!r}")
    numel = 1
    for s in shape:
        numel *= int(s)
    if raw.dtype != torch.uint8 or raw.numel() != t.nbytes(numel) or numel % t.block_elems:
        raise ValueError(
            f"dequantize: {raw.numel()} {raw.dtype} bytes for a {t.name} tensor of shape {list(shape)}"
        )
    out = torch.empty(shape, dtype=dtype, device=raw.device)
    if numel:
        _dequant[(triton.cdiv(numel, TILE),)](
            raw.contiguous(), out, numel,
            QT=KERNEL_TYPES[t.name], BE=t.block_elems, BB=t.block_bytes, TILE=TILE,
            enable_fp_fusion=False,
        )  # fmt: skip
    return out
