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

Numerics (see ``shared/reference/wan_architecture.md`` section 2.4) follow diffusers'
``WanTransformer3DModel``, which is the original math with the residual stream kept in the model dtype:

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
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxswap.models import sla as _sla

__all__ = [
    "ATTENTION_TYPES",
    "CLIP_TOKENS",
    "CONFIGS",
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
    "rope_cos_sin",
    "rope_split",
    "select_expert",
    "sinusoidal_embedding",
    "tiny_config",
    "turbowan_config",
    "unpatchify",
]

#: CLIP ViT-H/14 at 224 px: 16 x 16 patches + 1 class token (Wan2.1 I2V image conditioning).
CLIP_TOKENS = 257
#: RoPE base frequency of every WAN model.
ROPE_THETA = 10000.0

MODEL_TYPES = ("t2v", "i2v", "ti2v")

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _sla_untrained(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _sla.sla_attention(q, k, v)


#: Attention implementations by ``WanConfig.attention_type``. Each takes q, k, v as ``[B, H, L, d]``
#: (same dtype) and returns ``[B, H, Lq, d]`` with the default ``1/sqrt(d)`` scale and no mask.
#: ``"sla"`` here is sparse-linear attention with the default ``sla_topk`` and a zero ``proj_l``; a
#: model built with ``attention_type="sla"`` instead gives every self-attention its own
#: :class:`fxswap.models.sla.SparseLinearAttention` (learned ``proj_l``, the config's ``sla_topk``)
#: and keeps SDPA for cross-attention, as TurboDiffusion does.
#: Read-only: a new backend is added here in code, not registered at runtime.
ATTENTION_TYPES: Mapping[str, AttentionFn] = MappingProxyType({"sdpa": _sdpa, "sla": _sla_untrained})


def get_attention(attention_type: str) -> AttentionFn:
    """Return the attention function for ``attention_type`` or raise a ValueError naming the choices."""
    try:
        return ATTENTION_TYPES[attention_type]
    except KeyError:
        raise ValueError(
            f"attention_type={attention_type!r} is not supported; choose one of {sorted(ATTENTION_TYPES)}"
        ) from None


def attention(q: Tensor, k: Tensor, v: Tensor, attention_type: str = "sdpa") -> Tensor:
    """Multi-head attention on ``[B, H, L, d]`` tensors through the backend named by ``attention_type``."""
    return get_attention(attention_type)(q, k, v)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real dims of ``head_dim`` rotated by frame, row and column position: ``(d-4(d//6), 2(d//6), 2(d//6))``.

    For ``head_dim=128`` this is ``(44, 42, 42)``, i.e. 22 + 21 + 21 interleaved pairs.
    """
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


#: WanConfig fields that must be positive ints (checked in ``WanConfig.__post_init__``).
_POSITIVE_INT_FIELDS = (
    "dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "text_len",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Architecture of one WAN DiT (one expert for the Wan2.2 A14B pairs).

    ``in_dim`` counts the channels after the i2v concatenation: ``x`` has ``out_dim`` channels and the
    conditioning ``y`` the remaining ``in_dim - out_dim`` (20 for the 14B i2v models: 4 mask + 16 latent).
    """

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    model_type: str
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    #: CLIP feature width for Wan2.1 i2v (``img_emb`` + per-block ``k_img``/``v_img``), else None.
    image_dim: int | None = None
    #: Wan2.2 TI2V: the model accepts a ``[B, L]`` timestep (one per token).
    per_token_timesteps: bool = False
    attention_type: str = "sdpa"
    #: attention_type="sla": fraction of key blocks each query block attends to exactly (TurboWan: 0.1).
    sla_topk: float = 0.1
    #: attention_type="sla": query / key block sizes in tokens (TurboDiffusion: 128 / 64).
    sla_block_q: int = _sla.BLOCK_Q
    sla_block_k: int = _sla.BLOCK_K
    #: Wan2.2 A14B: fraction of ``num_train_timesteps`` at and above which the high-noise expert runs.
    boundary: float | None = None
    num_experts: int = 1
    name: str = "custom"

    def __post_init__(self) -> None:
        for field in _POSITIVE_INT_FIELDS:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"WanConfig.{field}={value!r} must be a positive int")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"WanConfig.model_type={self.model_type!r} must be one of {list(MODEL_TYPES)}")
        if self.dim % self.num_heads != 0:
            raise ValueError(
                f"WanConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}; "
                f"pick dim = num_heads * head_dim (WAN uses head_dim 128)"
            )
        head_dim = self.dim // self.num_heads
        if head_dim % 2 != 0 or head_dim < 6:
            raise ValueError(
                f"head_dim = dim/num_heads = {self.dim}/{self.num_heads} = {head_dim} must be even and >= 6 "
                f"so that RoPE can split it into frame/row/column pairs {rope_split(head_dim)}"
            )
        if self.freq_dim <= 0 or self.freq_dim % 2 != 0:
            raise ValueError(
                f"WanConfig.freq_dim={self.freq_dim!r} must be a positive even int (cos|sin halves)"
            )
        if not (isinstance(self.eps, float) and self.eps > 0):
            raise ValueError(f"WanConfig.eps={self.eps!r} must be a positive float")
        ps = self.patch_size
        if not (isinstance(ps, tuple) and len(ps) == 3 and all(isinstance(p, int) and p > 0 for p in ps)):
            raise ValueError(
                f"WanConfig.patch_size={ps!r} must be a tuple of three positive ints, e.g. (1, 2, 2)"
            )
        if self.in_dim < self.out_dim:
            raise ValueError(
                f"WanConfig.in_dim={self.in_dim} < out_dim={self.out_dim}: in_dim counts the latent "
                f"channels (out_dim) plus any conditioning channels y"
            )
        if self.image_dim is not None:
            if self.model_type != "i2v":
                raise ValueError(
                    f"WanConfig.image_dim={self.image_dim} needs model_type='i2v' (got {self.model_type!r}); "
                    f"only Wan2.1 i2v has the CLIP image branch"
                )
            if not isinstance(self.image_dim, int) or self.image_dim <= 0:
                raise ValueError(f"WanConfig.image_dim={self.image_dim!r} must be a positive int or None")
        get_attention(self.attention_type)
        _sla.check_topk(self.sla_topk)
        for field in ("sla_block_q", "sla_block_k"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"WanConfig.{field}={value!r} must be a positive int (TurboDiffusion: 128 for queries, "
                    f"64 for keys)"
                )
        if self.num_experts not in (1, 2):
            raise ValueError(f"WanConfig.num_experts={self.num_experts!r} must be 1 or 2 (Wan2.2 A14B)")
        if (self.num_experts == 2) != (self.boundary is not None):
            raise ValueError(
                f"WanConfig.boundary={self.boundary!r} with num_experts={self.num_experts}: a boundary is "
                f"required exactly when there are two experts"
            )
        if self.boundary is not None and not 0.0 < self.boundary < 1.0:
            raise ValueError(f"WanConfig.boundary={self.boundary!r} must lie strictly between 0 and 1")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_image_input(self) -> bool:
        """True for Wan2.1 i2v: CLIP features go through ``img_emb`` and per-block ``k_img``/``v_img``."""
        return self.image_dim is not None

    @property
    def y_dim(self) -> int:
        """Channels of the conditioning input ``y`` concatenated after ``x`` (0: no ``y``)."""
        return self.in_dim - self.out_dim

    @property
    def vae_stride(self) -> tuple[int, int, int]:
        """(time, height, width) compression of the VAE that produces this model's latents.

        The Wan2.2 VAE (z=48, used by TI2V-5B) compresses space 16x; the Wan2.1 VAE (z=16) 8x.
        """
        return (4, 16, 16) if self.out_dim == 48 else (4, 8, 8)


def _wan14b(**fields: Any) -> WanConfig:
    """Every 14B WAN (2.1 T2V/I2V, each Wan2.2 A14B expert) shares dim/ffn/heads/layers."""
    return WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, **fields)


