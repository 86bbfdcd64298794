"""What Inductor's program really holds: its generated wrapper replayed on fake tensors.

The plan's activation model is the FX graph's (a buffer lives from its op to its last reader).
Inductor's program differs in both directions: fusion never materialises most intermediates, while
buffer reuse (``buf7 = buf2; del buf2  # reuse``) keeps a freed buffer alive until a later
allocation of the same size takes it over. Neither can be read from the FX graph, so this module
runs the generated ``call()`` itself, line by line, as Inductor wrote it, with

- every tensor fake (``FakeTensorMode``): no device memory, no compute;
- every fused kernel (``cpp_fused_*``, ``triton_*``) a no-op: kernels write into buffers the
  wrapper allocated beforehand, so skipping them changes no allocation;
- allocation helpers (``empty_strided_*``, ``reinterpret_tensor``, ``alloc_from_pool``) mapped to
  their torch equivalents, which the fake mode serves;
- extern kernels and ATen fallbacks (matmul, attention, convolution) run through their fake
  kernels, and their internal workspace is measured once per distinct call on zero-filled tensors
  on the device (:mod:`fxswap.workspace`);
- the fxswap ops through their fake implementations: ``wait`` returns a unit's tensors, which live
  until the wrapper drops its last reference to them, as on the device.

A storage is allocated when the first tensor on it appears and freed when the last Python
reference to a tensor on it dies (``weakref.finalize``), exactly when the real wrapper would hand
it back to the allocator. The result is the call's allocation timeline above its inputs, with the
moment of every fxswap op, which :func:`fxswap.replay.inductor_activations` turns into the
per-op activation bytes the planner simulates.

NOTE: the CPU wrapper's names are checked against torch 2.11-2.14 (``Runner.call``); a wrapper this
module cannot replay raises :class:`ReplayError`, and ``fxswap.compile`` then refuses to promise a
budget for that graph rather than guessing.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fxswap.alloc_probe import Measurements, PieceProbe, pieces, profiler_running
from fxswap.errors import ReplayError
from fxswap.passes.device_rules import CPU_RULES, DeviceRules

__all__ = ["FxswapEvent", "ReplayError", "ReplayResult", "inductor_activations", "replay"]

_KERNEL = re.compile(r"^(cpp_fused_|cpp_|triton_|kernel_cpp_)")
_VIEW_OR_FREE = ("aten::view", "aten::_reinterpret", "aten::as_strided", "aten::t", "aten::permute")


@dataclass(frozen=True, slots=True)
class FxswapEvent:
    """One fxswap op in the replay: its kind, unit id and the allocation level when it ran."""

    kind: str  # "load" | "carry" | "wait" | "release"
    uid: int
    index: int  # position in ReplayResult.levels at which the op ran


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """``levels[j]``: bytes allocated by the call (above its inputs) after event j; ``events``: the
    fxswap ops in the order the wrapper ran them."""

    levels: tuple[int, ...]
    events: tuple[FxswapEvent, ...]

    @property
    def peak_bytes(self) -> int:
        return max(self.levels, default=0)


class _Noop:
    """Stands for a compiled kernel: callable, and ``.run(...)`` for Triton launchers."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def run(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Tracker(TorchDispatchMode):
    """Sees every tensor the replay creates; counts storages in and out by reference lifetime."""

    def __init__(
        self, device: torch.device, workspace: Callable[[Any, Any, Any], int], rules: DeviceRules = CPU_RULES
    ) -> None:
        super().__init__()
        self.device = device
        self.workspace = workspace
        self.rules = rules
        self.level = 0
        self.levels: list[int] = [0]
        self.refs: dict[int, int] = {}  # storage key -> live tensor objects on it
        self.sizes: dict[int, int] = {}
        self.noted: set[int] = set()  # id() of the live tensor objects noted
        self.gen: dict[int, int] = {}  # storage key -> its registration (see register)
        self._gens = itertools.count()
        self.events: list[FxswapEvent] = []

    def known(self, t: torch.Tensor) -> None:
        # A tensor that exists before the call (input, resident weight): never counted.
        self.refs.setdefault(int(t.untyped_storage()._cdata), 1 << 30)

    def _note(self, t: torch.Tensor) -> None:
        # Once per tensor object: an out= call returns the buffer it was given, and `refs` counts
        # live objects (the replay's memo keys on it), not how often one was seen.
        if id(t) in self.noted:
            return
        key = int(t.untyped_storage()._cdata)
        if key not in self.refs:
            # as the device's allocator counts the storage (rounded on CUDA: passes.device_rules)
            self.register(key, self.rules.alloc_bytes(int(t.untyped_storage().nbytes())))
            self._move(self.sizes[key])
        self.refs[key] += 1
        self.noted.add(id(t))
        weakref.finalize(t, self._drop, key, self.gen.get(key, -1), id(t))

    def register(self, key: int, size: int) -> None:
        """A new storage at ``key``, of ``size`` counted bytes, no live tensor on it yet."""
        self.refs[key] = 0
        self.sizes[key] = size
        # A storage's address can be reused once it is freed: a tensor noted on the old one that
        # dies later must not count against the new one.
        self.gen[key] = next(self._gens)

    def forget(self, key: int) -> None:
        """The storage at ``key`` is freed (its move made by the caller)."""
        self.refs.pop(key, None)
        self.sizes.pop(key, None)
        self.gen.pop(key, None)

    def _drop(self, key: int, gen: int, obj: int) -> None:
        self.noted.discard(obj)
        n = self.refs.get(key)
        if n is None or self.gen.get(key) != gen:
            return
        if n <= 1:
            size = self.sizes.get(key, 0)
            self.forget(key)
            self._move(-size)
        else:
            self.refs[key] = n - 1

    def _move(self, delta: int) -> None:
        if delta:
            self.level += delta
            self.levels.append(self.level)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        kind = func._schema.name.split("::")[-1] if getattr(func, "namespace", "") == "fxswap" else ""
        swap_op = kind in ("load", "carry", "wait", "release")
        if swap_op:
            uid = int(args[0])
            # The runtime allocates a unit's device tensors when its load is issued (the copy needs
            # a destination); the fake wait creates them instead, so move them to the load here.
            # A carry allocates the next call's copy, which outlives this call (its wait is there).
            if kind in ("load", "carry"):
                self._move(_unit_bytes(uid, self.rules))
            elif kind == "wait":
                self._move(-_unit_bytes(uid, self.rules))
            out = func(*args, **kwargs)
            self.events.append(FxswapEvent(kind, uid, len(self.levels) - 1))
            ws = 0
        else:
            # An extern call with out= (Inductor's `extern_kernels.mm(..., out=buf)`) writes into a
            # buffer the wrapper allocated; its own scratch is still measured (_measure_one).
            skip = func._schema.name in _VIEW_OR_FREE
            ws = 0 if skip else self.workspace(func, args, kwargs)
            # An out= call allocates nothing but its scratch (measured above): its fake kernel is
            # skipped, a fake matmul per matmul, most of a block program's replay time otherwise.
            out = kwargs["out"] if "out" in kwargs else func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._note(t)
        if not swap_op and ws:
            # The op's scratch, live while it runs, beside its output (which it allocates first).
            self._move(ws)
            self._move(-ws)
        return out


