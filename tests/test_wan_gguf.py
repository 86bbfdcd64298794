"""WAN from GGUF and fp8 files with the weights kept as stored (``fxswap.models.wan.load``).

The GGUF file is made the way users get theirs: a ComfyUI checkpoint converted by ComfyUI-GGUF's own
``tools/convert.py`` (vendored; ``FXSWAP_COMFYUI_GGUF`` overrides its path), its 5-D patch
embedding added back as its ``tools/fix_5d_tensors.py`` does, and the large tensors re-quantised
here with ``gguf.quants.quantize`` (the K types, which ``gguf`` cannot quantise, as random blocks
under small scales). The expected output is the same WAN built from ``gguf.quants.dequantize`` of
every tensor of that file (the oracle), run unswapped; the swapped, stored-weight model must equal it
bitwise (eager).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import fxswap  # noqa: E402
from fxswap.errors import CheckpointError  # noqa: E402
from fxswap.models import wan, wan_checkpoint  # noqa: E402
from fxswap.stored import stored_weights  # noqa: E402

GT = gguf.GGMLQuantizationType
VENDOR = Path(os.environ.get("FXSWAP_COMFYUI_GGUF", "/work/shared/vendor/ComfyUI-GGUF"))
CFG = wan.tiny_config("t2v", dim=256, ffn_dim=512, num_heads=2, freq_dim=256, text_dim=256, text_len=8)
F16_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,), "Q5_K": (0, 2), "Q3_K": (108,), "Q2_K": (80, 82)}
# 2-D weights re-quantised, in turn (rows of 256 for the K types, of 32 for the others).
QUANT_CYCLE = ("Q4_K", "Q8_0", "Q6_K", "Q4_0", "Q5_K", "Q5_1", "Q3_K", "Q4_1", "Q2_K", "Q5_0")


def _convert_module() -> Any:
    path = VENDOR / "tools" / "convert.py"
    if not path.is_file():
        pytest.skip(f"ComfyUI-GGUF's convert.py not found at {path} (set FXSWAP_COMFYUI_GGUF)")
    spec = importlib.util.spec_from_file_location("comfyui_gguf_convert", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _requantise(src: Path, fix: Path, dst: Path, seed: int = 0) -> None:
    """What llama-quantize and fix_5d_tensors.py do to the converter's BF16 file: quantise the large
    2-D tensors, keep the rest, add the 5-D tensor back in F32."""
    from safetensors.torch import load_file

    rng = np.random.default_rng(seed)
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(path=None, arch="wan")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    k = 0
    for t in reader.tensors:
        data, qtype = t.data, t.tensor_type
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if qtype == GT.BF16 and len(shape) == 2:
            name = QUANT_CYCLE[k % len(QUANT_CYCLE)]
            elems, size = gguf.GGML_QUANT_SIZES[GT[name]]
            if shape[1] % elems == 0:
                k += 1
                x = gguf.quants.dequantize(data, qtype)
                if name in F16_FIELDS:
                    blocks = rng.integers(0, 256, size=(x.size // elems, size), dtype=np.uint8)
                    for at in F16_FIELDS[name]:
                        s = rng.uniform(1e-4, 2e-3, len(blocks)).astype(np.float16)
                        blocks[:, at : at + 2] = s.view(np.uint8).reshape(-1, 2)
                    data = blocks.reshape(shape[0], -1)
                else:
                    data = gguf.quants.quantize(x, GT[name])
                qtype = GT[name]
        w.add_tensor(t.name, data, raw_dtype=qtype)
    for key, v in load_file(fix).items():
        w.add_tensor(key, v.float().numpy(), raw_dtype=GT.F32)
    w.write_header_to_file(path=dst)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    model = wan.build(CFG, dtype=torch.bfloat16)
    src = tmp / "wan_tiny_comfy.safetensors"
    wan_checkpoint.save(model, src, layout="comfyui")
    convert = _convert_module()
    cwd = os.getcwd()
    os.chdir(tmp)  # convert.py writes its 5-D fix file into the working directory
    try:
        bf16, _ = convert.convert_file(str(src), str(tmp / "wan-BF16.gguf"), interact=False)
    finally:
        os.chdir(cwd)
    fix = tmp / "fix_5d_tensors_wan.safetensors"
    assert fix.is_file(), "convert.py left the 5-D patch embedding out, as it does for WAN"
    out = tmp / "wan-tiny-mixed.gguf"
    _requantise(Path(bf16), fix, out)
    return out


def _min_budget(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """The smallest budget (GiB) of layerwise mode, as the planner reports it: every block swapped."""
    try:
        fxswap.compile(model, backend="eager", mode="layerwise", max_vram_gb=1e-6, reserve_mb=0)(**inputs)
    except fxswap.BudgetInfeasibleError as e:
        return e.min_vram_bytes / 2**30
    raise AssertionError("a budget of 1 KiB was accepted")


def _oracle_model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The same WAN, every tensor decoded by gguf.quants.dequantize (float32), rounded by torch."""
    ref = wan.build(CFG, dtype=dtype).eval()
    params = dict(ref.state_dict(keep_vars=True))
    with torch.no_grad():
        for t in gguf.GGUFReader(path).tensors:
            p = params[t.name]
            p.copy_(
                torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(p.shape)
            )
    return ref


