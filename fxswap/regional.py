"""Inductor on a rewritten graph, one region at a time: each distinct block program compiled once.

:func:`compile_regional` cuts the rewritten graph into regions (:mod:`fxswap.passes.regions`:
the prologue, each repeated block, the epilogue), compiles every region whose canonical code and
input layout it has not compiled before in this process, and returns a :class:`RegionalProgram`
that runs the regions in order. The swap ops stay inside the compiled code of the region whose op
they precede or follow, at the plan's positions; a region's unit ids are its own (numbered by first
appearance, shapes folded in), resolved per call of the region through a table that maps them to
the units of that occurrence. Forty identical swapped blocks are one program called forty times.

Why not one graph: Inductor's time grows with the number of ops, so a 40-block model took as
long to compile as 40 blocks, for every plan ``fxswap.fit`` tried and every input signature.
Why not ``torch.compiler.nested_compile_region``: see ``docs/ops_and_inductor.md`` (it traces
through Dynamo again and, as measured, reused one block's weights for every block when the model
is called through ``functional_call``).

What a region costs at run time: one call of Inductor's runtime wrapper (a few microseconds) and
the table switch. Values crossing regions live in the program's slot list until their last reader
region starts, which is where the monolithic program would have freed them at the latest.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import operator
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx

from fxswap import ops

__all__ = [
    "INDUCTOR_CONFIG",
    "RegionalProgram",
    "Step",
    "clear_programs",
    "compile_inductor",
    "compile_regional",
    "edges_eager",
    "regions_enabled",
]

logger = logging.getLogger("fxswap.compiler")

# fxswap's scoped Inductor settings (names checked on torch 2.11 to 2.14; see compile_inductor).
INDUCTOR_CONFIG: dict[str, Any] = {"reorder_for_locality": False, "triton.cudagraphs": False}

# Compiled region programs of this process, by canonical code and input layout (bounded: a long
# ComfyUI session sees many resolutions). Inductor's on-disk FX graph cache serves other processes.
_PROGRAMS: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
_PROGRAMS_MAX = 512
_PROGRAMS_LOCK = threading.Lock()


def clear_programs() -> None:
    """Forget the compiled regions of this process (the next build compiles or hits Inductor's cache)."""
    with _PROGRAMS_LOCK:
        _PROGRAMS.clear()


_WARM_LOCK = threading.Lock()
_WARMED: set[str] = set()


def warm_inductor(device: torch.device) -> None:
    """Start, in the background, what the first Inductor compile of a process otherwise waits for,
    so that it runs while fxswap captures and plans (seconds of Dynamo tracing and planning before
    the first region reaches Inductor):

    - on the CPU, the pick of the vector instruction set: the first time, with an empty Inductor
      cache, it builds and runs small C++ test programs (measured: 3 to 7 s on a 2-core machine);
      a thread, which waits on the compiler, not on the GIL;
    - on a GPU, Inductor's pool of Triton compile workers (torch's own ``maybe_warm_pool``, which
      ``torch.compile``'s Inductor backend calls only when it is handed its first graph). Not on
      the CPU, where C++ kernels are compiled from threads and the pool would only take a core.

    Once per device type and process; a failure is left for the real compile to report.
    """
    with _WARM_LOCK:
        if device.type in _WARMED:
            return
        _WARMED.add(device.type)
    if device.type == "cpu":

        def pick() -> None:
            try:
                from torch._inductor.cpu_vec_isa import pick_vec_isa

                pick_vec_isa()
            except Exception as exc:
                logger.debug("fxswap: vector ISA not picked ahead: %s", exc)

        threading.Thread(target=pick, name="fxswap-warm-isa", daemon=True).start()
        return
    try:
        from torch._inductor.async_compile import maybe_warm_pool

        maybe_warm_pool()
    except Exception as exc:  # the compile itself starts the pool, or says why it cannot
        logger.debug("fxswap: Inductor's worker pool not warmed: %s", exc)


def compile_inductor(gm: fx.GraphModule, flat: Sequence[Any]) -> Callable[..., Any]:
    """Inductor on one graph with the settings the fxswap ops need.

    ``flat`` holds the example inputs: real tensors, or fake tensors of one ``FakeTensorMode``
    (with static shapes), which are used as they are.
    """
    from torch._inductor.compile_fx import compile_fx

    # NOTE: reorder_for_locality=False keeps Inductor's schedule in FX order for the fxswap ops.
    # With it on, Inductor sank each load past the matmul it should overlap (observed: load k+1
    # after release k), which serialises transfer and compute. Fusion is unaffected.
    # CUDA graphs stay off whatever the global config says: a replay skips the Python load / wait
    # ops, so every replay would compute with the weights (and addresses) of the recorded call.
    # NOTE: outside a tracing context (fxswap.compile; the torch.compile backend runs inside
    # Dynamo's) Inductor bypasses its FX graph cache ("No shape env") and every process would
    # compile the same graph again. A context with a static shape env lets the cache key the
    # graph's code, which the rewrite keeps identical across builds and processes.
    # NOTE: with a shape env in the context, AOTAutograd fakifies real example inputs with
    # symbolic (duck-sized) dims and Inductor generates shape-generic code, which also failed to
    # lower a convolution of WAN i2v at one frame (`12 - s49`). So the inputs are handed over as
    # fake tensors of that mode with static shapes, which AOTAutograd takes as they are.
    context: Any = contextlib.nullcontext()
    example: list[Any] = list(flat)
    if torch._guards.TracingContext.try_get() is None:
        fake_mode = torch._guards.detect_fake_mode(example)
        if fake_mode is None:
            fake_mode = _static_fake_mode()
            example = [
                fake_mode.from_tensor(t, static_shapes=True) if isinstance(t, torch.Tensor) else t
                for t in flat
            ]
        context = torch._guards.tracing(torch._guards.TracingContext(fake_mode))
    with torch._inductor.config.patch(INDUCTOR_CONFIG), torch.no_grad(), context:
        return compile_fx(gm, example)  # type: ignore[return-value]


_NOT_RUN = ("placeholder", "get_attr", "output")


def edges_eager() -> bool:
    """Whether the stretches outside the repeated blocks of a graph that has them (prologue,
    epilogue, ops between blocks) run as FX's Python instead of compiled, as regional compilation
    leaves them: the default, only the block programs are compiled and the outputs are those of
    ``torch.compile`` applied to each repeated block. ``FXSWAP_EAGER_EDGES=0`` compiles them too:
    more programs on a first call, outputs those of ``torch.compile`` on the whole model."""
    return os.environ.get("FXSWAP_EAGER_EDGES", "1").strip().lower() not in ("0", "false", "no", "off")


def regions_enabled() -> bool:
    """Whether graphs are compiled region by region (``FXSWAP_REGIONS=0``: as one region, the whole
    graph in one Inductor compile, as fxswap did before; kept for comparisons)."""
    return os.environ.get("FXSWAP_REGIONS", "1").strip().lower() not in ("0", "false", "no", "off")


def _static_fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)