CONFIGS: dict[str, WanConfig] = {
    c.name: c
    for c in (
        WanConfig(
            dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16, model_type="t2v",
            name="wan2.1-t2v-1.3b",
        ),
        _wan14b(in_dim=16, out_dim=16, model_type="t2v", name="wan2.1-t2v-14b"),
        _wan14b(in_dim=36, out_dim=16, model_type="i2v", image_dim=1280, name="wan2.1-i2v-14b"),
        WanConfig(
            dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48, model_type="ti2v",
            per_token_timesteps=True, name="wan2.2-ti2v-5b",
        ),
        _wan14b(
            in_dim=16, out_dim=16, model_type="t2v", boundary=0.875, num_experts=2,
            name="wan2.2-t2v-a14b",
        ),
        _wan14b(
            in_dim=36, out_dim=16, model_type="i2v", boundary=0.900, num_experts=2,
            name="wan2.2-i2v-a14b",
        ),
    )
}  # fmt: skip


def _turbowan(base: str, name: str) -> WanConfig:
    # TurboDiffusion: sla_topk 0.1 by default (its README recommends 0.15), blocks 128 x 64.
    return dataclasses.replace(CONFIGS[base], attention_type="sla", sla_topk=0.1, name=name)


#: TurboDiffusion's TurboWan releases: the WAN architecture with SLA self-attention. Separate from
#: ``CONFIGS`` because their tensors are a WAN model's plus ``proj_l``; every function that takes a
#: config name (``build``, ``example_inputs``, ``latent_shape``, ``fxswap plan --model``, ``fxswap
#: bench --models``) accepts these names too. ``sla_topk`` can be changed per call:
#: ``build("turbowan2.1-t2v-1.3b", sla_topk=0.15)``.
TURBOWAN_CONFIGS: dict[str, WanConfig] = {
    c.name: c
    for c in (
        _turbowan("wan2.1-t2v-1.3b", "turbowan2.1-t2v-1.3b"),
        _turbowan("wan2.1-t2v-14b", "turbowan2.1-t2v-14b"),
        _turbowan("wan2.2-i2v-a14b", "turbowan2.2-i2v-a14b"),
    )
}


