"""``passes.device_rules`` against hand computations from PyTorch's source.

Every expected figure is worked out here from the constants and functions of PyTorch's source
(file and function named at each case), not from the code under test:

- c10/cuda/CUDACachingAllocator.cpp (DeviceCachingAllocator): ``round_size`` (multiples of
  kMinBlockSize = 512, at least 512), ``get_pool`` (size <= kSmallSize = 1 MiB: small pool),
  ``get_allocation_size`` (< kMinLargeAlloc = 10 MiB: a kLargeBuffer = 20 MiB segment; else rounded
  up to kRoundLarge = 2 MiB), ``should_split`` (large pool: split only if remaining > kSmallSize;
  small pool or expandable segments: if remaining >= kMinBlockSize). ``allocated_bytes`` counts
  the block handed out, so an unsplit block counts whole.
- aten/src/ATen/cuda/CublasHandlePool.cpp: ``parseChosenWorkspaceSize`` (default
  4096 KiB * 2 + 16 KiB * 8, or 4096 * 8 KiB on sm 9.0; ``CUBLAS_WORKSPACE_CONFIG`` ``:SIZE:COUNT``
  pairs add SIZE KiB * COUNT), ``getCUDABlasLtWorkspaceSize`` (``CUBLASLT_WORKSPACE_SIZE`` KiB,
  default 1024, capped at the cuBLAS size), ``getCUDABlasLtWorkspace`` (shared with cuBLAS only
  when ``TORCH_CUBLASLT_UNIFIED_WORKSPACE`` is set true).
- aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp ``mha_fwd``: ``softmax_lse`` is
  float, (batch, heads, seqlen_q).
"""

from __future__ import annotations

import pytest
from graphs import OpSpec, build_graph

from fxswap.ir import GraphIR
from fxswap.passes.device_rules import (
    CPU_RULES,
    KEPT_WORKSPACE,
    apply_rules,
    cublas_workspace_bytes,
    cublaslt_workspace_bytes,
    cuda_rules,
    rule_terms,
    sdpa_backend,
    sdpa_workspace_bytes,
)

KiB, MiB = 1024, 2**20
SM89 = cuda_rules((8, 9))


@pytest.mark.parametrize(
    ("request_bytes", "counted", "why"),
    [
        (0, 0, "no allocation at all for 0 bytes"),
        (1, 512, "round_size: below kMinBlockSize -> 512"),
        (512, 512, "round_size: already a multiple of 512"),
        (513, 1024, "round_size: 512 * ceil(513 / 512)"),
        (1 * MiB, 1 * MiB, "get_pool: 1 MiB is still small (size <= kSmallSize); 2 MiB segment, split"),
        (1 * MiB + 1, 1 * MiB + 512, "large, < 10 MiB: split off a 20 MiB segment (19 MiB left)"),
        (9 * MiB + 1, 9 * MiB + 512, "large, < kMinLargeAlloc: 20 MiB segment, 11 MiB left: split"),
        (10 * MiB, 10 * MiB, "get_allocation_size: 10 MiB segment, 0 left: the block is the request"),
        (11 * MiB, 12 * MiB, "12 MiB segment, 1 MiB left (not > kSmallSize): unsplit, 12 MiB"),
        (11 * MiB - 512, 11 * MiB - 512, "12 MiB segment, 1 MiB + 512 left (> 1 MiB): split"),
        # WAN 14B's ffn.0 weight, 13824 x 5120 bf16 = 141,557,760 bytes = 135 MiB: a 136 MiB
        # segment leaves exactly 1 MiB, so the whole 136 MiB block is counted
        (13824 * 5120 * 2, 136 * MiB, "135 MiB -> 136 MiB segment, 1 MiB left: unsplit"),
        # WAN 14B's attention q weight 5120 x 5120 bf16 = 50 MiB: a 2 MiB multiple, exact
        (5120 * 5120 * 2, 50 * MiB, "50 MiB: segment of exactly 50 MiB"),
    ],
)
def test_caching_allocator_counts(request_bytes: int, counted: int, why: str) -> None:
    assert SM89.alloc_bytes(request_bytes) == counted, why
    assert CPU_RULES.alloc_bytes(request_bytes) == request_bytes  # the CPU: identity


