"""Tests for fxswap.models.wan: configs, meta builds, forward numerics and full-graph capture.

Equivalence with diffusers' WanTransformer3DModel lives with the checkpoint loader's tests.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch._dynamo.utils import counters

from fxswap.models import wan

# Exact counts from the product brief (issue 2); derived by hand from the architecture's formulas
# (docs/benchmarks.md, "WAN parameter counts"), which also match the published checkpoint sizes.
EXPECTED_PARAMS = {
    "wan2.1-t2v-1.3b": 1_418_996_800,
    "wan2.1-t2v-14b": 14_288_491_584,
    "wan2.1-i2v-14b": 16_394_878_784,
    "wan2.2-ti2v-5b": 4_999_787_712,
    "wan2.2-t2v-a14b": 14_288_491_584,
    "wan2.2-i2v-a14b": 14_288_901_184,
}
SMALL_VIDEO: dict[str, Any] = dict(frames=5, height=32, width=48)  # latent (2, 4, 6) -> token grid (2, 2, 3)


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _perturbed(cfg: wan.WanConfig, seed: int = 0) -> wan.WanModel:
    """A tiny model whose norm weights and biases are not the trivial 1/0 of a fresh init."""
    torch.manual_seed(seed)
    model = wan.build(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


# ---------------------------------------------------------------------------------------------- configs


def test_config_names_are_exactly_the_contract() -> None:
    assert set(wan.CONFIGS) == set(EXPECTED_PARAMS)
    for name, cfg in wan.CONFIGS.items():
        assert cfg.name == name
        assert cfg.head_dim == 128


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_meta_build_has_exact_parameter_count(name: str) -> None:
    model = wan.build(name, device="meta")
    assert _numel(model) == EXPECTED_PARAMS[name]
    assert all(p.is_meta for p in model.parameters())


def test_meta_build_14b_is_fast_in_a_fresh_process() -> None:
    # In a fresh interpreter: in this one, an earlier test has already paid for what is measured.
    # The first random op on meta imports Dynamo and torch's decompositions (1-3 s); a build must not.
    code = (
        "import sys, time, torch\n"
        "from fxswap.models import wan\n"
        "t = time.perf_counter()\n"
        "m = wan.build('wan2.1-t2v-14b', device='meta', dtype=torch.bfloat16)\n"
        "print(time.perf_counter() - t, 'torch._dynamo' in sys.modules, "
        "{p.dtype for p in m.parameters()} == {torch.bfloat16}, all(p.is_meta for p in m.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    elapsed, dynamo_loaded, bf16, meta = out.split()
    assert (dynamo_loaded, bf16, meta) == ("False", "True", "True")
    assert float(elapsed) < 5.0, f"meta build of 14B took {float(elapsed):.2f} s"


def test_modulation_tables_keep_randn_init_on_real_devices() -> None:
    # Meta skips the draw; a real build must still give the original randn / sqrt(dim) tables.
    dim = 1024
    model = wan.build(wan.tiny_config("t2v", dim=dim, num_heads=8, num_layers=1))
    for table in (model.blocks[0].modulation, model.head.modulation):
        assert abs(table.std().item() * dim**0.5 - 1.0) < 0.1
        assert abs(table.mean().item()) * dim**0.5 < 0.1
    torch.manual_seed(5)
    a = wan.build(wan.tiny_config("t2v")).state_dict()
    torch.manual_seed(5)
    b = wan.build(wan.tiny_config("t2v")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded builds stay reproducible


def test_state_dict_uses_original_wan_keys_and_shapes() -> None:
    model = wan.build("wan2.1-i2v-14b", device="meta")
    sd = model.state_dict()
    d = 5120
    assert sd["patch_embedding.weight"].shape == (d, 36, 1, 2, 2)
    assert sd["text_embedding.0.weight"].shape == (d, 4096)
    assert sd["time_embedding.0.weight"].shape == (d, 256)
    assert sd["time_projection.1.weight"].shape == (6 * d, d)
    assert sd["blocks.0.modulation"].shape == (1, 6, d)
    assert sd["head.modulation"].shape == (1, 2, d)
    assert sd["head.head.weight"].shape == (4 * 16, d)
    assert sd["img_emb.proj.0.weight"].shape == (1280,)
    assert sd["img_emb.proj.3.weight"].shape == (d, 1280)
    block0 = sorted(k[len("blocks.0.") :] for k in sd if k.startswith("blocks.0."))
    linears = [
        f"{a}.{p}.{s}" for a in ("self_attn", "cross_attn") for p in "qkvo" for s in ("weight", "bias")
    ]
    expected = sorted(
        linears
        + [f"{a}.norm_{p}.weight" for a in ("self_attn", "cross_attn") for p in "qk"]
        + [
            "cross_attn.k_img.weight",
            "cross_attn.k_img.bias",
            "cross_attn.v_img.weight",
            "cross_attn.v_img.bias",
        ]
        + ["cross_attn.norm_k_img.weight", "norm3.weight", "norm3.bias", "modulation"]
        + ["ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias"]
    )
    assert block0 == expected  # 31 tensors; norm1/norm2 have none
    # Nothing besides parameters is persisted (RoPE tables are computed per forward).
    assert len(sd) == len(list(model.parameters()))


def test_t2v_and_a14b_i2v_have_no_image_branch() -> None:
    for name in ("wan2.1-t2v-14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"):
        keys = wan.build(name, device="meta").state_dict().keys()
        assert not any("img" in k for k in keys), name


def _bad(**changes: Any) -> dict[str, Any]:
    fields = dataclasses.asdict(wan.tiny_config("t2v"))
    fields.update(changes)
    return fields


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (dict(dim=65), "not divisible by num_heads"),
        (dict(dim=66, num_heads=2), "must be even"),
        (dict(dim=8, num_heads=2), "must be even and >= 6"),
        (dict(num_layers=0), "num_layers=0"),
        (dict(model_type="s2v"), "model_type='s2v'"),
        (dict(image_dim=1280), "needs model_type='i2v'"),
        (dict(in_dim=2), "in_dim=2 < out_dim=4"),
        (dict(freq_dim=33), "freq_dim=33"),
        (dict(patch_size=(1, 2)), "patch_size=(1, 2)"),
        (dict(boundary=0.9), "boundary=0.9"),
        (dict(num_experts=2), "boundary=None"),
        (dict(num_experts=3, boundary=0.5), "num_experts=3"),
        (dict(num_experts=2, boundary=1.5), "strictly between 0 and 1"),
        (dict(eps=0.0), "eps=0.0"),
    ],
)
def test_bad_config_values_raise_clear_errors(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError) as info:
        wan.WanConfig(**_bad(**changes))
    assert needle in str(info.value)


def test_unknown_attention_type_names_option_and_choices() -> None:
    for make in (
        lambda: wan.WanConfig(**_bad(attention_type="flash")),
        lambda: wan.build(wan.tiny_config(), attention_type="flash"),
        lambda: wan.get_attention("flash"),
    ):
        with pytest.raises(ValueError) as info:
            make()
        assert "'flash'" in str(info.value) and "sdpa" in str(info.value)


def test_unknown_config_name() -> None:
    with pytest.raises(ValueError, match="wan2.1-t2v-14b"):
        wan.build("wan2.1-t2v-13b", device="meta")


def test_a14b_two_experts_are_built_loaded_and_picked(tmp_path: Any) -> None:
    # Meta: each named A14B config builds one full-size expert; two builds give two separate experts.
    for name in ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"):
        high, low = (wan.build(name, device="meta") for _ in range(2))
        assert high is not low and _numel(high) == _numel(low) == EXPECTED_PARAMS[name]
    # Tiny pair with the T2V-A14B boundary: each expert loaded from its own file, picked per step.
    from fxswap.models.wan_checkpoint import save

    cfg = wan.tiny_config("t2v", num_experts=2, boundary=0.875)
    experts = [_perturbed(cfg, seed=s) for s in (1, 2)]
    for i, m in enumerate(experts):
        save(m, tmp_path / f"expert{i}.safetensors")
    loaded = [wan.load(tmp_path / f"expert{i}.safetensors", dtype=torch.float32) for i in range(2)]
    assert all(m.config == cfg for m in loaded)  # boundary and expert count travel in the metadata
    inp = wan.example_inputs(cfg, **SMALL_VIDEO)
    with torch.no_grad():
        for t, want in ((999.0, 0), (875.0, 0), (874.0, 1), (1.0, 1)):
            i = wan.select_expert(loaded[want].config, t)
            assert i == want == wan.select_expert("wan2.2-t2v-a14b", t)
            step = dict(inp, timestep=torch.tensor([t]))
            torch.testing.assert_close(loaded[i](**step), experts[want](**step), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(loaded[0](**inp), loaded[1](**inp))


def test_select_expert_boundaries() -> None:
    t2v, i2v = wan.CONFIGS["wan2.2-t2v-a14b"], wan.CONFIGS["wan2.2-i2v-a14b"]
    assert (t2v.num_experts, t2v.boundary, i2v.num_experts, i2v.boundary) == (2, 0.875, 2, 0.9)
    assert wan.select_expert(t2v, 999) == 0
    assert wan.select_expert(t2v, 875.0) == 0
    assert wan.select_expert(t2v, 874.99) == 1
    assert wan.select_expert(t2v, 0) == 1
    assert wan.select_expert(i2v, 900.0) == 0
    assert wan.select_expert(i2v, 899.9) == 1
    assert wan.select_expert(i2v, 0.95, num_train_timesteps=1) == 0
    assert wan.select_expert(i2v, 0.85, num_train_timesteps=1) == 1
    assert wan.select_expert(wan.CONFIGS["wan2.1-t2v-14b"], 10.0) == 0


# ------------------------------------------------------------------------------------------ shapes/inputs


def test_latent_shape_and_example_inputs() -> None:
    assert wan.latent_shape("wan2.1-t2v-14b", 81, 480, 832) == (16, 21, 60, 104)
    assert wan.latent_shape("wan2.1-t2v-14b", 81, 720, 1280) == (16, 21, 90, 160)
    assert wan.latent_shape("wan2.2-ti2v-5b", 121, 704, 1280) == (48, 31, 44, 80)
    inp = wan.example_inputs("wan2.1-i2v-14b", device="meta", dtype=torch.bfloat16)
    assert inp["x"].shape == (1, 16, 21, 60, 104) and inp["x"].is_meta
    assert inp["y"].shape == (1, 20, 21, 60, 104)
    assert inp["clip_fea"].shape == (1, 257, 1280)
    assert inp["context"].shape == (1, 512, 4096) and inp["context"].dtype == torch.bfloat16
    assert inp["timestep"].shape == (1,) and inp["timestep"].dtype == torch.float32
    ti2v = wan.example_inputs("wan2.2-ti2v-5b", batch=2, frames=121, height=704, width=1280, device="meta")
    assert ti2v["timestep"].shape == (2, 31 * 22 * 40)
    assert set(wan.example_inputs("wan2.2-i2v-a14b", device="meta")) == {"x", "y", "timestep", "context"}


@pytest.mark.parametrize(
    ("frames", "height", "width", "needle"),
    [(80, 480, 832, "frames=80"), (81, 470, 832, "height=470"), (81, 480, 0, "width=0")],
)
def test_latent_shape_rejects_bad_sizes(frames: int, height: int, width: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        wan.latent_shape("wan2.1-t2v-14b", frames, height, width)


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [("t2v", {}), ("i2v", {}), ("i2v", {"image_dim": None}), ("ti2v", {})],
    ids=["t2v", "i2v-wan2.1", "i2v-a14b", "ti2v"],
)
def test_tiny_forward_shape_and_finite(model_type: str, overrides: dict[str, Any]) -> None:
    cfg = wan.tiny_config(model_type, **overrides)
    model = _perturbed(cfg)
    inp = wan.example_inputs(cfg, batch=2, **SMALL_VIDEO)
    with torch.no_grad():
        out = model(**inp)
    assert out.shape == (2, cfg.out_dim, 2, 4, 6)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.std() > 0.1  # not a degenerate constant


def test_forward_depends_on_every_input() -> None:
    cfg = wan.tiny_config("i2v")
    model = _perturbed(cfg)
    inp = wan.example_inputs(cfg, **SMALL_VIDEO)
    with torch.no_grad():
        ref = model(**inp)
        for key in inp:
            changed = dict(inp, **{key: inp[key] + 1.0})
            assert not torch.allclose(model(**changed), ref), f"output ignores {key}"


def test_batch_samples_are_independent() -> None:
    cfg = wan.tiny_config("t2v")
    model = _perturbed(cfg)
    inp = wan.example_inputs(cfg, batch=2, **SMALL_VIDEO)
    with torch.no_grad():
        both = model(**inp)
        first = model(**{k: v[:1] for k, v in inp.items()})
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_follows_parameters() -> None:
    cfg = wan.tiny_config("t2v")
    model = _perturbed(cfg)
    inp = wan.example_inputs(cfg, **SMALL_VIDEO)
    with torch.no_grad():
        ref = model(**inp)
        out = model.to(torch.bfloat16)(**inp)  # float32 inputs are cast to the compute dtype
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_float32_norms_and_modulation_in_bfloat16_model() -> None:
    # A loader may keep norm weights and modulation tables in float32 (diffusers' _keep_in_fp32_modules).
    cfg = wan.tiny_config("i2v")
    model = _perturbed(cfg)
    inp = wan.example_inputs(cfg, **SMALL_VIDEO)
    with torch.no_grad():
        ref = model(**inp)
        model.to(torch.bfloat16)
        for module in model.modules():
            if isinstance(module, (wan.RMSNorm, wan.FP32LayerNorm)):
                module.float()
        for table in [model.head.modulation, *(block.modulation for block in model.blocks)]:
            table.data = table.data.float()
        out = model(**inp)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_per_token_timesteps_all_equal_match_per_step() -> None:
    cfg = wan.tiny_config("ti2v")
    model = _perturbed(cfg)
    inp = wan.example_inputs(cfg, batch=2, per_token_timesteps=False, **SMALL_VIDEO)
    inp["timestep"] = torch.tensor([731.0, 88.0])
    tokens = 2 * 2 * 3
    per_token = dict(inp, timestep=inp["timestep"][:, None].expand(2, tokens).contiguous())
    with torch.no_grad():
        a, b = model(**inp), model(**per_token)
        varied = per_token["timestep"].clone()
        varied[:, 0] = 0.0  # TI2V gives conditioning-frame tokens t=0
        c = model(**dict(per_token, timestep=varied))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(c, a)


# tiny configs: text_len 8, text_dim 32, in_dim 4 (i2v: x 4 + y 8), CLIP image_dim 16; SMALL_VIDEO's
# latent is [F=2, H=4, W=6], i.e. 12 tokens. Each needle names the argument, what was expected, and
# (where there is one) the fix.
BAD_INPUTS = {
    "x-rank": ("t2v", {"x": torch.zeros(4, 2, 4, 6)}, r"x must be .*\[B, C, F, H, W\].*x\[None\]"),
    "x-channels": ("t2v", {"x": torch.zeros(1, 3, 2, 4, 6)}, r"x has 3 channels.*in_dim=4.*VAE"),
    "x-channels-i2v": (
        "i2v", {"x": torch.zeros(1, 16, 2, 4, 6)}, r"x has 16 channels and y 8.*in_dim=12 .*x 4 \+ y 8"
    ),
    "x-height-patch": (
        "t2v", {"x": torch.zeros(1, 4, 2, 5, 6)}, r"x H=5 .*not divisible by the patch size 2"
    ),
    "x-width-patch": ("t2v", {"x": torch.zeros(1, 4, 2, 4, 7)}, r"x W=7 .*latent_shape"),
    "y-missing": ("i2v", {"y": None}, r"needs y.*\[B, 8, F, H, W\].*pass y="),
    "y-for-t2v": ("t2v", {"y": torch.zeros(1, 4, 2, 4, 6)}, r"y was given.*no conditioning.*drop y"),
    "y-spatial": ("i2v", {"y": torch.zeros(1, 8, 2, 4, 4)}, r"y must be \[B=1, 8, F=2, H=4, W=6\]"),
    "context-text-dim": ("t2v", {"context": torch.zeros(1, 8, 31)}, r"context must be .*text_dim=32.*31"),
    "context-rank": (
        "t2v", {"context": torch.zeros(8, 32)}, r"must be .*\[B=1, text_len=8, text_dim=32\]; got \(8, 32\)"
    ),
    "context-too-short": (
        "t2v", {"context": torch.zeros(1, 5, 32)}, r"context has 5 tokens.*text_len=8.*zero-pad"
    ),
    "context-too-long": (
        "t2v", {"context": torch.zeros(1, 512, 32)}, r"context has 512 tokens.*text_len=512"
    ),
    "clip-missing": ("i2v", {"clip_fea": None}, r"needs clip_fea.*\[B=1, 257, image_dim=16\]; got None"),
    "clip-tokens": ("i2v", {"clip_fea": torch.zeros(1, 256, 16)}, r"clip_fea.*257.*got \(1, 256, 16\)"),
    "clip-width": ("i2v", {"clip_fea": torch.zeros(1, 257, 1280)}, r"image_dim=16\]; got \(1, 257, 1280\)"),
    "clip-for-t2v": ("t2v", {"clip_fea": torch.zeros(1, 257, 16)}, r"no CLIP image branch.*drop clip_fea"),
    "timestep-per-token": ("t2v", {"timestep": torch.zeros(1, 12)}, r"per_token_timesteps=False.*\[B=1\]"),
    "timestep-tokens": ("ti2v", {"timestep": torch.zeros(1, 5)}, r"\[B=1, L=12\]"),
    "timestep-scalar": ("t2v", {"timestep": torch.tensor(3.0)}, r"timestep must be \[B=1\].*torch\.full"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_forward_rejects_bad_inputs(case: str) -> None:
    model_type, change, needle = BAD_INPUTS[case]
    cfg = wan.tiny_config(model_type)
    inp: dict[str, Any] = dict(wan.example_inputs(cfg, **SMALL_VIDEO), **change)
    with pytest.raises(ValueError, match=needle):
        wan.build(cfg)(**inp)


def test_other_text_len_is_a_config_choice() -> None:
    # The fix the context-length error names works: a model built for 5 tokens takes 5 tokens.
    cfg = wan.tiny_config("t2v", text_len=5)
    inp = wan.example_inputs(cfg, **SMALL_VIDEO)
    assert inp["context"].shape[1] == 5
    with torch.no_grad():
        assert wan.build(cfg)(**inp).shape == (1, 4, 2, 4, 6)


def test_input_checks_still_fire_when_compiled() -> None:
    # (That they cost no graph break is test_fullgraph_capture_tiny_real: every capture runs them.)
    cfg = wan.tiny_config("i2v")
    model = _perturbed(cfg)
    inp = wan.example_inputs(cfg, **SMALL_VIDEO)
    # The checks run at trace time, so a compiled model reports a bad shape with the same message:
    # as the ValueError itself, or (fullgraph=True, where Dynamo wraps any raise) as its cause.
    bad = dict(inp, context=torch.zeros(1, 5, cfg.text_dim))
    for fullgraph in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=fullgraph)
        with pytest.raises(Exception) as info, torch.no_grad():
            compiled(**bad)
        chain = [info.value, info.value.__cause__]
        assert any("context has 5 tokens but tiny-i2v takes text_len=8" in str(e) for e in chain), chain
        assert fullgraph or info.type is ValueError


# ---------------------------------------------------------------------------------------------- RoPE


def _reference_rope(x: Tensor, grid: tuple[int, int, int], theta: float = 10000.0) -> Tensor:
    """The original WAN complex RoPE (rope_params + rope_apply) for one grid, in complex128."""
    b, seq, n, d = x.shape
    c = d // 2

    def rope_params(max_len: int, dim: int) -> Tensor:
        freqs = torch.outer(
            torch.arange(max_len, dtype=torch.float64),
            1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64).div(dim)),
        )
        return torch.polar(torch.ones_like(freqs), freqs)

    freqs = torch.cat(
        [rope_params(64, d - 4 * (d // 6)), rope_params(64, 2 * (d // 6)), rope_params(64, 2 * (d // 6))], 1
    )
    parts = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    table = torch.cat(
        [
            parts[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            parts[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            parts[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(seq, 1, -1)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(b, seq, n, -1, 2))
    return torch.view_as_real(xc * table).flatten(3)


@settings(deadline=None)
@given(
    f=st.integers(1, 5),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    head_dim=st.sampled_from([6, 12, 24, 32, 128]),
    seed=st.integers(0, 2**16),
)
def test_real_rope_equals_complex_reference(f: int, h: int, w: int, head_dim: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, f * h * w, 3, head_dim, generator=gen, dtype=torch.float64)
    ref = _reference_rope(x, (f, h, w))
    cos64, sin64 = wan.rope_cos_sin(head_dim, f, h, w, dtype=torch.float64)
    torch.testing.assert_close(wan.apply_rope(x, cos64, sin64), ref, rtol=0, atol=1e-12)
    cos, sin = wan.rope_cos_sin(head_dim, f, h, w)
    assert cos.dtype == torch.float32
    out32 = wan.apply_rope(x.float(), cos, sin)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=0, atol=1e-5)


def test_rope_split_matches_wan() -> None:
    assert wan.rope_split(128) == (44, 42, 42)
    assert wan.rope_split(32) == (12, 10, 10)


def test_unpatchify_matches_original_einsum() -> None:
    f, h, w, c, patch = 2, 3, 4, 5, (1, 2, 2)
    x = torch.randn(2, f * h * w, math.prod(patch) * c)
    ours = wan.unpatchify(x, (f, h, w), patch, c)
    for i in range(2):
        u = x[i].view(f, h, w, *patch, c)
        ref = torch.einsum("fhwpqrc->cfphqwr", u).reshape(c, f * patch[0], h * patch[1], w * patch[2])
        assert torch.equal(ours[i], ref)


def test_sinusoid_is_cos_then_sin() -> None:
    t = torch.tensor([0.0, 500.0])
    emb = wan.sinusoidal_embedding(t, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(500 * freqs), torch.sin(500 * freqs)]))


# ------------------------------------------------------------------------------------------- capture


def _capture(model: wan.WanModel, inp: dict[str, Tensor]) -> tuple[list[torch.fx.GraphModule], Tensor]:
    """Compile with a backend that records graphs; returns the graphs and the compiled output."""
    torch._dynamo.reset()
    counters.clear()
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(**inp)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    return graphs, out


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "ti2v"])
def test_fullgraph_capture_tiny_real(model_type: str) -> None:
    cfg = wan.tiny_config(model_type)
    model = _perturbed(cfg)
    inp = wan.example_inputs(cfg, **SMALL_VIDEO)
    graphs, out = _capture(model, inp)
    assert len(graphs) == 1
    with torch.no_grad():
        torch.testing.assert_close(out, model(**inp), rtol=0, atol=0)
    # Every parameter of the model is read by the one graph (nothing hidden in a break or a leaf).
    placeholders = [n for n in graphs[0].graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(list(model.parameters())) + len(inp)


def _capture_meta_full_size(name: str, **overrides: Any) -> list[torch.fx.GraphModule]:
    """Capture ``name`` (with ``overrides``) on meta at 832x480, 81 frames (L = 32760 tokens)."""
    cfg = dataclasses.replace(wan.CONFIGS[name], **overrides)
    model = wan.build(cfg, device="meta", dtype=torch.bfloat16)
    inp = wan.example_inputs(cfg, device="meta", dtype=torch.bfloat16)
    graphs, out = _capture(model, inp)
    assert len(graphs) == 1
    assert out.is_meta and out.shape == (1, cfg.out_dim, 21, 60, 104)
    values = [n.meta.get("example_value") for n in graphs[0].graph.nodes if n.op == "call_function"]
    biggest = max(v.numel() for v in values if isinstance(v, Tensor))
    assert biggest == 32760 * cfg.ffn_dim  # the FFN hidden state
    placeholders = [n for n in graphs[0].graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(list(model.parameters())) + len(inp)
    return graphs


def test_fullgraph_capture_meta_1_3b_dims() -> None:
    # Full 1.3B widths and a full 480p video, 2 of the 30 blocks: capture cost is linear in blocks
    # (the slow tests below capture every block) and the full-size shapes are what is checked here.
    _capture_meta_full_size("wan2.1-t2v-1.3b", num_layers=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b"])
def test_fullgraph_capture_meta_full_model(name: str) -> None:
    _capture_meta_full_size(name)


@pytest.mark.slow
def test_fullgraph_capture_meta_ti2v_5b_per_token() -> None:
    model = wan.build("wan2.2-ti2v-5b", device="meta", dtype=torch.bfloat16)
    inp = wan.example_inputs("wan2.2-ti2v-5b", frames=121, height=704, width=1280, device="meta")
    graphs, out = _capture(model, inp)
    assert len(graphs) == 1 and out.shape == (1, 48, 31, 44, 80)