def _unit_bytes(uid: int, rules: DeviceRules = CPU_RULES) -> int:
    from fxswap import ops

    meta = ops.lookup(uid).meta
    # one device tensor per weight (SwapRuntime), each its own allocation
    return sum(
        rules.alloc_bytes(math.prod(shape) * dtype.itemsize)
        for shape, dtype in zip(meta.shapes, meta.dtypes, strict=True)
    )


def _call_of(compiled: Any) -> tuple[Any, dict[str, Any]]:
    call = getattr(compiled, "current_callable", None)
    if call is None:
        raise ReplayError(
            f"cannot find the generated wrapper of {compiled!r} (no current_callable); this torch "
            "version's Inductor output is not supported for memory replay"
        )
    fn = getattr(call, "__func__", call)
    return call, fn.__globals__


# Measured workspace per (device, rules, ATen call), for every replay of the process: a new input
# signature repeats most calls of the last one, as does every fxswap.fit round.
_MEASURED = Measurements()


def _workspace_prober(device: torch.device, rules: DeviceRules) -> Callable[[Any, Any, Any], int]:
    """An ATen-call workspace measurer with a per-signature cache (zeros on ``device``), shared by
    every replay of the process."""
    cache: dict[Any, int] = {}
    where = (str(device), rules)

    # NOTE: asked once per op of the replay (thousands for a 40-block WAN, nearly all hits): a
    # plain recursive key, not pytree's flatten and spec string, which took about 0.4 ms a call.
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), tuple(v.stride()), v.dtype)
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, *(one(x) for x in v))
        if isinstance(v, dict):
            return ("dict", *((k, one(x)) for k, x in v.items()))
        return repr(v)

    def key_of(func: Any, args: Any, kwargs: Any) -> Any:
        return (func, one(args), one(kwargs))

    def probe(func: Any, args: Any, kwargs: Any) -> int:
        key = key_of(func, args, kwargs)
        if key not in cache:
            ws = _MEASURED.get((where, key))
            if ws is None:
                ws = _measure_one(func, args, kwargs, device, rules)
                if not (device.type == "cpu" and profiler_running()):  # 0 then means "not measured"
                    _MEASURED.put((where, key), ws)
            cache[key] = ws
        return cache[key]

    return probe


