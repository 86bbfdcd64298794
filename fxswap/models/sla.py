"""Sparse-linear attention (SLA, arXiv 2509.24006), the self-attention of TurboWan models.

For each query block of ``block_q`` tokens, SLA

1. scores every key block of ``block_k`` tokens by the dot product of the mean-pooled query block
   with the mean-pooled *smoothed* key block (``k - mean(k)`` over the sequence), and keeps the
   ``kept_blocks(n, topk)`` best ones (:func:`select_blocks`);
2. runs exact softmax attention (scale ``1/sqrt(d)``) over the kept key blocks only: the sparse
   output ``o_s``;
3. runs linear attention over the key blocks it did *not* keep: with the feature map
   ``phi = softmax over the head dim``, ``o_l = phi(q) (sum_j phi(k_j)^T v_j) / (phi(q) . sum_j
   phi(k_j))`` summed over the unkept blocks ``j`` (0 when every block is kept);
4. returns ``o_s + proj_l(o_l)``, with ``proj_l`` a learned ``Linear(head_dim, head_dim)`` that is
   zero at initialisation, so an untrained SLA is block-sparse attention.

Steps 2 and 3 are one op, ``torch.ops.fxswap.sla_sparse_linear``, registered here with a pure
PyTorch implementation (:func:`sparse_linear_reference`, any device) and, on CUDA when Triton is
installed, the fused kernel of :mod:`fxswap.kernels.sla_triton`. Steps 1 and 4, and the linear
branch's per-key-block sums (:func:`kv_block_sums`), stay ordinary torch ops, so a captured graph
shows the scoring matmul, the sums' buffer and ``proj_l`` as what they are (the planner counts
that buffer against the budget), and the analysis prices the op from its shapes like SDPA.
Under ``torch.compile(fullgraph=True)`` the op is one node: the model still captures as one graph.

The reference computes in float32 whatever the input dtype (the kernel accumulates in float32 too)
and returns the input dtype. Selection also scores in float32, so for bf16 inputs a near-tie
between two blocks may resolve differently from TurboDiffusion's bf16 scoring.
"""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# re-exported: wan_config validates configs with these without importing torch
from fxswap.models.sla_config import BLOCK_K, BLOCK_Q, check_topk

__all__ = [
    "BLOCK_K",
    "BLOCK_Q",
    "SparseLinearAttention",
    "attention_flops",
    "check_topk",
    "feature_map",
    "kept_blocks",
    "kv_block_sums",
    "mean_pool",
    "select_blocks",
    "sla_attention",
    "sparse_linear",
    "sparse_linear_reference",
]

#: Environment switch: ``FXSWAP_SLA_KERNEL=reference`` makes CUDA tensors use the PyTorch reference
#: instead of the Triton kernel (for A/B checks; the default is the kernel when Triton imports).
KERNEL_ENV = "FXSWAP_SLA_KERNEL"


def kept_blocks(num_blocks: int, topk: float) -> int:
    """How many of ``num_blocks`` key blocks each query block keeps: ``floor(topk * num_blocks)``,
    at least 1 and at most ``num_blocks``.

    TurboDiffusion takes ``min(n, int(topk * n))``; here ``topk`` is read as the fraction it spells,
    so ``0.29`` of 100 blocks is 29 (float arithmetic gives ``int(28.999999999999996) = 28``), and the
    floor of 1 keeps softmax defined when ``topk * n < 1`` (TurboDiffusion would keep 0 blocks).
    """
    if not isinstance(num_blocks, int) or num_blocks <= 0:
        raise ValueError(f"num_blocks={num_blocks!r} must be a positive int")
    check_topk(topk)
    return _kept(num_blocks, topk)


