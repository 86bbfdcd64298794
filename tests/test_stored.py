"""Weights kept as stored (GGUF blocks, fp8 with a scale): swapped at their stored size, decoded on
the device by ``fxswap::dequant`` inside the graph.

Independent means: the expected output is the same model built from ``gguf.quants.dequantize``'s
float32 weights (the oracle, numpy) rounded to the model's dtype by torch, run unswapped; the bytes
moved are counted by a transfer backend and compared with the stored sizes computed here from
``gguf.GGML_QUANT_SIZES``; the device peak is the CPU allocator's (``fxswap.oracle``).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

gguf = pytest.importorskip("gguf")

import fxswap  # noqa: E402
from fxswap.ops import register_patch  # noqa: E402
from fxswap.oracle import live_bytes, measure  # noqa: E402
from fxswap.runtime import CopyBackend, SwapRuntime  # noqa: E402
from fxswap.stored import StoredWeight, attach, materialise, stored_weights  # noqa: E402

GT = gguf.GGMLQuantizationType
DIM = 512
# Byte offsets of each block's float16 scales (ggml-common.h), set to small finite values here.
F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}  # fmt: skip
# One storage per Linear weight, in block order: every block type, the plain GGUF types and fp8.
KINDS = ("Q4_K", "Q6_K", "Q8_0", "Q5_K", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "fp8")


class Blocks(nn.Module):
    def __init__(self, n: int, dtype: torch.dtype, device: str | None = None) -> None:
        super().__init__()
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(DIM, DIM, **kw), nn.GELU(), nn.Linear(DIM, DIM, **kw)) for _ in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return x


def _stored_bytes(kind: str, numel: int) -> int:
    if kind == "fp8":
        return numel
    elems, size = gguf.GGML_QUANT_SIZES[GT[kind]]
    return numel // elems * size


def _weights(kind: str, shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(stored bytes, the oracle's float32 values) of a weight of ``shape`` stored as ``kind``."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    if kind in ("BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        raw = gguf.quants.quantize(x, GT[kind]).view(np.uint8)
    else:  # K types: gguf cannot quantise them; random quants under small scales
        elems, size = gguf.GGML_QUANT_SIZES[GT[kind]]
        raw = rng.integers(0, 256, size=(math.prod(shape) // elems, size), dtype=np.uint8)
        for at in F16_FIELDS[kind]:
            raw[:, at : at + 2] = (
                rng.uniform(1e-4, 2e-3, len(raw)).astype(np.float16).view(np.uint8).reshape(-1, 2)
            )
    raw = raw.reshape(-1)
    return raw, gguf.quants.dequantize(raw.reshape(shape[0], -1), GT[kind])


def _models(n: int = 6, dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, nn.Module, dict[str, int]]:
    """(the model with stored weights, its parameters on meta; the oracle-built reference; stored
    bytes per weight)."""
    torch.manual_seed(0)
    ref = Blocks(n, dtype).eval()
    model = Blocks(n, dtype, device="meta").eval()
    stored: dict[str, StoredWeight] = {}
    sizes: dict[str, int] = {}
    names = [k for k, _ in ref.named_parameters() if k.endswith("weight")]
    for i, name in enumerate(names):
        p = ref.get_parameter(name)
        kind = KINDS[i % len(KINDS)]
        shape = (int(p.shape[0]), int(p.shape[1]))
        if kind == "fp8":
            w = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.05
            scale = float(w.abs().max() / 448)
            data = (w / scale).to(torch.float8_e4m3fn)
            want = (data.to(torch.float64) * scale).float()  # exact: 4 + 53 bits
            stored[name] = StoredWeight(data, "fp8", shape, dtype, scale)
        else:
            raw, oracle = _weights(kind, shape, seed=i)
            want = torch.from_numpy(oracle)
            stored[name] = StoredWeight(torch.from_numpy(raw.copy()), kind, shape, dtype)
        with torch.no_grad():
            p.copy_(want.to(dtype))
        sizes[name] = _stored_bytes(kind, p.numel())
    # biases: plain tensors of the model (not stored), the same values in both
    for name, p in ref.named_parameters():
        if not name.endswith("weight"):
            mod, _, attr = name.rpartition(".")
            model.get_submodule(mod)._parameters[attr] = nn.Parameter(p.detach().clone(), requires_grad=False)
    attach(model, stored)
    return model, ref, sizes


class CountingBackend(CopyBackend):
    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def start(self, host: Any, device: torch.device) -> Any:
        self.bytes += sum(t.numel() * t.element_size() for t in host)
        return super().start(host, device)


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, nn.Module, dict[str, int]]:
    return _models()


def _min_budget(model: nn.Module, x: torch.Tensor, mode: str) -> int:
    try:
        fxswap.compile(model, backend="eager", mode=mode, max_vram_gb=1e-6, reserve_mb=0, block_size_mb=0.3)(
            x
        )
    except fxswap.BudgetInfeasibleError as e:
        return e.min_vram_bytes
    raise AssertionError("a budget of 1 KiB was accepted")


@pytest.mark.parametrize("mode", ["layerwise", "adaptive"])
def test_swapped_output_is_bitwise_the_oracle_models_and_moves_stored_bytes(
    models: tuple[nn.Module, nn.Module, dict[str, int]], mode: str
) -> None:
    model, ref, sizes = models
    x = torch.randn(3, DIM, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x)
        lo = _min_budget(model, x, mode)
        full = lo + sum(sizes.values())
        for budget in (lo, (lo + full) // 2, full):
            backend = CountingBackend()
            s = fxswap.compile(
                model, backend="eager", mode=mode, max_vram_gb=budget / 2**30, reserve_mb=0,
                block_size_mb=0.3, transfer_backend=backend,
            )  # fmt: skip
            assert torch.equal(s(x), want), budget
            # a steady-state call (the first one's tail may start the next call's loads: warm start)
            backend.bytes = 0
            got = s(x)
            assert torch.equal(got, want), budget
            swapped = [u for u in s.plan.units if not u.resident]
            if budget == lo:
                assert swapped, "the smallest budget swaps"
            moved = sum(sizes[p] for u in swapped for p in u.params if p in sizes)
            biases = sum(
                ref.get_parameter(p).numel() * 2 for u in swapped for p in u.params if p not in sizes
            )
            assert backend.bytes == moved + biases  # the stored sizes, not the bf16 ones
            # measured: a steady-state call that re-creates its residents stays within the budget
            s.release()
            with measure("cpu") as m:
                again = s(x)
            assert torch.equal(again, want)
            assert m.peak_bytes + live_bytes([x]) <= budget, (m.peak_bytes, budget)
            s.close()


def test_host_holds_each_weight_once_at_its_stored_size(
    models: tuple[nn.Module, nn.Module, dict[str, int]],
) -> None:
    model, _, sizes = models
    x = torch.randn(2, DIM, dtype=torch.bfloat16)
    with torch.no_grad():
        lo = _min_budget(model, x, "layerwise")
        s = fxswap.compile(model, backend="eager", mode="layerwise", max_vram_gb=lo / 2**30, reserve_mb=0)
        s(x)
    store = dict(s.runtime.store.items())
    assert store, "some units are swapped"
    for name, t in store.items():
        if name in sizes:
            assert t.numel() * t.element_size() == sizes[name]
    # the model holds no decoded copy: its stored weights are meta tensors
    assert all(model.get_parameter(k).is_meta for k in sizes)
    s.close()


def test_materialise_decodes_into_a_plain_module() -> None:
    model, ref, _ = _models(n=1)
    assert stored_weights(model)
    plain = materialise(model)
    assert not stored_weights(plain)
    for (k, a), (_, b) in zip(plain.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(a, b), k


def test_stored_weight_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="takes 136 bytes"):
        StoredWeight(torch.zeros(34, dtype=torch.uint8), "Q8_0", (4, 32), torch.bfloat16)
    with pytest.raises(ValueError, match="fp8 data must be"):
        StoredWeight(torch.zeros(4, 4), "fp8", (4, 4), torch.bfloat16, 1.0)
    with pytest.raises(ValueError, match="takes no `scale`"):
        StoredWeight(torch.zeros(34, dtype=torch.uint8), "Q8_0", (32,), torch.bfloat16, 2.0)
    m = Blocks(1, torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match=r"shape \[512, 256\]"):
        attach(m, {"blocks.0.0.weight": StoredWeight(torch.zeros(512 * 8 * 34, dtype=torch.uint8), "Q8_0",
                                                      (512, 256), torch.bfloat16)})  # fmt: skip
    with pytest.raises(KeyError, match="not a parameter"):
        attach(m, {"nope": StoredWeight(torch.zeros(34, dtype=torch.uint8), "Q8_0", (32,), torch.bfloat16)})


@pytest.mark.slow
def test_inductor_swapped_and_resident_stored_weights_match_the_oracle_model() -> None:
    # Inductor compiles the decode as an opaque op (its fake gives the decoded shape and dtype);
    # the stored tensors reach its regions as uint8 / fp8 inputs, from a wait or as residents.
    model, ref, sizes = _models(n=3)
    x = torch.randn(3, DIM, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x)
        lo = _min_budget(model, x, "layerwise")
        for budget in (lo, lo + sum(sizes.values())):
            s = fxswap.compile(
                model, mode="layerwise", max_vram_gb=budget / 2**30, reserve_mb=0, block_size_mb=0.3
            )
            assert torch.equal(s(x), want)
            assert torch.equal(s(x), want)
            assert any(u.resident for u in s.plan.units) == (budget > lo)
            s.close()


def test_a_saved_plan_of_a_stored_model_is_reused(
    models: tuple[nn.Module, nn.Module, dict[str, int]], tmp_path: Path
) -> None:
    model, ref, _ = models
    x = torch.randn(3, DIM, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        lo = _min_budget(model, x, "layerwise")
        s = fxswap.compile(model, backend="eager", mode="layerwise", max_vram_gb=lo / 2**30, reserve_mb=0)
        want = s(x)
        path = tmp_path / "plan.json"
        s.plan.save(path)
        s.close()
        again = fxswap.compile(model, backend="eager", plan=path)
        assert torch.equal(again(x), want)
        assert torch.equal(want, ref(x))
        again.close()


def test_fxswap_plan_refuses_a_stored_model_naming_the_fix(
    models: tuple[nn.Module, nn.Module, dict[str, int]],
) -> None:
    model, _, _ = models
    with pytest.raises(ValueError, match=r"keeps weights as stored.*fxswap.compile"):
        fxswap.plan(model, torch.randn(3, DIM, dtype=torch.bfloat16), max_vram_gb=1)


class _PatchingRuntime(SwapRuntime):
    """A runtime that asks the graph to change two stored weights after their decode (what the
    ComfyUI nodes do with a LoRA on a GGUF weight)."""

    def __init__(self, deltas: dict[str, torch.Tensor], backend: CopyBackend) -> None:
        super().__init__("cpu", backend=backend)
        self.deltas = deltas
        self.fns: list[Any] = []
        self.calls: dict[str, int] = dict.fromkeys(deltas, 0)

    def decoded_patch(self, fqn: str) -> int | None:
        if fqn not in self.deltas:
            return None

        def fn(w: torch.Tensor) -> torch.Tensor:
            self.calls[fqn] += 1
            return w + self.deltas[fqn]

        self.fns.append(fn)
        return register_patch(fn)


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_runtime_patch_applies_after_the_decode_and_the_weight_moves_stored(
    models: tuple[nn.Module, nn.Module, dict[str, int]], backend: str
) -> None:
    """``SwapRuntime.decoded_patch``: the graph applies ``fxswap::patch`` to the decoded weight. The
    output equals, bitwise, the oracle-built model whose two weights had the same delta added (the
    same bf16 add); the patched weights still move at their stored size; each patch runs once per
    decode. Under Inductor the patch is an opaque op in its region, like the decode."""
    from fxswap.compiled import SwapModule
    from fxswap.options import make_options

    model, ref, sizes = models
    names = [k for k in sizes if k.endswith("weight")][:2]
    g = torch.Generator().manual_seed(5)
    deltas = {
        k: (torch.randn(ref.get_parameter(k).shape, generator=g) * 0.05).to(torch.bfloat16) for k in names
    }
    patched = copy.deepcopy(ref)
    with torch.no_grad():
        for k, d in deltas.items():
            patched.get_parameter(k).copy_(ref.get_parameter(k) + d)
    x = torch.randn(3, DIM, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = patched(x)
        assert not torch.equal(want, ref(x)), (
            "the deltas must change the output for this test to mean anything"
        )
        lo = _min_budget(model, x, "layerwise")
        # the patch's output beside its decoded input: one more decoded weight (bf16), given to the
        # plan as its reserve (as the ComfyUI nodes reserve the LoRA merge's bytes)
        room = max(ref.get_parameter(k).numel() * 2 for k in names)
        for budget in (lo + room, lo + room + sum(sizes.values())):
            backend = CountingBackend()
            rt = _PatchingRuntime(deltas, backend)
            options = make_options(
                mode="layerwise", max_vram_gb=budget / 2**30, block_size_mb=0.3, reserve_mb=room / 2**20
            )
            s = SwapModule(model, options=options, plan=None, backend=backend, empty_cache_freq=0,
                           device=torch.device("cpu"), strict=True, runtime=rt)  # fmt: skip
            assert torch.equal(s(x), want), budget
            assert rt.calls == dict.fromkeys(names, 1), rt.calls
            backend.bytes = 0
            assert torch.equal(s(x), want), budget
            swapped = [u for u in s.plan.units if not u.resident]
            moved = sum(sizes[p] for u in swapped for p in u.params if p in sizes)
            biases = sum(
                ref.get_parameter(p).numel() * 2 for u in swapped for p in u.params if p not in sizes
            )
            assert backend.bytes == moved + biases  # stored sizes, the patched weights included
            if budget == lo + room:
                assert swapped, "the smallest budget swaps"
            s.release()
            with measure("cpu") as m:
                assert torch.equal(s(x), want)
            assert m.peak_bytes + live_bytes([x]) <= budget, (m.peak_bytes, budget)
            s.close()


# ------------------------------------------------------------------ residents decoded once
# Planned on the graph as fxswap.compile sees it; the budgets below come from the stored-residents
# plan (the same graph with no weight offered for decoding once: the planner's model before this
# choice existed) and from sizes computed here by hand.


def _graph_dequants(s: Any) -> list[str]:
    """The weights the compiled graph decodes (``fxswap::dequant`` nodes, counted by target)."""
    from fxswap import ops

    (entry,) = s._entries.values()
    return [n for n in entry.gm.graph.nodes if n.target is ops.dequant]


def _stored_residents_peak(s: Any, budget: int) -> tuple[int, Any]:
    """The peak of the plan that keeps every resident stored, for ``s``'s graph and ``budget``, and
    that plan: the planner on the same IR with no weight offered for decoding once."""
    import dataclasses

    from fxswap.options import make_options
    from fxswap.passes.planner import build_plan

    (entry,) = s._entries.values()
    ir = entry.ir
    plain = dataclasses.replace(
        ir, weights=tuple(dataclasses.replace(w, decoded_nbytes=0) for w in ir.weights)
    )
    opts = make_options(mode="layerwise", max_vram_gb=budget / 2**30, reserve_mb=0, block_size_mb=0.3)
    plan = build_plan(plain, opts)
    assert not plan.decoded_residents
    return plan.peak_bytes, (plan, ir)


def test_residents_are_decoded_once_when_the_budget_holds_them_and_stay_stored_a_byte_below() -> None:
    """Ten GGUF weights (no fp8: its float32 scratch is larger than this toy model's activations).

    - Budget P_s + sum(d - s) (P_s: the stored-residents plan's peak, every unit resident; d, s: each
      weight's decoded and stored bytes by hand): decoding a weight once adds d - s at every op and
      removes its decoded activation and scratch, and the upload (every resident decoded, the
      inputs, one stored copy and scratch) is below P_s + sum(d - s) because the stored plan already
      held, at the reader of each weight, the decoded tensor and scratch beside every resident. So
      every resident is decoded once: the plan says so, the graph decodes none of them, the output
      equals the oracle-built model's bitwise, and the CPU allocator's peak of a call that uploads
      (and decodes) its residents is within the plan's peak, itself within the budget.
    - One byte below the least budget that could admit any one weight decoded (the stored plan's
      per-op bytes outside its reader, plus its d - s by hand): every resident stays stored and the
      graph decodes each at every call.
    """
    import dataclasses

    from fxswap.passes.validate import validate_plan

    model, ref, sizes = _models(n=5)
    assert set(sizes) == {k for k in sizes if k.endswith("weight")} and len(sizes) == 10
    decoded = {k: ref.get_parameter(k).numel() * 2 for k in sizes}  # bf16
    extra = {k: decoded[k] - sizes[k] for k in sizes}
    x = torch.randn(3, DIM, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = ref(x)
        probe = fxswap.compile(model, backend="eager", mode="layerwise", max_vram_gb=1.0, reserve_mb=0,
                               block_size_mb=0.3)  # fmt: skip
        assert torch.equal(probe(x), want)
        p_s, (stored_plan, ir) = _stored_residents_peak(probe, 2**30)
        plain_ir = dataclasses.replace(
            ir, weights=tuple(dataclasses.replace(w, decoded_nbytes=0) for w in ir.weights)
        )
        probe.close()
        assert all(u.resident for u in stored_plan.units)

        budget = p_s + sum(extra.values())
        s = fxswap.compile(model, backend="eager", mode="layerwise", max_vram_gb=budget / 2**30, reserve_mb=0,
                           block_size_mb=0.3)  # fmt: skip
        assert torch.equal(s(x), want)
        plan = s.plan
        assert sorted(plan.decoded_residents) == sorted(sizes)
        assert _graph_dequants(s) == []
        # resident bytes as held: the decoded weights by hand, the biases in bf16
        biases = sum(p.numel() * 2 for k, p in ref.named_parameters() if k not in sizes)
        assert plan.resident_bytes == sum(decoded.values()) + biases
        assert plan.peak_bytes <= budget
        s.release()  # the next call uploads and decodes its residents again, measured
        with measure("cpu") as m:
            assert torch.equal(s(x), want)
        assert m.peak_bytes + live_bytes([x]) <= plan.peak_bytes, (m.peak_bytes, plan.peak_bytes)
        # the device copies are the decoded weights; the host keeps the stored bytes only
        held = s.runtime._residents
        assert all(held[k].dtype == torch.bfloat16 and tuple(held[k].shape) == (DIM, DIM) for k in sizes)
        assert not dict(s.runtime.store.items()), "nothing is swapped, so nothing else is on the host"
        assert all(model.get_parameter(k).is_meta for k in sizes)
        assert all(stored_weights(model)[k].data.dtype == torch.uint8 for k in sizes)
        s.close()

        # Decoding w adds its d - s at every op that does not read it (the decoded activation it
        # removes lives at its reader only): with none decoded yet, the least budget that admits w
        # is at least the stored plan's highest such op plus d - s. One byte below the least of
        # these over every w, none can be decoded.
        tl = validate_plan(plain_ir, stored_plan)
        below = (
            min(
                max(tl.total(i) for i, o in enumerate(ir.ops) if w not in o.weights) + extra[w] for w in sizes
            )
            - 1
        )
        assert below >= p_s, "every unit still fits resident, stored"
        s = fxswap.compile(model, backend="eager", mode="layerwise", max_vram_gb=below / 2**30, reserve_mb=0,
                           block_size_mb=0.3)  # fmt: skip
        assert torch.equal(s(x), want)
        assert all(u.resident for u in s.plan.units)
        assert s.plan.decoded_residents == ()
        assert len(_graph_dequants(s)) == len(sizes)
        assert s.plan.peak_bytes <= below
        s.close()


def test_a_plan_with_decoded_residents_round_trips_is_honoured_and_edits_are_refused(tmp_path: Path) -> None:
    import json

    from fxswap.errors import PlanError
    from fxswap.plan_json import canonical_sha256
    from fxswap.swapplan import SwapPlan, load_plan

    model, ref, sizes = _models(n=2)
    x = torch.randn(3, DIM, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = ref(x)
        s = fxswap.compile(model, backend="eager", mode="layerwise", max_vram_gb=1.0, reserve_mb=0,
                           block_size_mb=0.3)  # fmt: skip
        assert torch.equal(s(x), want)
        plan = s.plan
        assert plan.decoded_residents
        path = tmp_path / "plan.json"
        plan.save(path)
        s.close()
        assert load_plan(path) == plan
        # honoured: the plan given decodes the same weights once, none in the graph
        again = fxswap.compile(model, backend="eager", plan=path)
        assert torch.equal(again(x), want)
        assert again.plan.decoded_residents == plan.decoded_residents
        assert len(_graph_dequants(again)) == len(sizes) - len(plan.decoded_residents)
        again.close()

        def edited(fn: Any, src: Path = path) -> str:
            data = json.loads(src.read_text())
            data.pop("content_sha256")
            fn(data)
            data["content_sha256"] = canonical_sha256(data)  # saved again: a valid checksum
            return json.dumps(data)

        # a plan of schema 3 (before the field): read with none decoded, and it runs
        lo = _min_budget(model, x, "layerwise")
        s = fxswap.compile(model, backend="eager", mode="layerwise", max_vram_gb=lo / 2**30, reserve_mb=0,
                           block_size_mb=0.3)  # fmt: skip
        s(x)
        assert s.plan.decoded_residents == ()
        swapping = tmp_path / "swapping.json"
        s.plan.save(swapping)
        s.close()
        old = edited(src=swapping, fn=lambda d: (d.pop("decoded_residents"), d.update(schema_version=3)))
        assert '"decoded_residents"' not in old
        loaded = SwapPlan.from_json(old)
        assert loaded.decoded_residents == () and loaded.units == load_plan(swapping).units
        (tmp_path / "old.json").write_text(old)
        again = fxswap.compile(model, backend="eager", plan=tmp_path / "old.json")
        assert torch.equal(again(x), want)
        assert len(_graph_dequants(again)) == len(sizes)
        again.close()

        # a swapped weight marked decoded: refused on load, naming the field
        swapped = next(p for u in loaded.units if not u.resident for p in u.params if p in sizes)
        with pytest.raises(PlanError, match=rf"`decoded_residents` names '{swapped}'.*no resident unit"):
            SwapPlan.from_json(edited(lambda d: d.update(decoded_residents=[swapped]), swapping))
        with pytest.raises(PlanError, match=r"`plan.decoded_residents` is .* not a valid tuple"):
            SwapPlan.from_json(edited(lambda d: d.update(decoded_residents="blocks.0.0.weight")))
        # a resident weight not kept as stored (a bias) marked decoded: refused when compiled
        bias = next(p for u in plan.units if u.resident for p in u.params if p not in sizes)
        bad = tmp_path / "bad.json"
        bad.write_text(edited(lambda d: d.update(decoded_residents=[bias])))
        with pytest.raises(
            PlanError, match=rf"`decoded_residents` names '{bias}'.*not a weight kept as stored"
        ):
            fxswap.compile(model, backend="eager", plan=bad)(x)


@pytest.mark.slow
def test_inductor_runs_residents_decoded_once_bitwise() -> None:
    model, ref, sizes = _models(n=3)
    x = torch.randn(3, DIM, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = ref(x)
        s = fxswap.compile(model, mode="layerwise", max_vram_gb=1.0, reserve_mb=0, block_size_mb=0.3)
        assert torch.equal(s(x), want)
        assert torch.equal(s(x), want)
        assert s.plan.decoded_residents
        assert len(_graph_dequants(s)) == len(sizes) - len(s.plan.decoded_residents)
        s.release()
        with measure("cpu") as m:
            assert torch.equal(s(x), want)
        assert m.peak_bytes + live_bytes([x]) <= s.plan.peak_bytes <= 2**30
        s.close()
