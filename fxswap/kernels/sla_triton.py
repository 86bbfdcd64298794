"""Triton kernel for SLA's sparse and linear branches (``torch.ops.fxswap.sla_sparse_linear``).

``_sla_fwd`` (grid: query blocks x batch*heads), for one query block: online-softmax attention over
the key blocks its LUT row lists (float32 running max, sum and accumulator) and, while visiting
them, the per-block sums ``S_j``/``Z_j`` of those blocks (computed in the graph by
:func:`fxswap.models.sla.kv_block_sums`); the linear branch then uses ``total - visited``, the
unkept blocks, without touching any other key block: ``o_l = phi(q) S' / (phi(q) . Z')``, or 0
when every block is kept.

Semantics are those of :func:`fxswap.models.sla.sparse_linear_reference`, which the tests compare
against through Triton's CPU interpreter (``TRITON_INTERPRET=1``). Float32 inputs use IEEE
float32 dots (no TF32), so that comparison is tight; bf16/fp16 inputs use the tensor cores with
float32 accumulation. Head dims and block sizes must be powers of two of at least 16 (``tl.dot``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["check_shapes", "sparse_linear"]


@triton.jit
def _sla_fwd(
    Q, K, V, CQ, LUT, S, Z, SSUM, ZSUM, OS, OL,
    L, MQ, scale,
    D: tl.constexpr, DV: tl.constexpr, CD: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, KEPT: tl.constexpr, NK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = m * BQ + tl.arange(0, BQ)
    row_ok = rows < L
    offs_n = tl.arange(0, BK)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    offs_cd = tl.arange(0, CD)

    q = tl.load(Q + bh * L * D + rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BQ], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BQ], dtype=tl.float32)
    acc = tl.zeros([BQ, DV], dtype=tl.float32)
    s_kept = tl.zeros([CD, DV], dtype=tl.float32)
    z_kept = tl.zeros([CD], dtype=tl.float32)
    lut_row = LUT + (bh * MQ + m) * KEPT
    for i in range(KEPT):
        j = tl.load(lut_row + i)
        cols = j * BK + offs_n
        col_ok = cols < L
        k = tl.load(K + bh * L * D + cols[:, None] * D + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(V + bh * L * DV + cols[:, None] * DV + offs_dv[None, :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        if KEPT < NK:
            base = bh * NK + j
            s_kept += tl.load(S + base * CD * DV + offs_cd[:, None] * DV + offs_dv[None, :])
            z_kept += tl.load(Z + base * CD + offs_cd)
    out = bh * L * DV + rows[:, None] * DV + offs_dv[None, :]
    tl.store(OS + out, (acc / l_i[:, None]).to(OS.dtype.element_ty), mask=row_ok[:, None])

    if KEPT < NK:
        s_rest = tl.load(SSUM + bh * CD * DV + offs_cd[:, None] * DV + offs_dv[None, :]) - s_kept
        z_rest = tl.load(ZSUM + bh * CD + offs_cd) - z_kept
        cq_ptrs = CQ + bh * L * CD + rows[:, None] * CD + offs_cd[None, :]
        cq = tl.load(cq_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        num = tl.dot(cq, s_rest, input_precision=PREC)
        # Padding rows of the last block have phi(q) = 0: give them a harmless denominator.
        den = tl.where(row_ok, tl.sum(cq * z_rest[None, :], axis=1), 1.0)
        o_l = num / den[:, None]
    else:
        o_l = tl.zeros([BQ, DV], dtype=tl.float32)
    tl.store(OL + out, o_l.to(OL.dtype.element_ty), mask=row_ok[:, None])


def _pow2_at_least_16(x: int) -> bool:
    return x >= 16 and x & (x - 1) == 0


def check_shapes(head_dim: int, value_dim: int, feature_dim: int, block_q: int, block_k: int) -> None:
    """Raise ValueError unless every size is a power of two >= 16, which ``tl.dot``/``tl.arange`` need."""
    sizes = {"head_dim": head_dim, "value dim": value_dim, "feature dim": feature_dim,
             "block_q": block_q, "block_k": block_k}  # fmt: skip
    bad = {k: v for k, v in sizes.items() if not _pow2_at_least_16(v)}
    if bad:
        raise ValueError(
            f"the SLA Triton kernel needs powers of two >= 16; got {bad}. WAN uses head_dim 128 with "
            f"blocks 128/64; set FXSWAP_SLA_KERNEL=reference to run the PyTorch reference instead"
        )


def sparse_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    c_q: Tensor,
    s: Tensor,
    z: Tensor,
    lut: Tensor,
    block_q: int,
    block_k: int,
) -> tuple[Tensor, Tensor]:
    """``(o_s, o_l)`` of :func:`fxswap.models.sla.sparse_linear_reference`, by the Triton kernel.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before Triton is
    imported). Workspace: the totals of ``s``/``z`` over the key blocks, ``B*H*cd*(dv+1)`` floats.
    """
    b, h, length, d = q.shape
    dv, cd = v.shape[-1], c_q.shape[-1]
    check_shapes(d, dv, cd, block_q, block_k)
    mq, nk = triton.cdiv(length, block_q), triton.cdiv(length, block_k)
    kept = lut.shape[-1]
    q, k, v, c_q, lut = (t.contiguous() for t in (q, k, v, c_q, lut))
    s, z = s.float().contiguous(), z.float().contiguous()
    s_sum, z_sum = s.sum(dim=2), z.sum(dim=2)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    o_s = torch.empty((b, h, length, dv), dtype=q.dtype, device=q.device)
    o_l = torch.empty_like(o_s)
    _sla_fwd[(mq, b * h)](
        q, k, v, c_q, lut, s, z, s_sum, z_sum, o_s, o_l,
        length, mq, d**-0.5,
        D=d, DV=dv, CD=cd, BQ=block_q, BK=block_k, KEPT=kept, NK=nk, PREC=prec,
        # Each program holds q, the accumulator and the kept blocks' [cd, dv] sums: 8 warps at
        # head_dim 128 as TurboDiffusion's SLA kernel uses (not tuned here: no GPU yet).
        num_warps=8 if d >= 128 else 4,
    )  # fmt: skip
    return o_s, o_l
