"""Capture (fxswap.trace) and the FX -> GraphIR analysis, checked against hand-computed figures."""

from __future__ import annotations

import inspect
import resource

import pytest
import torch
from torch import nn

import fxswap
from fxswap.ir import GraphIR
from fxswap.passes.analyse import module_path

F32 = 4  # bytes per float32 element


def _op(ir: GraphIR, name: str):  # type: ignore[no-untyped-def]
    return next(o for o in ir.ops if o.name == name)


def _buffer(ir: GraphIR, name: str):  # type: ignore[no-untyped-def]
    return next(b for b in ir.buffers if b.name == name)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 1, groups=2) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        for b in self.blocks:
            x = b(x)
        return x


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8, bias=False)
        self.b = nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight  # tied: one Parameter object under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_mlp_names_bytes_flops_and_live_ranges() -> None:
    model = MLP()
    x = torch.randn(2, 8)
    t = fxswap.trace(model, x)
    ir = t.ir

    assert [n for n in t.placeholder_params if n] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert t.placeholder_params.count(None) == 1
    # the example inputs Dynamo passed are the model's own Parameter objects, at the mapped positions
    params = dict(model.named_parameters())
    for name, value in zip(t.placeholder_params, t.example_inputs, strict=True):
        if name is not None:
            assert value is params[name]
        else:
            assert value is x

    assert [w.name for w in ir.weights] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert [w.module for w in ir.weights] == ["fc1", "fc1", "fc2", "fc2"]
    assert ir.weights[0].shape == (16, 8) and ir.weights[0].dtype == "float32"
    assert ir.weight_bytes == (16 * 8 + 16 + 4 * 16 + 4) * F32

    assert [o.target for o in ir.ops] == ["torch._C._nn.linear", "torch.relu", "torch._C._nn.linear"]
    assert [o.module for o in ir.ops] == ["fc1", "", "fc2"]
    assert [o.weights for o in ir.ops] == [("fc1.weight", "fc1.bias"), (), ("fc2.weight", "fc2.bias")]
    assert [o.out_bytes for o in ir.ops] == [2 * 16 * F32, 2 * 16 * F32, 2 * 4 * F32]
    assert [o.flops for o in ir.ops] == [2 * 2 * 16 * 8, 0, 2 * 2 * 4 * 16]
    # relu reads 2x16 and writes 2x16 floats
    assert ir.ops[1].mem_bytes == 2 * 2 * 16 * F32

    assert ir.inputs == (fxswap.ir.InputInfo(name="x", shape=(2, 8), dtype="float32"),)
    spans = [(b.nbytes, b.start, b.end) for b in ir.buffers]
    # the input x spans the whole call: the caller holds it after its last read (op 0)
    assert spans == [(2 * 8 * F32, 0, 2), (2 * 16 * F32, 0, 1), (2 * 16 * F32, 1, 2), (2 * 4 * F32, 2, 2)]


class Aliases(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x).view(2, 16).transpose(0, 1)  # [16, 2], a view of the linear output
        a, b = y.chunk(2)  # two [8, 2] views of the same storage
        s = a + b  # [8, 2]: the only new storage after the linear
        c = y.contiguous()  # non-contiguous: a real copy [16, 2]
        c.add_(1.0)  # in place: no new storage, but memory traffic
        return s, c


def test_views_chunk_getitem_fold_into_base_storage() -> None:
    ir = fxswap.trace(Aliases(), torch.randn(4, 8)).ir
    by_target = {o.target: o for o in ir.ops}
    lin = by_target["torch._C._nn.linear"]
    assert lin.out_bytes == 4 * 8 * F32
    for view_like in ("Tensor.view", "Tensor.transpose", "Tensor.chunk", "_operator.getitem"):
        assert by_target[view_like].out_bytes == 0, view_like
        assert by_target[view_like].mem_bytes == 0, view_like
    assert by_target["_operator.add"].out_bytes == 8 * 2 * F32
    assert by_target["Tensor.contiguous"].out_bytes == 16 * 2 * F32
    inplace = by_target["Tensor.add_"]
    assert inplace.out_bytes == 0 and inplace.mem_bytes > 0
    assert sum(o.out_bytes for o in ir.ops) == (32 + 16 + 32) * F32

    names = [o.name for o in ir.ops]
    base = _buffer(ir, lin.name)
    # the linear output stays alive until the last read of any of its views (the contiguous copy)
    assert base.start == names.index(lin.name)
    assert base.end == names.index(by_target["Tensor.contiguous"].name)
    # both results are graph outputs: they live to the last op
    assert _buffer(ir, by_target["_operator.add"].name).end == len(ir.ops) - 1
    assert _buffer(ir, by_target["Tensor.contiguous"].name).end == len(ir.ops) - 1
    # no buffer for views: one per real storage (input, linear, add, contiguous)
    assert len(ir.buffers) == 4


class TupleOp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = torch.max(x, dim=1)  # a fresh op returning two new storages
        return values * 2 + indices


def test_fresh_tuple_op_allocates_each_element() -> None:
    ir = fxswap.trace(TupleOp(), torch.randn(4, 8)).ir
    mx = next(o for o in ir.ops if o.target == "torch.max")
    assert mx.out_bytes == 4 * 4 + 4 * 8  # float32 values + int64 indices
    getitems = [o for o in ir.ops if o.target == "_operator.getitem"]
    assert len(getitems) == 2 and all(o.out_bytes == 0 for o in getitems)


