"""A trace-friendly re-implementation of the WAN 2.1 / 2.2 video diffusion transformer (DiT).

State-dict keys are exactly those of the original ``Wan-Video/Wan2.x`` ``WanModel`` (and of ComfyUI),
so the official safetensors load by name. The forward pass is rewritten so that
``torch.compile(model, fullgraph=True)`` captures one graph with no breaks, on real and on ``meta``
tensors:

* one dense batch ``[B, C, F, H, W]``; no ``seq_lens``, no padding, no per-sample loops;
* token-grid sizes are Python ints taken from the input shape (no ``.tolist()``);
* RoPE is real-valued (interleaved pairs, the same rotation as the original complex multiply) and its
  cos/sin tables are computed per forward from those ints, in float64, then kept in float32. They are
  therefore not buffers at all: nothing to save, nothing that ``module.to(bfloat16)`` can degrade;
* every Python branch depends only on the config or on tensor ranks/shapes, never on tensor values.

Numerics follow diffusers' ``WanTransformer3DModel``, which is the original block's math (the
``WanAttentionBlock`` of ``Wan-Video/Wan2.1``'s ``wan/modules/model.py``) with the residual stream kept
in the model dtype:

* the compute dtype is the dtype of the parameters, chosen by the caller (``build(..., dtype=...)``);
* LayerNorms (``norm1``/``norm2`` non-affine, ``norm3`` affine, head norm) and q/k RMSNorms run in
  float32; the RMSNorm result is cast back to the input dtype before the weight multiply;
* modulation (shift/scale/gate), the residual adds and the head modulation run in float32 and the
  residual stream is cast back to the model dtype after every add (the original code instead lets the
  stream become float32 under autocast; with float32 weights both are identical);
* the sinusoidal time embedding is computed in float32 with diffusers' formula
  (``exp(-ln(10000) * i / half)``, cos first), which the original computes in float64 and then casts to
  float32: the two differ by float32 rounding of the angle only.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxswap.errors import CheckpointError
from fxswap.models import sla as _sla
from fxswap.models import wan_checkpoint
from fxswap.models.attention import ATTENTION_TYPES, AttentionFn, attention, get_attention
from fxswap.models.wan_config import (
    CLIP_TOKENS,
    CONFIGS,
    MODEL_TYPES,
    ROPE_THETA,
    TURBOWAN_CONFIGS,
    WanConfig,
    latent_shape,
    named_config,
    resolve_config,
    rope_split,
    select_expert,
    tiny_config,
    turbowan_config,
)

# The config names are part of this module's public surface (``wan.CONFIGS``, ``wan.tiny_config``...):
# callers build, load and size models through one module.
__all__ = [
    "ATTENTION_TYPES",
    "CLIP_TOKENS",
    "CONFIGS",
    "MODEL_TYPES",
    "TURBOWAN_CONFIGS",
    "ROPE_THETA",
    "WanConfig",
    "WanModel",
    "apply_rope",
    "attention",
    "build",
    "example_inputs",
    "get_attention",
    "latent_shape",
    "load",
    "named_config",
    "resolve_config",
    "rope_cos_sin",
    "rope_split",
    "select_expert",
    "sinusoidal_embedding",
    "tiny_config",
    "turbowan_config",
    "unpatchify",
]


# --------------------------------------------------------------------------------------------------
# Functional pieces
# --------------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """``[N] -> [N, dim]`` float32 sinusoid, cos half first (original WAN / diffusers ``flip_sin_to_cos``).

    Computed in float32 with diffusers' formula so that equivalence with diffusers is exact; the
    original computes the same angles in float64.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_cos_sin(
    head_dim: int,
    frames: int,
    height: int,
    width: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """cos and sin (``dtype``, float32 by default), each ``[frames*height*width, 1, head_dim//2]``.

    Pair ``i`` of the first ``t_dim/2`` pairs rotates with the frame index, the next ones with the row,
    the last ones with the column (``rope_split``). Angles are formed in float64 like the original
    ``rope_params`` and rounded once to float32. The grid sizes are Python ints, so under Dynamo this
    is a few small constant-shaped ops.
    """
    f64 = torch.float64

    def axis(n: int, dim: int) -> Tensor:
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=f64, device=device) / dim))
        return torch.outer(torch.arange(n, dtype=f64, device=device), inv_freq)  # [n, dim/2]

    t_dim, h_dim, w_dim = rope_split(head_dim)
    at, ah, aw = axis(frames, t_dim), axis(height, h_dim), axis(width, w_dim)

    def grid(fn: Callable[[Tensor], Tensor]) -> Tensor:
        shape = (frames, height, width, -1)
        parts = [
            fn(at).to(dtype)[:, None, None, :].expand(shape),
            fn(ah).to(dtype)[None, :, None, :].expand(shape),
            fn(aw).to(dtype)[None, None, :, :].expand(shape),
        ]
        return torch.cat(parts, dim=-1).reshape(frames * height * width, 1, head_dim // 2)

    return grid(torch.cos), grid(torch.sin)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of ``x: [B, L, H, d]`` by ``cos/sin: [L, 1, d/2]``.

    Equal to the original ``view_as_complex(x) * polar(1, angle)``. Done in float32 (float64 if ``x`` or
    the tables are float64) and cast back to ``x.dtype``.
    """
    work = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32)
    pairs = x.to(work).unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def unpatchify(
    x: Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int], channels: int
) -> Tensor:
    """Head output ``[B, f*h*w, pt*ph*pw*C]`` -> video ``[B, C, f*pt, h*ph, w*pw]``.

    The head's features are ordered ``(pt, ph, pw, c)`` with the channel fastest (the original
    ``einsum('fhwpqrc->cfphqwr')``), the opposite of the patch embedding's channel-slowest input order.
    """
    f, h, w = grid
    pt, ph, pw = patch_size
    x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(x.shape[0], channels, f * pt, h * ph, w * pw)


# --------------------------------------------------------------------------------------------------
# Modules (attribute names are the original WAN ones: they are the state-dict keys)
# --------------------------------------------------------------------------------------------------


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 and returned in the input dtype (original ``WanLayerNorm``)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm over the full last dim (all heads together), float32 statistics, then ``* weight``."""

    def __init__(self, dim: int, eps: float, **factory: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, **factory))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        # The final cast keeps q/k in the activation dtype even if a loader kept this weight in float32.
        return (normed.type_as(x) * self.weight).type_as(x)


