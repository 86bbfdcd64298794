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
the table switch, in one Python function generated for the program, where the glue's swap ops are
written out (``_straight_line``). Values crossing regions live in the program's slots until their
last reader region starts, which is where the monolithic program would have freed them at the
latest. The regions are compiled without Inductor's per-input asserts (``REGION_CONFIG``): their
input layouts are fixed when the program is built.
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
from fxswap.errors import LayoutError

__all__ = [
    "INDUCTOR_CONFIG",
    "REGION_CONFIG",
    "RegionalProgram",
    "Step",
    "clear_programs",
    "compile_inductor",
    "compile_regional",
    "edges_eager",
    "input_layout",
    "regions_enabled",
    "significant_strides",
]

logger = logging.getLogger("fxswap.compiler")

# fxswap's scoped Inductor settings (names checked on torch 2.11 to 2.14; see compile_inductor).
INDUCTOR_CONFIG: dict[str, Any] = {"reorder_for_locality": False, "triton.cudagraphs": False}

# What the regions of a regional program are compiled with, on top: no per-input size and stride
# asserts. Inductor checks every input of a graph at each call (0.7 us each on the CPU), and a
# region's inputs are its weights and the activations crossing into it: 35 asserts per block of the
# 40-block toy, about 1 ms of its 13 ms call, which one graph does not pay for values that stay
# inside it. The layouts are fixed when the program is built: a user tensor's is part of the
# call's signature (fxswap.build.signature), residents and waited units are fxswap's own copies, and
# everything else is the output of a step whose code is fixed. FXSWAP_REGIONS=0 keeps the asserts:
# it is fxswap's earlier one-graph program, the baseline that benchmarks compare with.
REGION_CONFIG: dict[str, Any] = {"size_asserts": False}

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


