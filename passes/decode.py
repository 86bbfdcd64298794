"""Decode-once pass: which resident weights kept as stored the plan keeps decoded for the whole call.

A weight kept as its file stores it (GGUF blocks, fp8: :func:`fxswap.passes.analyse.stored_storage`)
is decoded by ``fxswap::dequant`` before its first reader, at every call, and its decoded tensor
lives from that reader to its last. For a *resident* weight the runtime can instead decode it once,
when the residents are uploaded, and hand the graph the decoded tensor. Per weight ``w`` (stored
bytes ``s``, decoded ``d``, decoder scratch ``c``, first reader ``f``, last reader ``l``)::

    time per call   - (s + d) / device memory rate       the decode kernel no longer runs (at op f)
    device bytes    + (d - s) at every op and between calls      d held instead of s, all call long
                    - d over ops f..l                    no decoded activation
                    - c at op f                          no decoder scratch (unless a larger one
                                                         decoded there is still needed)
    upload          s + d + c once, before the call      the stored copy and scratch while decoding

Plain data in, plain data out (no torch). :func:`decode_residents` is the IR of a plan that keeps
``names`` decoded; every consumer of such a plan (the planner, the validator, ``fxswap.fit``)
simulates that IR, so the memory model checks every op with the change, exactly, not an estimate.

Choice (:func:`choose_decoded`), after the schedule and its resident set are fixed: the resident
stored weights in order of time saved per extra byte (``(s + d) / (d - s)``; a weight whose decoded
form is no larger comes first, it only saves), ties by first reader then name; each is taken if,
with it and those taken before, (a) every op's bytes (and with a warm start, the steady call's and
the bytes between two calls) and (b) the upload stay within the budget. The upload
(:func:`upload_bytes`) is part of the plan's peak: the runtime decodes these weights one at a
time, so at worst it holds every resident as the plan holds it, the caller's inputs (no more than
the least activation level of any op) and one weight's stored copy and decoder scratch. Every
weight so taken saves time (its decode's bytes at memory speed; nothing else changes in the time
model, and a shorter op never delays another), so no other time test is needed. Otherwise the
weight stays stored, decoded at each call. Deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence

from fxswap.errors import PlanError
from fxswap.ir import GraphIR
from fxswap.passes.liveness import activation_profile
from fxswap.passes.simulate import UnitWindow, simulate_memory
from fxswap.passes.warmstart import steady_memory

__all__ = [
    "UPLOAD",
    "choose_decoded",
    "decode_residents",
    "dequant_buffer",
    "peak_name",
    "upload_bytes",
    "upload_level",
]


def dequant_buffer(weight: str) -> str:
    """The name :func:`fxswap.passes.analyse.stored_storage` gives a stored weight's decoded tensor."""
    return f"{weight}.dequant"


def _first_last(ir: GraphIR) -> tuple[dict[str, int], dict[str, int]]:
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, op in enumerate(ir.ops):
        for w in op.weights:
            first.setdefault(w, i)
            last[w] = i
    return first, last


