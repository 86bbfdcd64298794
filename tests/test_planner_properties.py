"""Property tests of the planner on generated graphs, against an independent per-op simulator.

Run more cases with ``FXSWAP_HYPOTHESIS_PROFILE=nightly`` (10,000 examples per property).

The reference simulator below is written from the contract in the issue, not from
``fxswap.passes.simulate``: it recomputes uses, unit order, load points and per-op memory with
plain loops. The brute force derives each mode's partitions from the written contract (its own
block and chunk rules, not the planner's candidate list) and enumerates every resident subset x
prefetch depth x partition, so it checks the planner's minimum (and the monotonicity argument
behind it) rather than trusting it. Budgets are drawn mostly in [minimum, minimum + 3 units];
``pytest --hypothesis-show-statistics`` reports how many plans swap and prefetch, and
:func:`test_generated_plans_swap_and_prefetch_in_a_stated_share` holds that share.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from hypothesis import event, given, settings
from hypothesis import strategies as st

from fxswap.errors import BudgetInfeasibleError, PlanMismatchError
from fxswap.ir import GraphIR, InputInfo, OpInfo, WeightInfo
from fxswap.passes.liveness import analyse_liveness
from fxswap.passes.planner import build_plan, candidate_partitions, mode_min_vram_bytes
from fxswap.passes.schedule import fill_resident, prepare_partition
from fxswap.passes.simulate import op_costs, simulate_time
from fxswap.passes.validate import validate_plan
from fxswap.swapplan import MODES, PlanOptions, SwapPlan, SwapUnit, fingerprint_parts
from tests.graphs import graphs

MiB = 2**20
GiB = 2**30

modes = st.sampled_from(MODES)
# up to 4: the search goes past depth 2 and spread placement needs depth to matter
depths = st.integers(0, 4)
reserves = st.sampled_from([0, 1, 64 * MiB, 256 * MiB])
block_sizes = st.sampled_from([1 * MiB, 64 * MiB, 100 * MiB, 300 * MiB, 700 * MiB, 4 * GiB])


# ---------------------------------------------------------------- reference model


def ref_act(g: GraphIR) -> list[int]:
    return [sum(b.nbytes for b in g.buffers if b.start <= i <= b.end) for i in range(len(g.ops))]


def ref_ranges(g: GraphIR, units: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    out = []
    for params in units:
        uses = [i for i, op in enumerate(g.ops) if any(w in params for w in op.weights)]
        out.append((min(uses), max(uses)) if uses else (0, 0))
    return out


def ref_peak(
    g: GraphIR,
    act: Sequence[int],
    sizes: Sequence[int],
    ranges: Sequence[tuple[int, int]],
    resident: Sequence[bool],
    depth: int,
    reserve: int,
) -> int:
    """Peak of a schedule per the contract: units sorted by first use (stable), load at the first
    use of the unit ``depth`` places earlier (op 0 for the first ``depth``), release after last use."""
    order = sorted(range(len(sizes)), key=lambda k: ranges[k][0])
    load = {k: (ranges[order[pos - depth]][0] if pos >= depth else 0) for pos, k in enumerate(order)}
    res = sum(s for s, r in zip(sizes, resident, strict=True) if r)
    totals = [
        reserve
        + res
        + act[i]
        + sum(sizes[k] for k in range(len(sizes)) if not resident[k] and load[k] <= i <= ranges[k][1])
        for i in range(len(g.ops))
    ]
    return max(totals) if totals else reserve + res


def ref_plan_peak(g: GraphIR, plan: SwapPlan) -> int:
    act = ref_act(g)
    peak = None
    res = sum(u.bytes for u in plan.units if u.resident)
    for i in range(len(g.ops)):
        inflight = sum(
            u.bytes
            for u in plan.units
            if not u.resident
            and u.load_at is not None
            and u.release_after is not None
            and u.load_at <= i <= u.release_after
        )
        # warm start: units loaded in this call's tail for the next call, from their point on
        carried = sum(u.bytes for u in plan.units if u.carry_at is not None and u.carry_at <= i)
        total = plan.reserve_bytes + res + inflight + act[i] + carried
        peak = total if peak is None else max(peak, total)
    if any(u.carry_at is not None for u in plan.units):
        # between two calls: the next call's carried units beside what the last op saw
        between = (
            plan.reserve_bytes + res + act[-1] + sum(u.bytes for u in plan.units if u.carry_at is not None)
        )
        peak = between if peak is None else max(peak, between)
    return plan.reserve_bytes + res if peak is None else peak


def ref_block(name: str) -> str:
    """Layerwise block of a weight, from the contract: the shortest dotted prefix ending in a
    number, else the top-level module."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def ref_chunks(order: Sequence[str], sizes: dict[str, int], limit: int) -> list[tuple[str, ...]]:
    """Chunkwise units from the contract: whole blocks packed greedily in first-use order; a block
    above ``limit`` is cut into its children (deeper while a child is still above it), packed among
    themselves only; a lone tensor above ``limit`` is a unit of its own."""

    def key(name: str, prefix: str) -> str:
        if not prefix:
            return ref_block(name)
        rest = name[len(prefix) + 1 :]
        return f"{prefix}.{rest.split('.', 1)[0]}"

    def pack(names: list[str], prefix: str) -> list[tuple[str, ...]]:
        groups: list[list[str]] = []
        for n in names:  # maximal runs of consecutive weights with the same key
            if groups and key(groups[-1][-1], prefix) == key(n, prefix):
                groups[-1].append(n)
            else:
                groups.append([n])
        out: list[tuple[str, ...]] = []
        cur: list[str] = []
        for grp in groups:
            size = sum(sizes[n] for n in grp)
            if size > limit:
                if cur:
                    out.append(tuple(cur))
                    cur = []
                k = key(grp[0], prefix)
                out.extend([tuple(grp)] if grp == [k] else pack(grp, k))
                continue
            if cur and sum(sizes[n] for n in cur) + size > limit:
                out.append(tuple(cur))
                cur = []
            cur += grp
        if cur:
            out.append(tuple(cur))
        return out

    return pack(list(order), "")


