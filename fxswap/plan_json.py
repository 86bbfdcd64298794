"""The plan's JSON codec: field order and types stated in one table, the checksum, the checks.

A plan file is one JSON object: every :class:`fxswap.swapplan.SwapPlan` field in declaration order
(``fingerprint_parts`` as an object, ``units`` as a list of objects with every
:class:`fxswap.swapplan.SwapUnit` field), then ``content_sha256``, the sha256 of the canonical
JSON of everything else. :func:`decode_plan` checks the schema version, every field's presence and
type against :data:`PLAN_FIELDS` / :data:`UNIT_FIELDS` (unknown fields are refused too) and the
checksum; every failure is a :class:`fxswap.errors.PlanError` naming the field. The record itself
(and the checks of its sums) lives in :mod:`fxswap.swapplan`, which this module does not import.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fxswap.errors import PlanError
from fxswap.options import DEFAULT_P2P_GBPS

__all__ = [
    "PLAN_FIELDS",
    "READABLE_VERSIONS",
    "SCHEMA_VERSION",
    "SPAN_FIELDS",
    "UNIT_FIELDS",
    "canonical_sha256",
    "decode_plan",
    "encode_plan",
    "read_plan_text",
]

# 2: warm start (units' carry_at/carry_node; the plan's warm_start, carried, boundary and first
# call figures). 3: reloads (units' spans). 4: decoded_residents (resident weights kept as stored
# that the runtime decodes once) and the collectives' link and times (p2p_gbps, nvlink,
# predicted_collective_*); a plan of schema 3 is still read, with their defaults.
SCHEMA_VERSION = 4
#: Schemas this fxswap reads: the fields added since the oldest take their PLAN_DEFAULTS value.
READABLE_VERSIONS = (3, 4)

# A field's JSON kind: the checker of a JSON value, and the type named in the error.
_Kind = tuple[Callable[[object], bool], str]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


INT: _Kind = (_is_int, "int")
FLOAT: _Kind = (_is_float, "float")
STR: _Kind = (lambda v: isinstance(v, str), "str")
BOOL: _Kind = (lambda v: isinstance(v, bool), "bool")
STRS: _Kind = (_is_str_list, "tuple[str, ...]")
OPT_INT: _Kind = (lambda v: v is None or _is_int(v), "int | None")
OPT_STR: _Kind = (lambda v: v is None or isinstance(v, str), "str | None")
# composite fields, checked by decode_plan itself
PARTS: _Kind = (lambda v: True, "fingerprint parts")
UNITS: _Kind = (lambda v: True, "units")

#: WeightSpan's fields in declaration order, and their JSON kinds.
SPAN_FIELDS: dict[str, _Kind] = {
    "weight": STR,
    "bytes": INT,
    "first_use": INT,
    "last_use": INT,
    "first_node": STR,
    "last_node": STR,
}


def _is_spans(v: object) -> bool:
    return isinstance(v, list) and all(
        isinstance(sp, dict)
        and set(sp) == set(SPAN_FIELDS)
        and all(ok(sp[k]) for k, (ok, _) in SPAN_FIELDS.items())
        for sp in v
    )


SPANS: _Kind = (_is_spans, "tuple[WeightSpan, ...]")

#: SwapUnit's fields in declaration order, and their JSON kinds (tests check it against the record).
UNIT_FIELDS: dict[str, _Kind] = {
    "name": STR,
    "params": STRS,
    "bytes": INT,
    "resident": BOOL,
    "oversized": BOOL,
    "first_use": INT,
    "last_use": INT,
    "load_at": OPT_INT,
    "wait_at": OPT_INT,
    "release_after": OPT_INT,
    "load_node": OPT_STR,
    "wait_node": OPT_STR,
    "release_node": OPT_STR,
    "carry_at": OPT_INT,
    "carry_node": OPT_STR,
    "spans": SPANS,
}

#: SwapPlan's fields in declaration order, and their JSON kinds (tests check it against the record).
PLAN_FIELDS: dict[str, _Kind] = {
    "schema_version": INT,
    "fingerprint": STR,
    "fingerprint_parts": PARTS,
    "mode": STR,
    "partition": STR,
    "max_vram_bytes": INT,
    "block_size_bytes": INT,
    "reserve_bytes": INT,
    "prefetch_depth": INT,
    "peak_bytes": INT,
    "peak_op": STR,
    "resident_bytes": INT,
    "swapped_bytes": INT,
    "weight_bytes": INT,
    "activation_peak_bytes": INT,
    "min_vram_bytes": INT,
    "moved_bytes_per_call": INT,
    "predicted_step_ms": FLOAT,
    "predicted_compute_ms": FLOAT,
    "predicted_stall_ms": FLOAT,
    "warm_start": BOOL,
    "carried_bytes": INT,
    "boundary_bytes": INT,
    "predicted_first_step_ms": FLOAT,
    "h2d_gbps": FLOAT,
    "compute_tflops": FLOAT,
    "device_mem_gbps": FLOAT,
    "num_ops": INT,
    "units": UNITS,
    "ulysses_degree": INT,
    "ulysses_rank": INT,
    "p2p_gbps": FLOAT,
    "nvlink": BOOL,
    "predicted_collective_ms": FLOAT,
    "predicted_collective_stall_ms": FLOAT,
    "decoded_residents": STRS,
}

#: Plan fields added after schema 3 was written: absent in older files, read as these values.
PLAN_DEFAULTS: dict[str, Any] = {
    "ulysses_degree": 1,
    "ulysses_rank": 0,
    "p2p_gbps": DEFAULT_P2P_GBPS,
    "nvlink": False,
    "predicted_collective_ms": 0.0,
    "predicted_collective_stall_ms": 0.0,
    "decoded_residents": (),
}


def canonical_sha256(obj: object) -> str:
    """sha256 hex of ``obj``'s canonical JSON (sorted keys, no spaces): checksums and fingerprints."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def encode_plan(plan: Mapping[str, Any], units: Sequence[Mapping[str, Any]]) -> str:
    """The JSON text of a plan given as field -> value (``fingerprint_parts`` as pairs) and its units.

    Fields are written in :data:`PLAN_FIELDS` order, then ``content_sha256``.
    """
    body: dict[str, Any] = {}
    for name in PLAN_FIELDS:
        if name == "fingerprint_parts":
            body[name] = dict(plan[name])
        elif name == "units":
            body[name] = [{k: _plain(u[k]) for k in UNIT_FIELDS} for u in units]
        else:
            body[name] = plan[name]
    body["content_sha256"] = canonical_sha256(body)
    return json.dumps(body, indent=1, allow_nan=False) + "\n"


