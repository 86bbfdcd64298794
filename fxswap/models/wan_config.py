"""What a WAN 2.1 / 2.2 transformer is: its config, the released configs, the attention types' names.

The model (:mod:`fxswap.models.wan`) and the checkpoint loader (:mod:`fxswap.models.wan_checkpoint`)
both build on this module and import nothing of each other's, except that ``wan.load`` builds the
model the loader fills. Everything here is public through :mod:`fxswap.models.wan` as well, where
the attention backends themselves are (:mod:`fxswap.models.attention`). Imports no torch
(``tests/test_cli_cache.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fxswap.models import sla_config as _sla

# This module imports no torch: `fxswap plan` reads configs and checks its arguments with it before
# deciding whether it needs torch at all (its graph cache). The attention backends, which are torch
# functions, live in fxswap.models.attention (public through fxswap.models.wan).

__all__ = [
    "ATTENTION_NAMES",
    "CLIP_TOKENS",
    "CONFIGS",
    "MODEL_TYPES",
    "ROPE_THETA",
    "TURBOWAN_CONFIGS",
    "WanConfig",
    "latent_shape",
    "named_config",
    "resolve_config",
    "rope_split",
    "select_expert",
    "tiny_config",
    "turbowan_config",
]

#: CLIP ViT-H/14 at 224 px: 16 x 16 patches + 1 class token (Wan2.1 I2V image conditioning).
CLIP_TOKENS = 257
#: RoPE base frequency of every WAN model.
ROPE_THETA = 10000.0

MODEL_TYPES = ("t2v", "i2v", "ti2v")

#: The names of the attention backends of :data:`fxswap.models.attention.ATTENTION_TYPES` (which
#: checks on import that the two agree): ``"sdpa"`` and sparse-linear attention ``"sla"``.
ATTENTION_NAMES = ("sdpa", "sla")


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
        if self.attention_type not in ATTENTION_NAMES:
            raise ValueError(
                f"attention_type={self.attention_type!r} is not supported; choose one of "
                f"{sorted(ATTENTION_NAMES)}"
            )
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
    return resolve_config(name)


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
    config = resolve_config(config)
    if config.num_experts == 1 or config.boundary is None:
        return 0
    if num_train_timesteps <= 0:
        raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be positive (WAN uses 1000)")
    return 0 if float(timestep) >= config.boundary * num_train_timesteps else 1


def resolve_config(name_or_config: str | WanConfig) -> WanConfig:
    """``name_or_config`` itself, or the config so named in :data:`CONFIGS` or :data:`TURBOWAN_CONFIGS`."""
    if isinstance(name_or_config, WanConfig):
        return name_or_config
    found = CONFIGS.get(name_or_config) or TURBOWAN_CONFIGS.get(name_or_config)
    if found is None:
        known = sorted([*CONFIGS, *TURBOWAN_CONFIGS])
        raise ValueError(f"unknown WAN config {name_or_config!r}; known: {known}")
    return found


def latent_shape(config: WanConfig | str, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``(C, F, H, W)`` of the noisy latent ``x`` for a video of ``frames`` x ``height`` x ``width`` pixels.

    Frames compress ``(frames-1)//4 + 1`` (the first frame is kept); space compresses 8x (Wan2.1 VAE)
    or 16x (Wan2.2 VAE, z=48). E.g. 81 frames at 832x480 on a Wan2.1 model gives (16, 21, 60, 104).
    """
    cfg = resolve_config(config)
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
