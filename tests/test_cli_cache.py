"""``fxswap plan``'s torch-free cached path (fxswap.cli_cache): a hit imports no torch and prints and
writes what the torch path does; any change to what the graph depends on misses; a bad file falls
back. The reference is always the command run with ``--no-cache`` (a fresh meta capture)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fxswap
import fxswap.models.wan
import fxswap.passes.analyse
from fxswap import cli_cache
from fxswap.cli import main
from fxswap.ir import GraphIR, OpInfo, WeightInfo
from fxswap.models import wan_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "wan2.1-t2v-1.3b", "--layers", "2", "--resolution", "256x256", "--frames", "5"]

# Runs fxswap's CLI in this child, then reports whether any torch module got imported.
_CHILD = textwrap.dedent(
    """
    import json, sys
    from fxswap.cli import main
    rc = main(sys.argv[1:])
    sys.stdout.flush()
    torch = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    print("CHILD " + json.dumps({"rc": rc, "torch": torch[:5]}))
    """
)


def _child(argv: list[str], cache: Path) -> tuple[str, dict[str, object]]:
    env = dict(os.environ, FXSWAP_CACHE_DIR=str(cache))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    out, _, report = proc.stdout.rpartition("CHILD ")
    return out, json.loads(report)


def _untimed(report: str) -> str:
    # the two timings are the only things that may differ between two runs of one command
    return re.sub(r"\d+\.\d+ s\b", "<t> s", report)


@pytest.mark.parametrize(
    "extra",
    [
        ["--max-vram-gb", "1", "--mode", "chunkwise"],
        ["--max-vram-gb", "0.6", "--dtype", "fp8", "--card", "rtx4090", "--no-warm-start"],
    ],
    ids=["bf16", "fp8-card"],
)
def test_a_hit_imports_no_torch_and_gives_what_the_torch_path_gives(tmp_path: Path, extra: list[str]) -> None:
    cache, out = tmp_path / "graphs", tmp_path / "plan.json"
    argv = ["plan", *SMALL, *extra, "-o", str(out)]
    fresh_report, fresh = _child([*argv, "--no-cache"], cache)
    assert not cache.exists() and fresh["torch"]  # --no-cache: torch path, nothing written
    fresh_json = out.read_bytes()
    first_report, first = _child(argv, cache)  # a miss: torch path, fills both caches
    assert "meta capture" in first_report and first["torch"]
    assert out.read_bytes() == fresh_json
    assert len(list((cache / "plan").glob("*.json"))) == 1
    hit_report, hit = _child(argv, cache)
    assert hit == {"rc": 0, "torch": []}
    assert "graph from the cache" in hit_report
    assert out.read_bytes() == fresh_json
    assert _untimed(hit_report) == _untimed(fresh_report).replace(
        "meta capture <t> s", "graph from the cache <t> s"
    )


def test_torch_free_modules_import_no_torch() -> None:
    code = (
        "import sys, fxswap.cli, fxswap.cli_cache, fxswap.graph_cache, fxswap.models.wan_config, "
        "fxswap.passes.planner, fxswap.options\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'torch'], 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_attention_names_list_the_backends() -> None:
    assert tuple(fxswap.models.wan.ATTENTION_TYPES) == wan_config.ATTENTION_NAMES


# ------------------------------------------------------------------------------------------------
# The key
# ------------------------------------------------------------------------------------------------

BASE = dataclasses.replace(wan_config.CONFIGS["wan2.1-t2v-1.3b"], num_layers=2)
INPUT = {"batch": 1, "frames": 5, "height": 256, "width": 256, "dtype": "bf16"}


def _ir(n: int = 1) -> GraphIR:
    w = WeightInfo(name="w", shape=(2, 2), dtype="bfloat16", nbytes=8, module="lin")
    op = OpInfo(
        name="op", target="aten.mm", module="lin", weights=("w",), out_bytes=4 * n, flops=8.0, mem_bytes=0
    )
    return GraphIR(ops=(op,), weights=(w,), buffers=(), inputs=())


def _key(config: wan_config.WanConfig = BASE, **changes: object) -> dict[str, object]:
    key = cli_cache.front_key(config, **{**INPUT, **changes})  # type: ignore[arg-type]
    assert key is not None
    return key


def test_every_input_of_the_key_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _key()
    assert _key() == base  # deterministic
    cli_cache.write(base, _ir(), tmp_path)
    assert cli_cache.read(base, tmp_path) == _ir()
    changed = {
        "config value": _key(dataclasses.replace(BASE, sla_topk=0.15)),
        "layers": _key(dataclasses.replace(BASE, num_layers=3)),
        "attention": _key(dataclasses.replace(BASE, attention_type="sla")),
        "frames": _key(frames=9),
        "height": _key(height=320),
        "width": _key(width=320),
        "batch": _key(batch=2),
        "dtype": _key(dtype="fp8"),
    }
    monkeypatch.setattr(sys, "version", "3.99.0 (other)")
    changed["python"] = _key()
    monkeypatch.undo()
    monkeypatch.setattr(cli_cache, "FORMAT", cli_cache.FORMAT + 1)
    changed["format"] = _key()
    monkeypatch.undo()
    for what, key in changed.items():
        assert key != base, what
        assert cli_cache.read(key, tmp_path) is None, what
    assert cli_cache.read(base, tmp_path) == _ir()


def _fake_torch(folder: Path, version: str, commit: str) -> Path:
    pkg = folder / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the front key must not import torch')\n")
    (pkg / "version.py").write_text(f"__version__ = '{version}'\ngit_version = '{commit}'\n")
    return folder


def _key_in_child(pythonpath: Path | None) -> dict[str, object]:
    code = textwrap.dedent(
        f"""
        import dataclasses, json
        from fxswap import cli_cache
        from fxswap.models import wan_config
        config = dataclasses.replace(wan_config.CONFIGS["wan2.1-t2v-1.3b"], num_layers=2)
        print(json.dumps(cli_cache.front_key(config, **{INPUT!r})))
        """
    )
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    )
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_the_key_reads_the_torch_that_import_would_load(tmp_path: Path) -> None:
    import torch

    real = _key_in_child(None)
    assert real["torch"]["version"] == torch.__version__  # type: ignore[index]
    assert real == json.loads(json.dumps(_key()))
    other = _key_in_child(_fake_torch(tmp_path / "a", "9.9.9", "abc"))
    assert other["torch"]["version"] == "9.9.9"  # type: ignore[index]
    same_version = _key_in_child(_fake_torch(tmp_path / "b", torch.__version__, "another-commit"))
    assert same_version["torch"]["version"] == torch.__version__  # type: ignore[index]
    assert len({json.dumps(k, sort_keys=True) for k in (real, other, same_version)}) == 3
    assert {k: v for k, v in other.items() if k != "torch"} == {k: v for k, v in real.items() if k != "torch"}


def test_the_source_digest_covers_the_model_capture_and_passes() -> None:
    roots = [os.path.realpath(r) for r in cli_cache._package_roots()]
    for module in (fxswap.models.wan, fxswap.passes.analyse, fxswap.cli, cli_cache, wan_config):
        path = os.path.realpath(module.__file__ or "")
        assert any(path.startswith(r + os.sep) for r in roots), path


@pytest.mark.parametrize("edited", ["fxswap/models/wan.py", "passes/analyse.py", "fxswap/capture.py"])
def test_a_changed_source_file_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edited: str) -> None:
    copy = tmp_path / "src"
    for part in ("fxswap", "passes"):
        # symlinks=True keeps fxswap/passes -> ../passes a link, as in the checkout
        shutil.copytree(ROOT / part, copy / part, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cli_cache, "_package_roots", lambda: [str(copy / "fxswap"), str(copy / "passes")])
    before = _key()
    assert before == _key()
    cli_cache.write(before, _ir(), tmp_path)
    with open(copy / edited, "a") as f:
        f.write("\n# edited\n")
    after = _key()
    assert after["source"] != before["source"]
    assert cli_cache.read(after, tmp_path) is None


# ------------------------------------------------------------------------------------------------
# Bad files, --no-cache
# ------------------------------------------------------------------------------------------------


def test_a_corrupt_front_file_warns_and_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "graphs"
    monkeypatch.setenv("FXSWAP_CACHE_DIR", str(cache))
    argv = ["plan", *SMALL, "--max-vram-gb", "1"]
    assert main([*argv, "--no-cache", "-o", str(tmp_path / "fresh.json")]) == 0
    assert not cache.exists()
    assert main([*argv, "-o", str(tmp_path / "first.json")]) == 0
    (front,) = (cache / "plan").glob("*.json")
    good = front.read_bytes()
    capsys.readouterr()
    for bad in (b"{not json", good[: len(good) // 2], json.dumps({"key": {}, "ir": {}}).encode()):
        front.write_bytes(bad)
        with pytest.warns(UserWarning, match=r"cached graph .*plan.*; taking the torch path"):
            assert main([*argv, "-o", str(tmp_path / "again.json")]) == 0
        assert (tmp_path / "again.json").read_bytes() == (tmp_path / "fresh.json").read_bytes()
        assert front.read_bytes() == good  # rewritten by the torch path
    assert (tmp_path / "first.json").read_bytes() == (tmp_path / "fresh.json").read_bytes()


def test_an_unwritable_cache_plans_all_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FXSWAP_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="could not write the graph cache"):
        assert main(["plan", *SMALL, "--max-vram-gb", "1", "-o", str(tmp_path / "p.json")]) == 0
    assert main(["plan", *SMALL, "--max-vram-gb", "1", "--no-cache", "-o", str(tmp_path / "q.json")]) == 0
    assert (tmp_path / "p.json").read_bytes() == (tmp_path / "q.json").read_bytes()


def test_a_compiled_only_module_turns_the_front_cache_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "src"
    shutil.copytree(
        ROOT / "fxswap", copy / "fxswap", symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    monkeypatch.setattr(cli_cache, "_package_roots", lambda: [str(copy / "fxswap")])
    assert cli_cache.front_key(BASE, **INPUT) is not None  # type: ignore[arg-type]
    (copy / "fxswap" / "models" / "extra.pyc").write_bytes(b"")  # a module whose change no digest sees
    assert cli_cache.front_key(BASE, **INPUT) is None  # type: ignore[arg-type]
    assert cli_cache.source_digest([str(tmp_path / "empty")]) is None
