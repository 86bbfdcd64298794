"""Capture once: the :class:`~fxswap.ir.GraphIR` of a model and input signature, cached on disk as JSON.

Capturing WAN 14B takes seconds (Dynamo traces 40 blocks) while planning it takes a tenth of a
second, so ``fxswap plan``, ``fxswap recommend`` and the bench keep the captured graph description
and reuse it when nothing it depends on changed. Only the plain-data IR is cached, never the
GraphModule: ``fxswap.compile`` rewrites the live graph and always captures.

The key covers everything the IR is a function of:

- the model's structure: every module's path, class and ``extra_repr()``, its plain attributes
  (ints, floats, strings, config dataclasses: e.g. the attention type or the SLA top-k), and the
  source of every loaded module of the packages that define its classes, torch's aside (the
  forward's code and the helpers it calls; for fxswap's own models that is all of fxswap);
- every parameter and buffer: name, shape, dtype (aliases included, since tied weights change the IR);
- the input signature: the pytree structure of the call, each tensor's shape, stride, dtype and
  device type (meta inputs get rule-based op workspace, real ones a measured one), the CUDA card's
  name for CUDA inputs, and every non-tensor argument (Dynamo specialises on them);
- the versions: the cache format, fxswap, torch, and the source of the capture modules (so a
  changed capture or analysis invalidates every entry without a version bump).

A file whose stored key differs from the computed one, or which does not parse as this format, is
refused: the graph is captured again and the file replaced; nothing is trusted that was not
written for this key. JSON only (no pickle). The location is ``$FXSWAP_CACHE_DIR`` if set, else
``$XDG_CACHE_HOME/fxswap/graphs`` (``~/.cache/fxswap/graphs``); ``cache=False`` (``--no-cache`` on
the command line) neither reads nor writes.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import inspect
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fxswap.ir import BufferInfo, GraphIR, InputInfo, OpInfo, WeightInfo

__all__ = [
    "FORMAT",
    "CachedGraph",
    "cache_dir",
    "cache_key",
    "captured_ir",
    "ir_from_json",
    "ir_to_json",
    "read_entry",
    "write_entry",
]

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("fxswap.graph_cache")

# torch is imported by the functions that compute the key, not by this module: the JSON codec and
# the file reading and writing serve `fxswap plan`'s torch-free cached path (fxswap.cli_cache).

# Bumped when the file layout or the meaning of an IR field changes (2: WeightInfo.joined;
# 3: OpInfo.dequant_bytes; 4: OpInfo's collective fields; 5: WeightInfo's stored-weight fields,
# decoded_nbytes and the rest).
FORMAT = 5

# Field -> JSON type for each IR record, checked on load: a file from another version, or edited
# by hand, fails with the field named instead of building a record with a wrong type.
_INT, _FLOAT, _STR, _STRS, _INTS = "int", "float", "str", "list[str]", "list[int]"
_PAIRS = "list[[int, int]]"
_BOOL = "bool"
_FIELDS: dict[type, dict[str, str]] = {
    OpInfo: {
        "name": _STR,
        "target": _STR,
        "module": _STR,
        "weights": _STRS,
        "out_bytes": _INT,
        "flops": _FLOAT,
        "mem_bytes": _INT,
        "workspace_bytes": _INT,
        "dequant_bytes": _INT,
        "collective": _STR,
        "sent_bytes": _INT,
        "received_bytes": _INT,
        "waits_on": _INT,
    },
    WeightInfo: {
        "name": _STR,
        "shape": _INTS,
        "dtype": _STR,
        "nbytes": _INT,
        "module": _STR,
        "joined": _PAIRS,
        "decoded_nbytes": _INT,
        "decode_scratch_bytes": _INT,
        "decoded_once": _BOOL,
        "stored_nbytes": _INT,
    },
    BufferInfo: {"name": _STR, "nbytes": _INT, "start": _INT, "end": _INT},
    InputInfo: {"name": _STR, "shape": _INTS, "dtype": _STR},
}
_SECTIONS: dict[str, type] = {
    "ops": OpInfo,
    "weights": WeightInfo,
    "buffers": BufferInfo,
    "inputs": InputInfo,
}


def _check_fields() -> None:
    # The table must name every field of every record: a field added to the IR without a type
    # here would otherwise be silently dropped by the cache.
    for cls, table in _FIELDS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        if names != set(table):
            raise AssertionError(
                f"graph_cache._FIELDS[{cls.__name__}] does not match its fields {sorted(names)}"
            )


_check_fields()


def ir_to_json(ir: GraphIR) -> dict[str, Any]:
    """Plain JSON of a GraphIR (tuples become lists)."""
    return {
        section: [
            {name: _json_value(v) for name, v in dataclasses.asdict(rec).items()}
            for rec in getattr(ir, section)
        ]
        for section in _SECTIONS
    }


def _json_value(v: Any) -> Any:
    return [_json_value(x) for x in v] if isinstance(v, (tuple, list)) else v


def _value(kind: str, v: Any, where: str) -> Any:
    def bad() -> ValueError:
        return ValueError(f"{where}: expected {kind}, got {type(v).__name__} {v!r}")

    if kind == _INT:
        if type(v) is not int:
            raise bad()
        return v
    if kind == _FLOAT:
        if type(v) not in (int, float) or not math.isfinite(v):
            raise bad()
        return float(v)
    if kind == _STR:
        if type(v) is not str:
            raise bad()
        return v
    if kind == _BOOL:
        if type(v) is not bool:
            raise bad()
        return v
    if kind == _PAIRS:
        if type(v) is not list or any(
            type(p) is not list or len(p) != 2 or any(type(x) is not int for x in p) for p in v
        ):
            raise bad()
        return tuple((p[0], p[1]) for p in v)
    elem = int if kind == _INTS else str
    if type(v) is not list or any(type(x) is not elem for x in v):
        raise bad()
    return tuple(v)


def ir_from_json(data: Any) -> GraphIR:
    """Inverse of :func:`ir_to_json`, checking every field's type against the table above.

    Raises:
        ValueError: naming the section, the record index and the field that does not fit.
    """
    if not isinstance(data, dict) or set(data) != set(_SECTIONS):
        raise ValueError(f"a graph needs exactly the sections {sorted(_SECTIONS)}")
    parts: dict[str, tuple[Any, ...]] = {}
    for section, cls in _SECTIONS.items():
        table = _FIELDS[cls]
        records = data[section]
        if not isinstance(records, list):
            raise ValueError(f"{section}: expected a list")
        out = []
        for i, rec in enumerate(records):
            if not isinstance(rec, dict) or set(rec) != set(table):
                raise ValueError(f"{section}[{i}]: expected the fields {sorted(table)}")
            out.append(cls(**{k: _value(kind, rec[k], f"{section}[{i}].{k}") for k, kind in table.items()}))
        parts[section] = tuple(out)
    return GraphIR(**parts)


# ------------------------------------------------------------------------------------------------
# The key
# ------------------------------------------------------------------------------------------------


def _plain(v: Any) -> Any:
    """A JSON-able stand-in for a module attribute, or None when it says nothing about the graph."""
    import torch

    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, enum.Enum):
        return f"{type(v).__qualname__}.{v.name}"
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, (tuple, list)) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v):
        return list(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return repr(v)
    if isinstance(v, torch.Tensor):
        # a plain tensor attribute (not a registered buffer) the forward may read as a constant
        return ["tensor", list(v.shape), str(v.dtype)]
    if callable(v) or hasattr(v, "__dict__"):
        # an object or function the forward may call (an attention processor...): its kind at least
        return f"<{type(v).__module__}.{type(v).__qualname__}>"
    return None


def _source_digest(files: set[str]) -> str:
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.encode() + b"\0")
        try:
            h.update(Path(path).read_bytes())
        except OSError:
            h.update(b"<unreadable>")
    return h.hexdigest()


class _NoSource(Exception):
    """A class of the model has no source file to key on (defined in a notebook cell, ``python -c``)."""


def _packages_source(packages: set[str], classes: set[type]) -> str:
    """Digest of the source files behind the model's classes as they are on disk: each class's own
    file, and every ``.py`` file of the packages that define them (a forward calls helpers from
    anywhere in its package). Independent of which modules happen to be imported.

    Raises:
        _NoSource: a class whose source file cannot be found: the key could not see its forward
            change, so such a model is not cached.
    """
    files: set[str] = set()
    for cls in classes:
        try:
            f = inspect.getsourcefile(cls)
        except (TypeError, OSError):
            f = None
        if not f or not os.path.exists(f):
            raise _NoSource(f"{cls.__module__}.{cls.__qualname__}")
        files.add(os.path.abspath(f))
    for name in packages:
        mod = sys.modules.get(name)
        # a regular package's folder, or every folder of a namespace package (no __init__.py)
        f = getattr(mod, "__file__", None)
        roots = (
            [os.path.dirname(os.path.abspath(f))]
            if f and os.path.basename(f) == "__init__.py"
            else [os.path.abspath(r) for r in getattr(mod, "__path__", [])]
        )
        for top in roots:
            for root, dirs, names in os.walk(top, followlinks=True):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                files.update(os.path.join(root, n) for n in names if n.endswith(".py"))
    return _source_digest(files)


def _structure(model: torch.nn.Module) -> dict[str, Any]:
    modules = []
    packages: set[str] = set()
    classes: set[type] = set()
    for name, m in model.named_modules(remove_duplicate=False):
        cls = type(m)
        attrs = {}
        for k, v in sorted(vars(m).items()):
            if k.startswith("_"):
                continue
            p = _plain(v)
            if p is not None or v is None:
                attrs[k] = p
        modules.append([name, f"{cls.__module__}.{cls.__qualname__}", m.extra_repr(), attrs])
        own = [k for k in cls.__mro__ if not k.__module__.startswith(("torch", "builtins"))]
        classes.update(own)
        packages.update(k.__module__.split(".", 1)[0] for k in own)
    packages.discard("__main__")
    tensors = [
        [kind, n, list(t.shape), str(t.dtype)]
        for kind, named in (
            ("param", model.named_parameters(remove_duplicate=False)),
            ("buffer", model.named_buffers(remove_duplicate=False)),
        )
        for n, t in named
    ]
    # Tied weights: which names share one tensor (the IR names each storage once).
    ids: dict[int, str] = {}
    ties = []
    for n, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        first = ids.setdefault(id(t), n)
        if first != n:
            ties.append([n, first])
    return {
        "modules": modules,
        "tensors": tensors,
        "ties": ties,
        "model_source": _packages_source(packages, classes),
    }


def _signature(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    import torch
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten((args, dict(kwargs)))
    out: list[Any] = []
    cards: set[str] = set()
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            out.append(["tensor", list(leaf.shape), list(leaf.stride()), str(leaf.dtype), leaf.device.type])
            if leaf.device.type == "cuda":
                cards.add(torch.cuda.get_device_name(leaf.device))
        else:
            out.append(["value", repr(leaf)])
    return {"tree": str(spec), "leaves": out, "cards": sorted(cards)}


def _capture_source() -> str:
    # The modules whose code decides what a capture produces (graph, op sizes, workspace).
    import fxswap.alloc_probe
    import fxswap.capture
    import fxswap.passes.analyse
    import fxswap.workspace

    mods = (fxswap.capture, fxswap.alloc_probe, fxswap.passes.analyse, fxswap.workspace)
    return _source_digest(
        {os.path.abspath(m.__file__) for m in mods if m.__file__} | {os.path.abspath(__file__)}
    )


def cache_key(model: torch.nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the captured IR of ``model(*args, **kwargs)`` depends on, as plain JSON."""
    import torch

    from fxswap import _version

    return {
        "format": FORMAT,
        "fxswap": _version.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "capture_source": _capture_source(),
        "model": _structure(model),
        "inputs": _signature(args, kwargs),
    }


