"""SLA (sparse-linear attention, TurboWan): reference, Triton kernel, model, checkpoints, planning.

Expected values come from code that shares nothing with ``fxswap.models.sla``: SDPA for dense
attention, float64 per-block loops for the block selection and both branches, the unswapped model
for fxswap.compile, and a state dict written here in TurboDiffusion's layout. The Triton kernel runs
through Triton's CPU interpreter in a child process (``TRITON_INTERPRET=1`` must be set before
Triton is imported), and on CUDA in the ``gpu`` test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fxswap.bench.costmodel import wan_block_flops
from fxswap.compiler import compile as fx_compile
from fxswap.errors import BudgetInfeasibleError
from fxswap.models import sla, wan
from fxswap.models.wan_checkpoint import CheckpointError
from fxswap.runtime import LateCopyBackend
from tests.triton_env import triton_installed

ROOT = Path(__file__).resolve().parents[1]
MODES = ("layerwise", "chunkwise", "adaptive")
COMMON: dict[str, Any] = dict(reserve_mb=0, block_size_mb=0.004)


def _op_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor, bq: int, bk: int
) -> tuple[Any, ...]:
    """The fused op's arguments, as ``sla.sla_attention`` builds them."""
    s, z = sla.kv_block_sums(sla.feature_map(k), v, bk)
    return (q, k, v, sla.feature_map(q), s, z, lut, bq, bk)


def _qkv(b: int, h: int, length: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, length, d, generator=g) for _ in range(3))


# ------------------------------------------------------------------------------- brute force (float64)
def _brute_selection(q: torch.Tensor, k: torch.Tensor, kept: int, bq: int, bk: int) -> list[list[set[int]]]:
    """Per (batch*head, query block): the set of the ``kept`` best key blocks, by loops in float64."""
    b, h, length, _ = q.shape
    out = []
    for n in range(b * h):
        qq, kk = q.reshape(b * h, length, -1)[n].double(), k.reshape(b * h, length, -1)[n].double()
        ks = kk - kk.mean(dim=0)
        pq = [qq[s : s + bq].mean(dim=0) for s in range(0, length, bq)]
        pk = [ks[s : s + bk].mean(dim=0) for s in range(0, length, bk)]
        rows = []
        for a in pq:
            scores = [float(a @ c) for c in pk]
            rows.append(set(sorted(range(len(pk)), key=lambda j: -scores[j])[:kept]))
        out.append(rows)
    return out