def ref_partitions(g: GraphIR, mode: str, block: int) -> list[list[tuple[str, ...]]]:
    """The partitions a mode may use, derived here from the written contract (not the planner's
    candidate list): layerwise, chunkwise at ``block``, adaptive = layerwise + chunkwise at 64 MiB
    .. 2 GiB (doubling) and at ``block``."""
    used = {w for op in g.ops for w in op.weights}
    first = {w: min(i for i, op in enumerate(g.ops) if w in op.weights) for w in used}
    pos = {w.name: i for i, w in enumerate(g.weights)}
    order = sorted(used, key=lambda w: (first[w], pos[w])) + [w.name for w in g.weights if w.name not in used]
    sizes = {w.name: w.nbytes for w in g.weights}
    blocks: dict[str, list[str]] = {}
    for w in order:
        blocks.setdefault(ref_block(w), []).append(w)
    layerwise = [tuple(ws) for ws in blocks.values()]
    if mode == "layerwise":
        return [layerwise]
    if mode == "chunkwise":
        return [ref_chunks(order, sizes, block)]
    return [layerwise] + [
        ref_chunks(order, sizes, c) for c in sorted({64 * MiB * 2**k for k in range(6)} | {block})
    ]


def ref_split(g: GraphIR) -> tuple[GraphIR, dict[str, str]]:
    """The graph with one weight per place a weight is read (the reload contract), and the real
    weight of every virtual one. Two consecutive reads of a weight are one place when every op from
    the first to the second has the same block (ref_block of its module, "" at the root) or a view
    joins them; a place is named ``<module of its first read>.@<weight>``, ``#2``, ... if taken."""
    real: dict[str, str] = {}
    taken = {w.name for w in g.weights}
    place_of: dict[tuple[str, int], str] = {}
    for w in g.weights:
        at = [i for i, op in enumerate(g.ops) if w.name in op.weights]
        groups: list[list[int]] = []
        for i in at:
            same_block = (
                groups
                and len({ref_block(op.module) if op.module else "" for op in g.ops[groups[-1][-1] : i + 1]})
                == 1
            )
            viewed = groups and any(a <= groups[-1][-1] and i <= b for a, b in w.joined)
            if same_block or viewed:
                groups[-1].append(i)
            else:
                groups.append([i])
        if len(groups) < 2:
            continue
        for grp in groups:
            module = g.ops[grp[0]].module
            name = base = f"{module}.@{w.name}" if module else f"@{w.name}"
            k = 1
            while name in taken:
                k += 1
                name = f"{base}#{k}"
            taken.add(name)
            real[name] = w.name
            for i in grp:
                place_of[(w.name, i)] = name
    ops = tuple(
        dataclasses.replace(op, weights=tuple(dict.fromkeys(place_of.get((w, i), w) for w in op.weights)))
        for i, op in enumerate(g.ops)
    )
    weights = []
    for w in g.weights:
        names = [v for v, r in real.items() if r == w.name]
        weights += [dataclasses.replace(w, name=v, joined=()) for v in names] if names else [w]
    return dataclasses.replace(g, ops=ops, weights=tuple(weights)), real