def test_expandable_segments_split_every_block() -> None:
    # should_split: with expandable segments, remaining >= kMinBlockSize splits (also in the large pool)
    rules = cuda_rules((8, 9), alloc_conf="expandable_segments:True")
    assert rules.expandable_segments
    assert rules.alloc_bytes(11 * MiB) == 11 * MiB
    assert rules.alloc_bytes(13824 * 5120 * 2) == 135 * MiB
    assert rules.alloc_bytes(1) == 512  # rounding is unchanged
    assert not cuda_rules((8, 9), alloc_conf="max_split_size_mb:128").expandable_segments


@pytest.mark.parametrize(
    ("capability", "config", "expected"),
    [
        ((8, 9), None, 4096 * KiB * 2 + 16 * KiB * 8),  # = 8,519,680: default off sm 9.0
        ((8, 0), None, 8_519_680),
        ((12, 0), None, 4096 * 8 * KiB),  # Blackwell consumer (major 12): 32 MiB
        ((10, 0), None, 4096 * 8 * KiB),  # Blackwell datacenter (major 10): 32 MiB
        ((9, 0), None, 4096 * 8 * KiB),  # = 32 MiB on sm 9.0
        ((8, 9), ":4096:8", 4096 * KiB * 8),  # the deterministic-mode setting: 32 MiB
        ((8, 9), ":16:8", 16 * KiB * 8),  # 128 KiB
        ((9, 0), ":4096:2:16:8", 4096 * KiB * 2 + 16 * KiB * 8),  # pairs add up
        ((8, 9), "nonsense", 8_519_680),  # no :SIZE:COUNT pair: torch warns and keeps the default
    ],
)
def test_cublas_workspace(capability: tuple[int, int], config: str | None, expected: int) -> None:
    assert cublas_workspace_bytes(capability, config) == expected


def test_cublaslt_workspace() -> None:
    cublas = 8_519_680
    # unified (the default of CUDA builds, unset or set true): shares cuBLAS's workspace
    assert cublaslt_workspace_bytes(cublas, None, None) == 0
    assert cublaslt_workspace_bytes(cublas, "4096", None) == 0
    assert cublaslt_workspace_bytes(cublas, None, "1") == 0
    # set false: its own, CUBLASLT_WORKSPACE_SIZE KiB (default 1024), not capped
    assert cublaslt_workspace_bytes(cublas, None, "0") == 1024 * KiB
    assert cublaslt_workspace_bytes(cublas, "65536", "0") == 65536 * KiB


def test_kept_workspace_as_the_allocator_counts_it() -> None:
    # sm 8.9: 8,519,680 (a 512 multiple, large pool under 10 MiB: split off 20 MiB, counted as is);
    # cuBLASLt shares it by default
    assert SM89.kept_bytes() == 8_519_680
    # sm 9.0: 32 MiB (10 MiB or more: a segment of exactly 32 MiB)
    assert cuda_rules((9, 0)).kept_bytes() == 32 * MiB
    # cuBLASLt's own (unified off): + 1 MiB (small pool)
    assert cuda_rules((9, 0), cublaslt_unified="0").kept_bytes() == 33 * MiB
    assert CPU_RULES.kept_bytes() == 0


def _graph(target: str) -> GraphIR:
    # x (1,000 bytes, input) -> op0 (700 bytes out) -> op1 (3 MiB + 1 out) ; weights 100 and 2 MiB
    return build_graph(
        [("a.weight", 100), ("b.weight", 2 * MiB)],
        [OpSpec(("a.weight",), 700, target=target), OpSpec(("b.weight",), 3 * MiB + 1, target="aten.relu")],
        input_bytes=1000,
    )