def test_gguf_loads_stored_and_runs_swapped_bitwise_as_the_oracle_model(gguf_file: Path) -> None:
    reader = gguf.GGUFReader(gguf_file)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {"Q4_K", "Q8_0", "Q6_K", "Q4_0", "Q5_K", "Q2_K", "Q3_K"} <= set(types.values())
    model = wan.load(gguf_file, config=CFG).eval()
    kept = stored_weights(model)
    # every quantised tensor is kept as stored, its parameter on meta; nothing quantised is decoded
    quantised = {k for k, v in types.items() if v not in ("F32", "F16", "BF16")}
    assert quantised <= set(kept)
    for k, w in kept.items():
        assert w.qtype == types[k] and model.get_parameter(k).is_meta
        assert w.nbytes == next(int(t.n_bytes) for t in reader.tensors if t.name == k)
    ref = _oracle_model(gguf_file, torch.bfloat16)
    inputs = wan.example_inputs(CFG, frames=5, height=32, width=32, dtype=torch.bfloat16)
    with torch.no_grad():
        want = ref(**inputs)
        stored_total = sum(w.nbytes for w in kept.values())
        s = fxswap.compile(
            model, backend="eager", mode="layerwise", max_vram_gb=_min_budget(model, inputs), reserve_mb=0
        )
        got = s(**inputs)
        assert torch.equal(got, want)
        assert any(not u.resident for u in s.plan.units), "some units are swapped"
        # the plan counts the stored sizes: all weights, as the planner sees them, below the bf16 total
        bf16_total = sum(p.numel() * 2 for p in ref.parameters())
        assert s.plan.weight_bytes < bf16_total and stored_total < bf16_total / 2
        s.close()


def test_gguf_errors_name_the_file_the_tensor_and_the_fix(gguf_file: Path, tmp_path: Path) -> None:
    # another architecture
    other = tmp_path / "flux.gguf"
    w = gguf.GGUFWriter(path=None, arch="flux")
    w.add_tensor("x.weight", np.zeros((2, 32), np.float32), raw_dtype=GT.F32)
    w.write_header_to_file(path=other)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="general.architecture is 'flux', not 'wan'"):
        wan.load(other)
    # a config the file was not made from: the shape mismatch is named per tensor
    with pytest.raises(
        CheckpointError, match=r"shape mismatch.*`blocks\.0\.ffn\.0\.weight`: file \[512, 256\]"
    ):
        wan.load(gguf_file, config=wan.tiny_config("t2v", dim=256, ffn_dim=768, num_heads=2, freq_dim=256,
                                                   text_dim=256, text_len=8))  # fmt: skip
    # truncated
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size - 100])
    with pytest.raises(CheckpointError, match="runs past the end of the file.*download it again"):
        wan.load(cut, config=CFG)
    with pytest.raises(CheckpointError, match="device='cpu'"):
        wan.load(gguf_file, config=CFG, device="meta")


