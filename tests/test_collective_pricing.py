"""Collectives priced by the time model (passes/simulate.py's third stream) and recorded by analyse.

Expected values are worked out by hand from the stated model, or by a tick-by-tick simulation
written here that shares no code with the simulator:

- compute runs ops in order; a collective op and its wait cost nothing on compute;
- a collective takes ``latency + max(sent, received) / p2p rate`` on its own stream and compute
  waits for it at its ``wait_tensor``;
- without NVLink, the loads and the collectives are served one after another in issue order on the
  host-to-device direction of the link; with NVLink they do not share anything.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from fxswap.ir import GraphIR, OpInfo
from fxswap.options import PlanOptions
from fxswap.passes import simulate
from fxswap.passes.planner import build_plan
from fxswap.passes.simulate import UnitWindow, op_costs, simulate_time
from fxswap.passes.warmstart import simulate_steady
from tests.graphs import chain_graph

MS = 1_000_000  # bytes per ms at 1 GB/s; FLOPs per ms at 1e-3 TFLOP/s


def _compute(name: str, ms: float) -> OpInfo:
    return OpInfo(name, "torch.matmul", "", (), 0, ms * MS, 0)


def _a2a(name: str, nbytes: int) -> OpInfo:
    # mem_bytes as analyse records it for the op (input + output): not priced on compute
    return OpInfo(name, "a2a", "", (), nbytes, 0.0, 4 * nbytes, collective="all_to_all",
                  sent_bytes=nbytes, received_bytes=nbytes)  # fmt: skip


def _wait(name: str, of: int, nbytes: int) -> OpInfo:
    return OpInfo(name, "wait", "", (), nbytes, 0.0, 2 * nbytes, collective="wait", waits_on=of)


def _two_all_to_alls() -> list[OpInfo]:
    return [
        _compute("mm0", 2),  # op 0: 2 ms
        _a2a("a2a1", 4 * MS),  # op 1: 4e6 bytes each way -> 0.05 + 4 = 4.05 ms
        _compute("mm2", 1),  # op 2: 1 ms, overlaps a2a1
        _wait("w3", 1, 4 * MS),  # op 3: needs a2a1
        _compute("mm4", 3),  # op 4: 3 ms, reads the swapped unit
        _a2a("a2a5", 2 * MS),  # op 5: 0.05 + 2 = 2.05 ms
        _wait("w6", 5, 2 * MS),  # op 6
        _compute("mm7", 1),  # op 7: 1 ms
    ]


def test_two_all_to_alls_and_a_load_by_hand() -> None:
    ops = _two_all_to_alls()
    # one swapped unit of 3e6 bytes (3 ms at 1 GB/s), issued before op 2, waited before op 4
    unit = [UnitWindow(3 * MS, False, load_at=2, wait_at=4, release_after=4)]

    pcie = op_costs(ops, 1e-3, 1.0, p2p_gbps=1.0, nvlink=False)
    assert pcie.prefix_ms == pytest.approx((0, 2, 2, 3, 3, 6, 6, 6, 7))  # collectives cost 0 on compute
    rep = simulate_time(pcie, unit, h2d_gbps=1.0)
    # PCIe, one host-to-device direction, in issue order:
    #   a2a1 issued at 2 ms (op 1), link free: 2 -> 6.05
    #   the load issued at 2 ms too (op 2, after op 1): waits for the link, 6.05 -> 9.05
    #   op 2 runs 2 -> 3; op 3 waits for a2a1 until 6.05 (collective stall 3.05)
    #   op 4 waits for the load until 9.05 (copy stall 3.0), runs 9.05 -> 12.05
    #   a2a5 issued at 12.05: 12.05 -> 14.10; op 6 waits 2.05; op 7 runs 14.10 -> 15.10
    assert rep.load_start_ms == pytest.approx((6.05,)) and rep.load_end_ms == pytest.approx((9.05,))
    assert rep.stall_ms == pytest.approx(3.0)
    assert rep.collective_stall_ms == pytest.approx(3.05 + 2.05)
    assert rep.collective_ms == pytest.approx(4.05 + 2.05)
    assert rep.compute_ms == pytest.approx(7.0)
    assert rep.step_ms == pytest.approx(15.10)

    nvlink = op_costs(ops, 1e-3, 1.0, p2p_gbps=1.0, nvlink=True)
    rep = simulate_time(nvlink, unit, h2d_gbps=1.0)
    # NVLink: the load runs 2 -> 5 beside a2a1 (2 -> 6.05); op 3 waits until 6.05; op 4 finds the
    # load done and runs 6.05 -> 9.05; a2a5 9.05 -> 11.10; op 7 runs 11.10 -> 12.10
    assert rep.load_start_ms == pytest.approx((2.0,)) and rep.load_end_ms == pytest.approx((5.0,))
    assert rep.stall_ms == pytest.approx(0.0)
    assert rep.collective_stall_ms == pytest.approx(3.05 + 2.05)
    assert rep.step_ms == pytest.approx(12.10)

    # the load issued first, before op 0: it holds the link 0 -> 3, so a2a1 (issued at 2 ms) waits
    # for it and runs 3 -> 7.05; op 3 waits until 7.05; op 4 (load done) 7.05 -> 10.05; a2a5
    # 10.05 -> 12.10; op 7 12.10 -> 13.10. With NVLink a2a1 would not wait: 12.10 as above.
    early = [UnitWindow(3 * MS, False, load_at=0, wait_at=4, release_after=4)]
    rep = simulate_time(pcie, early, h2d_gbps=1.0)
    assert rep.load_end_ms == pytest.approx((3.0,)) and rep.stall_ms == pytest.approx(0.0)
    assert rep.collective_stall_ms == pytest.approx(4.05 + 2.05) and rep.step_ms == pytest.approx(13.10)
    assert simulate_time(nvlink, early, h2d_gbps=1.0).step_ms == pytest.approx(12.10)

    # a faster link: p2p 4 GB/s -> a2a1 0.05 + 1 = 1.05 ms (2 -> 3.05), a2a5 0.05 + 0.5 = 0.55 ms
    fast = op_costs(ops, 1e-3, 1.0, p2p_gbps=4.0, nvlink=False)
    rep = simulate_time(fast, unit, h2d_gbps=1.0)
    # load 3.05 -> 6.05; op 3 waits until 3.05; op 4 waits for the load until 6.05, runs to 9.05;
    # a2a5 9.05 -> 9.60; op 7 9.60 -> 10.60
    assert rep.step_ms == pytest.approx(10.60)


def test_steady_call_without_carried_units_is_the_one_call_model() -> None:
    # the warm-start simulation runs three calls; with nothing carried each is the cold call
    ops = _two_all_to_alls()
    unit = [UnitWindow(3 * MS, False, load_at=2, wait_at=4, release_after=4)]
    costs = op_costs(ops, 1e-3, 1.0, p2p_gbps=1.0, nvlink=False)
    steady = simulate_steady(costs, unit, [None], h2d_gbps=1.0)
    assert steady.step_ms == pytest.approx(15.10)  # the hand figure above
    assert steady.collective_stall_ms == pytest.approx(5.10)


def test_link_options_change_nothing_without_collectives() -> None:
    g = chain_graph(6, weight_bytes=4 * 2**20, act_bytes=2**20)
    base = PlanOptions(max_vram_bytes=128 * 2**20, reserve_bytes=0, h2d_gbps=1.0)
    other = dataclasses.replace(base, p2p_gbps=1.0, nvlink=True)
    a, b = build_plan(g, base), build_plan(g, other)
    assert a.fingerprint == b.fingerprint  # and old plans keep their digest
    assert a.predicted_step_ms == b.predicted_step_ms and a.units == b.units
    assert a.predicted_collective_ms == 0.0 == a.predicted_collective_stall_ms


def test_planner_prices_a_rank_graph_with_its_collectives() -> None:
    # the hand graph as a plan-able IR without weights, so without loads: op 0 runs 0 -> 2, a2a1
    # 2 -> 6.05, op 2 2 -> 3, op 3 waits until 6.05, op 4 6.05 -> 9.05, a2a5 9.05 -> 11.10,
    # op 6 waits, op 7 11.10 -> 12.10 (the NVLink figure above: without copies nothing is shared)
    ops = tuple(_two_all_to_alls())
    ir = GraphIR(ops=ops, weights=(), buffers=(), inputs=())
    opts = PlanOptions(max_vram_bytes=2**30, reserve_bytes=0, compute_tflops=1e-3, device_mem_gbps=1.0,
                       p2p_gbps=1.0)  # fmt: skip
    plan = build_plan(ir, opts)
    assert plan.predicted_step_ms == pytest.approx(12.10)
    assert plan.predicted_collective_stall_ms == pytest.approx(3.05 + 2.05)
    assert plan.predicted_collective_ms == pytest.approx(6.10)
    assert plan.p2p_gbps == 1.0 and plan.nvlink is False


# --------------------------------------------------------------------------- brute force in ticks
def _ticks(
    durations: list[int],
    colls: dict[int, tuple[int, int]],  # issue op -> (wait op, ticks)
    loads: list[tuple[int, int, int]],  # (load_at, wait_at, ticks), in unit order
    nvlink: bool,
) -> int:
    """Step time by advancing one tick at a time: a queue per link resource, compute op by op."""
    n = len(durations)
    shared: list[list[int]] = []  # FIFO of [ticks left, id]; loads and collectives when not nvlink
    own: list[list[int]] = []  # collectives with NVLink
    done: set[int] = set()  # ids: ("load", k) -> k, ("coll", i) -> 1000 + i
    issued_loads: set[int] = set()
    issued_coll: set[int] = set()
    t, i, left = 0, 0, None
    while True:
        # everything compute can do at this instant
        while i < n and left is None:
            for k, (la, _, d) in enumerate(loads):
                if la == i and k not in issued_loads:
                    issued_loads.add(k)
                    shared.append([d, k])
            if any(wa == i and k not in done for k, (_, wa, _) in enumerate(loads)):
                break
            if i in colls and i not in issued_coll:
                issued_coll.add(i)
                (own if nvlink else shared).append([colls[i][1], 1000 + i])
            if any(w == i and 1000 + c not in done for c, (w, _) in colls.items()):
                break
            if durations[i] == 0:
                i += 1
            else:
                left = durations[i]
        if i >= n:
            return t
        # one tick: compute, and the head of each queue
        t += 1
        if left is not None:
            left -= 1
            if left == 0:
                left = None
                i += 1
        for q in (shared, own):
            if q:
                q[0][0] -= 1
                if q[0][0] == 0:
                    done.add(q.pop(0)[1])


@pytest.mark.parametrize("nvlink", [False, True])
def test_brute_force_ticks_agree(nvlink: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # a latency of 1 ms, all rates 1 GB/s and whole-ms sizes: every event falls on a tick
    monkeypatch.setattr(simulate, "COLLECTIVE_LATENCY_MS", 1.0)
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(3, 12)
        durations = [rng.randint(0, 3) for _ in range(n)]
        colls: dict[int, tuple[int, int]] = {}
        for _ in range(rng.randint(0, 3)):
            a = rng.randrange(n - 1)
            w = rng.randrange(a + 1, n)
            if (
                a in colls
                or any(a == x[0] for x in colls.values())
                or w in colls
                or w in {x[0] for x in colls.values()}
            ):
                continue
            colls[a] = (w, 1 + rng.randint(0, 4))  # latency 1 + bytes
        ops = []
        for i, d in enumerate(durations):
            if i in colls:
                ops.append(_a2a(f"c{i}", (colls[i][1] - 1) * MS))
                durations[i] = 0
            elif any(w == i for w, _ in colls.values()):
                src = next(c for c, (w, _) in colls.items() if w == i)
                ops.append(_wait(f"w{i}", src, 0))
                durations[i] = 0
            else:
                ops.append(_compute(f"o{i}", d))
        loads = []
        for _ in range(rng.randint(0, 3)):
            la = rng.randrange(n)
            loads.append((la, rng.randrange(la, n), rng.randint(1, 4)))
        loads.sort(key=lambda x: x[0])  # units issued in order, as the planner's schedules are
        windows = [UnitWindow(d * MS, False, la, wa, wa) for la, wa, d in loads]
        costs = op_costs(ops, 1e-3, 1.0, p2p_gbps=1.0, nvlink=nvlink)
        got = simulate_time(costs, windows, h2d_gbps=1.0).step_ms
        assert got == pytest.approx(_ticks(durations, colls, loads, nvlink)), (ops, loads)


# --------------------------------------------------------------------------- analyse
def test_analyse_records_all_to_all_bytes_on_a_sharded_tiny_wan() -> None:
    torch = pytest.importorskip("torch")
    from fxswap.models import wan
    from fxswap.parallel import sharded_ir

    cfg = wan.tiny_config("t2v", num_layers=1, dim=128, ffn_dim=256, num_heads=4)
    model = wan.build(cfg, device="meta", dtype=torch.bfloat16)
    inputs = wan.example_inputs(model.config, frames=5, height=64, width=64, device="meta",
                                dtype=torch.bfloat16)  # fmt: skip
    single, shard, _ = sharded_ir(model, inputs, 2)
    assert not any(o.collective for o in single.ops)
    # by hand: latent frames 1 + (5 - 1) / 4 = 2, 64 / 8 = 8 x 8 latent pixels, patches (1, 2, 2):
    # 2 * 4 * 4 = 32 tokens, 16 per rank. Self-attention q, k, v and its output are
    # [1, 4 heads, 16, 32] bf16 on a rank = 4096 bytes, half of it sent and half received.
    tokens = 2 * (64 // 8 // 2) ** 2
    assert cfg.dim // cfg.num_heads == 32
    per = 1 * 4 * (tokens // 2) * 32 * 2
    a2a = [o for o in shard.ops if o.collective == "all_to_all"]
    assert [(o.sent_bytes, o.received_bytes) for o in a2a[:4]] == [(per // 2, per // 2)] * 4
    # the gather before the unpatchify: the rank's [1, 16, out_dim * 4] head output, repeated
    # twice and half of it sent
    head = 1 * (tokens // 2) * cfg.out_dim * 4 * 2
    assert (a2a[4].sent_bytes, a2a[4].received_bytes) == (head, head)
    assert len(a2a) == 5
    index = {o.name: i for i, o in enumerate(shard.ops)}
    waits = [o for o in shard.ops if o.collective == "wait"]
    assert sorted(o.waits_on for o in waits) == sorted(index[o.name] for o in a2a)
    assert all(shard.ops[w.waits_on].collective == "all_to_all" for w in waits)