def _measure_one(func: Any, args: Any, kwargs: Any, device: torch.device, rules: DeviceRules) -> int:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    if device.type == "cpu" and profiler_running():
        return 0  # profilers do not nest; fxswap.workspace warns once for the capture
    if getattr(func, "namespace", None) == "_c10d_functional":
        # Never run alone (it would wait for, or pair with, the other ranks' probes): the rule of
        # passes.sequence_parallel.collective_workspace, for the all-to-alls that pass emits.
        from fxswap.passes.sequence_parallel import ALL_TO_ALL

        if func is not ALL_TO_ALL or device.type != "cpu":
            return 0
        return 2 * int(args[0].untyped_storage().nbytes())

    with unset_fake_temporarily():

        def real(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                t = torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=device)
                return t.zero_() if t.numel() else t
            return v

        r_args, r_kwargs = pytree.tree_map(real, (args, kwargs))
        # storages that exist before the op (its inputs, an out= buffer): not new when returned
        given = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((r_args, r_kwargs))
            if isinstance(t, torch.Tensor)
        }
        probe: PieceProbe
        with torch.no_grad(), pieces(device) as probe, probe.piece("op"):
            out = func(*r_args, **r_kwargs)
            new: dict[int, int] = {}
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                    new[t.untyped_storage().data_ptr()] = rules.alloc_bytes(t.untyped_storage().nbytes())
            out_bytes = sum(new.values())
            del out
        return max(0, probe.peak.get("op", 0) - int(out_bytes))


def replay(
    compiled: Any, inputs: Sequence[Any], device: torch.device, rules: DeviceRules | None = None
) -> ReplayResult:
    """Replay ``compiled`` (what ``compile_fx`` returned) on fakes of ``inputs``.

    Args:
        compiled: the callable ``torch._inductor.compile_fx.compile_fx`` returned, or a
            :class:`fxswap.regional.RegionalProgram` (each region's wrapper replayed in turn).
        inputs: the flat graph inputs of a call (tensors on ``device``, or fake/meta tensors).
        device: the device the program runs on (op workspace is measured there).
        rules: how the device's allocator counts each storage (default: ``device``'s own,
            :func:`fxswap.workspace.device_rules_for`; the CPU's are the identity).

    Returns:
        The :class:`ReplayResult`: bytes allocated during the call above its inputs, per event.

    Raises:
        ReplayError: the wrapper uses a construct this replay does not know.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    if rules is None:
        from fxswap.workspace import device_rules_for

        rules = device_rules_for(device)
    probe = _workspace_prober(device, rules)
    tracker = _Tracker(device, probe, rules)
    with fake_mode:
        fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    for x in fakes:
        if isinstance(x, torch.Tensor):
            tracker.known(x)
    try:
        with fake_mode, tracker, torch.no_grad():
            steps = getattr(compiled, "steps", None)
            if steps is None:
                out = _replayable(compiled, device, tracker)(list(fakes))
            else:
                out = _replay_regions(compiled, list(fakes), tracker, device)
            del out
    except ReplayError:
        raise
    except Exception as e:  # the generated code met something the replay does not model
        raise ReplayError(f"replaying Inductor's generated code failed: {type(e).__name__}: {e}") from e
    return ReplayResult(tuple(tracker.levels), tuple(tracker.events))


def _replay_regions(program: Any, fakes: list[Any], tracker: _Tracker, device: torch.device) -> Any:
    """A :class:`fxswap.regional.RegionalProgram` replayed: its own slot handling, each region's
    generated wrapper replayed, and each fxswap event named by the rewritten graph's unit id (a
    region's ids are its own)."""
    replayed: dict[int, Callable[[list[Any]], Any]] = {}
    memo = _StepMemo(tracker)

    def call(step: Any, args: list[Any]) -> Any:
        fn = replayed.get(id(step.compiled))
        compiled = not step.glue and getattr(step.compiled, "current_callable", None) is not None
        if fn is None:
            # Glue runs FX's Python. A compiled region with nothing for Inductor to generate (its
            # outputs are views or aliases of its inputs, e.g. a no-op `.to(float32)`): AOT's
            # runtime wrapper makes the views, on the fakes as on the device.
            fn = _replayable(step.compiled, device, tracker) if compiled else step.call
            replayed[id(step.compiled)] = fn
        first = len(tracker.events)
        out = memo.run(step.compiled, fn, args) if compiled and MEMO else fn(args)
        tracker.events[first:] = [
            FxswapEvent(e.kind, step.units.get(e.uid, e.uid), e.index) for e in tracker.events[first:]
        ]
        return out

    return program.run(fakes, call=call)