@dataclass(frozen=True)
class Step:
    """One region call: the compiled program, the slots it reads and writes, and its unit table."""

    label: str
    compiled: Any  # what compile_fx returned (its generated wrapper is what fxswap.replay replays)
    call: Callable[[list[Any]], Any]  # boxed: takes a list and may empty it
    inputs: tuple[int, ...]
    drop: tuple[int, ...]  # slots whose last reader is this step: cleared before it runs
    outputs: tuple[int, ...]
    table: Mapping[int, ops.UnitHandle]  # the region's unit ids -> this occurrence's units
    units: Mapping[int, int]  # the region's unit ids -> the ids of the rewritten graph
    key: tuple[Any, ...]
    region: Any = None  # the fxswap.passes.regions.Region it runs (its canonical code, for checks)

    @property
    def glue(self) -> bool:
        """Run as FX's Python, not compiled (``compiled`` is the region's GraphModule): swap ops
        only, or a stretch outside the blocks."""
        return isinstance(self.compiled, fx.GraphModule)


class RegionalProgram:
    """The compiled regions of one rewritten graph, run in order (see the module docstring).

    Called like the monolithic program: ``program(*flat)`` with the graph's inputs, returns the
    graph's outputs as a list.
    """

    def __init__(
        self,
        steps: Sequence[Step],
        n_slots: int,
        constants: Mapping[int, Any],
        outputs: Sequence[int | None],
        output_constants: Sequence[Any],
    ) -> None:
        self.steps = tuple(steps)
        self.n_slots = n_slots
        self.constants = dict(constants)
        self.outputs = tuple(outputs)
        self.output_constants = tuple(output_constants)

    @property
    def programs(self) -> int:
        """Distinct compiled programs this graph runs (glue steps are not compiled)."""
        return len({id(s.compiled) for s in self.steps if not s.glue})

    def __call__(self, *flat: Any) -> list[Any]:
        return self.run(list(flat))

    def run(
        self,
        flat: list[Any],
        call: Callable[[Step, list[Any]], Any] | None = None,
        after: Callable[[Step], None] | None = None,
    ) -> list[Any]:
        """Run the regions on ``flat`` (``call`` replaces each step's program: the replay's hook;
        ``after`` is told when a step finished)."""
        env: list[Any] = [None] * self.n_slots
        env[: len(flat)] = flat
        for slot, value in self.constants.items():
            env[slot] = value
        previous = ops.swap_table(None)
        try:
            for st in self.steps:
                args = [env[i] for i in st.inputs]
                for i in st.drop:
                    env[i] = None
                ops.swap_table(st.table)
                outs = st.call(args) if call is None else call(st, args)
                for slot, v in zip(st.outputs, outs, strict=True):
                    env[slot] = v
                del outs, args
                if after is not None:
                    after(st)
        finally:
            ops.swap_table(previous)
        return [
            env[s] if s is not None else c for s, c in zip(self.outputs, self.output_constants, strict=True)
        ]


