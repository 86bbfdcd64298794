"""Checkpoint layouts, config detection, key mapping, laziness and every failure mode of the loader."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fxswap.errors import CheckpointError
from fxswap.models import wan
from fxswap.models.wan import load
from fxswap.models.wan_checkpoint import (
    COMFYUI_PREFIX,
    convert_state_dict,
    detect_config,
    detect_layout,
    load_into,
    load_state_dict,
    save,
)

FP8 = torch.float8_e4m3fn


def _model(model_type: str = "t2v", seed: int = 0, **overrides: Any) -> wan.WanModel:
    torch.manual_seed(seed)
    m = wan.build(wan.tiny_config(model_type, **overrides))
    with torch.no_grad():  # non-trivial biases and norm weights, so a mix-up shows
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return m


def _sd(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _meta_shapes(name_or_cfg: str | wan.WanConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in wan.build(name_or_cfg, device="meta").state_dict().items()}


_NAMED_SHAPES = {name: _meta_shapes(name) for name in wan.CONFIGS}

# (save kwargs, the layout detect_layout must report). A ComfyUI file with neither prefix nor scale
# keys has exactly the original key names: it is reported (and loads) as "original".
LAYOUT_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "original": ({"layout": "original"}, "original"),
    "original-bf16": ({"layout": "original", "dtype": torch.bfloat16}, "original"),
    "comfyui-prefix-fp16": ({"layout": "comfyui", "dtype": torch.float16}, "comfyui"),
    "comfyui-noprefix-bf16": (
        {"layout": "comfyui", "comfyui_prefix": "", "dtype": torch.bfloat16},
        "original",
    ),
    "comfyui-prefix-fp8": (
        {"layout": "comfyui", "quantize": "fp8_e4m3fn", "dtype": torch.bfloat16},
        "comfyui",
    ),
    "comfyui-noprefix-fp8": (
        {"layout": "comfyui", "comfyui_prefix": "", "quantize": "fp8_e4m3fn"},
        "original",
    ),
    "comfyui-prefix-scaled-fp8": ({"layout": "comfyui", "quantize": "scaled_fp8"}, "comfyui"),
    "comfyui-noprefix-scaled-fp8": (
        {"layout": "comfyui", "comfyui_prefix": "", "quantize": "scaled_fp8"},
        "comfyui",
    ),
    "diffusers": ({"layout": "diffusers"}, "diffusers"),
}


def _expected_from_file(files: list[Path], prefix: str) -> dict[str, torch.Tensor]:
    """Original-layout fp32 weights computed straight from the file(s), independently of the loader."""
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            raw.update(load_file(str(f)))
    out = {}
    for k, t in raw.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix) :]
        if k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input")):
            continue
        scale = raw.get(prefix + k[: -len("weight")] + "scale_weight") if k.endswith(".weight") else None
        out[k] = t.float() * scale.float() if scale is not None else t.float()
    return out


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_layout_round_trip(case: str, sharded: bool, model_type: str, tmp_path: Path) -> None:
    kwargs, layout = LAYOUT_CASES[case]
    m = _model(model_type)
    src = _sd(m)
    target = tmp_path / ("ckpt" if sharded else "ckpt.safetensors")
    files = save(m, target, max_shard_bytes=40_000 if sharded else None, **kwargs)
    if sharded:
        index = json.loads(files[-1].read_text())
        file_keys = list(index["weight_map"])
        assert len(files) > 3
        assert any(
            len({v for k, v in index["weight_map"].items() if f"blocks.{i}." in k}) > 1 for i in range(2)
        ), "expected at least one block to straddle two shards"
    else:
        file_keys = list(load_file(str(files[0])))
    assert detect_layout(file_keys) == layout

    sd, info = load_state_dict(target)
    assert info.layout == layout
    assert detect_layout(list(load_file(str(files[0])).keys()) if not sharded else sd.keys()) in (
        layout,
        "original",
    )
    assert info.config == m.config  # recovered from the fxswap_config metadata
    assert set(sd) == set(src)

    quantize = kwargs.get("quantize")
    stored_dtype = kwargs.get("dtype", torch.float32)
    prefix = kwargs.get("comfyui_prefix", COMFYUI_PREFIX) if kwargs["layout"] == "comfyui" else ""
    for k, t in src.items():
        linear_w = k.endswith(".weight") and t.dim() == 2
        want_dtype = FP8 if quantize and linear_w else stored_dtype
        assert sd[k].dtype == want_dtype, k
        base = t.to(stored_dtype)  # save() applies dtype= first, then fp8 quantisation
        if quantize == "scaled_fp8" and linear_w:
            scale = info.weight_scales[k]
            assert scale.item() == pytest.approx(base.abs().max().item() / 448.0, rel=1e-6)
            assert torch.equal(sd[k].view(torch.uint8), (base.float() / scale).to(FP8).view(torch.uint8)), k
        else:
            assert torch.equal(sd[k].float(), base.to(want_dtype).float()), (
                k
            )  # bitwise after the storage cast
    assert (info.quantization is not None) == (quantize is not None)

    loaded = load(target, dtype=torch.float32)
    expected = _expected_from_file(files, "" if kwargs["layout"] == "diffusers" else prefix)
    if kwargs["layout"] == "diffusers":
        expected = convert_state_dict(expected, "diffusers", "original")
    for k, t in loaded.state_dict().items():
        assert t.dtype == torch.float32
        assert torch.equal(t, expected[k]), k  # exact: fp8 dequant is stored.float() * scale
        if not quantize and stored_dtype == torch.float32:
            assert torch.equal(t, src[k]), k
    if not quantize and not sharded:  # the sharded weights were compared bitwise; one forward suffices
        inp = wan.example_inputs(m.config, frames=5, height=16, width=16)
        with torch.no_grad():
            ref = m.to(stored_dtype).float()(**inp)
            # Weights are bitwise equal (above); the forward may still round differently because
            # BLAS picks kernels by pointer alignment, and mapped tensors sit at file offsets.
            torch.testing.assert_close(loaded(**inp), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_turbowan_pth_linear_patch_embedding(model_type: str, tmp_path: Path) -> None:
    m = _model(model_type)
    src = _sd(m)
    path = tmp_path / "TurboWan-tiny.pth"
    save(m, path, layout="turbowan")
    raw = torch.load(path, weights_only=True)
    assert raw["patch_embedding.weight"].dim() == 2  # Linear-shaped, as TurboDiffusion stores it
    sd, info = load_state_dict(path, config=m.config)
    assert (info.layout, info.format, info.needs_attention_type) == ("turbowan", "pth", None)
    assert detect_layout({k: tuple(v.shape) for k, v in raw.items()}) == "turbowan"
    assert sd.shape("patch_embedding.weight") == tuple(src["patch_embedding.weight"].shape)
    loaded = load(path, config=m.config)
    for k, t in loaded.state_dict().items():
        assert torch.equal(t, src[k]), k
    # Without metadata and with head_dim != 128 the head count is unknowable: a clear error.
    with pytest.raises(CheckpointError, match="multiple of 128.*config="):
        load(path)


def test_turbowan_sla_keys_pick_sla_attention(tmp_path: Path) -> None:
    m = _model("t2v")
    sd = _sd(m)
    sd["patch_embedding.weight"] = sd["patch_embedding.weight"].reshape(
        sd["patch_embedding.weight"].shape[0], -1
    )
    head_dim = m.config.head_dim
    for i in range(m.config.num_layers):
        sd[f"blocks.{i}.self_attn.attn_op.local_attn.proj_l.weight"] = torch.zeros(head_dim, head_dim)
        sd[f"blocks.{i}.self_attn.attn_op.local_attn.proj_l.bias"] = torch.zeros(head_dim)
    path = tmp_path / "TurboWan-sla.pth"
    torch.save(sd, path)
    assert detect_layout(sd.keys()) == "turbowan"
    _, info = load_state_dict(path, config=m.config)
    assert info.needs_attention_type == "sla" and len(info.sla_keys) == 2 * m.config.num_layers
    # The keys pick SLA (tests/test_sla.py checks what the loaded model computes); SDPA is refused.
    assert load(path, config=m.config).config.attention_type == "sla"
    assert load(path, config=m.config, attention_type="sla").config.attention_type == "sla"
    with pytest.raises(CheckpointError, match="attention_type='sdpa' disagrees.*SLA key"):
        load(path, config=m.config, attention_type="sdpa")


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    path = tmp_path / "evil.pth"
    torch.save({"patch_embedding.weight": torch.zeros(2, 2), "x": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth.*refused"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="refused"):
        load(path)
    assert not marker.exists()
    # Prove the payload is live: an unsafe load does run it (so the check above can fail).
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


def test_bare_pickle_and_truncated_pth_are_refused(tmp_path: Path) -> None:
    bare = tmp_path / "bare.pth"
    bare.write_bytes(pickle.dumps({"head.modulation": [1.0]}))
    with pytest.raises(CheckpointError, match=r"bare\.pth.*refused"):
        load_state_dict(bare)
    m = _model()
    good = tmp_path / "good.pth"
    save(m, good, layout="turbowan")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth"):
        load_state_dict(cut, config=m.config)


@pytest.mark.parametrize("name", sorted(wan.CONFIGS))
def test_detect_config_of_named_models(name: str) -> None:
    cfg = wan.CONFIGS[name]
    got = detect_config(_meta_shapes(name))
    meta_sd = wan.build(name, device="meta").state_dict()  # tensors (not shapes) work too
    assert detect_config(meta_sd) == got and detect_layout(meta_sd) == "original"
    if name == "wan2.2-t2v-a14b":
        # Each A14B T2V expert has exactly the Wan2.1 T2V-14B architecture; shapes cannot tell them apart.
        assert got == wan.CONFIGS["wan2.1-t2v-14b"]
    else:
        assert got == cfg
    # In the diffusers layout too, after conversion; and TurboWan's Linear patch embedding.
    shapes = convert_state_dict(_meta_shapes(name), "original", "diffusers")
    back = convert_state_dict(shapes, "diffusers", "original")
    assert detect_config(back) == got
    pe = back["patch_embedding.weight"]
    back["patch_embedding.weight"] = (pe[0], pe[1] * 4)
    assert detect_config(back) == got


def test_detect_config_heads_and_hints(tmp_path: Path) -> None:
    # head_dim 128 without metadata: heads = dim // 128, fields the shapes cannot show get defaults.
    cfg = wan.tiny_config("t2v", dim=256, num_heads=2, ffn_dim=96, text_dim=24, freq_dim=16, num_layers=3)
    got = detect_config(_meta_shapes(cfg))
    assert (got.dim, got.num_heads, got.ffn_dim, got.num_layers, got.text_dim, got.freq_dim) == (
        256,
        2,
        96,
        3,
        24,
        16,
    )
    assert got.name == "custom"
    # Original Wan config.json next to the weights supplies the head count.
    cfg8 = wan.tiny_config("t2v")  # head_dim 32
    m = _model("t2v")
    folder = tmp_path / "repo"
    folder.mkdir()
    save(_sd(m), folder / "diffusion_pytorch_model.safetensors")  # a state dict: no fxswap metadata
    with pytest.raises(CheckpointError, match="multiple of 128"):
        load(folder)
    (folder / "config.json").write_text(
        json.dumps({"_class_name": "WanModel", "dim": 64, "num_heads": 2, "text_len": 8, "model_type": "t2v"})
    )
    sd, info = load_state_dict(folder)
    assert info.num_heads_source == "config.json"
    assert info.config is not None and info.config.num_heads == cfg8.num_heads and info.config.text_len == 8
    # Stale metadata (config disagrees with the tensors) is an error, not silently trusted.
    stale = tmp_path / "stale.safetensors"
    save(_sd(m), stale, config=wan.tiny_config("t2v", ffn_dim=256))
    _, info = load_state_dict(stale)
    assert info.config is None and "ffn_dim" in (info.config_error or "")
    with pytest.raises(CheckpointError, match="ffn_dim"):
        load(stale)
    ti2v = detect_config(_meta_shapes(wan.tiny_config("ti2v", in_dim=48, out_dim=48)), hints={"num_heads": 2})
    assert (ti2v.model_type, ti2v.per_token_timesteps, ti2v.num_heads) == ("ti2v", True, 2)
    assert (
        detect_config(_meta_shapes(wan.tiny_config("i2v", image_dim=None, dim=128, num_heads=1))).model_type
        == "i2v"
    )


@pytest.mark.parametrize("name", sorted(wan.CONFIGS))
def test_convert_state_dict_round_trip_is_identity(name: str) -> None:
    shapes = _meta_shapes(name)
    diff = convert_state_dict(shapes, "original", "diffusers")
    assert len(diff) == len(shapes) and diff.keys().isdisjoint({"head.modulation", "blocks.0.modulation"})
    assert "blocks.0.norm2.weight" in diff and "blocks.0.norm3.weight" not in diff  # the norm swap
    assert list(convert_state_dict(diff, "diffusers", "original").items()) == list(shapes.items())
    assert detect_layout(diff) == "diffusers" and detect_layout(shapes) == "original"


@given(
    name=st.sampled_from(sorted(wan.CONFIGS)),
    picks=st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=40),
    block=st.integers(min_value=0, max_value=999),
)
def test_convert_state_dict_property(name: str, picks: list[int], block: int) -> None:
    """Any subset of keys, with any block index, maps to distinct keys and back to itself."""
    keys = list(_NAMED_SHAPES[name])
    chosen = {re.sub(r"^blocks\.\d+\.", f"blocks.{block}.", keys[i % len(keys)]): i for i in picks}
    there = convert_state_dict(chosen, "original", "diffusers")
    assert len(there) == len(chosen)
    assert convert_state_dict(there, "diffusers", "original") == chosen


def test_convert_state_dict_rejects_unknown_keys() -> None:
    with pytest.raises(CheckpointError, match="blocks.0.self_attn.attn_op"):
        convert_state_dict(
            {"blocks.0.self_attn.attn_op.local_attn.proj_l.weight": 0}, "original", "diffusers"
        )
    with pytest.raises(CheckpointError, match="src="):
        convert_state_dict({}, "comfyui", "original")  # type: ignore[arg-type]


def test_missing_unexpected_and_shape_errors(tmp_path: Path) -> None:
    m = _model("t2v")
    sd = _sd(m)
    many_missing = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    p = tmp_path / "missing.safetensors"
    save(many_missing, p, config=m.config)
    with pytest.raises(CheckpointError, match=r"missing key\(s\): blocks\.1\..*and \d+ more") as e:
        load(p, config=m.config)
    assert str(p) in str(e.value)

    extra = dict(sd, **{"blocks.0.extra.weight": torch.zeros(3), "foo": torch.zeros(1)})
    p = tmp_path / "extra.safetensors"
    save(extra, p, config=m.config)
    with pytest.raises(CheckpointError, match=r"2 unexpected key\(s\): blocks\.0\.extra\.weight, foo"):
        load(p, config=m.config)
    lenient = load(p, config=m.config, strict=False)
    assert torch.equal(lenient.state_dict()["head.modulation"], sd["head.modulation"])

    with pytest.raises(
        CheckpointError, match=r"blocks\.0\.ffn\.0\.weight: checkpoint \[128, 64\] vs model \[256, 64\]"
    ):
        load(tmp_path / "extra.safetensors", config=wan.tiny_config("t2v", ffn_dim=256), strict=False)


def test_unknown_layout_lists_layouts_and_keys(tmp_path: Path) -> None:
    p = tmp_path / "vae.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(2), "decoder.conv_out.bias": torch.zeros(2)}, str(p))
    with pytest.raises(
        CheckpointError, match=r"original, comfyui, diffusers, turbowan.*decoder\.conv_out\.bias"
    ):
        load(p)


def test_truncated_safetensors_names_the_file(tmp_path: Path) -> None:
    m = _model()
    folder = tmp_path / "shards"
    files = save(m, folder, max_shard_bytes=40_000)
    victim = files[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{victim.name}.*truncated"):
        load(folder)
    single = tmp_path / "one.safetensors"
    save(m, single)
    single.write_bytes(single.read_bytes()[:6])
    with pytest.raises(CheckpointError, match=r"one\.safetensors"):
        load_state_dict(single)


def test_index_pointing_at_missing_shard(tmp_path: Path) -> None:
    files = save(_model(), tmp_path / "s", max_shard_bytes=40_000)
    files[0].unlink()
    with pytest.raises(CheckpointError, match=f"{files[0].name}.*download"):
        load(tmp_path / "s")


def test_dtype_errors(tmp_path: Path) -> None:
    m = _model()
    p = tmp_path / "fp8.safetensors"
    save(m, p, layout="comfyui", quantize="fp8_e4m3fn")
    for bad in (torch.int8, torch.int32, FP8):
        with pytest.raises(CheckpointError, match=r"dtype=torch\.\w+ cannot be a compute dtype"):
            load(p, dtype=bad)
    assert load(p).patch_embedding.weight.dtype == torch.bfloat16  # fp8 files default to bf16 compute
    # Integer-stored weights (TurboWan -quant style) cannot become a float compute dtype.
    sd = _sd(m)
    sd["blocks.0.self_attn.q.weight"] = torch.zeros_like(sd["blocks.0.self_attn.q.weight"], dtype=torch.int8)
    q = tmp_path / "int8.safetensors"
    save(sd, q, config=m.config)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.self_attn\.q\.weight \(torch\.int8\)"):
        load(q, dtype=torch.float32)


def test_comfyui_checkpoint_extras(tmp_path: Path) -> None:
    """Full ComfyUI checkpoints: VAE/text keys without the prefix are ignored; scale_input is noted."""
    m = _model()
    files = save(m, tmp_path / "c.safetensors", layout="comfyui", quantize="scaled_fp8")
    raw = load_file(str(files[0]))
    raw["first_stage_model.decoder.conv.weight"] = torch.zeros(3)
    raw[COMFYUI_PREFIX + "blocks.0.self_attn.q.scale_input"] = torch.tensor(1.0)
    save_file(
        raw,
        str(files[0]),
        metadata={"fxswap_config": json.dumps(m.config.__dict__ | {"patch_size": [1, 2, 2]})},
    )
    sd, info = load_state_dict(files[0])
    assert info.ignored_keys == ["first_stage_model.decoder.conv.weight"]
    assert any("scale_input" in n for n in info.notes)
    assert info.quantization == "scaled_fp8" and len(info.weight_scales) > 0
    load(files[0])


def test_load_into_is_all_or_nothing(tmp_path: Path) -> None:
    src = _model(seed=1)
    target = _model(seed=2)
    before = _sd(target)
    sd = _sd(src)
    sd["blocks.1.ffn.2.weight"] = torch.zeros(5, 5)  # the very last block is wrong
    bad = tmp_path / "bad.safetensors"
    save(sd, bad)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_into(target, bad)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified by a failed load"
    good = tmp_path / "good.safetensors"
    save(src, good, dtype=torch.bfloat16)
    load_into(target, good)
    for k, v in target.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, src.state_dict()[k].to(torch.bfloat16).float()), k


def _mapping_of(ptr: int) -> str | None:
    """The file backing the address ``ptr`` in this process, from /proc/self/maps."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 else ""
    return None