def _brute_sla(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor, bq: int, bk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_s, o_l) by definition: per query block, softmax over the listed blocks' keys, and linear
    attention (softmax feature map) over every other key."""
    b, h, length, d = q.shape
    o_s = torch.zeros(b, h, length, v.shape[-1], dtype=torch.float64)
    o_l = torch.zeros_like(o_s)
    for bi in range(b):
        for hi in range(h):
            qq, kk, vv = (t[bi, hi].double() for t in (q, k, v))
            for m, start in enumerate(range(0, length, bq)):
                rows = slice(start, min(length, start + bq))
                chosen = set(lut[bi, hi, m].tolist())
                keys = [t for t in range(length) if t // bk in chosen]
                rest = [t for t in range(length) if t // bk not in chosen]
                p = torch.softmax(qq[rows] @ kk[keys].T / math.sqrt(d), dim=-1)
                o_s[bi, hi, rows] = p @ vv[keys]
                if rest:
                    fq, fk = torch.softmax(qq[rows], dim=-1), torch.softmax(kk[rest], dim=-1)
                    o_l[bi, hi, rows] = (fq @ (fk.T @ vv[rest])) / (fq @ fk.sum(dim=0))[:, None]
    return o_s, o_l


# ---------------------------------------------------------------------------------------- reference
def test_dense_when_every_block_is_kept_and_proj_l_is_zero() -> None:
    # L=100 is not a multiple of either block size: partial last blocks on both sides.
    q, k, v = _qkv(2, 3, 100, 32)
    attn = sla.SparseLinearAttention(32, topk=1.0, block_q=32, block_k=16)
    assert torch.count_nonzero(attn.proj_l.weight) == 0 and torch.count_nonzero(attn.proj_l.bias) == 0
    with torch.no_grad():
        err = (attn(q, k, v) - F.scaled_dot_product_attention(q, k, v)).abs().max().item()
    assert err <= 1e-5, err


@pytest.mark.parametrize(
    ("blocks", "topk", "kept"),
    [(10, 0.3, 3), (20, 0.1, 2), (100, 0.29, 29), (7, 0.5, 3), (5, 0.01, 1), (8, 1.0, 8), (512, 0.1, 51)],
)
def test_kept_blocks_is_the_requested_fraction(blocks: int, topk: float, kept: int) -> None:
    assert sla.kept_blocks(blocks, topk) == kept


@pytest.mark.parametrize(
    ("length", "bq", "bk", "topk"), [(160, 32, 16, 0.3), (100, 16, 8, 0.25), (64, 64, 8, 0.5)]
)
def test_block_selection_keeps_exactly_the_best_fraction(length: int, bq: int, bk: int, topk: float) -> None:
    q, k, _ = _qkv(2, 2, length, 16, seed=1)
    lut = sla.select_blocks(q, k, topk, bq, bk)
    nk, mq = -(-length // bk), -(-length // bq)
    kept = math.floor(topk * nk + 1e-9)
    assert lut.shape == (2, 2, mq, kept) and lut.dtype == torch.int64
    expected = _brute_selection(q, k, kept, bq, bk)
    for n, rows in enumerate(lut.reshape(4, mq, kept).tolist()):
        for m, row in enumerate(rows):
            assert len(set(row)) == kept, "a block was selected twice"
            assert set(row) == expected[n][m], (n, m)


@pytest.mark.parametrize("topk", [0.25, 0.5, 1.0])
def test_reference_matches_the_definition(topk: float) -> None:
    q, k, v = _qkv(1, 2, 72, 16, seed=2)
    lut = sla.select_blocks(q, k, topk, 16, 8)
    o_s, o_l = sla.sparse_linear_reference(*_op_args(q, k, v, lut, 16, 8))
    want_s, want_l = _brute_sla(q, k, v, lut, 16, 8)
    assert (o_s.double() - want_s).abs().max() <= 1e-5
    assert (o_l.double() - want_l).abs().max() <= 1e-5
    if topk == 1.0:
        assert torch.count_nonzero(o_l) == 0


def test_proj_l_adds_the_projected_linear_branch() -> None:
    q, k, v = _qkv(1, 2, 64, 16, seed=3)
    attn = sla.SparseLinearAttention(16, topk=0.25, block_q=16, block_k=16)
    torch.manual_seed(0)
    with torch.no_grad():
        attn.proj_l.weight.normal_()
        attn.proj_l.bias.normal_()
        out = attn(q, k, v)
    lut = sla.select_blocks(q, k, 0.25, 16, 16)
    want_s, want_l = _brute_sla(q, k, v, lut, 16, 16)
    want = want_s + want_l @ attn.proj_l.weight.double().T + attn.proj_l.bias.double()
    assert (out.double() - want).abs().max() <= 1e-4


def test_reference_and_model_capture_with_fullgraph() -> None:
    q, k, v = _qkv(1, 2, 40, 16)
    lut = sla.select_blocks(q, k, 0.5, 16, 8)
    args = _op_args(q, k, v, lut, 16, 8)
    compiled = torch.compile(sla.sparse_linear_reference, fullgraph=True, backend="eager")
    for got, want in zip(compiled(*args), sla.sparse_linear_reference(*args), strict=True):
        assert torch.equal(got, want)
    cfg = wan.tiny_config(attention_type="sla", sla_topk=0.5, sla_block_q=8, sla_block_k=4)
    m = wan.build(cfg).eval()
    kw = wan.example_inputs(cfg, frames=5, height=64, width=64)
    with torch.no_grad():
        assert torch.equal(torch.compile(m, fullgraph=True, backend="eager")(**kw), m(**kw))


def test_bad_sla_arguments_are_named() -> None:
    for bad in (0.0, 1.5, -0.1, "0.1", True):
        with pytest.raises(ValueError, match="sla_topk"):
            wan.build(wan.tiny_config(), attention_type="sla", sla_topk=bad)
    with pytest.raises(ValueError, match="sla_block_k"):
        wan.tiny_config(attention_type="sla", sla_block_k=0)
    q, k, v = _qkv(1, 1, 16, 8)
    with pytest.raises(ValueError, match="lut"):
        s, z = sla.kv_block_sums(k, v, 16)
        sla.sparse_linear(q, k, v, q, s, z, torch.zeros(1, 1, 1, 1, dtype=torch.int32), 16, 16)
    with pytest.raises(ValueError, match="kv_block_sums"):
        sla.sparse_linear(q, k, v, q, s[:, :, :0], z, sla.select_blocks(q, k, 1.0, 16, 16), 16, 16)


# ------------------------------------------------------------------------------------------- model
def _perturbed(cfg: wan.WanConfig, seed: int = 0) -> wan.WanModel:
    torch.manual_seed(seed)
    m = wan.build(cfg).eval().requires_grad_(False)
    for p in m.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    return m


SLA_CFG = wan.tiny_config(attention_type="sla", sla_topk=0.5, sla_block_q=8, sla_block_k=4)


def test_sla_model_with_all_blocks_and_zero_proj_l_is_the_dense_model() -> None:
    dense = _perturbed(wan.tiny_config())
    cfg = wan.tiny_config(attention_type="sla", sla_topk=1.0, sla_block_q=8, sla_block_k=4)
    model = wan.build(cfg).eval()
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert all("proj_l" in k for k in missing) and len(missing) == 4 and not unexpected
    # Only self-attention is SLA: cross-attention keeps SDPA (TurboDiffusion's replace_attention).
    assert all(b.cross_attn.attn_fn is wan.ATTENTION_TYPES["sdpa"] for b in model.blocks)
    kw = wan.example_inputs(model.config, frames=5, height=64, width=64)
    with torch.no_grad():
        err = (model(**kw) - dense(**kw)).abs().max().item()
    assert err <= 1e-5, err


def _min_budget(model: torch.nn.Module, kw: dict[str, Any], mode: str, backend: str = "eager") -> int:
    with pytest.raises(BudgetInfeasibleError) as ei:
        fx_compile(model, mode=mode, max_vram_gb=1e-9, backend=backend, **COMMON)(**kw)
    return ei.value.min_vram_bytes


@pytest.mark.parametrize("mode", MODES)
def test_fxswap_compile_of_an_sla_model_is_exact(mode: str) -> None:
    model = _perturbed(SLA_CFG)
    kw = wan.example_inputs(SLA_CFG, frames=5, height=64, width=64)
    with torch.no_grad():
        ref = model(**kw)
    lo = _min_budget(model, kw, mode)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    swapped = []
    for budget in (lo, (2 * lo + weights) // 2, 10 * lo + weights):
        sm = fx_compile(
            model, mode=mode, max_vram_gb=budget / 2**30, backend="eager",
            transfer_backend=LateCopyBackend(0.0005), **COMMON,
        )  # fmt: skip
        assert torch.equal(sm(**kw), ref), f"{mode} at {budget} bytes: not bitwise equal"
        plan = sm.plan
        assert plan is not None and plan.peak_bytes <= budget
        units = [u for u in plan.units if not u.resident]
        swapped.append(sorted(w for u in units for w in u.params))
    assert any("proj_l" in w for w in swapped[0]), "proj_l must travel with its block"
    assert swapped[-1] == []


@pytest.mark.slow
def test_fxswap_inductor_matches_torch_compile_on_an_sla_model() -> None:
    model = _perturbed(SLA_CFG)
    kw = wan.example_inputs(SLA_CFG, frames=5, height=48, width=80)  # 30 tokens: partial blocks
    # Inductor's own minimum (its program's measured peak): the FX model's can be a little lower
    # (254,004 against 255,540 bytes here), and which one a run sees depended on the tests before it.
    lo = _min_budget(model, kw, "adaptive", backend="inductor")
    sm = fx_compile(model, mode="adaptive", max_vram_gb=lo / 2**30, backend="inductor", **COMMON)
    out = sm(**kw)
    ref = torch.compile(model)(**kw)
    # Same tolerance as tests/test_compile.py's WAN case (observed here: 7e-7, a few fp32 ulps).
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert sm.plan is not None and sum(not u.resident for u in sm.plan.units) > 0


def test_capture_prices_sla_like_its_closed_form() -> None:
    from fxswap.capture import trace

    cfg = wan.tiny_config(attention_type="sla", sla_topk=0.25, sla_block_q=8, sla_block_k=4, num_layers=1)
    net = wan.build(cfg, device="meta")
    kw = wan.example_inputs(cfg, frames=5, height=64, width=64, device="meta")
    ir = trace(net, **kw).ir
    counted = sum(op.flops for op in ir.ops if op.module.startswith("blocks.0.self_attn.attn_op"))
    tokens = 2 * 4 * 4
    assert counted == sla.attention_flops(tokens, cfg.dim, cfg.head_dim, 0.25, 8, 4)
    # The sparse branch by hand: 32 queries x (2 of 8 kept blocks x 4 keys) x (QK^T + PV) x 2 heads.
    assert sla.attention_flops(tokens, cfg.dim, cfg.head_dim, 0.25, 8, 4) >= 2 * 32 * 8 * (32 + 32) * 2
    # WAN 1.3B at 480p (L=32760): SLA at 0.1 is about a tenth of the dense attention core.
    dense = wan_block_flops(1536, 8960, 32760)
    sparse = wan_block_flops(1536, 8960, 32760, sla_topk=0.1)
    core = 4 * 32760**2 * 1536
    assert 0.09 < (sparse - (dense - core)) / core < 0.12


def test_fxswap_plan_cli_prices_a_turbowan_model(capsys: pytest.CaptureFixture[str]) -> None:
    from fxswap.cli import main

    small = ["--layers", "2", "--resolution", "256x256", "--frames", "5", "--max-vram-gb", "2"]
    assert main(["plan", "--model", "turbowan2.1-t2v-1.3b", *small]) == 0
    assert "predicted peak" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- checkpoints
def test_detected_turbowan_architecture_gets_its_name() -> None:
    from fxswap.models.wan_checkpoint import detect_config

    for name, turbo in wan.TURBOWAN_CONFIGS.items():
        shapes = {k: tuple(v.shape) for k, v in wan.build(name, device="meta").state_dict().items()}
        assert wan.turbowan_config(detect_config(shapes)) == turbo, name
        assert wan.named_config(name) is turbo and turbo.attention_type == "sla" and turbo.sla_topk == 0.1
    custom = wan.tiny_config()
    assert wan.turbowan_config(custom) == dataclasses.replace(custom, attention_type="sla")


def _turbowan_state_dict(m: wan.WanModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """TurboDiffusion's layout, written here: Linear patch embedding, proj_l kept in float32."""
    sd: dict[str, torch.Tensor] = {}
    for key, t in m.state_dict().items():
        t = t.detach().clone()
        sd[key] = t.float() if "proj_l" in key else t.to(dtype)
    pe = sd["patch_embedding.weight"]
    sd["patch_embedding.weight"] = pe.reshape(pe.shape[0], -1).contiguous()
    return sd