class _Attention(nn.Module):
    """The q/k/v/o projections and q/k RMSNorms that self- and cross-attention both have.

    One definition for both, because the attribute names are state-dict keys: they must not drift
    apart between the two attentions.
    """

    def __init__(self, config: WanConfig, attn_fn: AttentionFn, **factory: Any) -> None:
        super().__init__()
        d = config.dim
        self.num_heads = config.num_heads
        self.attn_fn = attn_fn
        self.q = nn.Linear(d, d, **factory)
        self.k = nn.Linear(d, d, **factory)
        self.v = nn.Linear(d, d, **factory)
        self.o = nn.Linear(d, d, **factory)
        self.norm_q = RMSNorm(d, config.eps, **factory)
        self.norm_k = RMSNorm(d, config.eps, **factory)


class SLAAttnOp(nn.Module):
    """Holder that gives SLA's parameters TurboDiffusion's state-dict path,
    ``self_attn.attn_op.local_attn.proj_l.*`` (its ``MinimalA2AAttnOp.local_attn``)."""

    def __init__(self, config: WanConfig, **factory: Any) -> None:
        super().__init__()
        self.local_attn = _sla.SparseLinearAttention(
            config.head_dim, config.sla_topk, config.sla_block_q, config.sla_block_k, **factory
        )

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out: Tensor = self.local_attn(q, k, v)
        return out