def _layout(v: Any, device: torch.device) -> tuple[Any, ...]:
    if isinstance(v, torch.Tensor):
        dev = v.device if v.device.type != "meta" else device
        return ("T", tuple(v.shape), tuple(v.stride()), v.dtype, str(dev))
    return ("V", type(v).__name__, repr(v))


def _repeated_labels(regions: Sequence[Any], keys: Sequence[tuple[Any, ...]]) -> set[str]:
    """The labels of the repeated blocks: those of a container (``blocks`` of ``blocks.7``) in which
    two labels have a region of the same code and input layouts. A numbered module that is not
    repeated (``text_embedding.0`` and ``.2`` of an ``nn.Sequential``, Linears of other shapes) is
    not a block: regional compilation leaves it eager, and so does fxswap."""

    def container(label: str) -> str:
        return label.rsplit(".", 1)[0] if "." in label else ""

    labels_of: dict[tuple[str, tuple[Any, ...]], set[str]] = {}
    for region, key in zip(regions, keys, strict=True):
        if region.label and not region.glue:
            labels_of.setdefault((container(region.label), key), set()).add(region.label)
    repeated = {c for (c, _), labels in labels_of.items() if len(labels) >= 2}
    return {r.label for r in regions if r.label and container(r.label) in repeated}