def ref_candidates(
    g: GraphIR, mode: str, block: int
) -> list[tuple[list[tuple[str, ...]], GraphIR, list[bool]]]:
    """Every partition the planner may use, with the graph its units' ranges are read from and which
    units may never be resident: the mode's partitions of ``g``, and those of its split graph in
    which some weight is loaded by two or more units (their units are swap-only)."""
    out = [(p, g, [False] * len(p)) for p in ref_partitions(g, mode, block)]
    split, real = ref_split(g)
    if real:
        for p in ref_partitions(split, mode, block):
            homes: dict[str, set[int]] = {}
            for k, unit in enumerate(p):
                for v in unit:
                    if v in real:
                        homes.setdefault(real[v], set()).add(k)
            reloaded = {w for w, ks in homes.items() if len(ks) > 1}
            if reloaded:
                pinned = [any(real.get(v) in reloaded for v in unit) for unit in p]
                out.append((p, split, pinned))
    return out


def ref_unit_bytes(g: GraphIR, unit: Sequence[str], real: dict[str, str]) -> int:
    """A unit's bytes: each real weight once, however many of its places the unit holds."""
    size = {w.name: w.nbytes for w in g.weights}
    return sum(size[w] for w in {real.get(v, v) for v in unit})


def brute_force_min(g: GraphIR, o: PlanOptions) -> int:
    act = ref_act(g)
    best = None
    _, real = ref_split(g)
    for params, graph, pinned in ref_candidates(g, o.mode, o.block_size_bytes):
        sizes = [ref_unit_bytes(g, p, real) for p in params]
        ranges = ref_ranges(graph, params)
        for depth in range(o.max_prefetch_depth + 1):
            for resident in itertools.product((False, True), repeat=len(params)):
                if any(r and pin for r, pin in zip(resident, pinned, strict=True)):
                    continue
                p = ref_peak(g, act, sizes, ranges, resident, depth, o.reserve_bytes)
                best = p if best is None else min(best, p)
    assert best is not None
    return best


def ref_served(g: GraphIR, plan: SwapPlan) -> list[tuple[str, int, SwapUnit]]:
    """(weight, op, unit) for every read of every weight: the unit whose copy the op reads. A weight
    several units hold goes, read by read, to the one unit whose span covers that op."""
    out = []
    for i, op in enumerate(g.ops):
        for w in op.weights:
            holders = [u for u in plan.units if w in u.params]
            if len(holders) > 1 or any(sp.weight == w for u in holders for sp in u.spans):
                holders = [
                    u
                    for u in holders
                    if any(sp.weight == w and sp.first_use <= i <= sp.last_use for sp in u.spans)
                ]
            assert len(holders) == 1, (w, i, [u.name for u in holders])
            out.append((w, i, holders[0]))
    return out