class WanSelfAttention(_Attention):
    def __init__(self, config: WanConfig, attn_fn: AttentionFn, **factory: Any) -> None:
        super().__init__(config, attn_fn, **factory)
        self.attn_op: SLAAttnOp | None = None
        if config.attention_type == "sla":
            self.attn_op = SLAAttnOp(config, **factory)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        heads = (self.num_heads, -1)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(2, heads), cos, sin)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(2, heads), cos, sin)
        v = self.v(x).unflatten(2, heads)
        attend = self.attn_fn if self.attn_op is None else self.attn_op
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).flatten(2))


class WanCrossAttention(_Attention):
    """Text cross-attention; with ``image_dim`` also the Wan2.1 i2v image branch sharing ``q`` and ``o``."""

    def __init__(self, config: WanConfig, attn_fn: AttentionFn, **factory: Any) -> None:
        super().__init__(config, attn_fn, **factory)
        d = config.dim
        self.has_image_input = config.has_image_input
        if self.has_image_input:
            self.k_img = nn.Linear(d, d, **factory)
            self.v_img = nn.Linear(d, d, **factory)
            self.norm_k_img = RMSNorm(d, config.eps, **factory)

    def forward(self, x: Tensor, context: Tensor, context_img: Tensor | None = None) -> Tensor:
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(2, heads).transpose(1, 2)
        k = self.norm_k(self.k(context)).unflatten(2, heads).transpose(1, 2)
        v = self.v(context).unflatten(2, heads).transpose(1, 2)
        out = self.attn_fn(q, k, v)
        if self.has_image_input:
            if context_img is None:
                raise ValueError("context_img is required by a cross-attention built with image_dim")
            k_img = self.norm_k_img(self.k_img(context_img)).unflatten(2, heads).transpose(1, 2)
            v_img = self.v_img(context_img).unflatten(2, heads).transpose(1, 2)
            out = out + self.attn_fn(q, k_img, v_img)
        return self.o(out.transpose(1, 2).flatten(2))


def _modulation_table(rows: int, dim: int, **factory: Any) -> nn.Parameter:
    """A ``[1, rows, dim]`` modulation table, initialised ``randn / sqrt(dim)`` like the original.

    On ``meta`` there are no values to draw, and the first random or arithmetic op on meta in a
    process pays for loading torch's meta kernels (1-3 s, the bulk of a first 14B meta build), so the
    table is left uninitialised there. On real devices the draw (and so the RNG stream) is unchanged.
    """
    table = torch.empty(1, rows, dim, **factory)
    if not table.is_meta:
        table = torch.randn(1, rows, dim, **factory) / dim**0.5
    return nn.Parameter(table)


def _split_modulation(table: Tensor, e: Tensor, n: int) -> tuple[Tensor, ...]:
    """``table [1, n, D]`` + per-step ``e [B, n, D]`` or per-token ``e [B, L, n, D]``, in float32.

    Returns ``n`` tensors broadcastable against ``[B, L, D]``: ``[B, 1, D]`` per step, ``[B, L, D]``
    per token. The branch is on the rank of ``e``, which is static for a given call signature.
    """
    if e.ndim == 4:
        return tuple(p.squeeze(2) for p in (table.float().unsqueeze(0) + e.float()).chunk(n, dim=2))
    return (table.float() + e.float()).chunk(n, dim=1)


