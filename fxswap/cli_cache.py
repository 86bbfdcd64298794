"""``fxswap plan``'s cached path: the graph of a built-in WAN config found without importing torch.

The graph cache (:mod:`fxswap.graph_cache`) keys an entry on the live model and inputs, so reading it
needs torch imported and the meta model built: about 1.5 s of a repeated ``fxswap plan`` on a
2-core machine, against a few hundredths for the rest. For a built-in config (``--model NAME``)
everything that model and its inputs are a function of is known before torch is imported, so this
module keys a second ("front") entry on exactly that and stores the IR the command plans:

- the config's values (after ``--layers``), from :mod:`fxswap.models.wan_config`, which imports no
  torch;
- the input arguments: batch, frames, height, width and the ``--dtype`` (fp8's re-sized Linear
  weights are in the stored IR);
- the source on disk of every ``.py`` file of ``fxswap`` and ``fxswap.passes`` (hashed, not
  imported): the model, the capture, the analysis, the CLI and this key itself;
- torch's ``version.py`` as the import system would find it (not imported): its version string and
  the git commit it was built from; and Python's version.

That covers every input of the graph cache's key for such a model (the module tree, the tensors and
the input signature all follow from the config, the arguments and the source), so a front entry is
only ever read where the graph cache would have given the same IR. A miss, a changed input, or an
unreadable file (a warning) falls back to the torch path, which fills both caches. Entries live in
``plan/`` under :func:`fxswap.graph_cache.cache_dir` and are JSON like the graph cache's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from fxswap.graph_cache import FORMAT as GRAPH_FORMAT
from fxswap.graph_cache import cache_dir, read_entry, write_entry
from fxswap.ir import GraphIR
from fxswap.models.wan_config import WanConfig

__all__ = ["FORMAT", "front_key", "front_path", "read", "source_digest", "torch_build", "write"]

# Bumped when what a front entry holds, or what its key means, changes.
FORMAT = 1

_VERSION = re.compile(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", re.MULTILINE)


def torch_build() -> dict[str, str] | None:
    """torch's version and a digest of its ``version.py`` (version, git commit, CUDA), read from the
    file ``import torch`` would load; None when torch cannot be found that way (no front caching)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "version.py"
        try:
            text = path.read_bytes()
        except OSError:
            continue
        found = _VERSION.search(text.decode("utf-8", "replace"))
        if found is None:
            return None
        return {"version": found.group(1), "version_py": hashlib.sha256(text).hexdigest()}
    return None


def _package_roots() -> list[str]:
    import fxswap

    roots = [os.path.dirname(os.path.abspath(fxswap.__file__ or ""))]
    # fxswap.passes is installed from passes/ (a symlink in a checkout, a mapping in an editable
    # install): its spec says where, without importing it
    spec = importlib.util.find_spec("fxswap.passes")
    roots += [os.path.abspath(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return roots


# A module file that is not source (a compiled-only install): its change would not show in the digest.
_COMPILED = (".pyc", ".pyo", ".so", ".pyd")


def source_digest(roots: list[str] | None = None) -> str | None:
    """SHA-256 of every ``.py`` file under ``roots`` (default: fxswap's and fxswap.passes' folders),
    each named by its path below its root, each file once however many roots reach it; None when a
    root holds a module without its source, or no source at all (then nothing is cached)."""
    seen: set[str] = set()
    files: list[tuple[str, str]] = []
    for i, top in enumerate(_package_roots() if roots is None else roots):
        for root, dirs, names in os.walk(top, followlinks=True):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for n in names:
                if n.endswith(_COMPILED):
                    return None
                path = os.path.join(root, n)
                real = os.path.realpath(path)
                if n.endswith(".py") and real not in seen:
                    seen.add(real)
                    files.append((f"{i}/{os.path.relpath(path, top)}", path))
    if not files:
        return None
    h = hashlib.sha256()
    for name, path in sorted(files):
        h.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def front_key(
    config: WanConfig, *, batch: int, frames: int, height: int, width: int, dtype: str
) -> dict[str, Any] | None:
    """The key of ``fxswap plan``'s graph for ``config`` at this input, or None when torch's version
    or fxswap's source cannot be read without importing them (then the command takes the torch path)."""
    torch = torch_build()
    source = source_digest()
    if torch is None or source is None:
        return None
    return {
        "format": FORMAT,
        "graph_format": GRAPH_FORMAT,
        "python": sys.version.split()[0],
        "torch": torch,
        "source": source,
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
        "inputs": {
            "batch": batch,
            "frames": frames,
            "height": height,
            "width": width,
            "dtype": dtype,
            "device": "meta",
        },
    }


def front_path(key: dict[str, Any], folder: Path | None = None) -> Path:
    """Where the entry of ``key`` lives: ``plan/`` under ``folder`` (default the graph cache's)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return (cache_dir() if folder is None else folder) / "plan" / f"{digest[:32]}.json"


def read(key: dict[str, Any], folder: Path | None = None) -> GraphIR | None:
    """The IR stored for ``key``; None when there is none, or (with a warning) when the file does not
    parse as an entry for this key."""
    return read_entry(front_path(key, folder), key, "taking the torch path")


def write(key: dict[str, Any], ir: GraphIR, folder: Path | None = None) -> None:
    """Store ``ir`` for ``key`` (atomically; a warning, not an error, when the folder is not writable)."""
    write_entry(front_path(key, folder), key, ir)