def check_plan_contract(g: GraphIR, plan: SwapPlan, budget: int) -> None:
    """Everything a plan must satisfy, checked without the planner's own code (except the final
    cross-check with the validator)."""
    assert plan.peak_bytes <= budget
    assert ref_plan_peak(g, plan) == plan.peak_bytes
    # units partition the weights exactly, except that a reloaded weight is in several units,
    # each with a span of its reads
    names = [p for u in plan.units for p in u.params]
    assert sorted(set(names)) == sorted(w.name for w in g.weights)
    shared = {sp.weight for u in plan.units for sp in u.spans}
    assert all(names.count(p) == 1 for p in names if p not in shared)
    sizes = {w.name: w.nbytes for w in g.weights}
    assert all(u.bytes == sum(sizes[p] for p in u.params) for u in plan.units)
    # every read is served by exactly one unit (ref_served asserts it), after its wait and before
    # its release
    served = ref_served(g, plan)
    for _w, i, u in served:
        if not u.resident:
            assert u.load_at is not None and u.wait_at is not None and u.release_after is not None
            assert u.load_at <= u.wait_at <= i <= u.release_after, (i, u)
    # a weight is loaded again only between places of the contract: some op from one read to the
    # next lies in another block, and no view joins them
    for w in shared:
        info = next(x for x in g.weights if x.name == w)
        reads = [(i, u.name) for x, i, u in served if x == w]
        for (r, ur), (t, ut) in zip(reads, reads[1:], strict=False):
            if ur != ut:
                blocks = {ref_block(op.module) if op.module else "" for op in g.ops[r : t + 1]}
                assert len(blocks) > 1, (w, r, t)
                assert not any(a <= r and t <= b for a, b in info.joined), (w, r, t)
        assert all(not u.resident for u in plan.units if any(sp.weight == w for sp in u.spans))
    # prefetch rule over all units in first-use order
    firsts = [u.first_use for u in plan.units]
    assert firsts == sorted(firsts)
    d = plan.prefetch_depth
    for k, u in enumerate(plan.units):
        if u.resident:
            assert (u.load_at, u.wait_at, u.release_after) == (None, None, None)
        else:
            assert u.load_at == (firsts[k - d] if k >= d else 0)
            assert u.wait_at == u.first_use and u.release_after == u.last_use
    # the greedy fill leaves no swapped unit that would still fit as resident
    act = ref_act(g)
    reads_of = {u.name: [i for _, i, v in served if v.name == u.name] for u in plan.units}
    ranges = [
        (min(reads_of[u.name]), max(reads_of[u.name])) if reads_of[u.name] else (0, 0) for u in plan.units
    ]
    assert ranges == [(u.first_use, u.last_use) for u in plan.units]
    bytes_ = [u.bytes for u in plan.units]
    resident = [u.resident for u in plan.units]
    for k in range(len(plan.units)):
        if not resident[k] and not plan.units[k].spans:
            more = resident[:k] + [True] + resident[k + 1 :]
            assert ref_peak(g, act, bytes_, ranges, more, d, plan.reserve_bytes) > budget
    validate_plan(g, plan)


# ---------------------------------------------------------------- properties


@given(g=graphs(), mode=modes, depth=depths, reserve=reserves, block=block_sizes, data=st.data())
def test_plan_fits_budget_or_raises_exactly_below_minimum(
    g: GraphIR, mode: str, depth: int, reserve: int, block: int, data: st.DataObject
) -> None:
    base = PlanOptions(
        mode=mode, max_vram_bytes=1, reserve_bytes=reserve, block_size_bytes=block, max_prefetch_depth=depth
    )
    low = mode_min_vram_bytes(g, base)
    unit = max([w.nbytes for w in g.weights] + [MiB])
    where = data.draw(st.integers(0, 9), label="budget region")
    if where <= 6:  # mostly in [minimum, minimum + 2 units]: where the choices are tight
        budget = data.draw(st.integers(max(1, low), max(1, low) + 2 * unit), label="budget")
    elif where == 7:  # just below the minimum
        budget = data.draw(st.integers(max(1, low - unit), max(1, low - 1)), label="budget")
    else:
        budget = data.draw(st.integers(1, 6 * GiB), label="budget")
    o = dataclasses.replace(base, max_vram_bytes=budget)
    try:
        plan = build_plan(g, o)
    except BudgetInfeasibleError as e:
        assert budget < low == e.min_vram_bytes and e.mode == mode
        return
    assert budget >= low == plan.min_vram_bytes
    swapped = sum(not u.resident for u in plan.units)
    event("swapped units: " + ("yes" if swapped else "no"))
    event("prefetch depth: " + ("> 0" if plan.prefetch_depth > 0 and swapped else "0 or nothing swapped"))
    check_plan_contract(g, plan, budget)