class WanAttentionBlock(nn.Module):
    def __init__(self, config: WanConfig, attn_fn: AttentionFn, **factory: Any) -> None:
        super().__init__()
        d, eps = config.dim, config.eps
        # Execution order is norm1 -> self_attn, norm3 -> cross_attn, norm2 -> ffn (original naming).
        self.norm1 = FP32LayerNorm(d, eps, elementwise_affine=False, **factory)
        self.self_attn = WanSelfAttention(config, attn_fn, **factory)
        self.norm3 = FP32LayerNorm(d, eps, elementwise_affine=True, **factory)
        # SLA replaces self-attention only (TurboDiffusion's replace_attention): text is 512 tokens.
        cross_fn = ATTENTION_TYPES["sdpa"] if config.attention_type == "sla" else attn_fn
        self.cross_attn = WanCrossAttention(config, cross_fn, **factory)
        self.norm2 = FP32LayerNorm(d, eps, elementwise_affine=False, **factory)
        self.ffn = nn.Sequential(
            nn.Linear(d, config.ffn_dim, **factory),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.ffn_dim, d, **factory),
        )
        self.modulation = _modulation_table(6, d, **factory)

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        context: Tensor,
        cos: Tensor,
        sin: Tensor,
        context_img: Tensor | None = None,
    ) -> Tensor:
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = _split_modulation(self.modulation, e0, 6)
        dtype = x.dtype
        h = (self.norm1(x.float()) * (1 + scale_sa) + shift_sa).to(dtype)
        x = (x.float() + self.self_attn(h, cos, sin).float() * gate_sa).to(dtype)
        x = x + self.cross_attn(self.norm3(x), context, context_img)
        h = (self.norm2(x.float()) * (1 + scale_ff) + shift_ff).to(dtype)
        return (x.float() + self.ffn(h).float() * gate_ff).to(dtype)


class Head(nn.Module):
    def __init__(self, config: WanConfig, **factory: Any) -> None:
        super().__init__()
        d = config.dim
        self.norm = FP32LayerNorm(d, config.eps, elementwise_affine=False, **factory)
        self.head = nn.Linear(d, math.prod(config.patch_size) * config.out_dim, **factory)
        self.modulation = _modulation_table(2, d, **factory)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        # e is the time embedding before time_projection: [B, D] per step, [B, L, D] per token.
        shift, scale = _split_modulation(self.modulation, e.unsqueeze(-2), 2)
        return self.head((self.norm(x.float()) * (1 + scale) + shift).to(x.dtype))


class MLPProj(nn.Module):
    """Wan2.1 i2v CLIP projection: LN(1280) -> Linear -> exact GELU -> Linear -> LN(dim); LN eps 1e-5."""

    def __init__(self, in_dim: int, out_dim: int, **factory: Any) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            FP32LayerNorm(in_dim, **factory),
            nn.Linear(in_dim, in_dim, **factory),
            nn.GELU(),
            nn.Linear(in_dim, out_dim, **factory),
            FP32LayerNorm(out_dim, **factory),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.proj(x)
        return out