# Off only to check the memo against a full replay (tests/test_replay_memo.py).
MEMO = True


@dataclass(frozen=True, slots=True)
class _Effect:
    """What replaying one compiled region did, relative to its start (see :class:`_StepMemo`)."""

    deltas: tuple[int, ...]  # the allocation level's moves, in order
    events: tuple[tuple[str, int, int], ...]  # fxswap ops: kind, the region's unit id, move index
    freed: tuple[int, ...]  # the arguments (by position) whose storage the region freed
    # per output: ("arg", j, size, stride, offset): a view of argument j's storage;
    # ("new", group, nbytes, counted, size, stride, offset, dtype): a storage the region allocated
    # (outputs of one group share it); ("value", v): not a tensor
    outs: tuple[tuple[Any, ...], ...]


class _StepMemo:
    """Replays a compiled region once per distinct situation and repeats its effect after that.

    Forty blocks alike run one program forty times, on inputs alike; each replay of the generated
    wrapper costs tens of milliseconds of fake-tensor dispatch, about a second per fxswap.fit
    round for a 40-block model. The effect of a replay on the tracker is a function of the
    program, its arguments' layouts and which of their storages it may free. That last part is
    keyed by what decides it: which arguments share a storage, how many live tensors each storage
    has (the tracker's count) and how many references each argument object has (the caller's slot
    list, a later region's slot, the call's own list). The effect is then applied as recorded: the
    same level moves and fxswap events, the same freed storages, outputs with the same layouts and
    storage sharing. `tests/test_replay_memo.py` checks it against full replays.
    """

    def __init__(self, tracker: _Tracker) -> None:
        self.tracker = tracker
        self.seen: dict[tuple[Any, ...], _Effect] = {}

    def _key(self, compiled: Any, args: list[Any]) -> tuple[Any, ...] | None:
        refs = self.tracker.refs
        group: dict[int, int] = {}
        parts: list[Any] = [id(compiled)]
        for a in args:
            if not isinstance(a, torch.Tensor):
                if not isinstance(a, (int, float, bool, type(None))):
                    return None
                parts.append(("V", a))
                continue
            k = int(a.untyped_storage()._cdata)
            g = group.setdefault(k, len(group))
            # refcount: the argument list, this frame's loop variable, getrefcount's own argument,
            # and whatever else holds it (a slot a later region reads)
            held = sys.getrefcount(a)
            parts.append(
                ("T", tuple(a.shape), tuple(a.stride()), a.storage_offset(), a.dtype, g, refs.get(k), held)
            )
        return tuple(parts)

    def run(self, compiled: Any, fn: Callable[[list[Any]], Any], args: list[Any]) -> Any:
        key = self._key(compiled, args)
        effect = self.seen.get(key) if key is not None else None
        if effect is not None:
            return self._apply(effect, args)
        tr = self.tracker
        keys = [int(a.untyped_storage()._cdata) if isinstance(a, torch.Tensor) else None for a in args]
        # Registrations, not addresses: a storage the region frees can hand its address to one it
        # allocates next (an input has none: it was there before the call and is never freed).
        gens = [tr.gen.get(k) if k is not None else None for k in keys]
        n_levels, n_events = len(tr.levels), len(tr.events)
        out = fn(args)
        if key is None:
            return out
        levels = tr.levels
        deltas = tuple(levels[i] - levels[i - 1] for i in range(n_levels, len(levels)))
        events = tuple((e.kind, e.uid, e.index - (n_levels - 1)) for e in tr.events[n_events:])
        alive = [k is not None and (g is None or tr.gen.get(k) == g) for k, g in zip(keys, gens, strict=True)]
        freed = tuple(j for j, (k, a) in enumerate(zip(keys, alive, strict=True)) if k is not None and not a)
        arg_of = {k: j for j, (k, a) in reversed(list(enumerate(zip(keys, alive, strict=True)))) if a}
        outs: list[tuple[Any, ...]] = []
        groups: dict[int, int] = {}
        for t in out:
            if not isinstance(t, torch.Tensor):
                if not isinstance(t, (int, float, bool, type(None))):
                    return out  # nothing recorded: this situation is always replayed
                outs.append(("value", t))
                continue
            k = int(t.untyped_storage()._cdata)
            view = (tuple(t.shape), tuple(t.stride()), t.storage_offset())
            if k in arg_of:
                outs.append(("arg", arg_of[k], *view))
            elif k in tr.sizes:
                g = groups.setdefault(k, len(groups))
                nbytes = int(t.untyped_storage().nbytes())
                outs.append(("new", g, nbytes, tr.sizes[k], *view, t.dtype))
            else:
                return out  # an output on a storage the tracker does not count: always replayed
        self.seen[key] = _Effect(deltas, events, freed, tuple(outs))
        return out

    def _apply(self, effect: _Effect, args: list[Any]) -> list[Any]:
        from torch._subclasses.fake_tensor import FakeTensor

        tr = self.tracker
        base = len(tr.levels) - 1
        # the recorded moves (never 0: a level is appended only when it changes), with the fxswap
        # events at their recorded places among them
        moves = iter(effect.deltas)
        done = 0
        for kind, uid, at in effect.events:
            while done < at:
                tr._move(next(moves))
                done += 1
            tr.events.append(FxswapEvent(kind, uid, base + at))
        for d in moves:
            tr._move(d)
        for j in effect.freed:
            tr.forget(int(args[j].untyped_storage()._cdata))
        fake_mode = next(a.fake_mode for a in args if isinstance(a, FakeTensor))
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        storages: dict[int, Any] = {}
        outs: list[Any] = []
        for o in effect.outs:
            if o[0] == "value":
                outs.append(o[1])
                continue
            if o[0] == "arg":
                src = args[o[1]]
                size, stride, offset = o[2:5]
                with torch._C._DisableTorchDispatch():
                    view = torch.Tensor.as_strided(src, size, stride, offset)
                t = FakeTensor(fake_mode, view, src.device)
            else:
                _, g, nbytes, counted, size, stride, offset, dtype = o
                if g not in storages:
                    with torch._C._DisableTorchDispatch():
                        storages[g] = torch.empty(nbytes, dtype=torch.uint8, device="meta")
                    # counted by the recorded moves already: noted without a move of its own
                    tr.register(int(storages[g].untyped_storage()._cdata), counted)
                meta = torch.empty(0, dtype=dtype, device="meta")
                with torch._C._DisableTorchDispatch():
                    meta.set_(storages[g].untyped_storage(), offset, size, stride)
                t = FakeTensor(fake_mode, meta, device)
            tr._note(t)
            outs.append(t)
        args.clear()  # Inductor's boxed convention, as the replayed wrapper does
        return outs