def _check(name: str, kind: _Kind, value: object, where: str) -> object:
    ok, label = kind
    if not ok(value):
        raise PlanError(f"`{where}.{name}` is {value!r}, which is not a valid {label}; re-create the plan")
    if kind is FLOAT:
        return float(value)  # type: ignore[arg-type]
    if kind is STRS:
        return tuple(value)  # type: ignore[arg-type]
    if kind is SPANS:
        return tuple(dict(sp) for sp in value)  # type: ignore[attr-defined]
    return value


def _fields(data: dict[str, Any], table: Mapping[str, _Kind], where: str, lacks: str) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for name, kind in table.items():
        if name not in data and table is PLAN_FIELDS and name in PLAN_DEFAULTS:
            kw[name] = PLAN_DEFAULTS[name]
            continue
        if name not in data:
            raise PlanError(f"{lacks} lacks field `{name}`; re-create the plan")
        kw[name] = _check(name, kind, data[name], where)
    return kw


def decode_plan(
    text: str, *, fingerprint_fields: tuple[str, ...]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Parse and check plan JSON: the plan's fields (``fingerprint_parts`` as pairs, ``units``
    left out) and each unit's fields, ready for the records' constructors.

    Args:
        text: what :func:`encode_plan` wrote.
        fingerprint_fields: the keys ``fingerprint_parts`` must have, in order.

    Raises:
        PlanError: invalid JSON, wrong ``schema_version``, a missing, unknown or mistyped field, or a
            checksum that does not match (the file was edited).
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
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise PlanError(
            f"`schema_version` is {version!r}; this fxswap reads plans of schema "
            f"{' and '.join(map(str, READABLE_VERSIONS))}. Re-create the plan with this fxswap version"
        )
    checksum = data.pop("content_sha256", None)
    if not isinstance(checksum, str):
        raise PlanError("field `content_sha256` is missing or not a string; re-create the plan")
    kw = _fields(data, PLAN_FIELDS, "plan", "plan JSON")
    extra = sorted(set(data) - set(kw))
    if extra:
        raise PlanError(f"plan JSON has unknown field `{extra[0]}`; re-create the plan with this fxswap")
    parts = data["fingerprint_parts"]
    if (
        not isinstance(parts, dict)
        or list(parts) != list(fingerprint_fields)
        or not all(isinstance(v, str) for v in parts.values())
    ):
        raise PlanError(
            f"`fingerprint_parts` must map {', '.join(fingerprint_fields)} (in that order) to hex strings"
        )
    kw["fingerprint_parts"] = tuple(parts.items())
    if not isinstance(data["units"], list):
        raise PlanError("`units` must be a list of unit objects")
    units: list[dict[str, Any]] = []
    for i, u in enumerate(data["units"]):
        if not isinstance(u, dict):
            raise PlanError(f"`units[{i}]` must be an object")
        ukw = _fields(u, UNIT_FIELDS, f"units[{i}]", f"`units[{i}]`")
        extra = sorted(set(u) - set(ukw))
        if extra:
            raise PlanError(f"`units[{i}]` has unknown field `{extra[0]}`")
        units.append(ukw)
    del kw["units"]
    if canonical_sha256(data) != checksum:
        raise PlanError(
            "`content_sha256` does not match the plan's content: the file was edited after it was "
            "saved. Re-create the plan instead of editing it"
        )
    kw["schema_version"] = SCHEMA_VERSION  # an older schema's plan, read with its new fields' defaults
    return kw, units


def read_plan_text(path: str | Path) -> str:
    """The text of a plan file.

    Raises:
        PlanError: the file is not UTF-8 text.
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PlanError(f"plan file {str(path)!r} is not UTF-8 text ({e}); re-create the plan") from e