class WanModel(nn.Module):
    """The WAN DiT. ``forward(x, timestep, context, clip_fea=None, y=None) -> [B, out_dim, F, H, W]``.

    Build it with ``build``; parameters use PyTorch's default initialisation (plus ``randn/sqrt(D)`` for
    the modulation tables), since real use loads a checkpoint.
    """

    def __init__(
        self, config: WanConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.config = config
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        attn_fn = get_attention(config.attention_type)
        d = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_dim, d, kernel_size=config.patch_size, stride=config.patch_size, **factory
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, d, **factory), nn.GELU(approximate="tanh"), nn.Linear(d, d, **factory)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(config.freq_dim, d, **factory), nn.SiLU(), nn.Linear(d, d, **factory)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, **factory))
        self.blocks = nn.ModuleList(
            WanAttentionBlock(config, attn_fn, **factory) for _ in range(config.num_layers)
        )
        self.head = Head(config, **factory)
        if config.has_image_input:
            assert config.image_dim is not None  # narrowing for mypy; guaranteed by has_image_input
            self.img_emb = MLPProj(config.image_dim, d, **factory)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations are computed in: that of the parameters (the caller's choice)."""
        return self.patch_embedding.weight.dtype

    def _check_inputs(
        self, x: Tensor, timestep: Tensor, context: Tensor, clip_fea: Tensor | None, y: Tensor | None
    ) -> None:
        # Shape/None checks only, on Python ints: Dynamo evaluates them while tracing (they guard on
        # the shapes it specialises on anyway), so they add nothing to the captured graph.
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(
                f"x must be a latent video [B, C, F, H, W] (rank 5); got shape {tuple(x.shape)}. "
                f"Batch a single latent [C, F, H, W] with x[None]"
            )
        b, c, f, h, w = x.shape
        if cfg.y_dim > 0 and y is None:
            raise ValueError(
                f"{cfg.name} ({cfg.model_type}, in_dim={cfg.in_dim}) needs y: the conditioning "
                f"[B, {cfg.y_dim}, F, H, W] (mask + conditioning latent) concatenated after x's "
                f"{cfg.out_dim} channels; pass y=..."
            )
        if y is not None:
            if cfg.y_dim == 0:
                raise ValueError(
                    f"y was given (shape {tuple(y.shape)}) but {cfg.name} has in_dim={cfg.in_dim} = "
                    f"out_dim, i.e. no conditioning channels; drop y, or use an i2v config"
                )
            if y.ndim != 5 or y.shape[0] != b or tuple(y.shape[2:]) != (f, h, w):
                raise ValueError(
                    f"y must be [B={b}, {cfg.y_dim}, F={f}, H={h}, W={w}] to match x {tuple(x.shape)}; "
                    f"got {tuple(y.shape)}"
                )
        c_y = 0 if y is None else y.shape[1]
        if c + c_y != cfg.in_dim:
            expect = f"x {cfg.out_dim}" + (f" + y {cfg.y_dim}" if cfg.y_dim else "")
            raise ValueError(
                f"x has {c} channels"
                + (f" and y {c_y}" if y is not None else "")
                + f"; {cfg.name} takes in_dim={cfg.in_dim} channels ({expect}). Pass latents of "
                f"the VAE this model uses (z={cfg.out_dim}), or the config that matches your latents"
            )
        for size, p, axis in zip((f, h, w), cfg.patch_size, ("F", "H", "W"), strict=True):
            if size % p != 0:
                raise ValueError(
                    f"x {axis}={size} (shape {tuple(x.shape)}) is not divisible by the patch size {p} "
                    f"(patch_size={cfg.patch_size}); crop or pad the latent, or pick a video size "
                    f"that latent_shape() accepts"
                )
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(
                f"context must be the text encoder output [B={b}, text_len={cfg.text_len}, "
                f"text_dim={cfg.text_dim}]; got {tuple(context.shape)}"
            )
        if context.shape[1] != cfg.text_len:
            # The reference pipelines zero-pad T5 output to text_len and attend to the padding too
            # (no mask), so an unpadded context gives a different result, not an error downstream.
            raise ValueError(
                f"context has {context.shape[1]} tokens but {cfg.name} takes text_len={cfg.text_len}: "
                f"zero-pad the text encoder output to {cfg.text_len} tokens (as the Wan and diffusers "
                f"pipelines do), or build the model with text_len={context.shape[1]}"
            )
        if cfg.has_image_input:
            want = (b, CLIP_TOKENS, cfg.image_dim)
            if clip_fea is None or tuple(clip_fea.shape) != want:
                got = None if clip_fea is None else tuple(clip_fea.shape)
                raise ValueError(
                    f"{cfg.name} needs clip_fea, the CLIP ViT-H/14 image features of shape "
                    f"[B={b}, {CLIP_TOKENS}, image_dim={cfg.image_dim}]; got {got}"
                )
        elif clip_fea is not None:
            raise ValueError(
                f"clip_fea was given (shape {tuple(clip_fea.shape)}) but {cfg.name} has no CLIP image "
                f"branch (image_dim=None); drop clip_fea (Wan2.2 i2v conditions through y only)"
            )
        tokens = (f // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
        if timestep.ndim == 2:
            if not cfg.per_token_timesteps:
                raise ValueError(
                    f"timestep of shape {tuple(timestep.shape)} is per-token, but {cfg.name} has "
                    f"per_token_timesteps=False; pass one timestep per sample, shape [B={b}]"
                )
            if tuple(timestep.shape) != (b, tokens):
                raise ValueError(
                    f"per-token timestep must be [B={b}, L={tokens}] (one per latent patch); "
                    f"got {tuple(timestep.shape)}"
                )
        elif timestep.ndim != 1 or timestep.shape[0] != b:
            raise ValueError(
                f"timestep must be [B={b}] (or [B, L] per token); got {tuple(timestep.shape)}. "
                f"Expand a scalar with torch.full(({b},), t)"
            )

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        context: Tensor,
        clip_fea: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        self._check_inputs(x, timestep, context, clip_fea, y)
        cfg = self.config
        dtype = self.compute_dtype
        if y is not None:
            x = torch.cat([x, y], dim=1)
        b = x.shape[0]
        pt, ph, pw = cfg.patch_size
        f, h, w = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        d = cfg.dim

        # Token order is row-major (f, h, w).
        x = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()
        cos, sin = rope_cos_sin(cfg.head_dim, f, h, w, device=x.device)

        # Per step: e [B, D], e0 [B, 6, D]. Per token (TI2V, [B, L] timestep): e [B, L, D], e0 [B, L, 6, D].
        sinusoid = sinusoidal_embedding(timestep.flatten(), cfg.freq_dim).to(dtype)
        e = self.time_embedding(sinusoid)
        e0 = self.time_projection(e)
        if timestep.ndim == 2:
            e = e.unflatten(0, (b, -1))
            e0 = e0.unflatten(0, (b, -1)).unflatten(2, (6, d))
        else:
            e0 = e0.unflatten(1, (6, d))

        context = self.text_embedding(context.to(dtype))
        context_img = (
            self.img_emb(clip_fea.to(dtype)) if cfg.has_image_input and clip_fea is not None else None
        )

        for block in self.blocks:
            x = block(x, e0, context, cos, sin, context_img)

        return unpatchify(self.head(x, e), (f, h, w), cfg.patch_size, cfg.out_dim)


# --------------------------------------------------------------------------------------------------
# Construction, loading and example inputs
# --------------------------------------------------------------------------------------------------


def build(
    name_or_config: str | WanConfig,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> WanModel:
    """Build a ``WanModel`` from a ``CONFIGS`` name or a ``WanConfig``.

    Parameters are created directly on ``device`` with ``dtype`` (no float32 copy first); on ``"meta"``
    a 14B model builds in well under a second and allocates nothing. ``overrides`` replace config fields
    (e.g. ``attention_type="sdpa"``). For the Wan2.2 A14B names this builds ONE expert: the high- and
    low-noise experts share the architecture; ``select_expert`` picks which one runs at a timestep.
    """
    config = resolve_config(name_or_config)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return WanModel(config, device=device, dtype=dtype)


def load(
    path: str | os.PathLike[str],
    *,
    config: WanConfig | str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attention_type: str | None = None,
    sla_topk: float | None = None,
    strict: bool = True,
    keep_stored: bool | None = None,
) -> WanModel:
    """Load a WAN checkpoint (any layout in :data:`fxswap.models.wan_checkpoint.LAYOUTS`, one file or
    shards) into a fresh ``WanModel``.

    ``config``: a ``WanConfig`` or a ``CONFIGS`` name; detected from the tensors when None (see
    :func:`fxswap.models.wan_checkpoint.detect_config`). A Wan2.2 T2V-A14B expert has exactly a
    Wan2.1 T2V-14B's tensors, so pass ``config="wan2.2-t2v-a14b"`` to get its expert boundary.
    ``device``: where the parameters live. ``dtype``: the compute dtype (fp32, bf16, fp16, fp64);
    None picks the dtype most of the file is stored in, or bf16 for fp8 files. Parameters the model
    keeps in fp32 stay fp32. ``attention_type``: None picks ``"sla"`` for files with SLA keys
    (TurboWan), else the config's; a value that disagrees with the keys is an error. ``sla_topk``
    sets the SLA key-block fraction (SLA models only; None keeps 0.1). ``strict=False`` ignores
    unexpected keys; missing keys and shape mismatches are always errors.

    Returns a WanModel whose parameters are in the compute dtype on ``device`` (fp8 is dequantised
    there: ``stored.float() * scale_weight``, then cast). On the CPU, parameters whose stored dtype
    already is the target dtype are views of the memory-mapped file, not copies. Everything (keys,
    shapes, dtypes, SLA, dtype arguments) is checked before the model is built; any problem is a
    ``CheckpointError``.

    Weights kept as stored (:mod:`fxswap.models.wan_stored`): a ``.gguf`` file (ComfyUI-GGUF's
    layout) always, and an fp8 safetensors file with ``keep_stored=True``, give a model whose
    quantised weights stay quantised in host memory (records of :mod:`fxswap.stored`, their
    parameters on meta): ``fxswap.compile`` copies them at their stored size and decodes them on the
    device. ``device`` must then be the CPU; ``fxswap.stored.materialise`` decodes such a model into
    a plain one.
    """
    gguf_file = str(path).lower().endswith(".gguf")
    if gguf_file or keep_stored:
        from fxswap.models import wan_stored

        if torch.device(device).type != "cpu":
            raise CheckpointError(
                f"load: device={device!r} with weights kept as stored; they stay on the host (fxswap.compile "
                "moves them), so pass device='cpu'"
            )
        if sla_topk is not None:
            raise CheckpointError("load: sla_topk applies to SLA checkpoints, not to weights kept as stored")
        if gguf_file and keep_stored is False:
            raise CheckpointError(
                f"load: {path} is a GGUF file; its weights are always kept as stored (keep_stored=False "
                "is for safetensors files). Drop keep_stored, or decode with fxswap.stored.materialise"
            )
        loader = wan_stored.load_gguf if gguf_file else wan_stored.load_fp8_stored
        model = loader(
            path,
            config=config,
            dtype=dtype,
            attention_type=attention_type,
            strict=strict,
            build=lambda cfg, dt: build(cfg, device="meta", dtype=dt),
        )
        assert isinstance(model, WanModel)
        return model
    sd, info, cfg, compute = wan_checkpoint.resolve_load_args(path, config, dtype, attention_type, sla_topk)
    dev = torch.device(device)
    skeleton = build(cfg, device="meta", dtype=compute)
    wan_checkpoint.materialise_into(skeleton, sd, info, dev, strict=strict)
    return skeleton


def example_inputs(
    config: WanConfig | str,
    *,
    batch: int = 1,
    frames: int = 81,
    height: int = 480,
    width: int = 832,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    per_token_timesteps: bool | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Keyword arguments for ``WanModel.forward`` at a video resolution: x, timestep, context (+ y, clip_fea).

    On ``meta`` the tensors are empty placeholders; elsewhere they are seeded random (``timestep`` =
    500). ``per_token_timesteps`` defaults to the config's (TI2V: a ``[B, L]`` timestep). ``dtype``
    (default float32) applies to the floating inputs except ``timestep``, which is always float32.
    """
    cfg = resolve_config(config)
    if batch <= 0:
        raise ValueError(f"batch={batch!r} must be positive")
    dtype = dtype or torch.float32
    c, lat_f, lat_h, lat_w = latent_shape(cfg, frames, height, width)
    pt, ph, pw = cfg.patch_size
    tokens = (lat_f // pt) * (lat_h // ph) * (lat_w // pw)
    per_token = cfg.per_token_timesteps if per_token_timesteps is None else per_token_timesteps
    on_meta = torch.device(device or "cpu").type == "meta"
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        if on_meta:
            return torch.empty(shape, device="meta", dtype=dtype)
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    t_shape = (batch, tokens) if per_token else (batch,)
    out: dict[str, Tensor] = {
        "x": rand(batch, c, lat_f, lat_h, lat_w),
        "timestep": torch.full(t_shape, 500.0, dtype=torch.float32, device=device),
        "context": rand(batch, cfg.text_len, cfg.text_dim),
    }
    if cfg.y_dim > 0:
        out["y"] = rand(batch, cfg.y_dim, lat_f, lat_h, lat_w)
    if cfg.has_image_input:
        assert cfg.image_dim is not None
        out["clip_fea"] = rand(batch, CLIP_TOKENS, cfg.image_dim)
    return out
