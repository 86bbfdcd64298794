"""fxswap's WAN model against diffusers' WanTransformer3DModel, through fxswap's key mapping.

The diffusers model is built with random weights; its state dict goes through
``convert_state_dict(..., "diffusers", "original")`` (and, separately, through a diffusers-layout
safetensors file and ``load``), lands in fxswap's model, and both run the same inputs in fp32.
Tiny configs: head_dim 32 splits RoPE into (12, 10, 10) in both implementations (diffusers uses
h = w = 2*(d//6), t = d - h - w; fxswap ``rope_split`` is the same formula). diffusers' i2v path
hard-codes 512 text tokens (``encoder_hidden_states.shape[1] - 512``), so the Wan2.1 i2v config has
``text_len=512`` and its inputs CLIP's 257 image tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fxswap.models import wan
from fxswap.models.wan import load
from fxswap.models.wan_checkpoint import convert_state_dict, load_state_dict, save

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

TOL = 1e-5


def _diffusers_model(cfg: wan.WanConfig, seed: int) -> Any:
    torch.manual_seed(seed)
    model: Any = WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        image_dim=cfg.image_dim,
        added_kv_proj_dim=cfg.dim if cfg.image_dim is not None else None,
    )
    # Default init leaves biases/norm weights at 0/1; randomise everything so a mapping mix-up
    # (e.g. norm2 vs norm3, q vs k) cannot hide behind identical initial values.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def _inputs(cfg: wan.WanConfig, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.out_dim, 3, 8, 6, generator=g)  # 3 x 4 x 3 = 36 tokens, non-square grid
    out = {
        "x": x,
        "timestep": torch.tensor([637.0]),
        "context": torch.randn(1, cfg.text_len, cfg.text_dim, generator=g),
    }
    if cfg.y_dim:
        out["y"] = torch.randn(1, cfg.y_dim, 3, 8, 6, generator=g)
    if cfg.image_dim is not None:
        out["clip_fea"] = torch.randn(1, wan.CLIP_TOKENS, cfg.image_dim, generator=g)
    return out


def _run_diffusers(model: Any, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = inp["x"] if "y" not in inp else torch.cat([inp["x"], inp["y"]], dim=1)
    with torch.no_grad():
        out: torch.Tensor = model(
            hidden_states=hidden,
            timestep=inp["timestep"],
            encoder_hidden_states=inp["context"],
            encoder_hidden_states_image=inp.get("clip_fea"),
            return_dict=False,
        )[0]
    return out


# text_len is the context length the inputs use (fxswap checks it); the Wan2.1 i2v case needs
# diffusers' hard-coded 512.
CASES = {
    "t2v": wan.tiny_config("t2v", num_layers=2, text_len=24),
    "i2v-wan2.1-clip": wan.tiny_config("i2v", num_layers=2, text_len=512),
    "i2v-wan2.2-noclip": wan.tiny_config("i2v", num_layers=2, image_dim=None, text_len=24),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers_through_convert_state_dict(case: str) -> None:
    cfg = CASES[case]
    ref = _diffusers_model(cfg, seed=1)
    sd = convert_state_dict(ref.state_dict(), "diffusers", "original")
    model = wan.build(cfg).eval()
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    inp = _inputs(cfg, seed=2)
    expected = _run_diffusers(ref, inp)
    with torch.no_grad():
        got = model(**inp)
    assert got.shape == expected.shape == inp["x"].shape
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"{case}: max abs difference {diff:.3e} > {TOL}"
    # The outputs must depend on the weights at all (guards against comparing two constants).
    assert expected.abs().max().item() > 1e-2


@pytest.mark.parametrize("case", ["t2v", "i2v-wan2.1-clip"])
def test_diffusers_file_loads_and_matches(case: str, tmp_path: Path) -> None:
    """A diffusers-layout safetensors file (as diffusers itself writes it) loads through ``load``."""
    cfg = CASES[case]
    ref = _diffusers_model(cfg, seed=3)
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
    assert list(tmp_path.glob("*.safetensors.index.json")), "expected diffusers to write shards + index"
    _, info = load_state_dict(tmp_path, config=cfg)
    assert info.layout == "diffusers"
    model = load(tmp_path, config=cfg, dtype=torch.float32)
    inp = _inputs(cfg, seed=4)
    diff = (model(**inp).detach() - _run_diffusers(ref, inp)).abs().max().item()
    assert diff <= TOL, f"{case}: max abs difference {diff:.3e} > {TOL}"


def test_diffusers_config_json_supplies_heads(tmp_path: Path) -> None:
    """Without fxswap metadata, diffusers' config.json (num_attention_heads) gives the head count."""
    cfg = CASES["t2v"]
    ref = _diffusers_model(cfg, seed=5)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    _, info = load_state_dict(tmp_path)
    assert info.config is not None
    assert info.num_heads_source == "config.json"
    assert (info.config.num_heads, info.config.dim, info.config.ffn_dim) == (
        cfg.num_heads,
        cfg.dim,
        cfg.ffn_dim,
    )


def test_fxswap_to_diffusers_direction(tmp_path: Path) -> None:
    """fxswap weights saved in the diffusers layout load into diffusers and give the same output."""
    cfg = CASES["t2v"]
    torch.manual_seed(6)
    model = wan.build(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    path = tmp_path / "model.safetensors"
    save(model, path, layout="diffusers")
    ref = _diffusers_model(cfg, seed=0)
    from safetensors.torch import load_file

    missing, unexpected = ref.load_state_dict(load_file(str(path)), strict=True)
    assert not missing and not unexpected
    inp = _inputs(cfg, seed=7)
    with torch.no_grad():
        diff = (model(**inp) - _run_diffusers(ref, inp)).abs().max().item()
    assert diff <= TOL


def test_norm_added_q_is_ignored_like_diffusers_does(tmp_path: Path) -> None:
    """A diffusers i2v file with the stray ``attn2.norm_added_q`` keys loads, equal to diffusers' output."""
    from safetensors.torch import load_file, save_file

    cfg = CASES["i2v-wan2.1-clip"]
    ref = _diffusers_model(cfg, seed=8)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    (path,) = tmp_path.glob("*.safetensors")
    raw = load_file(str(path))
    raw.update({f"blocks.{i}.attn2.norm_added_q.weight": torch.ones(cfg.dim) for i in range(cfg.num_layers)})
    save_file(raw, str(path), metadata={"format": "pt"})
    # diffusers declares them ignorable (from_pretrained needs accelerate to get that far here, so the
    # declaration is checked and the reference keeps its own weights, which the file holds too).
    assert "norm_added_q" in WanTransformer3DModel._keys_to_ignore_on_load_unexpected
    theirs = ref
    _, info = load_state_dict(tmp_path, config=cfg)
    assert len(info.ignored_keys) == cfg.num_layers
    ours = load(tmp_path, config=cfg, dtype=torch.float32)
    inp = _inputs(cfg, seed=9)
    with torch.no_grad():
        diff = (ours(**inp) - _run_diffusers(theirs, inp)).abs().max().item()
    assert diff <= TOL