def _rss_anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("RssAnon not in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc to see mappings")
def test_tensors_are_memory_mapped_not_copied(tmp_path: Path) -> None:
    # A ~320 MB fp32 model: dim 2048, 1 block (head_dim 128, so detection needs no hint).
    cfg = wan.tiny_config("t2v", dim=2048, num_heads=16, ffn_dim=4096, num_layers=1, text_dim=64, freq_dim=32)
    m = wan.build(cfg, device="meta")
    sd = {k: torch.full(v.shape, 0.5) for k, v in m.state_dict().items()}
    path = tmp_path / "big.safetensors"
    save(sd, path, config=cfg)
    del sd
    size_mb = path.stat().st_size / 2**20
    assert size_mb > 100
    anon0 = _rss_anon_kb()
    lazy, _ = load_state_dict(path)
    w = lazy["blocks.0.ffn.0.weight"]
    assert _mapping_of(w.data_ptr()) == str(path)  # a view of the file mapping, not a heap copy
    model = load(path)  # same dtype on CPU: parameters stay views of the mapping
    assert _mapping_of(model.state_dict()["blocks.0.ffn.0.weight"].data_ptr()) == str(path)
    with torch.no_grad():
        total = sum(float(p.sum()) for p in model.parameters())  # touch every page
    assert total > 0
    grown_mb = (_rss_anon_kb() - anon0) / 1024
    assert grown_mb < 0.25 * size_mb, f"anonymous memory grew {grown_mb:.1f} MB for a {size_mb:.0f} MB file"


