"""The graph cache (fxswap.graph_cache): a hit is the graph a fresh capture gives, and any change to
what the graph depends on misses. The reference is always ``fxswap.trace`` run anew, never the
cache's own output."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import fxswap
import fxswap._version
from fxswap import graph_cache
from fxswap.graph_cache import captured_ir, ir_from_json, ir_to_json
from tests.models import MLP, Shared


class _Counting:
    """fxswap.trace, counting how often it runs (a hit must not run it)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return fxswap.trace(model, *args, **kwargs)


def test_a_hit_is_the_graph_a_fresh_capture_gives(tmp_path: Path) -> None:
    model, x = MLP(4, 32), torch.randn(3, 32)
    capture = _Counting()
    first = captured_ir(model, (x,), cache=tmp_path, capture=capture)
    second = captured_ir(model, (x,), cache=tmp_path, capture=capture)
    assert (first.hit, second.hit, capture.calls) == (False, True, 1)
    assert second.path == first.path and first.path is not None and first.path.exists()
    assert second.ir == fxswap.trace(model, x).ir


def test_tied_weights_and_meta_inputs_round_trip(tmp_path: Path) -> None:
    model = Shared().to("meta")
    x = torch.empty(2, 32, device="meta")
    captured_ir(model, (x,), cache=tmp_path)
    hit = captured_ir(model, (x,), cache=tmp_path)
    assert hit.hit
    assert hit.ir == fxswap.trace(model, x).ir


def _misses(
    tmp_path: Path, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
) -> bool:
    return not captured_ir(model, args, kwargs, cache=tmp_path).hit


def test_every_input_of_the_key_misses_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 32)
    base = MLP(4, 32)
    assert _misses(tmp_path, base, (x,))
    assert not _misses(tmp_path, base, (x,))
    # Same structure, other weight values: the graph does not depend on values.
    assert not _misses(tmp_path, MLP(4, 32), (x,))
    assert _misses(tmp_path, MLP(5, 32), (x,))  # structure
    assert _misses(tmp_path, MLP(4, 32).to(torch.float64), (x.double(),))  # parameter dtype (and input)
    assert _misses(tmp_path, base, (torch.randn(4, 32),))  # input shape
    assert _misses(tmp_path, base, (torch.randn(32, 3).t(),))  # input strides
    # input device: rules instead of measured workspace
    assert _misses(tmp_path, MLP(4, 32).to("meta"), (x.to("meta"),))
    tied = Shared()
    assert _misses(tmp_path, tied, (x,))
    untied = Shared()
    untied.out.weight = nn.Parameter(untied.emb.weight.detach().clone())
    assert _misses(tmp_path, untied, (x,))  # the same shapes without the tie
    evaluating = MLP(4, 32)
    evaluating.train(False)
    assert _misses(tmp_path, evaluating, (x,))  # a module attribute (training)
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert _misses(tmp_path, base, (x,))
    monkeypatch.setattr(fxswap._version, "__version__", "0.0.0-other")
    assert _misses(tmp_path, base, (x,))


class _Scaled(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.scale = scale

    def forward(self, x: torch.Tensor, *, times: int = 1) -> torch.Tensor:
        for _ in range(times):
            x = self.lin(x) * self.scale
        return x


def test_plain_attributes_and_non_tensor_arguments_are_in_the_key(tmp_path: Path) -> None:
    x = torch.randn(2, 16)
    assert _misses(tmp_path, _Scaled(0.5), (x,))
    assert not _misses(tmp_path, _Scaled(0.5), (x,))
    assert _misses(tmp_path, _Scaled(2.0), (x,))
    assert _misses(tmp_path, _Scaled(0.5), (x,), {"times": 2})
    hit = captured_ir(_Scaled(0.5), (x,), {"times": 2}, cache=tmp_path)
    assert hit.hit and hit.ir == fxswap.trace(_Scaled(0.5), x, times=2).ir


def _module_from(path: Path, source: str) -> Any:
    path.write_text(textwrap.dedent(source))
    name = f"_fxswap_cache_probe_{abs(hash(source))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_a_changed_forward_misses(tmp_path: Path) -> None:
    # Two versions of one model file: same class, same parameters, another forward.
    src = tmp_path / "model_src.py"
    body = """
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(8, 8)
            def forward(self, x):
                return {expr}
    """
    x = torch.randn(2, 8)
    old = _module_from(src, body.format(expr="self.lin(x)"))
    cache = tmp_path / "cache"
    assert _misses(cache, old.Net(), (x,))
    new = _module_from(src, body.format(expr="torch.relu(self.lin(x)) + x"))
    got = captured_ir(new.Net(), (x,), cache=cache)
    assert not got.hit
    assert got.ir == fxswap.trace(new.Net(), x).ir


def test_a_file_for_another_key_or_a_broken_file_is_refused_and_replaced(tmp_path: Path) -> None:
    model, x = MLP(3, 16), torch.randn(2, 16)
    path = captured_ir(model, (x,), cache=tmp_path).path
    assert path is not None
    data = json.loads(path.read_text())
    data["key"]["torch"] = "0.0.0"  # e.g. a file copied from another install
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="refusing the cached graph"):
        again = captured_ir(model, (x,), cache=tmp_path)
    assert not again.hit and again.ir == fxswap.trace(model, x).ir
    assert captured_ir(model, (x,), cache=tmp_path).hit  # replaced by a good file

    path.write_text(path.read_text()[:100])  # truncated (a crash mid-write on another system)
    with pytest.warns(UserWarning, match="unreadable cached graph"):
        assert not captured_ir(model, (x,), cache=tmp_path).hit
    assert captured_ir(model, (x,), cache=tmp_path).hit

    data = json.loads(path.read_text())
    data["ir"]["ops"][0]["out_bytes"] = "12"  # a wrong type, the key intact
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"ops\[0\]\.out_bytes: expected int"):
        assert not captured_ir(model, (x,), cache=tmp_path).hit


