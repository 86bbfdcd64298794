"""Sequence parallelism (``ulysses_degree``) on ComfyUI's own ``comfy.ldm.wan.model.WanModel``.

The model is ComfyUI's class from the ComfyUI checkout (``FXSWAP_COMFYUI_DIR``, default
``<repo>/../shared/vendor/ComfyUI-0.3.64``), a tiny random config built in the test, run through
``fxswap.compile(..., ulysses_degree=2, backend="eager")`` on 2 gloo ranks spawned as in
``tests/test_sequence_parallel.py`` (its spawn helpers are reused). The reference is the same
ComfyUI model run whole in the same process: bitwise equal, since every op sees the same rows and
attention runs per head on the same values.

ComfyUI picks its attention function at import. The pass splits ``scaled_dot_product_attention``,
which ComfyUI uses with its "pytorch" attention: its default on NVIDIA GPUs, and what
``--use-pytorch-cross-attention`` selects elsewhere (the ranks set that flag, as a user would). On
the CPU ComfyUI's default is its sub-quadratic attention (matmuls and softmax in chunks sized by
``get_free_memory``): that is captured the way the Block Swap node captures it
(``free_memory_is_budget``) and refused with a clear error, checked here too.

Times on a 2-core machine: the 2-rank spawn 18 s wall idle, 50 to 79 s with other jobs beside
(load average 5 to 8): slow; the single-process checks 2 to 7 s each.

Needs ComfyUI's venv (torch 2.14.1 and ComfyUI's requirements): ``.ci/run`` runs this file there;
elsewhere it is skipped, saying why (``FXSWAP_REQUIRE_COMFYUI=1`` makes that a failure).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from tests.test_comfyui import COMFY_DIR, _missing
from tests.test_sequence_parallel import SLOW_TIMEOUT_S, _equality_and_peaks, _spawn, assert_exact_within_plan

# the guard of tests/test_comfyui.py (imported above: it raises there under FXSWAP_REQUIRE_COMFYUI=1)
pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))

WORLD = 2
# 4 heads of 16 (RoPE axes 8, 4, 4), 2 layers; text of 8 tokens of 48; ComfyUI's i2v image
# embedding takes CLIP features of 1280 (fixed in its MLPProj) and 257 tokens.
TINY = dict(patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=64, ffn_dim=128, freq_dim=32,
            text_dim=48, out_dim=16, num_heads=4, num_layers=2)  # fmt: skip


def _comfy(pytorch_attention: bool = False) -> Any:
    """ComfyUI's WAN module, imported as ComfyUI's server would be on this machine (``--cpu``; with
    ``pytorch_attention``, ``--use-pytorch-cross-attention``: it only counts at the first import,
    when ComfyUI picks its attention function)."""
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    if pytorch_attention:
        comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.ldm.wan.model
    import comfy.ops

    return comfy


def _comfy_wan(model_type: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    comfy = _comfy()
    torch.manual_seed(0)
    model = comfy.ldm.wan.model.WanModel(
        model_type=model_type, operations=comfy.ops.disable_weight_init, dtype=torch.float32, **TINY
    )
    with torch.no_grad():  # ComfyUI's classes skip weight init (disable_weight_init): random here
        for p in model.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    # 2 x 8 x 8 latent: 2 x 4 x 4 = 32 tokens after the (1, 2, 2) patch
    inputs: dict[str, Any] = {
        "x": torch.randn(1, 16, 2, 8, 8, generator=g),
        "timestep": torch.tensor([500.0]),
        "context": torch.randn(1, 8, 48, generator=g),
    }
    if model_type == "i2v":
        inputs["clip_fea"] = torch.randn(1, 257, 1280, generator=g)
    return model.eval().requires_grad_(False), inputs


def _check_comfy_wan(rank: int, world: int) -> dict[str, Any]:
    # the first import in this fresh process: ComfyUI's attention is "pytorch" (SDPA)
    assert _comfy(pytorch_attention=True).ldm.wan.model.optimized_attention.__name__ == "attention_pytorch"
    return {kind: _equality_and_peaks(lambda kind=kind: _comfy_wan(kind), world) for kind in ("t2v", "i2v")}


@pytest.fixture(scope="module")
def comfy_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(_check_comfy_wan, WORLD, tmp_path_factory.mktemp("sp_comfy"), SLOW_TIMEOUT_S)


@pytest.mark.slow  # see the note on times above
@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_comfyui_wan_two_ranks_bitwise_and_each_peak_within_its_plan(
    comfy_results: list[dict[str, Any]], kind: str
) -> None:
    # ComfyUI's i2v image embedding (257 CLIP tokens of 1280, a fixed size) runs whole on every
    # rank and is the tiny model's activation peak: lower per rank only for t2v
    assert_exact_within_plan(comfy_results, kind, fewer_activations=kind == "t2v")


def _attention(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """ComfyUI's WAN module with the attention its import picks for ``--use-pytorch-cross-attention``
    ("pytorch") or by default on the CPU ("sub_quad"), in this one (already importing) process."""
    comfy = _comfy()
    import comfy.ldm.modules.attention as attention

    monkeypatch.setattr(comfy.ldm.wan.model, "optimized_attention", getattr(attention, f"attention_{name}"))


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_pass_on_comfyui_wan_splits_each_self_attention_and_gathers_once(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    from fxswap.capture import trace
    from fxswap.passes.sequence_parallel import SequenceParallel, shard_sequence

    _attention(monkeypatch, "pytorch")
    model, inputs = _comfy_wan(kind)
    traced = trace(model, **inputs)
    report = shard_sequence(traced.gm, SequenceParallel(WORLD, 1, "unused"))
    layers = TINY["num_layers"]
    # tokens born at the patch embedding's conv3d(...).flatten(2): [B, D, N]
    assert (report.origin, report.origin_dim, report.tokens) == ("flatten", 2, 32)
    assert len(report.self_attention) == layers  # each layer's self-attention split by heads
    # cross-attention with sharded queries: the text's, and for i2v the image's keys and values
    assert len(report.cross_attention) == layers * (2 if kind == "i2v" else 1)
    # ComfyUI's RoPE table [1, N, 1, d/2, 2, 2], read as its two halves [..., 0] and [..., 1] per
    # layer and q/k: narrowed to the rank's 16 tokens, not gathered
    tables = [
        tuple(n.meta["example_value"].shape)
        for n in traced.gm.graph.nodes
        if n.target is torch.narrow and n.meta["example_value"].dim() == 5
    ]
    assert tables and set(tables) == {(1, 16, 1, 8, 2)}, tables
    # one gather: the head's output, before the unpatchify (u[:, :prod(grid)].view(...))
    assert len(report.gathered) == 1, report.gathered


def test_comfyui_sub_quadratic_attention_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    """ComfyUI's CPU default attention has no SDPA to split: a clear refusal, not a wrong result.
    Captured as the Block Swap node captures it (``get_free_memory`` answered by the budget)."""
    from fxswap.capture import trace
    from fxswap.passes.sequence_parallel import SequenceParallel, SequenceParallelError, shard_sequence

    _attention(monkeypatch, "sub_quad")
    from fxswap.comfyui.swap import free_memory_is_budget

    model, inputs = _comfy_wan("t2v")
    with free_memory_is_budget(2**30):
        traced = trace(model, **inputs)
    with pytest.raises(SequenceParallelError, match="found no self-attention"):
        shard_sequence(traced.gm, SequenceParallel(WORLD, 0, "unused"))