def test_apply_rules_rounds_every_allocation_and_keeps_the_library_workspace() -> None:
    raw = _graph("torch._C._nn.linear")
    ruled = apply_rules(raw, SM89)
    assert [w.nbytes for w in ruled.weights] == [512, 2 * MiB]  # 100 -> 512; 2 MiB exact
    sizes = {b.name: (b.nbytes, b.start, b.end) for b in ruled.buffers}
    # the kept workspace spans the whole call (ops 0..1)
    # cuBLAS's 8,519,680 on sm_89; cuBLASLt shares it (unified, the default)
    assert sizes.pop(KEPT_WORKSPACE) == (8_519_680, 0, 1)
    raw_sizes = sorted(b.nbytes for b in raw.buffers)
    assert raw_sizes == [700, 1000, 3 * MiB + 1]
    # 700 -> 1024, 1000 -> 1024, 3 MiB + 1 -> 3 MiB + 512
    assert sorted(n for n, _, _ in sizes.values()) == [1024, 1024, 3 * MiB + 512]
    assert apply_rules(raw, CPU_RULES) is raw  # the CPU changes nothing
    # no matmul in the graph: nothing kept
    assert KEPT_WORKSPACE not in {b.name for b in apply_rules(_graph("aten.add"), SM89).buffers}
    for target in ("aten.mm.default", "<built-in function matmul>", "torch.bmm", "aten.addmm.default"):
        assert KEPT_WORKSPACE in {b.name for b in apply_rules(_graph(target), SM89).buffers}, target


def test_rule_terms_at_an_op() -> None:
    raw = _graph("torch._C._nn.linear")
    ruled = apply_rules(raw, SM89)
    t = rule_terms(raw, ruled, 1)
    assert t.weights_rounding == 512 - 100
    # live at op 1 (by build_graph's lifetimes: the input for the whole call, op 0's output read by
    # op 1, op 1's own output): (1024 - 1000) + (1024 - 700) + 511
    assert t.activation_rounding == 24 + 324 + 511
    assert t.kept == 8_519_680
    assert t.total == t.weights_rounding + t.activation_rounding + t.kept


def test_sdpa_backend_and_workspace_by_hand() -> None:
    # WAN 14B at 832x480, 81 frames: 21 x 30 x 52 latent patches = 32,760 tokens, 40 heads of 128, bf16
    assert sdpa_backend((8, 9), "bfloat16", 128, 128, has_mask=False) == "flash"
    lse = 1 * 40 * 32760 * 4  # flash_api.cpp mha_fwd: softmax_lse float (batch, heads, seqlen_q)
    assert lse == 5_241_600
    kw = dict(batch=1, heads=40, lq=32760, lk=32760, head_dim=128, head_dim_v=128, itemsize=2)
    assert sdpa_workspace_bytes("flash", **kw) == lse
    assert SM89.alloc_bytes(lse) == 10238 * 512  # large pool under 10 MiB: rounded to 512, split
    # a mask rules out flash (check_for_attn_mask); memory-efficient takes it, with no log-sum-exp
    # in inference and the output kept in registers at head dim 128
    assert sdpa_backend((8, 9), "bfloat16", 128, 128, has_mask=True) == "efficient"
    assert sdpa_workspace_bytes("efficient", **kw) == 0
    # fp32 never runs flash; head dim 160 > 128 needs the fp32 output accumulator B*Lq*H*Dv*4
    assert sdpa_backend((8, 9), "float32", 160, 160, has_mask=False) == "efficient"
    acc = dict(kw, head_dim=160, head_dim_v=160, itemsize=4)
    assert sdpa_workspace_bytes("efficient", **acc) == 1 * 32760 * 40 * 160 * 4
    # pre-Ampere: no flash
    assert sdpa_backend((7, 5), "float16", 64, 64, has_mask=False) == "efficient"
    # head dim 12 in bf16: neither flash nor memory-efficient (multiples of 8): math, whose
    # scaled q and k copies and attention matrix with its softmax live together
    assert sdpa_backend((8, 9), "bfloat16", 12, 12, has_mask=False) == "math"
    small = dict(batch=2, heads=3, lq=5, lk=7, head_dim=12, head_dim_v=12, itemsize=2)
    assert sdpa_workspace_bytes("math", **small) == (2 * 3 * (5 + 7) * 12 + 2 * 2 * 3 * 5 * 7) * 2