def compile_regional(
    gm: fx.GraphModule,
    flat: Sequence[Any],
    units: Mapping[int, ops.UnitHandle],
    device: torch.device,
) -> RegionalProgram:
    """Compile ``gm`` (a rewritten graph) region by region; see the module docstring.

    Args:
        gm: the rewritten graph (its node meta carries Dynamo's example values).
        flat: the graph's inputs for a call, in placeholder order (real tensors).
        units: the graph's unit table (build-local ids); positive ids resolve through the registry.
        device: where the program runs (intermediate values live there).

    Returns:
        The program; regions already compiled in this process are not compiled again.
    """
    from fxswap.passes.regions import split_regions
    from fxswap.progress import progress

    def handle(uid: int) -> ops.UnitHandle:
        return units[uid] if uid in units else ops.lookup(uid)

    def meta_of(uid: int) -> tuple[Sequence[Sequence[int]], Sequence[torch.dtype]]:
        m = handle(uid).meta
        return m.shapes, m.dtypes

    labels = None if regions_enabled() else {n: "" for n in gm.graph.nodes if n.op not in _NOT_RUN}
    split = split_regions(gm, meta_of, labels=labels)
    slot: dict[str, int] = {name: i for i, name in enumerate(split.placeholders)}
    if len(flat) != len(slot):
        raise ValueError(f"compile_regional: {len(flat)} inputs for a graph of {len(slot)} placeholders")
    by_name = {n.name: n for n in gm.graph.nodes}
    constants: dict[int, Any] = {}
    example: dict[int, Any] = {i: v for i, v in enumerate(flat)}

    def slot_of(name: str) -> int:
        if name not in slot:
            node = by_name[name]
            slot[name] = len(slot)
            if node.op == "get_attr":
                value: Any = gm
                for part in str(node.target).split("."):
                    value = getattr(value, part)
                constants[slot[name]] = value
                example[slot[name]] = value
        return slot[name]

    last_reader: dict[int, int] = {}
    plans: list[tuple[Any, list[int], list[int], dict[int, ops.UnitHandle]]] = []
    for r, region in enumerate(split.regions):
        ins = [slot_of(n) for n in region.inputs]
        for s in ins:
            last_reader[s] = r
        outs = []
        for name in region.outputs:
            s = slot_of(name)
            outs.append(s)
            example[s] = _example_value(by_name[name], device)
        table = {local: handle(orig) for local, orig in region.units.items()}
        plans.append((region, ins, outs, table))
    keep = {slot[n] for n in split.outputs if n is not None}

    keys = []
    for region, ins, _outs, _table in plans:
        keys.append((region.signature, tuple(_layout(example[s], device) for s in ins)))
    # Run as FX's Python, not compiled: glue always; and, unless FXSWAP_EAGER_EDGES=0, every
    # stretch outside the repeated blocks (prologue, epilogue, ops between blocks), as regional
    # compilation leaves them (docs/first_call.md: what that saves and costs).
    blocks = _repeated_labels(split.regions, keys)
    eager_outside = edges_eager() and bool(blocks)
    interpreted = [r.glue or (eager_outside and r.label not in blocks) for r in split.regions]
    with _PROGRAMS_LOCK:
        todo = {
            k: (region, ins, table)
            for k, (region, ins, _, table), fx_run in zip(keys, plans, interpreted, strict=True)
            if not fx_run
        }
        todo = {k: v for k, v in todo.items() if k not in _PROGRAMS}
    compiled_now: dict[tuple[Any, ...], Any] = {}
    for k in progress(list(todo), desc="fxswap: compiling blocks", unit="block", total=len(todo)):
        region, ins, table = todo[k]
        t0 = time.perf_counter()
        compiled_now[k] = _compile_region(region.gm, [example[s] for s in ins], table, device)
        logger.debug(
            "fxswap: compiled region %r (%d nodes) in %.2f s",
            region.label,
            len(region.gm.graph.nodes),
            time.perf_counter() - t0,
        )
    with _PROGRAMS_LOCK:
        for k, fn in compiled_now.items():
            _PROGRAMS[k] = fn
        programs = {k: _PROGRAMS[k] for k, fx_run in zip(keys, interpreted, strict=True) if not fx_run}
        for k in programs:
            _PROGRAMS.move_to_end(k)
        while len(_PROGRAMS) > _PROGRAMS_MAX:
            _PROGRAMS.popitem(last=False)
    if todo:
        logger.info(
            "fxswap: %d regions, %d distinct programs, %d compiled now",
            interpreted.count(False),
            len(programs),
            len(todo),
        )
    steps = []
    glue: dict[str, fx.GraphModule] = {}
    for r, ((region, ins, outs, table), k) in enumerate(zip(plans, keys, strict=True)):
        drop = tuple(s for s in dict.fromkeys(ins) if last_reader[s] == r and s not in keep)
        if interpreted[r]:
            # Glue (swap ops only) or a stretch outside the blocks: FX's Python, nothing to
            # compile; regions alike (canonical code) share one module.
            if region.signature not in glue:
                glue[region.signature] = _boxed_module(region)
            gm = glue[region.signature]
            step = Step(
                region.label,
                gm,
                _glue_call(gm),
                tuple(ins),
                drop,
                tuple(outs),
                table,
                region.units,
                k,
                region,
            )
        else:
            fn = programs[k]
            step = Step(
                region.label, fn, _boxed(fn), tuple(ins), drop, tuple(outs), table, region.units, k, region
            )
        steps.append(step)
    return RegionalProgram(
        steps,
        len(slot),
        constants,
        [slot[n] if n is not None else None for n in split.outputs],
        split.constants,
    )


