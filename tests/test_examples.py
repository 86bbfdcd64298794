"""The examples README points to run to completion and check what they print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_wan_tiny_example() -> None:
    out = _run("wan_tiny.py")
    assert "detected layout: diffusers" in out
    assert "weights bitwise equal to the source: True" in out


@pytest.mark.slow
def test_compile_wan_tiny_example_is_exact_in_every_mode() -> None:
    out = _run("compile_wan_tiny.py")
    assert out.count("output bitwise equal to the unswapped model: True") == 3