def test_fp8_scaled_file_keeps_its_storage_and_matches_the_float64_oracle(tmp_path: Path) -> None:
    from safetensors import safe_open

    torch.manual_seed(1)
    model = wan.build(CFG, dtype=torch.bfloat16)
    path = tmp_path / "wan_tiny_fp8_scaled.safetensors"
    wan_checkpoint.save(model, path, layout="comfyui", quantize="scaled_fp8")
    kept_model = wan.load(path, keep_stored=True).eval()
    kept = stored_weights(kept_model)
    assert kept and all(w.qtype == "fp8" and w.data.dtype == torch.float8_e4m3fn for w in kept.values())
    # the reference: each fp8 tensor times its scale in float64 (exact), rounded once to bf16
    ref = wan.build(kept_model.config, dtype=torch.bfloat16).eval()
    params = dict(ref.state_dict(keep_vars=True))
    prefix = wan_checkpoint.COMFYUI_PREFIX
    with safe_open(path, "pt") as f, torch.no_grad():
        keys = set(f.keys())
        for k, p in params.items():
            t = f.get_tensor(prefix + k)
            sk = prefix + k.removesuffix(".weight") + ".scale_weight"
            v = t.double() * f.get_tensor(sk).double() if sk in keys and k.endswith(".weight") else t.double()
            p.copy_(v.to(p.dtype) if t.dtype not in (torch.float8_e4m3fn,) else v.float().to(p.dtype))
    inputs = wan.example_inputs(CFG, frames=5, height=32, width=32, dtype=torch.bfloat16)
    with torch.no_grad():
        want = ref(**inputs)
        lo = _min_budget(kept_model, inputs)
        s = fxswap.compile(kept_model, backend="eager", mode="layerwise", max_vram_gb=lo, reserve_mb=0)
        assert torch.equal(s(**inputs), want)
        s.close()


def test_cli_plan_prices_a_gguf_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fxswap.cli import main

    small = ["--model", "wan2.1-t2v-1.3b", "--layers", "2", "--resolution", "256x256", "--frames", "5"]
    out = tmp_path / "q4k.json"
    # --device cpu: bytes as stored, without a CUDA allocator's rounding (passes.device_rules)
    args = ["plan", *small, "--max-vram-gb", "8", "--dtype", "q4_k_m", "--device", "cpu", "-o", str(out)]
    assert main(args) == 0
    assert "dtype Q4_K_M" in capsys.readouterr().out
    # expected by hand: the tensors ComfyUI-GGUF's converter quantises (2- to 4-D, more than 1,024
    # values, not .modulation) at Q4_K's 144 bytes per 256 values (gguf's own table), the rest bf16
    # (a resident the plan keeps decoded once counts its bf16 bytes on the device: 2 per value)
    model = wan.build("wan2.1-t2v-1.3b", device="meta", dtype=torch.bfloat16, num_layers=2)
    elems, size = gguf.GGML_QUANT_SIZES[GT.Q4_K]
    plan = fxswap.load_plan(out)
    decoded = set(plan.decoded_residents)
    want = 0
    for name, p in model.named_parameters():
        q = (
            p.dim() in (2, 3, 4)
            and p.numel() > 1024
            and "modulation" not in name
            and p.shape[-1] % elems == 0
        )
        assert q or name not in decoded, f"{name} is not stored, so it cannot be decoded once"
        want += p.numel() // elems * size if q and name not in decoded else p.numel() * 2
    assert plan.weight_bytes == want
    with pytest.raises(SystemExit):
        main(["plan", *small, "--dtype", "IQ4_XS"])