def test_turbowan_pth_loads_and_runs(tmp_path: Path) -> None:
    # head_dim 128 (dim 128, 1 head): the head count is detected as for the released files.
    cfg = wan.tiny_config(
        dim=128, num_heads=1, attention_type="sla", sla_topk=0.5, sla_block_q=8, sla_block_k=4
    )
    src = _perturbed(cfg)
    path = tmp_path / "TurboWan-tiny.pth"
    sd = _turbowan_state_dict(src, torch.float32)
    assert sd["blocks.1.self_attn.attn_op.local_attn.proj_l.weight"].shape == (128, 128)
    torch.save(sd, path)
    kw = wan.example_inputs(cfg, frames=5, height=64, width=64)
    loaded = wan.load(path, config=cfg)
    assert loaded.config.attention_type == "sla"
    with torch.no_grad():
        want = src(**kw)
        assert torch.equal(loaded(**kw), want)
    # Detected without a config (text_len cannot be seen in the tensors, so this one is not run):
    # the SLA keys pick attention_type="sla", sla_topk is an argument, the tensors are the source's.
    detected = wan.load(path, sla_topk=0.5)
    got = detected.config
    assert (got.attention_type, got.sla_topk, got.num_heads) == ("sla", 0.5, 1)
    for key, t in src.state_dict().items():
        assert torch.equal(detected.state_dict()[key], t), key
    with pytest.raises(CheckpointError, match="attention_type='sdpa' disagrees"):
        wan.load(path, config=cfg, attention_type="sdpa")
    plain = tmp_path / "plain.pth"
    torch.save({k: v for k, v in sd.items() if "proj_l" not in k}, plain)
    with pytest.raises(CheckpointError, match="attention_type='sla' disagrees"):
        wan.load(plain, config=dataclasses.replace(cfg, attention_type="sdpa"), attention_type="sla")
    with pytest.raises(CheckpointError, match="sla_topk=0.2 only applies"):
        wan.load(plain, config=dataclasses.replace(cfg, attention_type="sdpa"), sla_topk=0.2)