def _example_value(node: fx.Node, device: torch.device) -> Any:
    """What flows out of ``node`` at run time, as far as compiling its readers needs: a tensor of
    its shape, strides and dtype on ``device`` (fxswap tokens are empty uint8 tensors)."""
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, torch.Tensor):
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device="meta")
    if node.target in (ops.load, ops.carry, ops.release):
        return torch.empty(0, dtype=torch.uint8, device="meta")
    raise ValueError(
        f"node `{node.name}` passes a {type(val).__name__} from one region to another; only tensors can"
    )


def _compile_region(
    gm: fx.GraphModule, example: list[Any], table: Mapping[int, ops.UnitHandle], device: torch.device
) -> Any:
    fake_mode = _static_fake_mode()
    fakes: list[Any] = []
    for v in example:
        if isinstance(v, torch.Tensor) and v.device.type == "meta":
            with fake_mode:
                fakes.append(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device))
        elif isinstance(v, torch.Tensor):
            fakes.append(fake_mode.from_tensor(v, static_shapes=True))
        else:
            fakes.append(v)
    with ops.bound_units(table):  # the fake waits read the units' shapes
        return compile_inductor(gm, fakes)


def _boxed_module(region: Any) -> fx.GraphModule:
    """``region``'s module taking its inputs as one list, which it empties before its first op
    (Inductor's boxed convention): FX's code drops each value after its last use, so a weight
    released here is freed at its release, before a later load in the same step allocates, as in
    the compiled program. Called with ``*args``, the caller's tuple would hold every input until
    the step returns."""
    graph = fx.Graph()
    box = graph.placeholder("args")
    env: dict[fx.Node, fx.Node] = {}
    inputs = [n for n in region.graph.nodes if n.op == "placeholder"]
    for i, n in enumerate(inputs):
        env[n] = graph.call_function(operator.getitem, (box, i))
        env[n].meta = dict(n.meta)
    graph.call_method("clear", (box,))
    for n in region.graph.nodes:
        if n.op != "placeholder":
            env[n] = graph.node_copy(n, lambda a: env[a])
    return fx.GraphModule(region.owner, graph)


def _glue_call(gm: fx.GraphModule) -> Callable[[list[Any]], Any]:
    # gm.forward, not gm(...): no hooks on these modules, and forty or more calls per step.
    return cast(Callable[[list[Any]], Any], gm.forward)


def _boxed(fn: Any) -> Callable[[list[Any]], Any]:
    # Inductor's runtime wrapper takes a list and empties it, so a region's inputs can be freed
    # inside it at their last use; calling the outer function with *args would hold them all.
    inner = getattr(fn, "compiled_fn", None)
    if inner is not None and getattr(inner, "_boxed_call", False):
        return inner
    return lambda args: fn(*args)