def _kept(num_blocks: Any, topk: float) -> Any:
    # topk as the nearest fraction p/q with q <= 10^6, then integer floor(n * p / q): exact for the
    # fractions people write (0.29 * 100 -> 29, where float arithmetic gives 28.99...), and made of
    # integer ops only, so it stays symbolic when Dynamo traces with a dynamic sequence length.
    frac = Fraction(topk).limit_denominator(10**6)
    return max(1, min(num_blocks, num_blocks * frac.numerator // frac.denominator))


def _check_block(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{name}={value!r} must be a positive int (TurboDiffusion uses 128 for queries, 64 for keys)"
        )


def mean_pool(x: Tensor, block: int) -> Tensor:
    """``[..., L, d] -> [..., ceil(L/block), d]``: float32 mean of each block of ``block`` rows; the
    last block averages only the rows it has."""
    length = x.shape[-2]
    n = -(-length // block)
    pad = n * block - length
    xf = F.pad(x.float(), (0, 0, 0, pad)) if pad else x.float()
    sums = xf.unflatten(-2, (n, block)).sum(dim=-2)
    counts = torch.full((n, 1), float(block), dtype=torch.float32, device=x.device)
    if pad:
        counts[-1] = block - pad
    return sums / counts


def select_blocks(
    q: Tensor, k: Tensor, topk: float, block_q: int = BLOCK_Q, block_k: int = BLOCK_K
) -> Tensor:
    """The key blocks each query block attends to exactly: int64 ``[B, H, ceil(L/block_q), kept]``.

    Scores are ``mean_pool(q) @ mean_pool(k - mean(k))^T`` in float32; the ``kept_blocks`` highest
    per query block are returned in descending score order (ties: lower block index first is not
    promised, ``torch.topk`` decides).
    """
    check_topk(topk)
    smoothed = k.float() - k.float().mean(dim=-2, keepdim=True)
    scores = mean_pool(q, block_q) @ mean_pool(smoothed, block_k).transpose(-1, -2)
    kept = _kept(scores.shape[-1], topk)
    return torch.topk(scores, kept, dim=-1, sorted=True).indices


def feature_map(x: Tensor) -> Tensor:
    """The linear branch's feature map ``phi``: softmax over the head dim (TurboDiffusion's default)."""
    return torch.softmax(x, dim=-1)


def kv_block_sums(c_k: Tensor, v: Tensor, block_k: int = BLOCK_K) -> tuple[Tensor, Tensor]:
    """Per key block ``j``: ``S_j = phi(k_j)^T v_j`` ``[B, H, Nk, cd, dv]`` and ``Z_j = sum phi(k_j)``
    ``[B, H, Nk, cd]``, float32 (the last block's padding adds nothing).

    Ordinary graph ops rather than part of the fused op: ``S`` is the linear branch's one large
    buffer (``B*H*(L/64)*d^2*4`` bytes: 1.3 GB for WAN 14B at 480p), and as a graph activation the
    planner counts it against the budget instead of leaving it hidden inside an opaque op.
    """
    length = c_k.shape[-2]
    nk = -(-length // block_k)
    pad = (0, 0, 0, nk * block_k - length)
    ckb = F.pad(c_k.float(), pad).unflatten(-2, (nk, block_k))
    vb = F.pad(v.float(), pad).unflatten(-2, (nk, block_k))
    return ckb.transpose(-1, -2) @ vb, ckb.sum(dim=-2)


def sparse_linear_reference(
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
    """``(o_s, o_l)``, each ``[B, H, L, d]`` in ``q``'s dtype, computed in float32 with PyTorch ops.

    ``o_s``: softmax attention of each query block over the key blocks listed in ``lut``
    ``[B, H, Mq, kept]``; ``o_l``: linear attention with query features ``c_q`` over the key blocks
    not listed, from their sums ``s``/``z`` (:func:`kv_block_sums`); zero when every block is listed.
    Gathers the kept key/value blocks, so memory is ``O(kept * block_k * L)`` per head, not
    ``O(L^2)``. Only static Python branches: it also traces with ``torch.compile(fullgraph=True)``.
    """
    b, h, length, d = q.shape
    dv = v.shape[-1]
    mq, nk = -(-length // block_q), -(-length // block_k)
    kept = lut.shape[-1]
    bh = b * h
    f32 = torch.float32

    def blocks(x: Tensor, block: int, n: int) -> Tensor:  # [B, H, L, e] -> [BH, n, block, e] (zero pad)
        x = x.to(f32).reshape(bh, length, x.shape[-1])
        return F.pad(x, (0, 0, 0, n * block - length)).unflatten(1, (n, block))

    qb = blocks(q, block_q, mq)
    kb, vb = blocks(k, block_k, nk), blocks(v, block_k, nk)
    idx = lut.reshape(bh, mq, kept).long()
    rows = torch.arange(bh, device=q.device)[:, None, None]
    k_sel = kb[rows, idx].flatten(2, 3)  # [BH, Mq, kept*block_k, d]
    v_sel = vb[rows, idx].flatten(2, 3)
    key_valid = (torch.arange(nk * block_k, device=q.device) < length).view(nk, block_k)
    valid = key_valid[idx].flatten(2, 3)  # [BH, Mq, kept*block_k]: padding keys of the last block
    scores = (qb @ k_sel.transpose(-1, -2)) * (d**-0.5)
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    o_s = torch.softmax(scores, dim=-1) @ v_sel  # [BH, Mq, block_q, dv]

    if kept == nk:
        o_l = torch.zeros_like(o_s)
    else:
        cd = s.shape[-2]
        unkept = torch.ones(bh, mq, nk, dtype=f32, device=q.device).scatter(-1, idx, 0.0)
        s_q = (unkept @ s.float().reshape(bh, nk, cd * dv)).unflatten(-1, (cd, dv))  # [BH, Mq, cd, dv]
        z_q = unkept @ z.float().reshape(bh, nk, cd)  # [BH, Mq, cd]
        cqb = blocks(c_q, block_q, mq)
        o_l = (cqb @ s_q) / (cqb * z_q[:, :, None, :]).sum(dim=-1, keepdim=True)

    def tokens(o: Tensor) -> Tensor:
        # Contiguous, as the fake implementation promises (Inductor lays out the op's outputs by it).
        return o.flatten(1, 2)[:, :length].reshape(b, h, length, dv).to(q.dtype).contiguous()

    return tokens(o_s), tokens(o_l)


def _check_sparse_linear_args(
    q: Tensor, k: Tensor, v: Tensor, c_q: Tensor, s: Tensor, z: Tensor, lut: Tensor,
    block_q: int, block_k: int,
) -> None:  # fmt: skip
    if q.ndim != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"sla: q, k, v must be [B, H, L, d] with equal B, H, L (self-attention); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    b, h, length = q.shape[:3]
    nk, cd = -(-length // block_k), c_q.shape[-1]
    if (
        c_q.shape[:-1] != q.shape[:-1]
        or tuple(s.shape) != (b, h, nk, cd, v.shape[-1])
        or tuple(z.shape) != (b, h, nk, cd)
    ):
        raise ValueError(
            f"sla: c_q must be [B, H, L, cd] and s, z the kv_block_sums [B, H, {nk}, cd, dv] and "
            f"[B, H, {nk}, cd]; got c_q {tuple(c_q.shape)}, s {tuple(s.shape)}, z {tuple(z.shape)}"
        )
    mq = -(-q.shape[2] // block_q)
    if lut.ndim != 4 or tuple(lut.shape[:3]) != (q.shape[0], q.shape[1], mq) or lut.dtype != torch.int64:
        raise ValueError(
            f"sla: lut must be int64 [B, H, ceil(L/block_q)={mq}, kept] (select_blocks' output); "
            f"got {lut.dtype} {tuple(lut.shape)}"
        )


def _use_kernel(q: Tensor) -> bool:
    if q.device.type != "cuda" or os.environ.get(KERNEL_ENV, "") == "reference":
        return False
    from fxswap.kernels import triton_available

    return triton_available()


@torch.library.custom_op("fxswap::sla_sparse_linear", mutates_args=())
def sparse_linear(
    q: Tensor, k: Tensor, v: Tensor, c_q: Tensor, s: Tensor, z: Tensor, lut: Tensor,
    block_q: int, block_k: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """SLA's sparse and linear branches as one op: the Triton kernel on CUDA when Triton is
    installed (unless ``FXSWAP_SLA_KERNEL=reference``), else :func:`sparse_linear_reference`."""
    _check_sparse_linear_args(q, k, v, c_q, s, z, lut, block_q, block_k)
    if _use_kernel(q):
        from fxswap.kernels import sla_triton

        return sla_triton.sparse_linear(q, k, v, c_q, s, z, lut, block_q, block_k)
    return sparse_linear_reference(q, k, v, c_q, s, z, lut, block_q, block_k)


@sparse_linear.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, c_q: Tensor, s: Tensor, z: Tensor, lut: Tensor,
    block_q: int, block_k: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    shape = (*q.shape[:-1], v.shape[-1])
    return q.new_empty(shape), q.new_empty(shape)


def sla_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    topk: float = 0.1,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    proj_weight: Tensor | None = None,
    proj_bias: Tensor | None = None,
) -> Tensor:
    """SLA on ``[B, H, L, d]`` q, k, v: ``o_s + proj_l(o_l)``; no ``proj_weight`` means a zero ``proj_l``
    (an untrained SLA: block-sparse attention)."""
    lut = select_blocks(q, k, topk, block_q, block_k)
    s, z = kv_block_sums(feature_map(k), v, block_k)
    o_s, o_l = sparse_linear(q, k, v, feature_map(q), s, z, lut, block_q, block_k)
    if proj_weight is None:
        return o_s
    return o_s + F.linear(o_l, proj_weight, proj_bias)


def attention_flops(
    tokens: int, dim: int, head_dim: int, topk: float, block_q: int = BLOCK_Q, block_k: int = BLOCK_K
) -> float:
    """FLOPs of one SLA self-attention on ``tokens`` tokens (B=1, ``dim = heads * head_dim``), excluding
    the q/k/v/o projections: block scoring, the sparse branch, the linear branch and ``proj_l``.

    The sparse branch counts whole kept key blocks (``kept * block_k`` keys per query); its kept
    count is :func:`kept_blocks` of ``ceil(tokens / block_k)``, so it is ``~topk * 4 L^2 D``. This is
    the closed form of what capture counts op by op (``fxswap.passes.analyse``); elementwise work
    (mean pooling, feature maps, top-k) is priced there by bytes and left out here.
    """
    n, dd, hd = tokens, dim, head_dim
    heads = dd // hd
    mq, nk = -(-n // block_q), -(-n // block_k)
    kept = kept_blocks(nk, topk)
    scoring = 2.0 * mq * nk * dd
    sparse = 4.0 * n * kept * block_k * dd
    # phi(k)^T v per (padded) key block, always computed; then, unless every block is kept,
    # phi(q) S, the denominator, and the kept blocks' sums taken off the totals per query block.
    kv_sums = 2.0 * nk * block_k * hd * dd
    rest = 2.0 * n * hd * dd + 2.0 * n * dd + float(heads * mq * kept * hd * hd) if kept < nk else 0.0
    linear = kv_sums + rest
    proj_l = 2.0 * n * hd * dd
    return scoring + sparse + linear + proj_l


class SparseLinearAttention(nn.Module):
    """SLA with its learned ``proj_l`` (zero-initialised). ``forward(q, k, v)`` on ``[B, H, L, d]``.

    The attribute name ``proj_l`` is TurboDiffusion's, so TurboWan state-dict keys load by name.
    """

    def __init__(
        self,
        head_dim: int,
        topk: float = 0.1,
        block_q: int = BLOCK_Q,
        block_k: int = BLOCK_K,
        **factory: Any,
    ) -> None:
        super().__init__()
        check_topk(topk)
        _check_block("block_q", block_q)
        _check_block("block_k", block_k)
        self.topk = topk
        self.block_q = block_q
        self.block_k = block_k
        self.proj_l = nn.Linear(head_dim, head_dim, **factory)
        if not self.proj_l.weight.is_meta:
            with torch.no_grad():
                self.proj_l.weight.zero_()
                self.proj_l.bias.zero_()

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return sla_attention(
            q, k, v, self.topk, self.block_q, self.block_k, self.proj_l.weight, self.proj_l.bias
        )

    def extra_repr(self) -> str:
        return f"topk={self.topk}, block_q={self.block_q}, block_k={self.block_k}"