def test_diffusers_norm_added_q_is_ignored_with_a_note(tmp_path: Path) -> None:
    m = _model("i2v")
    files = save(m, tmp_path / "d.safetensors", layout="diffusers")
    raw = load_file(str(files[0]))
    extra = [f"blocks.{i}.attn2.norm_added_q.weight" for i in range(m.config.num_layers)]
    raw.update({k: torch.ones(m.config.dim) for k in extra})
    save_file(raw, str(files[0]), metadata={"fxswap_config": json.dumps(_config_dict(m.config))})
    sd, info = load_state_dict(files[0])
    assert info.layout == "diffusers" and sorted(info.ignored_keys) == sorted(extra)
    assert any("norm_added_q" in n and "diffusers ignores" in n for n in info.notes)
    assert not any("norm_added_q" in k for k in sd)
    loaded = load(files[0], dtype=torch.float32)  # strict: the ignored keys are not "unexpected"
    for k, t in loaded.state_dict().items():
        assert torch.equal(t, m.state_dict()[k]), k
    # The pure key mapping has no place for them; its error says what they are.
    with pytest.raises(CheckpointError, match="norm_added_q.*diffusers ignores them"):
        convert_state_dict(raw, "diffusers", "original")


def _config_dict(cfg: wan.WanConfig) -> dict[str, Any]:
    return dict(cfg.__dict__, patch_size=list(cfg.patch_size))