def _replayable(compiled: Any, device: torch.device, tracker: _Tracker) -> Callable[[list[Any]], Any]:
    """Inductor's generated ``call(args)`` of ``compiled``, its kernels no-ops and its allocations
    served by the fake mode (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensor

    call, glb = _call_of(compiled)

    def empty_strided(size: Any, stride: Any, dtype: Any = None, *a: Any, **k: Any) -> torch.Tensor:
        return torch.empty_strided(size, stride, dtype=dtype, device=device)

    def reinterpret(t: torch.Tensor, size: Any, stride: Any, offset: int = 0) -> torch.Tensor:
        if type(t) is FakeTensor:
            # NOTE: the view made with the fake mode's dispatch skipped (the kernel of the fake's
            # backend key only sets view metadata) and wrapped as a fake tensor of the same mode
            # and storage, noted by the tracker as its dispatch would: a quarter of the cost of
            # `as_strided` through the fake mode, called about 1,400 times per replay of a
            # 40-block WAN. Where that kernel is missing (a fake CUDA tensor on a CPU-only
            # build), the fake mode's own path below.
            try:
                with torch._C._DisableTorchDispatch():
                    view = torch.Tensor.as_strided(t, size, stride, t.storage_offset() + offset)
            except (NotImplementedError, RuntimeError):
                pass
            else:
                fake = FakeTensor(t.fake_mode, view, t.device)
                tracker._note(fake)
                return fake
        return t.as_strided(size, stride, t.storage_offset() + offset)

    def alloc_from_pool(pool: torch.Tensor, offset: int, dtype: Any, size: Any, stride: Any) -> torch.Tensor:
        return pool.view(torch.uint8)[offset:].view(dtype).as_strided(size, stride)

    patched = dict(glb)
    for name in list(patched):
        if name.startswith("empty_strided"):
            patched[name] = empty_strided
        elif _KERNEL.match(name):
            patched[name] = _Noop()
    patched["reinterpret_tensor"] = reinterpret
    patched["alloc_from_pool"] = alloc_from_pool
    patched["assert_size_stride"] = _Noop()
    patched["assert_alignment"] = _Noop()
    fn = getattr(call, "__func__", call)
    replayed = types.FunctionType(fn.__code__, patched, fn.__name__, fn.__defaults__, fn.__closure__)
    owner = getattr(call, "__self__", None)
    if owner is not None:
        return lambda args: replayed(owner, args)
    return replayed


def inductor_activations(
    result: ReplayResult,
    num_ops: int,
    event_ops: dict[tuple[str, int], int],
    units_at: Sequence[int],
) -> list[int]:
    """Per-FX-op activation bytes that make the plan's memory model equal the replayed program.

    Args:
        result: the replay of the program compiled from the plan.
        num_ops: ops in the plan's graph.
        event_ops: FX op index of each fxswap op, by ``(kind, uid)`` (load_at, wait_at, release_after,
            and carry_at for a warm start's carries, the last op for one at the end of the call).
        units_at: bytes of swapped units the plan holds at each op (the simulator's ``swapped``).

    Returns:
        ``act[i]`` such that ``units_at[i] + act[i]`` is at least every allocation level the
        program reaches while FX op ``i``'s stretch of the program runs, and equal to the highest.

    The fxswap ops cut the replay into stretches; stretch ``j`` runs between two fxswap ops whose FX
    positions bound the ops it executes. An op whose position Inductor moved earlier than planned
    is mapped to the earlier FX position (the running minimum from the right), so a stretch is
    never credited to ops after it ran.
    """
    marks = [(0, 0)]  # (level index, FX op) at the start of each stretch
    pos = [event_ops.get((e.kind, e.uid), 0) for e in result.events]
    for k in range(len(pos) - 2, -1, -1):
        pos[k] = min(pos[k], pos[k + 1])
    for e, p in zip(result.events, pos, strict=True):
        marks.append((e.index, p))
    act = [0] * num_ops
    levels = result.levels
    for j, (start, lo) in enumerate(marks):
        end = marks[j + 1][0] if j + 1 < len(marks) else len(levels) - 1
        hi = marks[j + 1][1] if j + 1 < len(marks) else num_ops - 1
        top = max(levels[start : end + 1], default=0)
        for i in range(max(0, lo), min(num_ops - 1, hi) + 1):
            act[i] = max(act[i], top - units_at[i])
    return act