def compile_inductor(
    gm: fx.GraphModule, flat: Sequence[Any], config: Mapping[str, Any] | None = None
) -> Callable[..., Any]:
    """Inductor on one graph with the settings the fxswap ops need (and ``config`` on top).

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
    with torch._inductor.config.patch({**INDUCTOR_CONFIG, **(config or {})}), torch.no_grad(), context:
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
        n_inputs: int,
    ) -> None:
        self.steps = tuple(steps)
        self.n_inputs = n_inputs  # slots 0 .. n_inputs - 1: the graph's inputs, in order
        self.n_slots = n_slots
        self.constants = dict(constants)
        self.outputs = tuple(outputs)
        self.output_constants = tuple(output_constants)
        self._straight: Callable[[list[Any]], list[Any]] | None = None

    @property
    def programs(self) -> int:
        """Distinct compiled programs this graph runs (glue steps are not compiled)."""
        return len({id(s.compiled) for s in self.steps if not s.glue})

    def __call__(self, *flat: Any) -> list[Any]:
        if torch._C._len_torch_dispatch_stack():
            # A dispatch mode (a fake mode, a debugging or counting mode) sees every op, the glue's
            # swap ops included, which the generated function calls without the dispatcher.
            return self.run(list(flat))
        if self._straight is None:
            # The first call runs the step loop and checks every compiled region's arguments
            # against the layouts it was compiled for (it has no asserts of its own: REGION_CONFIG);
            # the generated function runs the calls after it.
            out = self.run(list(flat), call=_checked)
            self._straight = _straight_line(self)
            return out
        return self._straight(list(flat))

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
                # `v` too: it would keep the step's last output alive through the next step
                v = outs = None
                del args
                if after is not None:
                    after(st)
        finally:
            ops.swap_table(previous)
        return [
            env[s] if s is not None else c for s, c in zip(self.outputs, self.output_constants, strict=True)
        ]


def _checked(st: Step, args: list[Any]) -> Any:
    """``st`` called after checking that its arguments are laid out as its program was compiled
    for (shape, dtype, the strides of dimensions longer than 1, as Inductor's own asserts check).
    The layouts were worked out when the program was built, from the capture's values: a value
    made by an op run as FX's Python (a stretch outside the blocks) could differ from them if a
    kernel lays out its output unlike the op's meta function, and a compiled region would then
    read the wrong elements."""
    if not st.glue:
        for i, (arg, want) in enumerate(zip(args, st.key[1], strict=True)):
            if isinstance(arg, torch.Tensor) and want[0] == "T":
                shape, stride, dtype = want[1], want[2], want[3]
                got = significant_strides(arg.shape, arg.stride())
                if (
                    tuple(arg.shape) != shape
                    or arg.dtype != dtype
                    or got != significant_strides(shape, stride)
                ):
                    raise LayoutError(
                        f"fxswap: input {i} of the compiled region {st.label or '(outside the blocks)'!r} "
                        f"is a {arg.dtype} tensor of shape {tuple(arg.shape)} and strides {arg.stride()}, "
                        f"but the region was compiled for {dtype}, {shape}, strides {stride} (what the "
                        "capture said the op before it makes). Fix: compile with FXSWAP_EAGER_EDGES=0, so "
                        "that the ops outside the blocks are compiled too, and report the model."
                    )
    return st.call(args)


def _straight_line(program: RegionalProgram) -> Callable[[list[Any]], list[Any]]:
    """``program.run`` without hooks, as one generated Python function: the slots are its locals,
    each step one call with its arguments named, and each glue step's swap ops written out in it,
    calling the ops' implementations on the step's units (resolved here, once) instead of going
    through the dispatcher. The replay keeps ``run`` and the glue modules: it needs the ops
    dispatched, to see them on fake tensors.

    On the 40-block toy (82 steps per call, 39 of them glue) this saves about 0.3 ms of the step
    loop (slot list, argument and output loops) and 0.4 ms of dispatching, of a 12 ms call.

    Memory is freed where ``run`` frees it: a compiled step's arguments go in a list the callee
    empties (the boxed convention), a slot is cleared before the call of its last reader, outputs
    are unpacked straight from the call; in a written-out glue step, each value is cleared right
    after its last use in the step, as FX's code for the glue module clears it."""
    namespace: dict[str, Any] = {
        "swap_table": ops.swap_table,
        "load_on": ops.load_on,
        "carry_on": ops.carry_on,
        "wait_on": ops.wait_on,
        "release_on": ops.release_on,
    }
    lines = ["def straight_line(flat):"]
    placeholders = [f"s{i}" for i in range(program.n_inputs)]
    if placeholders:
        lines.append(f"    {', '.join(placeholders)}, = flat")
    lines.append("    flat = None")
    for slot, value in program.constants.items():
        namespace[f"c{slot}"] = value
        lines.append(f"    s{slot} = c{slot}")
    lines.append("    previous = swap_table(None)")
    lines.append("    try:")
    for k, st in enumerate(program.steps):
        swaps_only = st.glue and st.region is not None and st.region.glue
        written = _glue_lines(k, st, namespace) if swaps_only else None
        if written is not None:
            lines.extend("        " + line for line in written)
            continue
        namespace[f"f{k}"] = st.call
        namespace[f"t{k}"] = st.table
        lines.append(f"        swap_table(t{k})")
        lines.append(f"        a = [{', '.join(f's{i}' for i in st.inputs)}]")
        if st.drop:
            lines.append(f"        {' = '.join(f's{i}' for i in st.drop)} = None")
        if st.outputs:
            lines.append(f"        {', '.join(f's{i}' for i in st.outputs)}, = f{k}(a)")
        else:
            lines.append(f"        f{k}(a)")
        lines.append("        a = None")  # a callee that does not empty it: not past its step
    lines.append("        pass")  # a program of no steps
    lines.append("    finally:")
    lines.append("        swap_table(previous)")
    outs = []
    for j, (out, constant) in enumerate(zip(program.outputs, program.output_constants, strict=True)):
        if out is None:
            namespace[f"o{j}"] = constant
            outs.append(f"o{j}")
        else:
            outs.append(f"s{out}")
    lines.append(f"    return [{', '.join(outs)}]")
    code = compile("\n".join(lines) + "\n", "<fxswap regional program>", "exec")
    exec(code, namespace)  # noqa: S102 (source generated above from slot numbers only)
    return cast(Callable[[list[Any]], list[Any]], namespace["straight_line"])


_ON = {ops.load: "load_on", ops.carry: "carry_on", ops.wait: "wait_on", ops.release: "release_on"}


def _glue_lines(k: int, st: Step, namespace: dict[str, Any]) -> list[str] | None:
    """The lines of glue step ``k`` written out (its boxed module's graph: the swap ops, indexing
    into a wait's list, the outputs), or None where the graph holds anything else."""
    graph = cast(fx.GraphModule, st.compiled).graph
    box = next(n for n in graph.nodes if n.op == "placeholder")
    expr: dict[fx.Node, str] = {}
    temps: set[fx.Node] = set()
    body: list[tuple[fx.Node, str]] = []
    out: fx.Node | None = None
    for n in graph.nodes:
        if n is box:
            continue
        if n.op == "call_method" and n.target == "clear" and n.args == (box,):
            continue
        if n.op == "output":
            out = n
            continue
        if n.op != "call_function":
            return None
        if n.target is operator.getitem and n.args[0] is box:
            expr[n] = f"s{st.inputs[cast(int, n.args[1])]}"
            continue
        expr[n] = f"g{k}_{len(temps)}"
        temps.add(n)
        if n.target is operator.getitem and isinstance(n.args[0], fx.Node) and isinstance(n.args[1], int):
            body.append((n, f"{expr[n]} = {expr[n.args[0]]}[{n.args[1]}]"))
            continue
        name = _ON.get(n.target)
        uid = n.args[0] if n.args else None
        if name is None or not isinstance(uid, int) or uid not in st.table or n.kwargs:
            return None
        # the last argument is the op's token (anchor, token, after); release's weights are only a
        # dependency, which the order of these lines keeps
        token = n.args[-1]
        if not isinstance(token, fx.Node):
            return None
        handle = f"h{k}_{uid}".replace("-", "m")
        namespace[handle] = st.table[uid]
        body.append((n, f"{expr[n]} = {name}({handle}, {expr[token]})"))
    if out is None:
        return None
    results = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    if len(results) != len(st.outputs) or not all(isinstance(r, fx.Node) for r in results):
        return None
    # each value is cleared after its last use: temporaries always; a slot where this step is its
    # last reader (st.drop), as the boxed module drops what it took from its list
    last = {expr[n]: n for n in temps}  # a value nothing reads: cleared after its own line
    for n, _ in body:
        for a in n.all_input_nodes:
            last[expr[a]] = n
    droppable = {f"s{i}" for i in st.drop} | {expr[n] for n in temps}
    returned = {expr[cast(fx.Node, r)] for r in results}
    lines = []
    unused = sorted(e for e in droppable if e not in last and e not in returned)
    if unused:  # read by no op of the step: freed before its first, as the module's list is emptied
        lines.append(f"{' = '.join(unused)} = None")
    for n, line in body:
        lines.append(line)
        dead = sorted(e for e, at in last.items() if at is n and e in droppable and e not in returned)
        if dead:
            lines.append(f"{' = '.join(dead)} = None")
    lines.extend(f"s{slot} = {expr[cast(fx.Node, r)]}" for slot, r in zip(st.outputs, results, strict=True))
    moved = sorted(e for e in returned & droppable if e not in {f"s{i}" for i in st.outputs})
    if moved:  # now held by their output slots
        lines.append(f"{' = '.join(moved)} = None")
    return lines


def significant_strides(shape: Sequence[int], stride: Sequence[int]) -> tuple[int | None, ...]:
    """The strides that address something: those of the dimensions longer than 1 (Inductor's own
    asserts ignore the others, and so do a call's signature and the first call's layout check)."""
    return tuple(s if n > 1 else None for n, s in zip(shape, stride, strict=True))


def input_layout(v: Any, device: torch.device) -> tuple[Any, ...]:
    """What a compiled region assumes of one input, as its program is keyed: a tensor's shape,
    strides, dtype and device (a meta tensor stands for one on ``device``); another value's repr."""
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
        # regions_enabled: with it off, the one region is compiled with Inductor's asserts
        layouts = tuple(input_layout(example[s], device) for s in ins)
        keys.append((region.signature, layouts, regions_enabled()))
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
        len(split.placeholders),
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
        return compile_inductor(gm, fakes, REGION_CONFIG if regions_enabled() else None)


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