@pytest.mark.parametrize(("dtype", "expected"), [("bfloat16", 2 * 4 * 24 * 4), ("float32", 0)])
def test_meta_capture_uses_the_backend_rule(dtype: str, expected: int) -> None:
    """Planning on meta tensors (fxswap.trace, `fxswap plan`): an attention of batch 2, 4 heads, 24
    queries of head dim 16. bf16 runs flash: its fp32 log-sum-exp, 2 * 4 * 24 * 4 bytes; fp32 runs
    memory-efficient: nothing beside the output in inference."""
    import torch

    import fxswap

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(self.proj(q), q, q)

    dt = getattr(torch, dtype)
    model = Attn().to(device="meta", dtype=dt).eval().requires_grad_(False)
    traced = fxswap.trace(model, torch.empty(2, 4, 24, 16, device="meta", dtype=dt))
    ws = {o.target.rsplit(".", 1)[-1]: o.workspace_bytes for o in traced.ir.ops}
    assert ws["scaled_dot_product_attention"] == expected


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_plans_with_the_target_rules(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """fxswap.compile applies the device's rules where it plans (and, under Inductor, where it
    replays the generated program). Here the CPU stands in for an sm_89 card: every resident weight
    is rounded as the caching allocator rounds it and cuBLAS's kept workspace is held at every op,
    so the peak grows by at least the kept 8,519,680 + 1 MiB bytes plus the weights' rounding:
    4 x (64*64*4 = 16,384: exact; bias 256 -> 512)."""
    import torch
    from models import MLP

    import fxswap
    import fxswap.build
    import fxswap.workspace

    torch.manual_seed(0)
    model = MLP(n=4, d=64).eval().requires_grad_(False)
    x = torch.randn(4, 64)
    opts = dict(mode="layerwise", max_vram_gb=1, reserve_mb=0, backend=backend, device="cpu")
    plain = fxswap.compile(model, **opts)
    ref = plain(x)
    cpu_plan = plain.plan
    plain.close()
    monkeypatch.setattr(fxswap.build, "device_rules_for", lambda d: SM89)
    monkeypatch.setattr(fxswap.workspace, "device_rules_for", lambda d: SM89)
    ruled = fxswap.compile(model, **opts)
    assert torch.equal(ruled(x), ref)
    p = ruled.plan
    ruled.close()
    assert cpu_plan is not None and p is not None
    assert p.weight_bytes - cpu_plan.weight_bytes == 4 * (512 - 256)
    assert p.peak_bytes - cpu_plan.peak_bytes >= 8_519_680 + 4 * (512 - 256)


@pytest.mark.gpu
def test_the_rules_match_the_cuda_allocator() -> None:
    """On a CUDA device: each request from a fresh segment counts what the rules say, as the
    allocator itself reports it (memory_allocated before and after)."""
    import torch

    from fxswap.workspace import device_rules_for

    dev = torch.device("cuda")
    rules = device_rules_for(dev)
    assert rules.target == "cuda" and rules.rounding
    for n in (1, 513, MiB, MiB + 1, 10 * MiB, 11 * MiB, 11 * MiB - 512, 13824 * 5120 * 2):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(dev)
        t = torch.empty(n, dtype=torch.uint8, device=dev)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated(dev) - before == rules.alloc_bytes(n), n
        del t


def test_replay_measures_the_scratch_of_an_out_call() -> None:
    """An extern call that writes into an out= buffer allocated before it: its own scratch (here
    1,000 float32 = 4,000 bytes, freed before it returns) is its workspace; the out= buffer, which
    it returns, is not new memory."""
    import torch

    from fxswap.passes.device_rules import CPU_RULES
    from fxswap.replay import _measure_one

    def op(a: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        scratch = torch.empty(1000, dtype=torch.float32)
        out.copy_(a + scratch[: a.numel()].view_as(a).zero_())
        del scratch
        return out

    a, buf = torch.zeros(4, 4), torch.zeros(4, 4)
    # a + scratch allocates its 64-byte result too, freed before the op returns
    assert _measure_one(op, (a,), {"out": buf}, torch.device("cpu"), CPU_RULES) == 4000 + 64
