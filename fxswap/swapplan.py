"""The swap plan: options in, a frozen, versioned, JSON-serialisable record out.

A :class:`SwapPlan` says, for every swap unit (a group of weights moved together), whether it stays
resident on the device or where it is loaded, waited for and released, in op indices of the
captured graph and in FX node names::

    unit blocks.3 (swapped, 812 MiB): load before op 1204 'linear_96' ... wait before op 1290
    'linear_103' ... release after op 1466 'add_211'

Units and sizes: all byte counts are ints in bytes. User-facing GB/MB are binary: ``max_vram_gb=16``
means 16 GiB (16 * 2**30 bytes) and ``block_size_mb=300`` means 300 MiB, since that is how card sizes
are marketed and reported by tools (a "16 GB" card reports 15.9-16 GiB). Transfer and compute
rates are decimal (GB/s = 1e9 bytes per second, TFLOP/s = 1e12 FLOP/s) as hardware specs state them.

Plans are JSON (no pickle). ``from_json`` checks the schema version, every field's presence and
type (unknown fields are refused too), a content checksum (``content_sha256``, so an edited file
is refused rather than silently trusted) and the plan's internal sums; every failure is a
:class:`fxswap.errors.PlanError` naming the field. ``check_compatible`` refuses a plan made for a
different graph, parameters, inputs or options with :class:`PlanFingerprintMismatch` naming them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fxswap.errors import PlanError, PlanMismatchError
from fxswap.ir import GraphIR

__all__ = [
    "DEFAULT_COMPUTE_TFLOPS",
    "DEFAULT_DEVICE_MEM_GBPS",
    "DEFAULT_H2D_GBPS",
    "FINGERPRINT_FIELDS",
    "MODES",
    "SCHEMA_VERSION",
    "PlanFingerprintMismatch",
    "PlanOptions",
    "byte_unit",
    "format_bytes",
    "SwapPlan",
    "SwapUnit",
    "combine_fingerprint",
    "fingerprint_parts",
    "load_plan",
]

MODES = ("layerwise", "chunkwise", "adaptive")
SCHEMA_VERSION = 1
FINGERPRINT_FIELDS = ("graph", "params", "inputs", "options")
GiB = 2**30
MiB = 2**20

# Pinned host-to-device copy rate, GB/s. PCIe 4.0 x16 measures 24-26 GB/s pinned (nvbandwidth,
# bandwidthTest; /work/shared/reference/offload_anchors.md section "bandwidth"); 22 leaves room for
# the concurrent traffic of a real step. PCIe 5.0 x16 measures ~56 GB/s: pass h2d_gbps=50 there.
DEFAULT_H2D_GBPS = 22.0
# Achieved dense bf16 matmul rate, TFLOP/s: an RTX 4090-class card peaks at ~165 dense; H100 is
# far higher (pass compute_tflops=600 there). Only relative times matter for adaptive's choice.
DEFAULT_COMPUTE_TFLOPS = 150.0
# Achieved device-memory bandwidth for memory-bound ops, GB/s (same value as passes/simulate.py).
DEFAULT_DEVICE_MEM_GBPS = 1500.0


def byte_unit(nbytes: int) -> tuple[str, int]:
    """The binary unit (name, bytes) in which ``nbytes`` reads as a number >= 1 (B up to GiB)."""
    for name, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if nbytes >= scale:
            return name, scale
    return "B", 1


def format_bytes(nbytes: int) -> str:
    """``nbytes`` in its own binary unit, e.g. ``300.00 MiB`` or ``15.82 GiB``."""
    name, scale = byte_unit(nbytes)
    return f"{nbytes} B" if scale == 1 else f"{nbytes / scale:.2f} {name}"


def _bad(field: str, value: object, fix: str) -> ValueError:
    return ValueError(f"`{field}` is {value!r}; {fix}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_rate(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanOptions:
    """What the planner is asked for. Bytes are exact ints; see :meth:`from_user` for GiB/MiB.

    Attributes:
        mode: "layerwise", "chunkwise" or "adaptive" (see :mod:`fxswap.passes.partition`).
        max_vram_bytes: the device budget; the plan's peak never exceeds it. The peak is that of
            the program that runs: the caller's inputs for the whole call, each op's workspace
            (measured on the device by ``fxswap.compile``), and under Inductor the buffers of the
            generated code itself (``fxswap.replay``).
        block_size_bytes: the largest chunk in chunkwise mode; one of the sizes adaptive tries.
        reserve_bytes: counted at every op inside the budget for what cannot be modelled: the
            CUDA caching allocator's rounding and fragmentation, and library workspace allocated
            once and kept (cuBLAS's per-stream workspace). Activations and op scratch are planned,
            not reserved. 256 MiB by default; 0 is exact on the CPU.
        max_prefetch_depth: the most units ahead a load may be issued (0 = just before use); the
            planner searches depths 0..this by its cost model (:mod:`fxswap.passes.planner`).
            Default 16: with swapped units spread among resident ones, hiding a slow copy takes a
            depth of several units; the search stops early, so a high cap costs little.
        h2d_gbps, compute_tflops, device_mem_gbps: the cost model's rates (see module constants).
    """

    mode: str = "adaptive"
    max_vram_bytes: int
    block_size_bytes: int = 300 * MiB
    reserve_bytes: int = 256 * MiB
    max_prefetch_depth: int = 16
    h2d_gbps: float = DEFAULT_H2D_GBPS
    compute_tflops: float = DEFAULT_COMPUTE_TFLOPS
    device_mem_gbps: float = DEFAULT_DEVICE_MEM_GBPS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise _bad("mode", self.mode, f"use one of {', '.join(repr(m) for m in MODES)}")
        if not _is_int(self.max_vram_bytes) or self.max_vram_bytes <= 0:
            raise _bad(
                "max_vram_bytes",
                self.max_vram_bytes,
                "pass a positive int number of bytes, or use PlanOptions.from_user(max_vram_gb=16, ...)",
            )
        if not _is_int(self.block_size_bytes) or self.block_size_bytes <= 0:
            raise _bad(
                "block_size_bytes",
                self.block_size_bytes,
                "pass a positive int number of bytes (e.g. 300 * 2**20 for 300 MiB)",
            )
        if not _is_int(self.reserve_bytes) or self.reserve_bytes < 0:
            raise _bad("reserve_bytes", self.reserve_bytes, "pass an int >= 0 (default 256 MiB)")
        if not _is_int(self.max_prefetch_depth) or not 0 <= self.max_prefetch_depth <= 64:
            raise _bad("max_prefetch_depth", self.max_prefetch_depth, "pass an int between 0 and 64")
        for name in ("h2d_gbps", "compute_tflops", "device_mem_gbps"):
            value = getattr(self, name)
            if not _is_rate(value):
                raise _bad(name, value, "pass a finite number > 0")
            # Stored as float so that a plan compares equal after a JSON round trip.
            object.__setattr__(self, name, float(value))

    @classmethod
    def from_user(
        cls,
        *,
        mode: str = "adaptive",
        max_vram_gb: float,
        block_size_mb: float = 300,
        reserve_mb: float = 256,
        max_prefetch_depth: int = 16,
        h2d_gbps: float = DEFAULT_H2D_GBPS,
        compute_tflops: float = DEFAULT_COMPUTE_TFLOPS,
        device_mem_gbps: float = DEFAULT_DEVICE_MEM_GBPS,
    ) -> PlanOptions:
        """Options from user units: ``max_vram_gb`` in GiB (2**30), sizes in MiB (2**20).

        Raises:
            ValueError: naming the user-facing argument (``max_vram_gb``, ...), its value and the fix.
        """
        for name, value in (("max_vram_gb", max_vram_gb), ("block_size_mb", block_size_mb)):
            if not _is_rate(value):
                raise _bad(
                    name, value, "pass a finite number > 0 (GiB for max_vram_gb, MiB for block_size_mb)"
                )
        if not (isinstance(reserve_mb, (int, float)) and not isinstance(reserve_mb, bool)) or not (
            math.isfinite(reserve_mb) and reserve_mb >= 0
        ):
            raise _bad("reserve_mb", reserve_mb, "pass a finite number of MiB >= 0 (default 256)")
        block = round(block_size_mb * MiB)
        if block <= 0:
            raise _bad("block_size_mb", block_size_mb, "pass at least 1 byte's worth (e.g. 300)")
        return cls(
            mode=mode,
            max_vram_bytes=max(1, round(max_vram_gb * GiB)),
            block_size_bytes=block,
            reserve_bytes=round(reserve_mb * MiB),
            max_prefetch_depth=max_prefetch_depth,
            h2d_gbps=h2d_gbps,
            compute_tflops=compute_tflops,
            device_mem_gbps=device_mem_gbps,
        )

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _sha(obj: object) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint_parts(ir: GraphIR, options: PlanOptions) -> dict[str, str]:
    """sha256 hex digests of what a plan depends on, keyed by ``FINGERPRINT_FIELDS``.

    - graph: every op's name, target, module, weights read, output bytes, flops and memory traffic,
      and every activation buffer's size and live range (the plan's timing and peak depend on them);
    - params: every weight's name, shape, dtype and size;
    - inputs: every input's name, shape and dtype;
    - options: every :class:`PlanOptions` field (all of them change the plan or its predictions).
    """
    graph = [
        [
            [o.name, o.target, o.module, list(o.weights), o.out_bytes, repr(float(o.flops)), o.mem_bytes]
            for o in ir.ops
        ],
        [[b.name, b.nbytes, b.start, b.end] for b in ir.buffers],
    ]
    params = [[w.name, list(w.shape), w.dtype, w.nbytes] for w in ir.weights]
    inputs = [[i.name, list(i.shape), i.dtype] for i in ir.inputs]
    opts = {k: (repr(v) if isinstance(v, float) else v) for k, v in options.as_dict().items()}
    return {"graph": _sha(graph), "params": _sha(params), "inputs": _sha(inputs), "options": _sha(opts)}


def combine_fingerprint(parts: Mapping[str, str]) -> str:
    """The plan fingerprint: sha256 over the parts in ``FINGERPRINT_FIELDS`` order."""
    return hashlib.sha256("|".join(f"{k}={parts[k]}" for k in FINGERPRINT_FIELDS).encode()).hexdigest()


class PlanFingerprintMismatch(PlanMismatchError):
    """A plan's fingerprint differs from the model/input/options it is used with.

    ``fields`` lists the parts that differ, in ``FINGERPRINT_FIELDS`` order.
    """

    def __init__(self, message: str, *, fields: tuple[str, ...]) -> None:
        super().__init__(message)
        self.fields = fields


_WHAT = {
    "graph": "graph structure (ops, their weights and activation sizes)",
    "params": "parameters (names, shapes or dtypes)",
    "inputs": "inputs (shapes or dtypes)",
    "options": "planner options (mode, budget, block size, reserve, depth or rates)",
}


@dataclass(frozen=True, slots=True)
class SwapUnit:
    """One swap unit. Op indices point into ``GraphIR.ops``; ``*_node`` are those ops' FX names.

    A resident unit has ``load_at``/``wait_at``/``release_after`` and the node names None.
    """

    name: str
    params: tuple[str, ...]
    bytes: int
    resident: bool
    oversized: bool
    first_use: int
    last_use: int
    load_at: int | None
    wait_at: int | None
    release_after: int | None
    load_node: str | None
    wait_node: str | None
    release_node: str | None


@dataclass(frozen=True, slots=True)
class SwapPlan:
    """A budget-checked swap plan for one graph, input and options. Build it with
    :func:`fxswap.passes.planner.build_plan`; save with :meth:`save`, load with :func:`load_plan`."""

    schema_version: int
    fingerprint: str
    fingerprint_parts: tuple[tuple[str, str], ...]
    mode: str
    partition: str  # which partition was used: "layerwise" or "chunkwise <size> MiB"
    max_vram_bytes: int
    block_size_bytes: int
    reserve_bytes: int
    prefetch_depth: int
    peak_bytes: int
    peak_op: str
    resident_bytes: int
    swapped_bytes: int
    weight_bytes: int
    activation_peak_bytes: int
    min_vram_bytes: int
    moved_bytes_per_call: int
    predicted_step_ms: float
    predicted_compute_ms: float
    predicted_stall_ms: float
    h2d_gbps: float
    compute_tflops: float
    device_mem_gbps: float
    num_ops: int
    units: tuple[SwapUnit, ...]

    @property
    def parts(self) -> dict[str, str]:
        """``fingerprint_parts`` as a dict."""
        return dict(self.fingerprint_parts)

    # ------------------------------------------------------------------ JSON
    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "fingerprint_parts":
                value = dict(value)
            elif f.name == "units":
                value = [
                    {
                        g.name: (list(v) if isinstance(v := getattr(u, g.name), tuple) else v)
                        for g in fields(u)
                    }
                    for u in value
                ]
            body[f.name] = value
        return body

    def to_json(self) -> str:
        """JSON text of the plan with a ``content_sha256`` checksum over everything else."""
        body = self._body()
        body["content_sha256"] = _sha(body)
        return json.dumps(body, indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SwapPlan:
        """Parse and check a plan written by :meth:`to_json`.

        Raises:
            PlanError: invalid JSON, wrong ``schema_version``, a missing, unknown or mistyped field,
                a checksum that does not match (the file was edited), or inconsistent sums.
        """
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(
                f"plan is not valid JSON ({e}); re-create it with `fxswap plan ... -o plan.json`"
            ) from e
        if not isinstance(data, dict):
            raise PlanError(f"plan JSON must be an object, got {type(data).__name__}; re-create the plan")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(
                f"`schema_version` is {version!r}; this fxswap reads plans of schema {SCHEMA_VERSION}. "
                "Re-create the plan with this fxswap version"
            )
        checksum = data.pop("content_sha256", None)
        if not isinstance(checksum, str):
            raise PlanError("field `content_sha256` is missing or not a string; re-create the plan")
        plan = cls._from_body(data)
        if _sha(data) != checksum:
            raise PlanError(
                "`content_sha256` does not match the plan's content: the file was edited after it was "
                "saved. Re-create the plan instead of editing it"
            )
        plan._check_sums()
        return plan

    @classmethod
    def _from_body(cls, data: dict[str, Any]) -> SwapPlan:
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                raise PlanError(f"plan JSON lacks field `{f.name}`; re-create the plan")
            kw[f.name] = _check_field(f.name, f.type, data[f.name], where="plan")
        extra = sorted(set(data) - set(kw))
        if extra:
            raise PlanError(f"plan JSON has unknown field `{extra[0]}`; re-create the plan with this fxswap")
        parts = data["fingerprint_parts"]
        if (
            not isinstance(parts, dict)
            or list(parts) != list(FINGERPRINT_FIELDS)
            or not all(isinstance(v, str) for v in parts.values())
        ):
            raise PlanError(
                f"`fingerprint_parts` must map {', '.join(FINGERPRINT_FIELDS)} (in that order) to hex strings"
            )
        kw["fingerprint_parts"] = tuple(parts.items())
        if not isinstance(data["units"], list):
            raise PlanError("`units` must be a list of unit objects")
        units = []
        for i, u in enumerate(data["units"]):
            if not isinstance(u, dict):
                raise PlanError(f"`units[{i}]` must be an object")
            ukw: dict[str, Any] = {}
            for g in fields(SwapUnit):
                if g.name not in u:
                    raise PlanError(f"`units[{i}]` lacks field `{g.name}`; re-create the plan")
                ukw[g.name] = _check_field(g.name, g.type, u[g.name], where=f"units[{i}]")
            extra = sorted(set(u) - set(ukw))
            if extra:
                raise PlanError(f"`units[{i}]` has unknown field `{extra[0]}`")
            units.append(SwapUnit(**ukw))
        kw["units"] = tuple(units)
        return cls(**kw)

    def _check_sums(self) -> None:
        checks = (
            ("resident_bytes", self.resident_bytes, sum(u.bytes for u in self.units if u.resident)),
            ("swapped_bytes", self.swapped_bytes, sum(u.bytes for u in self.units if not u.resident)),
            ("weight_bytes", self.weight_bytes, sum(u.bytes for u in self.units)),
            ("fingerprint", self.fingerprint, combine_fingerprint(self.parts)),
        )
        for name, stored, expected in checks:
            if stored != expected:
                raise PlanError(
                    f"`{name}` is {stored!r} but the plan's units give {expected!r}; re-create the plan"
                )
        if self.peak_bytes > self.max_vram_bytes:
            raise PlanError(
                f"`peak_bytes` {self.peak_bytes} exceeds `max_vram_bytes` {self.max_vram_bytes}; "
                "re-create the plan"
            )

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (UTF-8)."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    # ------------------------------------------------------------------ checks and reports
    def check_compatible(self, fingerprint_parts: Mapping[str, str]) -> None:
        """Refuse this plan for a graph, parameters, inputs or options it was not made for.

        Args:
            fingerprint_parts: :func:`fingerprint_parts` of the graph and options at hand.

        Raises:
            PlanFingerprintMismatch: (a :class:`fxswap.errors.PlanMismatchError`) naming every part
                that differs.
        """
        mine = self.parts
        differ = tuple(k for k in FINGERPRINT_FIELDS if mine.get(k) != fingerprint_parts.get(k))
        if differ:
            detail = "; ".join(
                f"{k}: {_WHAT[k]} differ "
                f"(plan {mine.get(k, '?')[:12]}, now {fingerprint_parts.get(k, '?')[:12]})"
                for k in differ
            )
            raise PlanFingerprintMismatch(
                f"plan does not match this model/input/options — {detail}. Fix: re-plan for this model, "
                "input and options (fxswap.plan(...) or `fxswap plan`), or load the plan made for them",
                fields=differ,
            )

    def summary(self) -> str:
        """A few lines for humans: units, resident bytes, bytes moved per call, peak vs budget,
        minimum budget for this mode and input, predicted step time.

        Sizes are printed in one binary unit for the whole summary (GiB for budgets of 1 GiB and
        up, MiB or KiB below), so that the figures compare at a glance and small test models do
        not print as 0.00 GiB.
        """
        name, scale = byte_unit(self.max_vram_bytes)

        def size(n: int) -> str:
            return f"{n / scale:.2f} {name}"

        swapped = [u for u in self.units if not u.resident]
        oversized = [u for u in self.units if u.oversized]
        chosen = f" (chosen: {self.partition})" if self.mode == "adaptive" else ""
        lines = [
            f"fxswap plan: mode {self.mode}{chosen}, prefetch depth {self.prefetch_depth}, "
            f"{self.num_ops} ops",
            f"  units: {len(self.units)} ({len(self.units) - len(swapped)} resident, {len(swapped)} swapped)",
            f"  weights {size(self.weight_bytes)}: resident {size(self.resident_bytes)}, "
            f"swapped {size(self.swapped_bytes)}, moved per call {size(self.moved_bytes_per_call)}",
            f"  predicted peak {size(self.peak_bytes)} at op {self.peak_op!r} of budget "
            f"{size(self.max_vram_bytes)} (reserve {size(self.reserve_bytes)}, activations "
            f"peak {size(self.activation_peak_bytes)})",
            f"  minimum budget for mode {self.mode} with this input: {size(self.min_vram_bytes)} "
            f"({self.min_vram_bytes} bytes)",
            f"  predicted step {self.predicted_step_ms:.1f} ms (compute {self.predicted_compute_ms:.1f} ms, "
            f"waiting for copies {self.predicted_stall_ms:.1f} ms) at {self.h2d_gbps:g} GB/s H2D, "
            f"{self.compute_tflops:g} TFLOP/s",
        ]
        # Adaptive picks its own unit size, so the limit a tensor exceeded is the chosen partition's,
        # not the user's block_size_mb.
        limit = (
            f"the unit size of the chosen partition ({self.partition})"
            if self.mode == "adaptive"
            else f"the block size {format_bytes(self.block_size_bytes)}"
        )
        for u in oversized:
            lines.append(
                f"  oversized: {u.name} is one tensor of {format_bytes(u.bytes)}, larger than {limit}; "
                "it is a unit of its own"
            )
        return "\n".join(lines)


def _check_field(name: str, typ: object, value: object, *, where: str) -> object:
    """Type-check one JSON value against the dataclass annotation (a string under PEP 563)."""
    t = str(typ)
    optional = "None" in t
    if value is None and optional:
        return None
    if t.startswith("int"):
        ok = _is_int(value)
    elif t == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value  # type: ignore[arg-type]
    elif t.startswith("str"):
        ok = isinstance(value, str)
    elif t == "bool":
        ok = isinstance(value, bool)
    elif t == "tuple[str, ...]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value  # type: ignore[arg-type]
    else:  # composite fields are checked by the caller
        return value
    if not ok:
        raise PlanError(f"`{where}.{name}` is {value!r}, which is not a valid {t}; re-create the plan")
    return value


def load_plan(path: str | Path) -> SwapPlan:
    """Read a plan saved by :meth:`SwapPlan.save`.

    Raises:
        PlanError: the file is not a valid plan of this schema (names the field).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PlanError(f"plan file {str(path)!r} is not UTF-8 text ({e}); re-create the plan") from e
    return SwapPlan.from_json(text)