def decode_residents(ir: GraphIR, names: Collection[str]) -> GraphIR:
    """The IR of a plan that keeps the stored weights ``names`` decoded for the whole call.

    Each weight counts its decoded bytes (``WeightInfo.nbytes``, in its resident unit) and is marked
    ``decoded_once``; its first reader no longer decodes it (``dequant_bytes``), and where the IR
    still holds the decode as :func:`fxswap.passes.analyse.stored_storage` wrote it, the decoded
    activation (its buffer and its reader's ``out_bytes``) and the decoder's scratch at that op go
    too. An IR whose activations were measured per op (``fxswap.fit``) keeps them as measured.
    Weights already ``decoded_once`` are left as they are (applying it twice changes nothing).

    Raises:
        PlanError: a name is not a weight of the graph kept as stored and read by some op, naming
            the field ``decoded_residents`` and the weight.
    """
    info = {w.name: w for w in ir.weights}
    first, _ = _first_last(ir)
    todo: list[str] = []
    for name in names:
        w = info.get(name)
        if w is None or w.decoded_nbytes <= 0 or name not in first:
            what = (
                "not a weight of this graph"
                if w is None
                else "not a weight kept as stored that an op reads (or one patched after its decode)"
            )
            raise PlanError(
                f"`decoded_residents` names {name!r}, which is {what}: only resident weights kept as "
                "stored (GGUF, fp8) can be decoded once. Fix: re-create the plan instead of editing it"
            )
        if not w.decoded_once:
            todo.append(name)
    if not todo:
        return ir
    chosen = set(todo)
    buffers = {b.name for b in ir.buffers}
    exact = {w for w in chosen if dequant_buffer(w) in buffers}
    scratch_at: dict[int, list[tuple[str, int]]] = {}
    for w in ir.weights:
        if w.decoded_nbytes > 0 and not w.decoded_once and w.name in first:
            scratch_at.setdefault(first[w.name], []).append((w.name, w.decode_scratch_bytes))
    ops = list(ir.ops)
    for i in sorted({first[w] for w in chosen}):
        here = scratch_at[i]
        op = ops[i]
        gone = [w for w, _ in here if w in chosen]
        dequant = sum(info[w].nbytes + info[w].decoded_nbytes for w in gone)
        out = sum(info[w].decoded_nbytes for w in gone if w in exact)
        ws = op.workspace_bytes
        if any(w in exact for w in gone):
            # stored_storage added the largest scratch of the weights decoded here
            ws -= max(c for _, c in here) - max((c for w, c in here if w not in chosen), default=0)
        ops[i] = dataclasses.replace(
            op,
            out_bytes=op.out_bytes - out,
            workspace_bytes=ws,
            dequant_bytes=max(0, op.dequant_bytes - dequant),
        )
    weights = tuple(
        dataclasses.replace(w, nbytes=w.decoded_nbytes, decoded_once=True, stored_nbytes=w.nbytes)
        if w.name in chosen
        else w
        for w in ir.weights
    )
    drop = {dequant_buffer(w) for w in exact}
    return dataclasses.replace(
        ir,
        ops=tuple(ops),
        weights=weights,
        buffers=tuple(b for b in ir.buffers if b.name not in drop),
    )


#: ``peak_op`` index of a plan whose peak is the residents' upload (before op 0).
UPLOAD = -2


def peak_name(names: Sequence[str], peak_op: int) -> str:
    """A plan's ``peak_op``: the op's name, "between calls" (index ``len(names)``: a warm start's
    boundary), "resident upload" (:data:`UPLOAD`), or "" for a graph without ops."""
    if peak_op == UPLOAD:
        return "resident upload"
    if peak_op < 0:
        return ""
    return names[peak_op] if peak_op < len(names) else "between calls"


def upload_level(act: Sequence[int], resident_bytes: int, transient: int) -> int:
    """Bytes on the device while the residents are uploaded and those decoded once are decoded,
    in whatever order: every resident as the plan holds it (``resident_bytes``), the caller's inputs
    (no more than the least activation level of any op, ``act``) and the largest ``transient`` (one
    weight's stored copy and decoder scratch while it is decoded). 0 when nothing is decoded."""
    if transient <= 0:
        return 0
    return min(act, default=0) + resident_bytes + transient


def upload_bytes(ir: GraphIR, act: Sequence[int], resident_bytes: int) -> int:
    """:func:`upload_level` of a plan's IR (after :func:`decode_residents`): the largest stored
    copy plus scratch among the weights decoded once. Part of the plan's peak."""
    transient = max(
        (w.stored_nbytes + w.decode_scratch_bytes for w in ir.weights if w.decoded_once), default=0
    )
    return upload_level(act, resident_bytes, transient)


def _prefix(xs: Sequence[int], pick: Callable[[int, int], int]) -> list[int]:
    """``out[i]`` = ``pick`` over ``xs[:i]``; ``out[0]`` is the identity (no element): -inf for max,
    +inf for min, as Python ints that any byte count beats."""
    out = [_NONE[pick]]
    for x in xs:
        out.append(pick(out[-1], x))
    return out


def _suffix(xs: Sequence[int], pick: Callable[[int, int], int]) -> list[int]:
    """``out[i]`` = ``pick`` over ``xs[i:]``; ``out[len(xs)]`` is the identity."""
    out = [_NONE[pick]]
    for x in reversed(xs):
        out.append(pick(out[-1], x))
    return out[::-1]


_NONE: dict[Callable[[int, int], int], int] = {max: -(2**62), min: 2**62}


