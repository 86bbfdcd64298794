"""Repository-level contracts: README's commands and CI agree, the package installs as designed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)[:2]


def test_readme_starts_with_two_commands() -> None:
    commands = _readme_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)


def test_ci_runs_readme_test_command() -> None:
    test_cmd = _readme_commands()[1]
    pytest_part = test_cmd.split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert pytest_part in ci.splitlines()


def test_passes_is_a_subpackage() -> None:
    import fxswap.passes

    assert Path(fxswap.passes.__file__).resolve().parent == ROOT / "passes"


def test_every_package_directory_is_installed() -> None:
    """pyproject lists packages by name: a new subpackage missing there would be left out of the wheel."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {"fxswap.passes"} | {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "fxswap").rglob("__init__.py")
        if "passes" not in p.relative_to(ROOT).parts  # the fxswap/passes symlink: installed from passes/
    }
    assert listed == on_disk