def named_config(name: str) -> WanConfig:
    """The config called ``name`` in :data:`CONFIGS` or :data:`TURBOWAN_CONFIGS`; ValueError naming the
    known ones otherwise."""
    return _resolve(name)


def turbowan_config(config: WanConfig) -> WanConfig:
    """``config`` with SLA self-attention; named after the TurboWan release of the same architecture
    when there is one (used by the loader for TurboWan files with SLA keys)."""
    if config.attention_type == "sla":
        return config
    for turbo in TURBOWAN_CONFIGS.values():
        base = dataclasses.replace(turbo, attention_type=config.attention_type, sla_topk=config.sla_topk,
                                   name=config.name)  # fmt: skip
        if base == config:
            return turbo
    return dataclasses.replace(config, attention_type="sla")


def tiny_config(model_type: str = "t2v", **overrides: Any) -> WanConfig:
    """A small config with the full structure of ``model_type`` for fast CPU tests.

    dim 64 / 2 heads gives head_dim 32, split (12, 10, 10) by RoPE. ``"i2v"`` is the Wan2.1 flavour with
    a (tiny) CLIP branch; pass ``image_dim=None`` for the Wan2.2 A14B flavour. ``"ti2v"`` has
    per-token timesteps.
    """
    base: dict[str, Any] = dict(
        dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=4, out_dim=4, model_type=model_type,
        freq_dim=32, text_dim=32, text_len=8, name=f"tiny-{model_type}",
    )  # fmt: skip
    if model_type == "i2v":
        base.update(in_dim=4 + 4 + 4, image_dim=16)  # x, then y = mask(4) + conditioning latent(4)
    elif model_type == "ti2v":
        base.update(per_token_timesteps=True)
    base.update(overrides)
    return WanConfig(**base)