def cache_dir() -> Path:
    """Where cached graphs live: ``$FXSWAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxswap/graphs``."""
    explicit = os.environ.get("FXSWAP_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxswap" / "graphs"


# ------------------------------------------------------------------------------------------------
# Lookup
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedGraph:
    """What :func:`captured_ir` returns."""

    ir: GraphIR
    seconds: float  # wall time of this lookup: the capture on a miss, the read on a hit
    hit: bool  # True when the IR came from the cache
    path: Path | None  # the cache file (None with cache=False)


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_entry(path: Path, key: dict[str, Any], fallback: str = "capturing again") -> GraphIR | None:
    """The IR in the cache file ``path`` if it was written for ``key``; None when there is no such
    file, or (with a warning ending in ``fallback``: what the caller does instead) when it does not
    parse or holds another key."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        warnings.warn(f"fxswap: ignoring the unreadable cached graph {path} ({e}); {fallback}", stacklevel=3)
        return None
    try:
        if not isinstance(data, dict) or data.get("key") != key:
            raise ValueError("its key differs from this model, input signature or version")
        return ir_from_json(data.get("ir"))
    except ValueError as e:
        warnings.warn(f"fxswap: refusing the cached graph {path} ({e}); {fallback}", stacklevel=3)
        return None


def write_entry(path: Path, key: dict[str, Any], ir: GraphIR) -> None:
    """Store ``ir`` under ``key`` in ``path``, atomically; a warning, not an error, when it cannot."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "ir": ir_to_json(ir)}, separators=(",", ":")))
        tmp.replace(path)  # atomic: a reader sees the old file or the new one, never half of one
    except OSError as e:
        warnings.warn(
            f"fxswap: could not write the graph cache {path} ({e}); continuing without it", stacklevel=3
        )


def captured_ir(
    model: torch.nn.Module,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    cache: bool | str | os.PathLike[str] = True,
    capture: Callable[..., Any] | None = None,
) -> CachedGraph:
    """The IR of ``model(*args, **kwargs)``: from the cache when its key matches, else captured and stored.

    Args:
        model, args, kwargs: the call to capture, as for :func:`fxswap.trace`.
        cache: True for :func:`cache_dir`, a folder to use that one, False to neither read nor write.
        capture: the capture to run on a miss (default :func:`fxswap.trace`); it returns an object
            with an ``ir`` attribute.
    """
    if capture is None:
        from fxswap.capture import trace

        capture = trace
    kwargs = dict(kwargs or {})
    start = time.perf_counter()
    path = None
    key: dict[str, Any] = {}
    if cache is not False:
        folder = cache_dir() if cache is True else Path(cache)
        try:
            key = cache_key(model, args, kwargs)
        except _NoSource as e:
            # the key could not see this class's forward change: capture, keep nothing
            logger.info(
                "fxswap: not caching the graph of %s: no source file for class %s", type(model).__name__, e
            )
        else:
            path = folder / f"{_digest(key)[:32]}.json"
            ir = read_entry(path, key)
            if ir is not None:
                return CachedGraph(ir, time.perf_counter() - start, True, path)
    ir = capture(model, *args, **kwargs).ir
    if path is not None:
        write_entry(path, key, ir)
    return CachedGraph(ir, time.perf_counter() - start, False, path)