def choose_decoded(
    ir: GraphIR,
    units: Sequence[UnitWindow],
    params: Sequence[Sequence[str]],
    reserve_bytes: int,
    budget: int,
    carry_at: Sequence[int | None] | None = None,
) -> tuple[str, ...]:
    """The resident stored weights to keep decoded for the whole call, in the order taken (the
    module docstring states the rule).

    Args:
        ir: the graph as planned (stored weights as :func:`~fxswap.passes.analyse.stored_storage`
            describes them).
        units: the schedule, every unit, as the simulators take it; ``params`` their weights.
        reserve_bytes: counted at every op.
        budget: the bytes no op (nor, with a warm start, the time between calls) may exceed.
        carry_at: the warm start's carry points per unit (None: every call cold).

    Returns:
        Weight names; empty when none fits (they then stay stored, decoded at each call).
    """
    info = {w.name: w for w in ir.weights}
    first, last = _first_last(ir)
    resident = [p for u, ps in zip(units, params, strict=True) if u.resident for p in ps]
    cands = [w for w in resident if w in first and info[w].decoded_nbytes > 0 and not info[w].decoded_once]
    if not cands:
        return ()
    n = len(ir.ops)
    act = list(activation_profile(ir))
    carried = carry_at is not None and any(c is not None for c in carry_at)
    if carried:
        assert carry_at is not None
        mem, boundary = steady_memory(act, units, reserve_bytes, carry_at)
        mem = [*mem, boundary]  # index n: between two calls (reserve + resident + act[-1] + carried)
    else:
        tl = simulate_memory(act, units, reserve_bytes)
        mem = [tl.total(i) for i in range(n)]
    buffers = {b.name for b in ir.buffers}
    # Scratch of the weights still decoded at each op, as stored_storage added its largest.
    scratch_at: dict[int, dict[str, int]] = {}
    for wi in ir.weights:
        if wi.decoded_nbytes > 0 and not wi.decoded_once and wi.name in first:
            scratch_at.setdefault(first[wi.name], {})[wi.name] = wi.decode_scratch_bytes

    def rank(w: str) -> tuple[int, float, int, str]:
        s, d = info[w].nbytes, info[w].decoded_nbytes
        extra = d - s
        return (0, float(extra), first[w], w) if extra <= 0 else (1, -(s + d) / extra, first[w], w)

    resident_bytes = sum(u.bytes for u in units if u.resident)
    stored_scratch = {w: info[w].nbytes + info[w].decode_scratch_bytes for w in cands}
    chosen: list[str] = []
    shift = 0  # bytes added at every op (and between calls) by the weights taken
    # NOTE: a weight's drop covers one contiguous range of ops (its readers), so the largest byte
    # count outside it comes from prefix and suffix maxima, rebuilt only when a weight is taken:
    # a WAN 14B graph has ~5,000 ops and ~400 candidates.
    hi_pre, hi_suf = _prefix(mem, max), _suffix(mem, max)
    lo_pre, lo_suf = _prefix(act, min), _suffix(act, min)
    for w in sorted(cands, key=rank):
        s, d, c = info[w].nbytes, info[w].decoded_nbytes, info[w].decode_scratch_bytes
        f, lst = first[w], last[w]
        drop: dict[int, int] = {}  # op -> bytes it no longer holds: ops f..lst (and n), contiguous
        if dequant_buffer(w) in buffers:
            for i in range(f, lst + 1):
                drop[i] = d
            here = scratch_at[f]
            others = max((v for k, v in here.items() if k != w), default=0)
            drop[f] = drop.get(f, 0) + max(here.values()) - others
        if carried and n - 1 in drop:
            drop[n] = drop[n - 1]  # the bytes between calls hold the last op's activations
        extra = d - s
        a, b = (min(drop), max(drop)) if drop else (len(mem), len(mem) - 1)
        peak = max(hi_pre[a], hi_suf[b + 1], *(mem[i] - v for i, v in drop.items())) + shift + extra
        if peak > budget:
            continue
        in_act = [act[i] - v for i, v in drop.items() if i < n]
        floor = min(lo_pre[min(a, n)], lo_suf[min(b + 1, n)], *in_act) if n else 0
        transient = max(s + c, max((stored_scratch[k] for k in chosen), default=0))
        if upload_level([floor], resident_bytes + shift + extra, transient) > budget:
            continue
        chosen.append(w)
        shift += extra
        if drop:
            for i, v in drop.items():
                mem[i] -= v
                if i < n:
                    act[i] -= v
            hi_pre, hi_suf = _prefix(mem, max), _suffix(mem, max)
            lo_pre, lo_suf = _prefix(act, min), _suffix(act, min)
            del scratch_at[f][w]
    return tuple(chosen)