def test_generated_plans_swap_and_prefetch_in_a_stated_share() -> None:
    """The budget strategy above must exercise swapping and prefetch, not only all-resident plans.

    Measured with these 200 draws on this machine: 56-74% of plans swap a unit and 1.5-7% also
    prefetch with depth > 0 (the shares moved between runs: hypothesis's generation is not fully
    reproducible across processes; depth only wins where compute can hide a copy and the budget
    holds two units in flight but not one more resident), and a few reload a weight read in two
    places (7 of 300 draws in one run: a reload wins only near the minimum or where it hides a
    stall). The floors sit under that range: most plans swap, and some prefetch and reload.
    """
    seen: list[tuple[bool, bool, bool]] = []

    def one(g: GraphIR, mode: str, depth: int, data: st.DataObject) -> None:
        base = PlanOptions(mode=mode, max_vram_bytes=1, reserve_bytes=0, max_prefetch_depth=depth)
        low = mode_min_vram_bytes(g, base)
        unit = max([w.nbytes for w in g.weights] + [MiB])
        budget = data.draw(st.integers(max(1, low), max(1, low) + 2 * unit))
        plan = build_plan(g, dataclasses.replace(base, max_vram_bytes=budget))
        swapped = any(not u.resident for u in plan.units)
        seen.append((swapped, swapped and plan.prefetch_depth > 0, any(u.spans for u in plan.units)))

    strategy = given(g=graphs(), mode=modes, depth=depths, data=st.data())
    settings(max_examples=200, database=None, derandomize=True, deadline=None)(strategy(one))()
    if not any(r for _, _, r in seen):
        # Reloads are rare (a few in 300 draws) and the derandomized draws still moved between
        # processes (once in a full run, none of 200 reloaded): 400 more, freshly seeded.
        settings(max_examples=400, database=None, derandomize=False, deadline=None)(strategy(one))()
    n = len(seen)
    share_swapped = sum(s for s, _, _ in seen) / n
    share_deep = sum(d for _, d, _ in seen) / n
    reloads = sum(r for _, _, r in seen)
    assert share_swapped >= 0.45 and share_deep > 0 and reloads > 0, (n, share_swapped, share_deep, reloads)


@given(
    g=graphs(max_weights=5, max_extra_ops=3), mode=modes, depth=depths, reserve=reserves, block=block_sizes
)
def test_minimum_equals_brute_force_minimum(
    g: GraphIR, mode: str, depth: int, reserve: int, block: int
) -> None:
    o = PlanOptions(
        mode=mode, max_vram_bytes=1, reserve_bytes=reserve, block_size_bytes=block, max_prefetch_depth=depth
    )
    low = brute_force_min(g, o)
    assert mode_min_vram_bytes(g, o) == low
    # a budget must be positive, so a graph that needs nothing is planned at 1 byte
    plan = build_plan(g, dataclasses.replace(o, max_vram_bytes=max(low, 1)))
    assert plan.min_vram_bytes == low
    check_plan_contract(g, plan, max(low, 1))
    if low > 1:
        try:
            build_plan(g, dataclasses.replace(o, max_vram_bytes=low - 1))
        except BudgetInfeasibleError as e:
            assert e.min_vram_bytes == low
        else:
            raise AssertionError(f"a plan at {low - 1} bytes, below the brute-force minimum {low}")


@given(
    g=graphs(),
    mode=modes,
    depth=depths,
    reserve=reserves,
    block=block_sizes,
    slack=st.integers(0, 4 * GiB),
    h2d=st.sampled_from([0.5, 22.0, 1000.0]),
)
def test_never_slower_than_front_fill_up_to_depth_2(
    g: GraphIR, mode: str, depth: int, reserve: int, block: int, slack: int, h2d: float
) -> None:
    """The search (placements x depths, early stops included) never predicts a slower call than
    the plain policy it replaced: front fill at every depth up to min(2, max_prefetch_depth)."""
    base = PlanOptions(
        mode=mode,
        max_vram_bytes=1,
        reserve_bytes=reserve,
        block_size_bytes=block,
        max_prefetch_depth=depth,
        h2d_gbps=h2d,
    )
    o = dataclasses.replace(base, max_vram_bytes=max(1, mode_min_vram_bytes(g, base) + slack))
    plan = build_plan(g, o)
    live = analyse_liveness(g)
    costs = op_costs(g.ops, o.compute_tflops, o.device_mem_gbps)
    plain = []
    for label, units in candidate_partitions(mode, live.order, dict(live.nbytes), block):
        part = prepare_partition(label, units, live, reserve)
        for d in range(min(2, depth) + 1):
            sched = fill_resident(part, d, o.max_vram_bytes, "front")
            if sched is not None:
                plain.append(simulate_time(costs, sched.windows(), h2d).step_ms)
    if not plain:
        # the minimum fell below every partition without reloads: only a reload fits this budget
        assert any(u.spans for u in plan.units)
        assert all(
            p.min_budget() > o.max_vram_bytes
            for p in (
                prepare_partition(lb, us, live, reserve)
                for lb, us in candidate_partitions(mode, live.order, dict(live.nbytes), block)
            )
        )
    else:
        # the planner compares times rounded to 1e-9 ms and then prefers more resident bytes
        assert plan.predicted_step_ms <= min(plain) + 1e-9
    check_plan_contract(g, plan, o.max_vram_bytes)