def test_cache_false_neither_reads_nor_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FXSWAP_CACHE_DIR", str(tmp_path))
    model, x = MLP(3, 16), torch.randn(2, 16)
    got = captured_ir(model, (x,), cache=False)
    assert not got.hit and got.path is None
    assert list(tmp_path.iterdir()) == []
    assert captured_ir(model, (x,)).path is not None  # the default location is $FXSWAP_CACHE_DIR
    assert len(list(tmp_path.iterdir())) == 1
    assert not captured_ir(model, (x,), cache=False).hit


def test_cache_location() -> None:
    env = {"FXSWAP_CACHE_DIR": "", "XDG_CACHE_HOME": "/xdg"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert graph_cache.cache_dir() == Path("/xdg/fxswap/graphs")
        mp.setenv("FXSWAP_CACHE_DIR", "/somewhere")
        assert graph_cache.cache_dir() == Path("/somewhere")


def test_json_codec_checks_each_field() -> None:
    ir = fxswap.trace(MLP(2, 8), torch.randn(1, 8)).ir
    data = json.loads(json.dumps(ir_to_json(ir)))
    assert ir_from_json(data) == ir
    data["weights"][0]["shape"] = [8, "8"]
    with pytest.raises(ValueError, match=r"weights\[0\]\.shape: expected list\[int\]"):
        ir_from_json(data)
    with pytest.raises(ValueError, match="sections"):
        ir_from_json({"ops": []})
    bad = json.loads(json.dumps(ir_to_json(ir)))
    del bad["buffers"][0]["end"]
    with pytest.raises(ValueError, match=r"buffers\[0\]: expected the fields"):
        ir_from_json(bad)


def test_the_key_does_not_depend_on_what_else_is_imported() -> None:
    # Two processes, one of which imports the planner and the compiler first: the same key (a key
    # over the loaded modules' files missed the cache between `fxswap plan` runs).
    import subprocess

    code = (
        "import sys, torch\n"
        "if sys.argv[1] == 'more':\n"
        "    import fxswap.passes.planner, fxswap.compiler, fxswap.bench.runner\n"
        "from fxswap.graph_cache import cache_key, _digest\n"
        "from tests.models import MLP\n"
        "print(_digest(cache_key(MLP(2, 8), (torch.empty(1, 8, device='meta'),), {})))\n"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", code, which], capture_output=True, text=True, check=True
        ).stdout.strip()
        for which in ("few", "more")
    }
    assert len(keys) == 1, keys


def test_a_class_without_a_source_file_is_not_cached(tmp_path: Path) -> None:
    # A model defined in `python -c` (or a notebook cell) has no file the key could hash: a changed
    # forward would hit a stale graph, so such a graph is captured every time and never written.
    import subprocess

    code = (
        "import sys, torch\n"
        "from fxswap.graph_cache import captured_ir\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        return self.lin(x)\n"
        "x = torch.randn(2, 4)\n"
        "print([captured_ir(Net(), (x,), cache=sys.argv[1]).hit for _ in range(2)])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[False, False]"
    assert list(tmp_path.iterdir()) == []