def test_turbowan_bf16_file_with_fp32_proj_l(tmp_path: Path) -> None:
    src = _perturbed(SLA_CFG)
    path = tmp_path / "TurboWan-bf16.pth"
    torch.save(_turbowan_state_dict(src, torch.bfloat16), path)
    loaded = wan.load(path, config=SLA_CFG)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    kw = wan.example_inputs(SLA_CFG, frames=5, height=64, width=64, dtype=torch.bfloat16)
    with torch.no_grad():
        out = loaded(**kw)
        ref = src.to(torch.bfloat16)(**kw)
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------ Triton kernel
_CHILD = textwrap.dedent(
    """
    import sys, torch
    from fxswap.kernels import sla_triton
    cases = torch.load(sys.argv[1])
    out = [sla_triton.sparse_linear(*c["args"]) for c in cases]
    torch.save(out, sys.argv[2])
    """
)

KERNEL_CASES = [  # (B, H, L, d, block_q, block_k, topk): partial blocks, an empty linear branch, d=32
    (1, 2, 80, 16, 32, 16, 0.4),
    (1, 2, 80, 16, 32, 16, 1.0),
    (2, 1, 64, 32, 16, 16, 0.25),
]


def test_triton_kernel_matches_reference_in_the_interpreter(tmp_path: Path) -> None:
    if not triton_installed():
        pytest.skip("triton is not installed (the `triton` extra); CI installs it")
    cases = []
    for b, h, length, d, bq, bk, topk in KERNEL_CASES:
        q, k, v = _qkv(b, h, length, d, seed=length + d)
        lut = sla.select_blocks(q, k, topk, bq, bk)
        cases.append({"args": _op_args(q, k, v, lut, bq, bk)})
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(cases, src)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, str(src), str(dst)], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(dst)
    errors = []
    for case, (o_s, o_l), spec in zip(cases, got, KERNEL_CASES, strict=True):
        want_s, want_l = sla.sparse_linear_reference(*case["args"])
        errors.append(max((o_s - want_s).abs().max().item(), (o_l - want_l).abs().max().item()))
        if spec[-1] == 1.0:
            q, k, v = case["args"][:3]
            assert (o_s - F.scaled_dot_product_attention(q, k, v)).abs().max() <= 1e-5
            assert torch.count_nonzero(o_l) == 0
    print(json.dumps({"kernel_vs_reference_max_abs": errors}))
    assert max(errors) <= 1e-5, errors


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_reference_on_cuda(dtype: torch.dtype) -> None:
    if not triton_installed():
        pytest.skip("triton is not installed")
    from fxswap.kernels import sla_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 4000, 128, device="cuda", generator=g, dtype=dtype) for _ in range(3))
    lut = sla.select_blocks(q, k, 0.1)
    args = _op_args(q, k, v, lut, sla.BLOCK_Q, sla.BLOCK_K)
    got = sla_triton.sparse_linear(*args)
    want = sla.sparse_linear_reference(*args)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(got, want, strict=True):
        assert (a.float() - b.float()).abs().max().item() <= tol
    # The op picks the kernel on CUDA.
    assert all(torch.equal(a, b) for a, b in zip(sla.sparse_linear(*args), got, strict=True))