@given(
    g=graphs(), mode=modes, depth=depths, reserve=reserves, block=block_sizes, slack=st.integers(0, 4 * GiB)
)
def test_plans_are_deterministic_and_round_trip(
    g: GraphIR, mode: str, depth: int, reserve: int, block: int, slack: int
) -> None:
    base = PlanOptions(
        mode=mode, max_vram_bytes=1, reserve_bytes=reserve, block_size_bytes=block, max_prefetch_depth=depth
    )
    o = dataclasses.replace(base, max_vram_bytes=max(1, mode_min_vram_bytes(g, base) + slack))
    plan = build_plan(g, o)
    # an equal graph built from fresh objects gives an equal plan
    copy = GraphIR(
        ops=tuple(OpInfo(*dataclasses.astuple(op)) for op in g.ops),
        weights=tuple(WeightInfo(*dataclasses.astuple(w)) for w in g.weights),
        buffers=g.buffers,
        inputs=tuple(InputInfo(*dataclasses.astuple(i)) for i in g.inputs),
    )
    assert build_plan(copy, o) == plan
    assert SwapPlan.from_json(plan.to_json()) == plan
    assert plan.fingerprint == build_plan(g, o).fingerprint


@given(g=graphs(), mode=modes, what=st.sampled_from(["graph", "params", "inputs", "options"]), data=st.data())
def test_plan_refused_for_another_graph(g: GraphIR, mode: str, what: str, data: st.DataObject) -> None:
    base = PlanOptions(mode=mode, max_vram_bytes=1, reserve_bytes=0)
    o = dataclasses.replace(base, max_vram_bytes=mode_min_vram_bytes(g, base) + GiB)
    plan = build_plan(g, o)
    plan.check_compatible(fingerprint_parts(g, o))
    g2, o2 = g, o
    if what == "graph":
        k = data.draw(st.integers(0, len(g.ops) - 1), label="op")
        op = g.ops[k]
        g2 = dataclasses.replace(
            g, ops=g.ops[:k] + (dataclasses.replace(op, target=op.target + "_2"),) + g.ops[k + 1 :]
        )
    elif what == "params" and g.weights:
        k = data.draw(st.integers(0, len(g.weights) - 1), label="weight")
        w = g.weights[k]
        new = data.draw(st.sampled_from([("float16", w.shape), (w.dtype, (*w.shape, 1))]), label="change")
        g2 = dataclasses.replace(
            g,
            weights=g.weights[:k]
            + (dataclasses.replace(w, dtype=new[0], shape=new[1]),)
            + g.weights[k + 1 :],
        )
    elif what == "inputs":
        x = g.inputs[0]
        new_x = data.draw(
            st.sampled_from(
                [dataclasses.replace(x, shape=(*x.shape, 2)), dataclasses.replace(x, dtype="float32")]
            )
        )
        g2 = dataclasses.replace(g, inputs=(new_x, *g.inputs[1:]))
    else:
        what = "options"
        o2 = data.draw(
            st.sampled_from(
                [
                    dataclasses.replace(o, max_vram_bytes=o.max_vram_bytes + 1),
                    dataclasses.replace(o, block_size_bytes=o.block_size_bytes * 2),
                    dataclasses.replace(o, mode=MODES[(MODES.index(mode) + 1) % 3]),
                    dataclasses.replace(o, h2d_gbps=o.h2d_gbps * 2),
                ]
            )
        )
    try:
        plan.check_compatible(fingerprint_parts(g2, o2))
    except PlanMismatchError as e:
        assert what in str(e) and e.fields == (what,)  # type: ignore[attr-defined]
    else:
        raise AssertionError(f"a plan was accepted for a graph with different {what}")