def test_conv_flops_buffers_and_module_paths() -> None:
    model = ConvNet().eval()
    t = fxswap.trace(model, torch.randn(1, 3, 6, 6))
    names = {w.name for w in t.ir.weights}
    assert {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "blocks.0.weight", "blocks.1.bias"} <= names
    # eval-mode batch norm reads its running statistics: buffers are named by identity too
    assert {"bn.running_mean", "bn.running_var"} <= names
    convs = [o for o in t.ir.ops if o.target == "torch.conv2d"]
    assert [o.module for o in convs] == ["conv", "blocks.0", "blocks.1"]
    out_numel = 1 * 8 * 6 * 6
    assert convs[0].flops == 2 * out_numel * 3 * 3 * 3
    assert convs[1].flops == 2 * out_numel * (8 // 2) * 1  # groups=2
    bn = next(o for o in t.ir.ops if o.module == "bn")
    assert "bn.running_mean" in bn.weights


def test_shared_weight_is_one_weight_used_by_two_ops() -> None:
    t = fxswap.trace(Shared(), torch.randn(3, 8))
    assert [w.name for w in t.ir.weights] == ["a.weight"]
    assert [n for n in t.placeholder_params if n] == ["a.weight"]
    users = [o for o in t.ir.ops if "a.weight" in o.weights]
    assert [o.module for o in users] == ["a", "b"]


class Attention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_sdpa_and_matmul_flops() -> None:
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    ir = fxswap.trace(Attention(), q, k, v).ir
    (op,) = ir.ops
    assert op.flops == 4 * 1 * 2 * 16 * 32 * 8
    assert [i.name for i in ir.inputs] == ["q", "k", "v"]

    class Bmm(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a @ b

    (mm,) = fxswap.trace(Bmm(), torch.randn(3, 4, 5), torch.randn(3, 5, 6)).ir.ops
    assert mm.flops == 2 * 3 * 4 * 6 * 5


def test_meta_tracing_allocates_nothing() -> None:
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(8192, 8192) for _ in range(8)])  # 2 GiB of float32 weights
        x = torch.empty(4, 8192)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = fxswap.trace(model, x)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert t.ir.weight_bytes == 8 * (8192 * 8192 + 8192) * F32
    assert [w.name for w in t.ir.weights][:2] == ["0.weight", "0.bias"]
    assert all(getattr(e, "device", torch.device("meta")).type == "meta" for e in t.example_inputs)
    assert grown_mib < 512


def _line_of(fn: object, marker: str) -> int:
    lines, first = inspect.getsourcelines(fn)  # type: ignore[arg-type]
    return first + next(i for i, line in enumerate(lines) if marker in line)


class ItemBreak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x)
        if x.sum().item() > 0:  # BREAK-ITEM
            x = x * 2
        return x


class PrintBreak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("tracing")  # BREAK-PRINT
        return self.lin(x)


class ExplicitBreak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x)
        torch._dynamo.graph_break()  # BREAK-EXPLICIT
        return self.lin(x)


@pytest.mark.parametrize(
    ("cls", "marker", "reason"),
    [
        (ItemBreak, "BREAK-ITEM", "data-dependent"),
        (PrintBreak, "BREAK-PRINT", "print"),
        (ExplicitBreak, "BREAK-EXPLICIT", "graph_break"),
    ],
)
def test_graph_break_names_reason_and_source_line(cls: type[nn.Module], marker: str, reason: str) -> None:
    model = cls()
    requires = [p.requires_grad for p in model.parameters()]
    with pytest.raises(fxswap.CaptureError) as info:
        fxswap.trace(model, torch.randn(2, 4))
    msg = str(info.value)
    assert f"test_trace.py:{_line_of(cls.forward, marker)}" in msg
    assert reason.lower() in msg.lower()
    assert info.value.__cause__ is not None  # the Dynamo exception is chained
    assert [p.requires_grad for p in model.parameters()] == requires  # restored on failure too


def test_trace_leaves_model_unchanged_and_retraces() -> None:
    model = MLP()
    model.fc2.bias.requires_grad_(False)
    before = {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    first = fxswap.trace(model, torch.randn(2, 8))
    second = fxswap.trace(model, torch.randn(2, 8))
    reshaped = fxswap.trace(model, torch.randn(5, 8))
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for n, (obj, value, req) in before.items():
        assert after[n] is obj
        assert torch.equal(after[n], value)
        assert after[n].requires_grad == req
    assert model.training
    # every call really re-traces (a fresh graph), and the new shape is seen: no cache leaks
    assert first.gm is not second.gm
    assert first.ir == second.ir
    assert reshaped.ir.inputs[0].shape == (5, 8)
    assert reshaped.ir.ops[0].out_bytes == 5 * 16 * F32


def test_kwargs_and_nested_inputs_are_named() -> None:
    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, extra: list[torch.Tensor] | None = None) -> torch.Tensor:
            assert extra is not None
            return self.lin(x) + extra[1]

    t = fxswap.trace(Kw(), torch.randn(2, 4), extra=[torch.randn(4), torch.randn(4)])
    assert sorted(i.name for i in t.ir.inputs) == ["extra[1]", "x"]


def test_trace_rejects_non_module() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fxswap.trace(lambda x: x, torch.randn(2))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("L['self'].blocks.0.self_attn", "blocks.0.self_attn"),
        ("L['self']._modules['blocks']._modules['0']._modules['ffn']", "blocks.0.ffn"),
        ("getattr(L['self'].blocks, '3').norm", "blocks.3.norm"),
        ("L['self'].blocks[2].attn", "blocks.2.attn"),
        ("L['model']", ""),
        ("L['model']._modules['l']._parameters['weight']", "l.weight"),
    ],
)
def test_module_path(source: str, expected: str) -> None:
    assert module_path(source) == expected