def select_expert(config: WanConfig | str, timestep: float, num_train_timesteps: int = 1000) -> int:
    """Which Wan2.2 A14B expert denoises at ``timestep`` (on the ``0..num_train_timesteps`` scale).

    Returns 0 for the high-noise expert when ``timestep >= boundary * num_train_timesteps`` (as the
    official ``text2video.py``/``image2video.py`` and diffusers' ``boundary_ratio`` do), else 1 for the
    low-noise expert. Configs with a single model always return 0. Call it outside the traced graph,
    with a Python number: the choice is a per-step scheduling decision, not part of the model.
    ``config`` may be a ``CONFIGS`` name, e.g. ``select_expert("wan2.2-t2v-a14b", t)``.
    """
    config = _resolve(config)
    if config.num_experts == 1 or config.boundary is None:
        return 0
    if num_train_timesteps <= 0:
        raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be positive (WAN uses 1000)")
    return 0 if float(timestep) >= config.boundary * num_train_timesteps else 1


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
        cross_fn = _sdpa if config.attention_type == "sla" else attn_fn
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
# Construction and example inputs
# --------------------------------------------------------------------------------------------------


def _resolve(name_or_config: str | WanConfig) -> WanConfig:
    if isinstance(name_or_config, WanConfig):
        return name_or_config
    found = CONFIGS.get(name_or_config) or TURBOWAN_CONFIGS.get(name_or_config)
    if found is None:
        known = sorted([*CONFIGS, *TURBOWAN_CONFIGS])
        raise ValueError(f"unknown WAN config {name_or_config!r}; known: {known}")
    return found


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
    config = _resolve(name_or_config)
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
) -> WanModel:
    """Load a WAN checkpoint (any layout, one file or shards) into a ready ``WanModel``.

    ``config``: a ``WanConfig`` or a ``CONFIGS`` name; detected from the tensors when None. Pass the
    name for a Wan2.2 T2V-A14B expert (``"wan2.2-t2v-a14b"``): its tensors are exactly a Wan2.1
    T2V-14B's, so detection cannot know it is one of two experts. ``dtype`` is the compute dtype
    (None: the dtype most of the file is stored in, bf16 for fp8 files). ``attention_type``: None
    picks it from the keys (``"sla"`` for a TurboWan file with ``proj_l`` keys, else the config's);
    an explicit value that disagrees with the keys is an error. ``sla_topk``: the SLA key-block
    fraction (None: the config's, 0.1). Every problem is a ``CheckpointError`` raised before a model
    is returned. Implemented in ``fxswap.models.wan_checkpoint.load``; this is its public name.
    """
    from fxswap.models import wan_checkpoint  # lazy: the loader imports this module

    return wan_checkpoint.load(
        path, config=config, device=device, dtype=dtype, attention_type=attention_type, sla_topk=sla_topk,
        strict=strict,
    )  # fmt: skip


def latent_shape(config: WanConfig | str, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``(C, F, H, W)`` of the noisy latent ``x`` for a video of ``frames`` x ``height`` x ``width`` pixels.

    Frames compress ``(frames-1)//4 + 1`` (the first frame is kept); space compresses 8x (Wan2.1 VAE)
    or 16x (Wan2.2 VAE, z=48). E.g. 81 frames at 832x480 on a Wan2.1 model gives (16, 21, 60, 104).
    """
    cfg = _resolve(config)
    st, sh, sw = cfg.vae_stride
    for value, label in ((frames, "frames"), (height, "height"), (width, "width")):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{label}={value!r} must be a positive int")
    if (frames - 1) % st != 0:
        raise ValueError(f"frames={frames} must be 1 + a multiple of {st} (e.g. 81) for the WAN VAE")
    lat_f, lat_h, lat_w = (frames - 1) // st + 1, height // sh, width // sw
    pt, ph, pw = cfg.patch_size
    if height % (sh * ph) != 0 or width % (sw * pw) != 0 or lat_f % pt != 0:
        raise ValueError(
            f"height={height} and width={width} must be multiples of {sh * ph} (VAE stride {sh} x patch "
            f"{ph}) for {cfg.name}"
        )
    return cfg.out_dim, lat_f, lat_h, lat_w


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
    cfg = _resolve(config)
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
