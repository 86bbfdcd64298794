"""Peer policies as schedules on the shared simulator: structure, fitting rule and time by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest
from graphs import chain_graph

from fxswap.bench.costmodel import graph_costs
from fxswap.bench.hardware import PROFILES
from fxswap.bench.peers import (
    PEER_POLICIES,
    GraphContext,
    build_peer,
    comfyui_lowvram,
    diffusers_group,
    evaluate,
    mmgp,
    wvw_blockswap,
)
from fxswap.errors import PlanError

MiB = 2**20
RESERVE = 16 * MiB
HW = replace(PROFILES["rtx4090"], bf16_tflops=100.0, achieved_fraction=1.0, pinned_h2d_gbps=10.0,
             d2h_gbps=5.0, sync_overhead_ms=0.5)  # fmt: skip


def _ctx(n_blocks: int = 6, flops: float = 1e12) -> GraphContext:
    ir = chain_graph(n_blocks, weight_bytes=100 * MiB, act_bytes=10 * MiB, embed_bytes=50 * MiB,
                     head_bytes=50 * MiB, flops=flops)  # fmt: skip
    return GraphContext(ir, RESERVE)


def _peak_by_hand(ctx: GraphContext, units: tuple) -> int:  # type: ignore[type-arg]
    """The peak of a schedule by its definition, written out here (not the simulator's code): at op
    i, reserve + every resident unit + every swapped unit with load_at <= i <= release_after + every
    activation buffer with start <= i <= end + op i's workspace; the peak is the largest."""
    ir = ctx.ir
    resident = sum(u.bytes for u in units if u.resident)
    best = 0
    for i, op in enumerate(ir.ops):
        swapped = sum(u.bytes for u in units if not u.resident and u.load_at <= i <= u.release_after)
        act = sum(b.nbytes for b in ir.buffers if b.start <= i <= b.end) + op.workspace_bytes
        best = max(best, RESERVE + resident + swapped + act)
    return best


def _wvw_by_hand(ctx: GraphContext, budget: int, prefetch: int) -> tuple[int, int]:
    """WanVideoWrapper's rule as its docs state it, written out here: swap the last N blocks, N the
    smallest that fits; a swapped block b is loaded at the first op of block b - prefetch (block 0
    and prefetch 0 at its own first op), waited for at its first op, released after its last.
    Returns (N, that schedule's peak by :func:`_peak_by_hand`)."""
    from fxswap.passes.simulate import UnitWindow

    blocks = [k for k, is_block in enumerate(ctx.is_block) if is_block]
    peak = 0
    for n in range(len(blocks) + 1):
        swapped = set(blocks[len(blocks) - n :])
        units = []
        for k, u in enumerate(ctx.layer_units):
            first, last = ctx.layer_range[k]
            if k not in swapped:
                units.append(UnitWindow(u.bytes, True))
                continue
            src = blocks[max(0, blocks.index(k) - prefetch)]
            units.append(UnitWindow(u.bytes, False, ctx.layer_range[src][0], first, last))
        peak = _peak_by_hand(ctx, tuple(units))
        if peak <= budget:
            return n, peak
    return len(blocks), peak


def _block_names(ctx: GraphContext, sched_units: tuple, resident: bool) -> list[str]:  # type: ignore[type-arg]
    return [
        ctx.layer_units[k].name
        for k, u in enumerate(sched_units)
        if ctx.is_block[k] and u.resident == resident
    ]


def test_context_splits_blocks_and_modules() -> None:
    ctx = _ctx(3)
    assert [u.name for u in ctx.layer_units] == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert ctx.is_block == (False, True, True, True, False)
    assert len(ctx.module_units) == 2 + 3 * 2  # embed, head, and attn/ffn per block


@pytest.mark.parametrize("prefetch", [0, 1])
def test_wvw_swaps_the_last_n_blocks_smallest_n_that_fits(prefetch: int) -> None:
    ctx = _ctx(6)
    for budget_mib in (450, 600, 800, 1000):
        budget = budget_mib * MiB
        s = wvw_blockswap(ctx, budget, prefetch)
        n = int(s.setting.split("=")[1])
        swapped = _block_names(ctx, s.units, resident=False)
        assert swapped == [f"blocks.{i}" for i in range(6 - n, 6)]
        assert s.peak_bytes == _peak_by_hand(ctx, s.units)
        assert (n, s.peak_bytes) == _wvw_by_hand(ctx, budget, prefetch)
        if s.feasible:
            assert s.peak_bytes <= budget
            if n > 0:  # one fewer swapped block does not fit
                fewer = wvw_blockswap(ctx, s.peak_bytes - 1, prefetch)
                assert int(fewer.setting.split("=")[1]) > n or not fewer.feasible
        else:
            assert n == 6 and s.peak_bytes > budget


def test_wvw_time_is_compute_plus_serial_copies_both_ways() -> None:
    ctx = _ctx(6)
    costs = graph_costs(ctx.ir, HW)
    for prefetch in (0, 1):
        s = wvw_blockswap(ctx, 600 * MiB, prefetch)
        swapped = [u for u in s.units if not u.resident]
        nbytes = sum(u.bytes for u in swapped)
        t = evaluate(s, costs, HW.pinned_h2d_gbps, HW.d2h_gbps, HW.sync_overhead_ms)
        expect = costs.prefix_ms[-1] + nbytes / 10e9 * 1e3 + nbytes / 5e9 * 1e3 + 0.5 * len(swapped)
        assert t.step_ms == pytest.approx(expect)
        assert t.moved_bytes == nbytes and t.d2h_bytes == nbytes


def test_diffusers_swaps_everything_one_ahead_with_syncs() -> None:
    ctx = _ctx(4)
    s = diffusers_group(ctx, 10**12)
    assert s.feasible and all(not u.resident for u in s.units)
    assert sum(u.bytes for u in s.units) == ctx.ir.weight_bytes
    firsts = [ctx.layer_range[k][0] for k, b in enumerate(ctx.is_block) if b]
    # block i's load is issued at the first op of block i-1 (block 0 at op 0, with the unmatched group)
    assert [u.load_at for u in s.units[1:]] == [0, *firsts[:-1]]
    costs = graph_costs(ctx.ir, HW)
    t = evaluate(s, costs, HW.pinned_h2d_gbps, HW.d2h_gbps, HW.sync_overhead_ms)
    assert t.moved_bytes == ctx.ir.weight_bytes and t.d2h_bytes == 0
    # the unmatched group is waited for at op 0, so its copy cannot be hidden; one sync per block
    # before and after use, plus the one at op 0
    n_blocks = sum(ctx.is_block)
    exposed = s.units[0].bytes / 10e9 * 1e3 + 0.5 * (2 * n_blocks + 2)
    assert t.step_ms >= costs.prefix_ms[-1] + exposed - 1e-9
    assert diffusers_group(ctx, s.peak_bytes - 1).feasible is False
    assert s.peak_bytes == _peak_by_hand(ctx, s.units)


def test_mmgp_preloads_evenly_and_as_many_as_fit() -> None:
    ctx = _ctx(8)
    s = mmgp(ctx, 900 * MiB)
    assert s.feasible and s.peak_bytes <= 900 * MiB
    resident = _block_names(ctx, s.units, resident=True)
    swapped = _block_names(ctx, s.units, resident=False)
    assert resident and swapped
    # evenly spread: no two preloaded floors adjacent when fewer than half are preloaded
    idx = sorted(int(n.split(".")[1]) for n in resident)
    if len(idx) <= 4:
        assert all(b - a >= 2 for a, b in zip(idx, idx[1:], strict=False))
    n = int(s.setting.split("=")[1])
    assert n == len(swapped)
    assert s.peak_bytes == _peak_by_hand(ctx, s.units)
    more = mmgp(ctx, s.peak_bytes)  # the same budget again gives the same answer
    assert more.units == s.units
    assert all(u.resident for k, u in enumerate(s.units) if not ctx.is_block[k])  # base resident


def test_comfyui_loads_largest_first_and_casts_the_rest_serially() -> None:
    ir = chain_graph(
        4, weight_bytes=100 * MiB, act_bytes=10 * MiB, embed_bytes=150 * MiB, head_bytes=20 * MiB
    )
    ctx = GraphContext(ir, RESERVE)
    s = comfyui_lowvram(ctx, 500 * MiB)
    assert s.feasible and s.peak_bytes <= 500 * MiB
    sizes = {m.name: m.bytes for m in ctx.module_units}
    loaded = {ctx.module_units[k].name for k, u in enumerate(s.units) if u.resident}
    assert "embed" in loaded  # the largest module goes first
    costs = graph_costs(ir, HW)
    t = evaluate(s, costs, HW.pinned_h2d_gbps, HW.d2h_gbps, HW.sync_overhead_ms)
    cast = sum(sizes[n] for n in sizes if n not in loaded)
    assert t.moved_bytes == cast
    # each cast starts when compute reaches its layer and compute waits for it: fully serial
    assert t.step_ms == pytest.approx(costs.prefix_ms[-1] + cast / 10e9 * 1e3)
    none_fit = comfyui_lowvram(ctx, RESERVE)
    assert not none_fit.feasible and none_fit.peak_bytes > RESERVE


def test_peers_never_beat_the_compute_time_and_build_peer_dispatches() -> None:
    ctx = _ctx(5)
    costs = graph_costs(ctx.ir, HW)
    for pol in PEER_POLICIES:
        s = build_peer(pol, ctx, 700 * MiB)
        assert s.policy == pol
        t = evaluate(s, costs, HW.pinned_h2d_gbps, HW.d2h_gbps, HW.sync_overhead_ms)
        assert t.step_ms >= costs.prefix_ms[-1] - 1e-9
    with pytest.raises(PlanError, match="policy='nope'"):
        build_peer("nope", ctx, 1)


def test_graph_without_blocks_is_refused() -> None:
    ir = chain_graph(0)
    with pytest.raises(PlanError, match="no numbered blocks"):
        GraphContext(ir, RESERVE)
