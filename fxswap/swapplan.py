"""The swap plan: a frozen, versioned, JSON-serialisable record of where each unit is moved.

A :class:`SwapPlan` says, for every swap unit (a group of weights moved together), whether it stays
resident on the device or where it is loaded, waited for and released, in op indices of the
captured graph and in FX node names::

    unit blocks.3 (swapped, 812 MiB): load before op 1204 'linear_96' ... wait before op 1290
    'linear_103' ... release after op 1466 'add_211'

All byte counts are ints in bytes; the options a plan is made with, their units and defaults are in
:mod:`fxswap.options`.

Plans are JSON (no pickle), written and read by :mod:`fxswap.plan_json`, which checks the schema
version, every field's presence and type (unknown fields are refused too) and a content checksum
(``content_sha256``, so an edited file is refused rather than silently trusted); this module then
checks the plan's internal sums. Every failure is a :class:`fxswap.errors.PlanError` naming the
field. ``check_compatible`` refuses a plan made for a different graph, parameters, inputs or options
with :class:`fxswap.errors.PlanFingerprintMismatch` naming them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from fxswap.errors import PlanError, PlanFingerprintMismatch
from fxswap.ir import GraphIR
from fxswap.options import (
    DEFAULT_COMPUTE_TFLOPS,
    DEFAULT_DEVICE_MEM_GBPS,
    DEFAULT_H2D_GBPS,
    DEFAULT_P2P_GBPS,
    MODES,
    GiB,
    MiB,
    PlanOptions,
)
from fxswap.plan_json import SCHEMA_VERSION, canonical_sha256, decode_plan, encode_plan, read_plan_text

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
    "WeightSpan",
    "combine_fingerprint",
    "fingerprint_parts",
    "load_plan",
    "reloaded_bytes",
]

FINGERPRINT_FIELDS = ("graph", "params", "inputs", "options")


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
            # a collective's bytes and wait, only where there is one: other graphs keep their digest
            + ([o.collective, o.sent_bytes, o.received_bytes, o.waits_on] if o.collective else [])
            for o in ir.ops
        ],
        [[b.name, b.nbytes, b.start, b.end] for b in ir.buffers],
        # where a weight may be loaded a second time (passes.occurrence)
        [[w.name, [list(r) for r in w.joined]] for w in ir.weights if w.joined],
    ]
    params = [[w.name, list(w.shape), w.dtype, w.nbytes] for w in ir.weights]
    inputs = [[i.name, list(i.shape), i.dtype] for i in ir.inputs]
    opts = {k: (repr(v) if isinstance(v, float) else v) for k, v in options.as_dict().items()}
    if not any(o.collective for o in ir.ops):
        # the collectives' link prices nothing without collectives: such plans keep their digest
        opts = {k: v for k, v in opts.items() if k not in ("p2p_gbps", "nvlink")}
    sha = canonical_sha256
    return {"graph": sha(graph), "params": sha(params), "inputs": sha(inputs), "options": sha(opts)}


def combine_fingerprint(parts: Mapping[str, str]) -> str:
    """The plan fingerprint: sha256 over the parts in ``FINGERPRINT_FIELDS`` order."""
    return hashlib.sha256("|".join(f"{k}={parts[k]}" for k in FINGERPRINT_FIELDS).encode()).hexdigest()


_WHAT = {
    "graph": "graph structure (ops, their weights and activation sizes)",
    "params": "parameters (names, shapes or dtypes)",
    "inputs": "inputs (shapes or dtypes)",
    "options": "planner options (mode, budget, block size, reserve, depth or rates)",
}


@dataclass(frozen=True, slots=True)
class WeightSpan:
    """The reads of one weight a unit serves, when that weight is loaded by several units.

    A weight read in separate places may be loaded once per place (``fxswap.passes.occurrence``):
    each unit holding it serves the reads from op ``first_use`` to op ``last_use`` (FX names
    ``first_node`` and ``last_node``) and no others.
    """

    weight: str
    bytes: int  # the weight's size
    first_use: int
    last_use: int
    first_node: str
    last_node: str


def reloaded_bytes(units: Iterable[SwapUnit]) -> int:
    """Bytes that units hold beyond the weights themselves: each weight loaded by ``n`` units
    counts ``n - 1`` times its size (see :class:`WeightSpan`)."""
    holders: dict[str, set[str]] = {}
    size: dict[str, int] = {}
    for u in units:
        for sp in u.spans:
            holders.setdefault(sp.weight, set()).add(u.name)
            size[sp.weight] = sp.bytes
    return sum((len(h) - 1) * size[w] for w, h in holders.items())


@dataclass(frozen=True, slots=True)
class SwapUnit:
    """One swap unit. Op indices point into ``GraphIR.ops``; ``*_node`` are those ops' FX names.

    A resident unit has ``load_at``/``wait_at``/``release_after`` and the node names None.
    ``carry_at`` (warm start): the op before which the load for the *next* call is issued, after
    this call's release; None when the unit is not carried across calls.
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
    carry_at: int | None = None
    carry_node: str | None = None
    # Weights this unit shares with other units, each loaded once per unit, and which of their
    # reads this unit serves. Empty for a unit whose weights are all its own (the usual case).
    spans: tuple[WeightSpan, ...] = ()


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
    # Warm start (fxswap.passes.warmstart): the option as given, and when units are carried
    # (carried_bytes > 0) the predicted_* figures above are those of a call after the first, and
    # peak_bytes covers every call and the bytes held between two calls.
    warm_start: bool
    carried_bytes: int  # allocated between two calls for the next call's first units
    boundary_bytes: int  # everything allocated between two calls (0 without warm start)
    predicted_first_step_ms: float  # the first call, which starts cold
    h2d_gbps: float
    compute_tflops: float
    device_mem_gbps: float
    num_ops: int
    units: tuple[SwapUnit, ...]
    # Sequence parallelism (fxswap.parallel): the degree and this rank's index; each rank plans its
    # own sharded graph. Defaults: one process, and plans written before these fields existed.
    ulysses_degree: int = 1
    ulysses_rank: int = 0
    # The collectives' link (PlanOptions.p2p_gbps / nvlink), and per call the collectives' time on
    # their stream and compute's waits for them (in predicted_step_ms, not in predicted_stall_ms).
    # Zero for a graph without collectives; defaults for plans written before these fields.
    p2p_gbps: float = DEFAULT_P2P_GBPS
    nvlink: bool = False
    predicted_collective_ms: float = 0.0
    predicted_collective_stall_ms: float = 0.0
    # Resident weights kept as stored (GGUF, fp8) that the runtime decodes once, when the residents
    # are uploaded, in this order, and hands the graph decoded (fxswap.passes.decode); their units
    # count the decoded bytes. Every other stored weight is decoded in the graph at each call.
    # Default: none (plans of schema 3, written before the field existed).
    decoded_residents: tuple[str, ...] = ()

    @property
    def parts(self) -> dict[str, str]:
        """``fingerprint_parts`` as a dict."""
        return dict(self.fingerprint_parts)

    # ------------------------------------------------------------------ JSON (fxswap.plan_json)
    def to_json(self) -> str:
        """JSON text of the plan with a ``content_sha256`` checksum over everything else."""
        plan = {f.name: getattr(self, f.name) for f in fields(self)}
        units = [
            {
                **{g.name: getattr(u, g.name) for g in fields(u)},
                "spans": [{h.name: getattr(sp, h.name) for h in fields(sp)} for sp in u.spans],
            }
            for u in self.units
        ]
        return encode_plan(plan, units)

    @classmethod
    def from_json(cls, text: str) -> SwapPlan:
        """Parse and check a plan written by :meth:`to_json`.

        Raises:
            PlanError: invalid JSON, wrong ``schema_version``, a missing, unknown or mistyped field,
                a checksum that does not match (the file was edited), or inconsistent sums.
        """
        kw, units = decode_plan(text, fingerprint_fields=FINGERPRINT_FIELDS)
        plan = cls(
            **kw,
            units=tuple(
                SwapUnit(**{**u, "spans": tuple(WeightSpan(**sp) for sp in u["spans"])}) for u in units
            ),
        )
        plan._check_sums()
        return plan

    def _check_sums(self) -> None:
        self.check_decoded_residents()
        extra = reloaded_bytes(self.units)  # a weight loaded by several units is one weight
        checks = (
            ("resident_bytes", self.resident_bytes, sum(u.bytes for u in self.units if u.resident)),
            ("swapped_bytes", self.swapped_bytes, sum(u.bytes for u in self.units if not u.resident) - extra),
            ("weight_bytes", self.weight_bytes, sum(u.bytes for u in self.units) - extra),
            ("carried_bytes", self.carried_bytes, sum(u.bytes for u in self.units if u.carry_at is not None)),
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

    def check_decoded_residents(self) -> None:
        """Refuse ``decoded_residents`` naming a weight twice or one in no resident unit (whether
        each is kept as stored is the graph's to say: ``passes.validate``)."""
        resident = {p for u in self.units if u.resident for p in u.params}
        for w in self.decoded_residents:
            if w not in resident:
                raise PlanError(
                    f"`decoded_residents` names {w!r}, which is in no resident unit of the plan: only a "
                    "resident weight can be decoded once. Fix: re-create the plan instead of editing it"
                )
        if len(set(self.decoded_residents)) != len(self.decoded_residents):
            raise PlanError("`decoded_residents` lists a weight twice; re-create the plan")

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
        if self.predicted_collective_ms:
            link = "NVLink" if self.nvlink else "PCIe, sharing host-to-device with the copies"
            lines.append(
                f"  collectives {self.predicted_collective_ms:.1f} ms per call at {self.p2p_gbps:g} GB/s "
                f"({link}); compute waits {self.predicted_collective_stall_ms:.1f} ms for them"
            )
        if self.carried_bytes:
            carried = sum(u.carry_at is not None for u in self.units)
            lines.append(
                f"  warm start: each call's tail loads the next call's first {carried} unit(s) "
                f"({size(self.carried_bytes)}, held between calls); first call "
                f"{self.predicted_first_step_ms:.1f} ms, then {self.predicted_step_ms:.1f} ms"
            )
        if self.decoded_residents:
            lines.append(
                f"  decoded once: {len(self.decoded_residents)} resident weight(s) kept as stored are "
                "decoded when uploaded and held decoded (no decode per call; the resident bytes count "
                "them decoded, the host keeps them stored)"
            )
        places: dict[str, int] = {}
        holders: dict[str, list[str]] = {}
        for u in self.units:
            for sp in u.spans:
                places[sp.weight] = places.get(sp.weight, 0) + 1
                if u.name not in holders.setdefault(sp.weight, []):
                    holders[sp.weight].append(u.name)
        for w, units in holders.items():
            lines.append(
                f"  reloaded: {w} is read in {places[w]} places and loaded by {len(units)} units "
                f"({', '.join(units)})"
            )
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


def load_plan(path: str | Path) -> SwapPlan:
    """Read a plan saved by :meth:`SwapPlan.save`.

    Raises:
        PlanError: the file is not a valid plan of this schema (names the field).
    """
    return SwapPlan.from_json(read_plan_text(path))