COMFY_QUANT_CASES = {
    "metadata-only": (True, False, r"metadata '_quantization_metadata'.*layer formats: float8_e4m3fn"),
    "tensors-only": (False, True, r"per-layer quantisation tensors such as '.*comfy_quant'"),
    "both": (True, True, r"'_quantization_metadata' and per-layer.*bf16/fp16 file"),
}


@pytest.mark.parametrize("case", sorted(COMFY_QUANT_CASES))
def test_comfyui_quantization_metadata_is_refused_not_misread(case: str, tmp_path: Path) -> None:
    with_metadata, with_tensors, needle = COMFY_QUANT_CASES[case]
    m = _model()
    raw = {COMFYUI_PREFIX + k: v for k, v in _sd(m).items()}
    layer = COMFYUI_PREFIX + "blocks.0.self_attn.q"
    raw[layer + ".weight"] = raw[layer + ".weight"].to(FP8)
    metadata = {"fxswap_config": json.dumps(_config_dict(m.config))}
    if with_metadata:
        metadata["_quantization_metadata"] = json.dumps(
            {"format_version": "1.0", "layers": {layer: {"format": "float8_e4m3fn"}}}
        )
    if with_tensors:
        raw[layer + ".weight_scale"] = torch.tensor(0.01)
        raw[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    path = tmp_path / "new-comfy.safetensors"
    save_file(raw, str(path), metadata=metadata)
    target = _model(seed=3)
    before = _sd(target)
    for attempt in (lambda: load_state_dict(path), lambda: load(path), lambda: load_into(target, path)):
        with pytest.raises(CheckpointError, match=needle):
            attempt()
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_config_may_be_a_name(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config='wan2\.1-t2v-13b'.*wan2\.1-t2v-14b"):
        load_state_dict(tmp_path, config="wan2.1-t2v-13b")
    m = _model()
    save(_sd(m), tmp_path / "m.safetensors")  # a tiny file cannot match a named config's shapes
    for loader in (load, wan.load):  # wan.load is the public name of the same loader
        with pytest.raises(CheckpointError, match=r"shape mismatch.*pass the config it was trained with"):
            loader(tmp_path / "m.safetensors", config="wan2.1-t2v-1.3b")


def _write_bad(kind: str, src: wan.WanModel, path: Path) -> Path:
    sd = _sd(src)
    if kind == "truncated":
        save(src, path)
        path.write_bytes(path.read_bytes()[:-64])
        return path
    if kind == "unknown-layout":
        save_file({"encoder.conv1.weight": torch.zeros(2)}, str(path))
        return path
    if kind == "missing":
        del sd["blocks.1.ffn.2.bias"]
    elif kind == "unexpected":
        sd["blocks.1.ffn.9.weight"] = torch.zeros(2)
    elif kind == "shape":
        sd["head.head.weight"] = torch.zeros(3, src.config.dim)
    elif kind == "int8":
        sd["blocks.1.ffn.2.weight"] = torch.zeros_like(sd["blocks.1.ffn.2.weight"], dtype=torch.int8)
    save(sd, path, config=src.config)
    return path


BAD_FILES = {
    "truncated": r"bad\.safetensors.*truncated",
    "unknown-layout": r"not a WAN transformer in any known layout",
    "missing": r"1 missing key\(s\): blocks\.1\.ffn\.2\.bias",
    "unexpected": r"1 unexpected key\(s\): blocks\.1\.ffn\.9\.weight.*strict=False",
    "shape": r"head\.head\.weight: checkpoint \[3, 64\] vs model \[16, 64\]",
    "int8": r"blocks\.1\.ffn\.2\.weight \(torch\.int8\).*not supported",
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_are_clear_errors_and_leave_the_target_unchanged(kind: str, tmp_path: Path) -> None:
    path = _write_bad(kind, _model(seed=1), tmp_path / "bad.safetensors")
    target = _model(seed=2)
    before = _sd(target)
    with pytest.raises(CheckpointError, match=BAD_FILES[kind]):
        load_into(target, path)
    with pytest.raises(CheckpointError, match=BAD_FILES[kind]):
        load(path, config=target.config)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified by a failed load ({kind})"
